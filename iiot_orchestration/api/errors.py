"""One error envelope for every 4xx and 5xx: ``{"error": {code, message, request_id, details}}``.

Handlers raise ``ApiError`` (or one of its helpers); FastAPI's validation errors, Starlette's
HTTP errors and anything unexpected are turned into the same envelope by ``install``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from iiot_orchestration.api import API_PREFIX

log = logging.getLogger("iiot.api")

# status -> the code a client can branch on when the handler names none
DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, for programs: not_found, rate_limited, ...")
    message: str = Field(description="For people; never names another tenant's data.")
    request_id: str = Field(description="Also in the X-Request-ID header and the server's log.")
    details: Any = Field(default=None, description="Per-field problems of a validation error.")


class ErrorEnvelope(BaseModel):
    error: ErrorBody


_ERROR_TEXT = {
    400: "Bad request (a damaged cursor, a missing X-IIOT-Tenant for a platform key, ...)",
    401: "No key, or an unknown, revoked or expired one",
    403: "The key's role is below what the operation needs",
    404: "Not found, or another tenant's: the two are indistinguishable",
    409: "Conflict with the current state",
    413: "Request body, or export, larger than allowed",
    415: "Unsupported media type",
    422: "Validation error: details name each field",
    429: "Rate limit of the key exceeded: retry after Retry-After seconds",
    500: "Internal error: quote the request_id",
    503: "The database is unavailable: retry after Retry-After seconds",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text} for status, text in _ERROR_TEXT.items()
}


def keyed_router(tag: str) -> APIRouter:
    """A router under /api/v1 whose operations document the error envelope for every error."""
    return APIRouter(prefix=API_PREFIX, tags=[tag], responses=ERROR_RESPONSES)


class ApiError(Exception):
    """An answer other than success: status, a stable code, a message for people, details."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.message = message
        self.details = details
        self.headers = headers or {}


def not_found(what: str) -> ApiError:
    """The one answer for an id that does not exist *or belongs to another tenant*."""
    return ApiError(404, f"{what} not found", code="not_found")


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or ""


def envelope(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    rid = request_id_of(request)
    body = {"error": {"code": code, "message": message, "request_id": rid, "details": details}}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), "X-Request-ID": rid})


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors():
        details.append(
            {
                "field": ".".join(str(p) for p in error.get("loc", ())),
                "problem": error.get("msg", "invalid"),
                "type": error.get("type", "value_error"),
            }
        )
    return details


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route of the request's path: Starlette's 405 names only the first
    route's, while FastAPI makes one route per operation (GET, PATCH and DELETE of a path)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return envelope(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        first = details[0] if details else {"field": "request", "problem": "invalid"}
        message = f"invalid request: {first['field']}: {first['problem']}"
        return envelope(request, 422, "validation_error", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = DEFAULT_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return envelope(request, exc.status_code, code, message, None, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "unhandled error",
            extra={"request_id": request_id_of(request), "path": request.url.path},
        )
        return envelope(
            request, 500, "internal_error", "internal error; quote the request_id when reporting it"
        )
