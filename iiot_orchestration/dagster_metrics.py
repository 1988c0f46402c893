"""Dagster run outcomes as Prometheus metrics: ``iiot dagster-metrics`` serves them for the
instance in ``DAGSTER_HOME`` (docs/alerts.md)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

WINDOW = timedelta(hours=24)
STATUSES = ("SUCCESS", "FAILURE", "CANCELED", "STARTED", "QUEUED")


class RunOutcomes(Collector):
    """Collected at each scrape: runs per job and status created in the last 24 hours, and the
    time of each job's last successful run."""

    def __init__(self, instance, window: timedelta = WINDOW) -> None:
        self.instance = instance
        self.window = window

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import dagster as dg

        since = datetime.now(UTC) - self.window
        runs = dg.RunsFilter(created_after=since)
        counts = GaugeMetricFamily(
            "iiot_dagster_runs",
            "Dagster runs created in the last 24 hours, by job and status",
            labels=["job", "status"],
        )
        last_success = GaugeMetricFamily(
            "iiot_dagster_last_success_timestamp_seconds",
            "End time of each job's latest successful run",
            labels=["job"],
        )
        seen: dict[tuple[str, str], int] = {}
        for run in self.instance.get_runs(filters=runs):
            key = (run.job_name, run.status.value)
            seen[key] = seen.get(key, 0) + 1
        for (job, status), n in sorted(seen.items()):
            counts.add_metric([job, status], n)
        latest: dict[str, float] = {}
        for record in self.instance.get_run_records(
            filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]), limit=500
        ):
            job = record.dagster_run.job_name
            ended = record.end_time or 0.0
            latest[job] = max(latest.get(job, 0.0), ended)
        for job, ended in sorted(latest.items()):
            last_success.add_metric([job], ended)
        yield counts
        yield last_success


def registry_for(instance) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RunOutcomes(instance))
    return registry


def serve(instance, host: str, port: int) -> None:  # pragma: no cover
    """Serve /metrics until interrupted."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry_for(instance))
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
        thread.join(5)
