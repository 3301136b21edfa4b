"""Every route answers as its OpenAPI schema says, and fuzzing the whole schema finds no 5xx, with auth
off and with auth on (a tokens file: the schema itself, and every generated request, carry a token)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.server.api.conftest import GOOD_TOKEN, Running

AUTH = {"Authorization": f"Bearer {GOOD_TOKEN}"}


@pytest.fixture(scope="session")
def api_schema(server: Running) -> Any:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


@pytest.fixture(scope="session")
def auth_api_schema(auth_server: Running) -> Any:
    return schemathesis.openapi.from_url(f"{auth_server.base_url}/openapi.json", headers=AUTH)


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
    ("/v1/datasets/{name}/batch", "POST", {"name": "beta"}, {}, {"indices": [1], "columns": ["response_ids"]}, 200),
    ("/v1/datasets/{name}/batch", "POST", {"name": "beta"}, {}, {"indices": [1], "columns": ["teacher_topk_ids"]}, 422),
    ("/v1/datasets/{name}/batch", "POST", {"name": "beta"}, {}, {"indices": [1], "columns": ["logits"]}, 422),
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


def fuzz(schema: Any, path: str, method: str, mode: str, max_examples: int, headers: dict[str, str] | None) -> None:
    generation_mode, real_name = MODES[mode]
    fixed = {"path_parameters": {"name": "alpha"}} if real_name else {}
    strategy = schema[path][method].as_strategy(generation_mode=generation_mode, **fixed)

    @given(case=strategy)
    @settings(max_examples=max_examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        # Not `positive_data_acceptance`: whether an index is in range, or a batch within the server's
        # limits, depends on the dataset and the settings, which a schema cannot say (422 and 413 then).
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    run()


@pytest.mark.parametrize(("path", "method", "mode"), FUZZ)
def test_fuzz_whole_schema_no_server_errors(api_schema: Any, path: str, method: str, mode: str) -> None:
    """Generated valid and invalid requests: no 5xx, and every answer matches the schema."""
    fuzz(api_schema, path, method, mode, 25, None)


@pytest.mark.parametrize(("path", "method", "mode"), FUZZ)
def test_fuzz_with_auth_on(auth_api_schema: Any, path: str, method: str, mode: str) -> None:
    """The same behind a tokens file, each request with a token (schemathesis' own `ignored_auth` check
    also sends some without one and expects them refused)."""
    fuzz(auth_api_schema, path, method, mode, 10, AUTH)


def test_with_auth_on_the_schema_declares_bearer_and_every_private_operation_is_401_without(
    auth_api_schema: Any, auth_server: Running
) -> None:
    raw = auth_api_schema.raw_schema
    assert raw["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "description": "A token from the server's tokens file.",
        "scheme": "bearer",
    }
    for path, method, path_parameters, query, body, _ in CALLS:
        operation = auth_api_schema[path][method]
        public = path in ("/livez", "/readyz", "/")
        assert bool(operation.definition.raw.get("security")) != public, path
        kwargs: dict[str, Any] = {"path_parameters": path_parameters, "query": query}
        if body is not None:
            kwargs.update(body=body, media_type="application/json")
        response = operation.Case(**kwargs).call()
        if not public:
            assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized", path
