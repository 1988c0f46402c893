"""Dagster runs the API launches and polls, through Dagster's GraphQL client and the webserver
(``IIOT_DAGSTER_HOST``, ``IIOT_DAGSTER_PORT``: the one `iiot dev` starts).

Only the client's public calls are used: ``submit_job_execution`` and ``get_run_status``.
``dagster_graphql`` is imported on first use, so that serving the rest of the API never loads
Dagster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from iiot_orchestration.api.errors import ApiError

log = logging.getLogger("iiot.api")

# the webserver's own address when it listens on every interface
_WILDCARDS = {"0.0.0.0", "::", ""}  # noqa: S104 - compared with, never bound
TIMEOUT_SECONDS = 30
# Dagster's run statuses by what a client waits for
STATES = {
    "QUEUED": "queued",
    "NOT_STARTED": "queued",
    "MANAGED": "queued",
    "STARTING": "running",
    "STARTED": "running",
    "CANCELING": "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "CANCELED": "canceled",
}
FINISHED = {"succeeded", "failed", "canceled"}
_NOT_FOUND = {"RunNotFoundError", "PipelineRunNotFoundError"}


class DagsterUnavailable(ApiError):
    """The webserver cannot be reached or refused the request: a 503 that says so."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message, code="dagster_unavailable")


@dataclass(frozen=True)
class DagsterRuns:
    host: str
    port: int
    timeout: int = TIMEOUT_SECONDS

    @property
    def hostname(self) -> str:
        host = "127.0.0.1" if self.host in _WILDCARDS else self.host
        return f"[{host}]" if ":" in host else host

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"

    def _client(self) -> Any:
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(self.hostname, port_number=self.port, timeout=self.timeout)

    def _unavailable(self, doing: str, exc: Exception) -> DagsterUnavailable:
        log.warning(
            "dagster request failed",
            extra={"doing": doing, "dagster": self.address, "error": repr(exc)[:500]},
        )
        return DagsterUnavailable(
            f"Dagster is unavailable: {doing} failed at the webserver {self.address} "
            "(IIOT_DAGSTER_HOST, IIOT_DAGSTER_PORT); try again later"
        )

    def launch(self, job: str, tags: dict[str, str]) -> str:
        """A run of ``job`` with ``tags`` (its partition among them): its run id."""
        try:
            return self._client().submit_job_execution(job, tags=tags)
        except Exception as exc:  # the client wraps every failure, connection errors included
            raise self._unavailable(f"launching {job}", exc) from None

    def state(self, run_id: str) -> tuple[str, str] | None:
        """(our state, Dagster's status) of a run; None when Dagster does not know it."""
        from dagster_graphql import DagsterGraphQLClientError

        try:
            status = self._client().get_run_status(run_id)
        except DagsterGraphQLClientError as exc:
            if exc.args and exc.args[0] in _NOT_FOUND:
                return None
            raise self._unavailable("reading a run's status", exc) from None
        except Exception as exc:
            raise self._unavailable("reading a run's status", exc) from None
        return STATES.get(status.value, "running"), status.value
