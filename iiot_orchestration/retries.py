"""Step retries of the nightly assets: transient failures only, with exponential backoff.

Dagster's ``RetryPolicy`` retries every exception an asset raises (all but a
``Failure(allow_retries=False)``), so a bad input such as a ``BillingError`` would be retried as
often as a dropped connection. ``retry_transient`` wraps an asset's function instead: a transient
error (the database connection lost, a deadlock, dbt reporting a lost connection) becomes a
``RetryRequested`` whose delay the policy computes; anything else fails the step at once, as
before. Docs: docs/operations.md, "Retries".
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg
import psycopg

from iiot_orchestration.settings import Settings, load_settings

MARKER = "retries_transient"
# libpq's words for a lost or refused connection, as dbt repeats them in its own errors
_CONNECTION_LOST = re.compile(
    r"server closed the connection unexpectedly|terminating connection due to administrator"
    r"|connection to server at .* failed|could not connect to server|SSL SYSCALL error"
    r"|the database system is (starting up|shutting down|in recovery mode)",
    re.IGNORECASE,
)
F = TypeVar("F", bound=Callable[..., Any])


def policy(settings: Settings) -> dg.RetryPolicy:
    """IIOT_RETRY_MAX retries, waiting IIOT_RETRY_DELAY_SECONDS x 2^(attempt-1) +-50 %."""
    return dg.RetryPolicy(
        max_retries=settings.retry_max,
        delay=settings.retry_delay_seconds,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


def is_transient(error: BaseException) -> bool:
    """True when ``error`` or one of its causes is a failure a later attempt can outlive."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # OperationalError: connection lost or refused, admin shutdown, deadlock, serialization
        if isinstance(current, psycopg.OperationalError):
            return True
        if not isinstance(current, psycopg.Error) and _CONNECTION_LOST.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _retry_request() -> dg.RetryRequested:
    retry_policy = policy(load_settings())
    attempt = dg.OpExecutionContext.get().retry_number + 1
    return dg.RetryRequested(
        max_retries=retry_policy.max_retries,
        seconds_to_wait=retry_policy.calculate_delay(attempt),
    )


def retry_transient(fn: F) -> F:
    """Retries the asset function ``fn`` after a transient error (see ``is_transient``)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def steps(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from fn(*args, **kwargs))
            except Exception as exc:
                if is_transient(exc):
                    raise _retry_request() from exc
                raise

        wrapper: Any = steps
    else:

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if is_transient(exc):
                    raise _retry_request() from exc
                raise

        wrapper = call
    setattr(wrapper, MARKER, True)
    return wrapper
