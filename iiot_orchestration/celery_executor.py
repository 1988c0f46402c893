"""The executor of every job: Dagster's default (each step a subprocess of the run, on the run's
host) or, with ``IIOT_DAGSTER_EXECUTOR=celery``, dagster-celery's, which sends each step to a
Celery worker through RabbitMQ (docs/operations.md, "Dagster on several hosts").

Steps exchange nothing through files: every asset returns a ``MaterializeResult`` (no output for
an IO manager to store) and reads and writes PostgreSQL, so a worker needs the database, the
broker and the storage roots, never another host's disk. The variables are read here, once per
code location load, as Dagster's ``env:`` source has no default."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

EXECUTOR_VARIABLE = "IIOT_DAGSTER_EXECUTOR"
BROKER_VARIABLE = "IIOT_CELERY_BROKER_URL"
QUEUE_VARIABLE = "IIOT_CELERY_QUEUE"
EXECUTORS = ("default", "celery")
DEFAULT_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
DEFAULT_QUEUE = "dagster"


class ExecutorSettingError(ValueError):
    """An IIOT_DAGSTER_EXECUTOR or IIOT_CELERY_* value the code location cannot start with."""


def celery_config(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The celery executor's configuration: the broker, results over the broker (``rpc://``: no
    result store to share), one task prefetched a worker and acknowledged after the step, so a
    worker that dies mid-step leaves it to another."""
    broker = env.get(BROKER_VARIABLE, "").strip() or DEFAULT_BROKER
    if not broker.startswith(("amqp://", "amqps://", "pyamqp://")):
        raise ExecutorSettingError(
            f"{BROKER_VARIABLE} must be an AMQP URL (amqp://user:password@host:5672/vhost), "
            f"not {broker!r}"
        )
    queue = env.get(QUEUE_VARIABLE, "").strip() or DEFAULT_QUEUE
    if not queue.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ExecutorSettingError(
            f"{QUEUE_VARIABLE} must be letters, digits, '.', '_' or '-', not {queue!r}"
        )
    return {
        "broker": broker,
        "backend": "rpc://",
        "config_source": {
            "task_default_queue": queue,
            "worker_prefetch_multiplier": 1,
            "task_acks_late": True,
            "broker_connection_retry_on_startup": True,
        },
    }


def job_executor(env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition | None:
    """The executor ``IIOT_DAGSTER_EXECUTOR`` names; None (Dagster's default) when unset."""
    name = env.get(EXECUTOR_VARIABLE, "").strip().lower() or "default"
    if name not in EXECUTORS:
        raise ExecutorSettingError(
            f"{EXECUTOR_VARIABLE} must be one of {', '.join(EXECUTORS)}, not {name!r}"
        )
    if name == "default":
        return None
    from dagster_celery import celery_executor

    return celery_executor.configured(celery_config(env), name="celery")
