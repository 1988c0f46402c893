"""The FastAPI application of `iiot api`: middleware, error envelope, routes, OpenAPI."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iiot_orchestration.api import API_PREFIX, errors
from iiot_orchestration.api.context import TokenBuckets, make_async_pool, make_pool
from iiot_orchestration.settings import Settings

log = logging.getLogger("iiot.api")
VERSION = "1.0.0"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

DESCRIPTION = """\
The tenant API of the IIoT telemetry platform: devices, telemetry, consumption, exports,
invoices, reports and alerts of **one tenant per request**, chosen by the API key alone.

Authenticate with `Authorization: Bearer iiot_<prefix>_<secret>` (`iiot api-keys create`).
Every error has one shape: `{"error": {"code", "message", "request_id", "details"}}`, and every
response carries `X-Request-ID`. Lists are paginated with `limit` and `cursor`
(`next_cursor` of the previous page). See docs/api.md for examples and the versioning policy.
"""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "iiot_api_requests",
            "API requests by route template, method and status",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "iiot_api_request_duration_seconds",
            "Time from the request to the end of the response, by route template and method",
            ("route", "method"),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )


class RequestMiddleware:
    """Request id, body size limit, metrics and one access-log line per request.

    A pure ASGI middleware, so that streamed exports are measured to their last byte and a body
    too large is refused while it is still arriving."""

    def __init__(self, app: ASGIApp, max_body: int, metrics: Metrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = offered if 0 < len(offered) <= 64 and set(offered) <= _REQUEST_ID_OK else ""
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                raw = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message["headers"] = [*raw, (b"x-request-id", rid.encode())]
            await send(message)

        too_large = self._too_large(headers)
        receive_from = receive
        if not too_large and b"content-length" not in headers and scope["method"] in _BODY_METHODS:
            # a chunked body: read it whole (up to the limit) before the application sees it
            too_large, receive_from = await self._buffer(receive)
        try:
            if too_large:
                await self._refuse(scope, rid, too_large, send_with_id)
            else:
                await self._call(scope, receive_from, send_with_id, status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(template, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(template, scope["method"]).observe(elapsed)
            log.info(
                "%s %s %s %.1f ms",
                scope["method"],
                scope["path"],
                status["code"],
                elapsed * 1000,
                extra={
                    "request_id": rid,
                    "status": status["code"],
                    "route": template,
                    "key_id": scope["state"].get("key_id"),
                },
            )

    async def _call(self, scope: Scope, receive: Receive, send: Send, status: dict) -> None:
        """The application; an unhandled error becomes the 500 envelope here, so that it is
        not re-raised to the server (which would close a kept-alive connection)."""
        started = {"response": False}

        async def tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unhandled error", extra={"request_id": scope["state"].get("request_id")})
            if started["response"]:
                raise  # a stream broke half way: only closing the connection can say so
            from starlette.requests import Request

            response = errors.envelope(
                Request(scope),
                500,
                "internal_error",
                "internal error; quote the request_id when reporting it",
            )
            await response(scope, _empty_receive, send)

    def _too_large(self, headers: dict[bytes, bytes]) -> str:
        length = headers.get(b"content-length")
        if length is None:
            return ""
        try:
            size = int(length)
        except ValueError:
            return "invalid Content-Length"
        if size > self.max_body:
            return f"request body of {size} bytes exceeds the limit of {self.max_body} bytes"
        return ""

    async def _buffer(self, receive: Receive) -> tuple[str, Receive]:
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                return f"request body exceeds the limit of {self.max_body} bytes", receive
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return "", replay

    async def _refuse(self, scope: Scope, rid: str, reason: str, send: Send) -> None:
        from starlette.requests import Request

        code = 400 if reason.startswith("invalid") else 413
        response = errors.envelope(
            Request(scope),
            code,
            errors.DEFAULT_CODES[code],
            reason + ("" if code == 400 else " (IIOT_API_MAX_BODY_BYTES)"),
        )
        await response(scope, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def app_from_environment() -> FastAPI:
    """The application of one `iiot api --workers N` process (uvicorn calls it in each)."""
    from iiot_orchestration.logs import configure_from_environment
    from iiot_orchestration.settings import load_settings

    configure_from_environment("iiot-api")
    return create_app(load_settings())


def create_app(settings: Settings, database_url: str | None = None) -> FastAPI:
    """The API application; the pools open when the server starts and close when it stops."""
    url = database_url or settings.require_database_url()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool.open(wait=False)
        # the hot reads' pool (context.AsyncViewer): made in the server's event loop
        app.state.async_pool = make_async_pool(url)
        await app.state.async_pool.open(wait=False)
        try:
            yield
        finally:
            await app.state.async_pool.close()
            app.state.pool.close()

    app = FastAPI(
        title="IIoT telemetry platform: tenant API",
        version=VERSION,
        description=DESCRIPTION,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=f"{API_PREFIX}/redoc",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.pool = make_pool(url)
    # N workers share each key's rate: every process allows its part (requests spread evenly)
    workers = max(1, settings.api_workers)
    app.state.buckets = TokenBuckets(
        settings.api_rate_per_second / workers, max(1, -(-settings.api_rate_burst // workers))
    )
    app.state.metrics = metrics
    errors.install(app)
    from iiot_orchestration.api.routes import include_all

    include_all(app)
    app.add_middleware(RequestMiddleware, max_body=settings.api_max_body_bytes, metrics=metrics)
    return app
