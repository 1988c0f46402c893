"""The API's routes: every module of this package with a ``router`` is included, in name order.

Each module's router carries its own prefix (``APIRouter(prefix=API_PREFIX)`` for /api/v1; none
for the health and metrics endpoints), so that a route's path is its whole template: the metrics
label requests by it.
"""

from __future__ import annotations

import importlib
import pkgutil

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute


def _required_role(dependant: Dependant) -> str | None:
    for sub in dependant.dependencies:
        name = getattr(sub.call, "__name__", "")
        if name.endswith("_session"):
            return name.removesuffix("_session")
        found = _required_role(sub)
        if found:
            return found
    return None


def include_all(app: FastAPI) -> None:
    """Include every router; each operation that needs a key names its least role in the
    OpenAPI document as ``x-iiot-role`` (viewer, editor, admin or platform)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        router = getattr(module, "router", None)
        if router is None:
            continue
        for route in router.routes:
            if isinstance(route, APIRoute):
                role = _required_role(route.dependant)
                if role:
                    route.openapi_extra = {**(route.openapi_extra or {}), "x-iiot-role": role}
        app.include_router(router)
