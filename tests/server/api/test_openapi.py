"""Every route answers as its OpenAPI schema says, and fuzzing the whole schema finds no 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.server.api.conftest import Running


@pytest.fixture(scope="session")
def api_schema(server: Running) -> Any:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


# (path template, method, path parameters, query, body, expected status)
CALLS: list[tuple[str, str, dict[str, Any], dict[str, Any], Any, int]] = [
    ("/livez", "GET", {}, {}, None, 200),
    ("/readyz", "GET", {}, {}, None, 200),
    ("/", "GET", {}, {}, None, 200),
    ("/metrics", "GET", {}, {}, None, 200),
    ("/v1/datasets", "GET", {}, {}, None, 200),
    ("/v1/datasets/{name}", "GET", {"name": "alpha"}, {}, None, 200),
    ("/v1/datasets/{name}", "GET", {"name": "alpha"}, {"version": 1}, None, 200),
    ("/v1/datasets/{name}", "GET", {"name": "nope"}, {}, None, 404),
    ("/v1/datasets/{name}", "GET", {"name": "alpha"}, {"version": 9}, None, 404),
    ("/v1/datasets/{name}", "GET", {"name": "-bad-"}, {}, None, 422),
    ("/v1/datasets/{name}/samples/{index}", "GET", {"name": "beta", "index": 7}, {}, None, 200),
    ("/v1/datasets/{name}/samples/{index}", "GET", {"name": "beta", "index": 40}, {}, None, 422),
    ("/v1/datasets/{name}/batch", "POST", {"name": "beta"}, {}, {"indices": [1, 2]}, 200),
    ("/v1/datasets/{name}/batch", "POST", {"name": "beta"}, {}, {"indices": [0] * 257}, 413),
    ("/v1/datasets/{name}/batch", "POST", {"name": "beta"}, {}, {"indices": [1], "version": 0}, 422),
    ("/v1/datasets/{name}/coverage", "GET", {"name": "alpha"}, {}, None, 200),
    ("/v1/datasets/{name}/consistency", "GET", {"name": "alpha"}, {}, None, 200),
    ("/v1/datasets/{name}/consistency", "GET", {"name": "zeta"}, {}, None, 404),
]


@pytest.mark.parametrize(("path", "method", "path_parameters", "query", "body", "status"), CALLS)
def test_route_answers_per_schema(
    api_schema: Any, path: str, method: str, path_parameters: dict, query: dict, body: Any, status: int
) -> None:
    operation = api_schema[path][method]
    kwargs: dict[str, Any] = {"path_parameters": path_parameters, "query": query}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = operation.Case(**kwargs)
    for accept in ("application/json", None):  # the batch route has two representations
        response = case.call(headers={"Accept": accept} if accept else None)
        assert response.status_code == status, response.text
        case.validate_response(response)  # status documented, content type listed, body matches its schema
        if status >= 400:
            assert set(response.json()["error"]) == {"type", "message"}


def test_schema_reuses_storage_models(api_schema: Any) -> None:
    components = api_schema.raw_schema["components"]["schemas"]
    names = {n.removesuffix("-Output") for n in components}
    assert {"Manifest", "CoverageStats", "ConsistencyStats", "ErrorResponse", "BatchRequest", "Sample"} <= names


OPERATIONS = sorted({(path, method) for path, method, *_ in CALLS})


def test_fuzz_covers_every_operation(api_schema: Any) -> None:
    listed = {(op.ok().path, op.ok().method.upper()) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


# schemathesis' own pytest loader (`from_fixture`) does not run under pytest 9, so each operation's
# strategy is driven by hypothesis directly; the checks are schemathesis' defaults.
MODES = {
    "positive": (GenerationMode.POSITIVE, False),
    "negative": (GenerationMode.NEGATIVE, False),
    "positive-real-name": (GenerationMode.POSITIVE, True),  # a real dataset: indices, versions, bodies go deep
}
FUZZ = [
    (path, method, mode)
    for path, method in OPERATIONS
    for mode in MODES
    if mode == "positive" or "{name}" in path  # only operations with inputs have invalid ones
]


@pytest.mark.parametrize(("path", "method", "mode"), FUZZ)
def test_fuzz_whole_schema_no_server_errors(api_schema: Any, path: str, method: str, mode: str) -> None:
    """Generated valid and invalid requests: no 5xx, and every answer matches the schema."""
    generation_mode, real_name = MODES[mode]
    fixed = {"path_parameters": {"name": "alpha"}} if real_name else {}
    strategy = api_schema[path][method].as_strategy(generation_mode=generation_mode, **fixed)

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        # Not `positive_data_acceptance`: whether an index is in range, or a batch within the server's
        # limits, depends on the dataset and the settings, which a schema cannot say (422 and 413 then).
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    run()
