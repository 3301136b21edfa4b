"""The read-only HTTP API (`lopd serve`): a thin FastAPI layer over `lopd.storage`.

Kept import-free on purpose: the CLI imports `lopd.server.api.command` on every start, and
FastAPI/uvicorn must load only when `lopd serve` actually runs (they ship in the `server` extra).
The contract is docs/http-api.md and the OpenAPI schema at `/openapi.json`.
"""
