"""Celery workers for Dagster's steps, as docs/operations.md ("Dagster on several hosts") starts
them, and which worker ran a step: what the tests and the benchmark of the Celery mode use.

A worker is ``dagster-celery worker start`` with the repository's worker configuration, one
queue, one step at a time; it runs in a session of its own, as the CLI starts Celery as a child
that a signal to the CLI alone would leave behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from iiot_orchestration.celery_executor import QUEUE_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
WORKER_CONFIG = ROOT / "ops" / "dagster" / "celery" / "celery.yaml"
INSTANCE_CONFIG = ROOT / "ops" / "dagster" / "celery" / "dagster.yaml"
DEFINITIONS = "iiot_orchestration.definitions"
# the Celery worker that ran a step, in the engine event dagster-celery logs before it
WORKER_KEY = "Celery worker"


def worker_argv(name: str, queue: str, config: Path = WORKER_CONFIG) -> list[str]:
    """The command of one worker named ``name`` taking one step at a time from ``queue``; it
    loads the code location when it starts (a broken one stops it there), not at its first
    step."""
    cli = Path(sys.executable).with_name("dagster-celery")
    return [
        str(cli), "worker", "start", "-A", "dagster_celery.app", "-y", str(config),
        "-q", queue, "-n", name, "-i", DEFINITIONS,
        "--", "--concurrency=1", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the worker's session (Celery's warm shutdown: the step in hand finishes),
        then SIGKILL if it has not exited within ``timeout`` seconds; its exit code."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        # the CLI exits on the signal; Celery, its child, once the step in hand is done
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def running(self) -> bool:
        """Whether any process of the worker's session is left."""
        self.process.poll()  # reaps the CLI once it exited
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def ready(self) -> bool:
        """Whether Celery says it is consuming (its "ready." line); False once it exited."""
        if self.process.poll() is not None:
            return False
        return b" ready." in self.log.read_bytes()


def start_worker(
    name: str, queue: str, home: Path, workdir: Path, env: Mapping[str, str]
) -> Worker:
    """A worker with its own DAGSTER_HOME (holding the Celery instance configuration) and
    working directory; its output goes to ``<workdir>/worker.log``."""
    home.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(INSTANCE_CONFIG.read_text())
    log = workdir / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            worker_argv(name, queue),
            cwd=workdir,
            env={
                **env,
                # the CLI starts `celery` from PATH: this interpreter's
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
                "DAGSTER_HOME": str(home),
                QUEUE_VARIABLE: queue,
            },
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(name, process, log)


def step_workers(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Which Celery worker ran each step of a run: step key to the worker's name."""
    found = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        data = event.engine_event_data.metadata if event and event.engine_event_data else {}
        if WORKER_KEY in data:
            found[event.step_key] = data[WORKER_KEY].value
    return found
