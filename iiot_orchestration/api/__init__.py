"""The tenant API: `iiot api` serves /api/v1 over FastAPI on uvicorn (docs/api.md)."""

API_PREFIX = "/api/v1"
