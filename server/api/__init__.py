"""The read-only HTTP API (`lopd serve`): a thin FastAPI layer over `lopd.storage`.

Kept import-free on purpose: the CLI imports `lopd.server.api.command` on every start, and
FastAPI/uvicorn must load only when `lopd serve` actually runs (they ship in the `server` extra).
The contract is `lopd.http_contract` (which the client imports too), summarised in docs/http-api.md
and published as the OpenAPI schema at `/openapi.json`.
"""
