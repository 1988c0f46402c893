"""/health/live, /health/ready and /metrics: no key needed (put them behind the network)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from iiot_orchestration.api.errors import ApiError, ErrorEnvelope

router = APIRouter(tags=["operations"])


@router.get("/health/live", summary="The process answers")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="The database answers and the schema has the API's migration",
    responses={503: {"model": ErrorEnvelope, "description": "Not ready; the error says why"}},
)
def ready(request: Request) -> dict[str, str]:
    try:
        with request.app.state.pool.connection(timeout=5) as conn:
            row = conn.execute(
                "SELECT to_regprocedure('iiot_api_authenticate(bytea,text)') IS NOT NULL"
            ).fetchone()
    except Exception as exc:
        raise ApiError(
            503, f"database unavailable: {type(exc).__name__}", code="unavailable"
        ) from None
    if not row or not row[0]:
        raise ApiError(
            503, "the database lacks the API's migration: run `iiot db migrate`", code="unavailable"
        )
    return {"status": "ready"}


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests and latency by route and status",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # `iiot api --workers N`: every process's counts, summed
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
