"""The parent of ``iiot ingest --processes N``: runs slots 0..N-1 and keeps them running.

A slot that dies without being asked to (killed, crashed, its writer process gone) is started
again after a delay that doubles while it keeps dying soon after its start, so a slot that
cannot start is not restarted in a tight loop; one that exits with a configuration error
(exit 2) stops them all, since it would fail the same way again. SIGTERM or Ctrl-C stop every
slot, which drain first, and nothing is restarted meanwhile.

A slot watches its parent (``watch_parent``) and stops, draining, when the parent is gone, even
after SIGKILL: no orphan keeps the slots' client ids or metrics ports from a new parent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge

from iiot_orchestration.errors import IiotError
from ingest_daemon.metrics import serve

log = logging.getLogger(__name__)

EXIT_CONFIGURATION = 2  # a slot's usage or configuration error: every slot stops
RESTART_DELAY_S = 1.0  # the first restart of a slot; doubles while it keeps dying
RESTART_DELAY_MAX_S = 30.0
STEADY_AFTER_S = 60.0  # a slot that ran this long before dying restarts after the first delay
POLL_S = 0.2
PARENT_POLL_S = 0.5
# a slot stopped by the stop signal before it could install its handler has nothing to drain
_CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)


class SupervisorError(IiotError):
    """The parent could not start (its metrics port)."""


class SupervisorMetrics:
    """The parent's own figures; each slot serves its own on its port."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "iiot_ingest_slot_restarts",
            "Slots started again after they died without being asked to stop",
            ["slot"],
            registry=self.registry,
        )
        self.running = Gauge(
            "iiot_ingest_slots_running", "Slot processes running", registry=self.registry
        )


@dataclass
class Slot:
    number: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    delay: float = RESTART_DELAY_S  # before its next restart
    restart_at: float | None = None  # dead, and started again at this monotonic time


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


class Supervisor:
    """Runs ``command --slot k --supervisor-pid <ours>`` for each slot k (an ``iiot ingest``)."""

    def __init__(
        self,
        command: list[str],
        processes: int,
        *,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        self.command = command
        self.slots = [Slot(number) for number in range(processes)]
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.metrics = SupervisorMetrics()
        for slot in self.slots:
            self.metrics.restarts.labels(str(slot.number))  # every slot's series, from 0

    def run(self, stop: threading.Event) -> int:
        """Keep the slots running until ``stop`` is set, then stop them and wait for them: 0
        when they all drained. A slot's configuration error stops them all: ``EXIT_CONFIGURATION``.
        """
        http = self._serve()
        try:
            for slot in self.slots:
                self._start(slot)
            while not stop.wait(POLL_S):
                failed = self._tend()
                if failed is not None:
                    self._stop_all()
                    return failed
            return self._stop_all()
        finally:
            if http is not None:
                http.shutdown()
                http.server_close()

    def _serve(self) -> ThreadingHTTPServer | None:
        if self.metrics_port is None:
            return None
        try:
            return serve(self.metrics, self.metrics_port, self._all_running, self.metrics_host)
        except OSError as exc:
            raise SupervisorError(
                f"cannot serve the supervisor's metrics on {self.metrics_host}:"
                f"{self.metrics_port} ({exc.strerror or exc}): choose another "
                "--supervisor-metrics-port, or 0 to turn them off"
            ) from None

    def _all_running(self) -> bool:
        return all(slot.process is not None for slot in self.slots)

    def _start(self, slot: Slot) -> None:
        command = [*self.command, "--slot", str(slot.number), "--supervisor-pid", str(os.getpid())]
        slot.process = subprocess.Popen(command)
        slot.started = time.monotonic()
        slot.restart_at = None

    def _tend(self) -> int | None:
        """Note the slots that died and start those whose delay is over; a configuration
        error's exit code when a slot exited with one."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is not None:
                code = slot.process.poll()
                if code is None:
                    continue
                slot.process = None
                ran = now - slot.started
                if code == EXIT_CONFIGURATION:
                    log.error(
                        "slot %d exited with a configuration error (exit %d): stopping every slot",
                        slot.number,
                        code,
                        extra={"slot": slot.number, "exit_code": code},
                    )
                    return code
                if ran >= STEADY_AFTER_S:
                    slot.delay = RESTART_DELAY_S
                log.warning(
                    "slot %d %s after %.1f s; restarting it in %g s",
                    slot.number,
                    exit_description(code),
                    ran,
                    slot.delay,
                    extra={"slot": slot.number, "exit_code": code, "restart_in_s": slot.delay},
                )
                slot.restart_at = now + slot.delay
                slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX_S)
            elif slot.restart_at is not None and now >= slot.restart_at:
                self.metrics.restarts.labels(str(slot.number)).inc()
                self._start(slot)
                log.info("slot %d restarted", slot.number, extra={"slot": slot.number})
        self.metrics.running.set(sum(slot.process is not None for slot in self.slots))
        return None

    def _stop_all(self) -> int:
        """SIGTERM to every running slot (each drains), then wait for them all; nothing is
        restarted. 0 when each drained, else the first failure's exit code (1 for a signal)."""
        running = [slot.process for slot in self.slots if slot.process is not None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = [process.wait() for process in running]
        for slot in self.slots:
            slot.process = slot.restart_at = None
        self.metrics.running.set(0)
        failed = [code for code in codes if code not in _CLEAN_EXITS]
        if not failed:
            return 0
        return failed[0] if failed[0] > 0 else 1


def watch_parent(parent_pid: int, stop: threading.Event) -> threading.Thread:
    """In a slot: set ``stop`` once the supervising process ``parent_pid`` is gone, so that the
    slot drains (acknowledging only what was committed) and exits instead of living on as an
    orphan. Polling ``os.getppid()`` sees the parent go however it died, SIGKILL included;
    unlike ``PR_SET_PDEATHSIG`` it needs no Linux call and does not depend on which of the
    parent's threads started the slot."""

    def watch() -> None:
        while not stop.wait(PARENT_POLL_S):
            if os.getppid() != parent_pid:
                log.warning(
                    "the supervising process %d is gone: stopping",
                    parent_pid,
                    extra={"supervisor_pid": parent_pid},
                )
                stop.set()

    thread = threading.Thread(target=watch, name="watch-supervisor", daemon=True)
    thread.start()
    return thread
