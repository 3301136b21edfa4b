"""The HTTP contract (`lopd.http_contract`) is the one source both sides use, and stays light."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lopd.client.http import StoreClient
from lopd.client.types import SampleArrays
from lopd.http_contract import (
    ALL_COLUMNS,
    ARROW_STREAM_MEDIA_TYPE,
    CONTENT_HASH_HEADER,
    DATASET_HEADER,
    INDEX,
    JSON_MEDIA_TYPE,
    MAX_BATCH_INDICES,
    SERVED_COLUMNS,
    VERSION_HEADER,
    ErrorResponse,
    ErrorType,
    Sample,
    error_body,
    read_error,
)
from lopd.server.api.encoding import ALL_SCHEMA, SERVED_SCHEMA
from lopd.server.api.settings import ServerSettings
from lopd.storage.schema import SAMPLE_SCHEMA, sample_schema

ROOT = Path(__file__).resolve().parents[1]


def test_a_sample_has_the_same_fields_everywhere():
    fields = (INDEX, *ALL_COLUMNS)
    assert tuple(Sample.model_fields) == fields  # the JSON model
    assert tuple(f.name for f in dataclasses.fields(SampleArrays)) == fields  # the client's decoded form
    assert tuple(SERVED_SCHEMA.names) == SERVED_COLUMNS  # the Arrow stream the server writes by default
    assert SERVED_SCHEMA.equals(SAMPLE_SCHEMA)  # every column of a store without top-k is served, typed as stored
    assert ALL_SCHEMA.equals(sample_schema(1))  # and of one with top-k, when asked for


def test_the_client_asks_within_the_servers_default_limit(tmp_path):
    assert StoreClient("http://h").max_indices_per_request == ServerSettings(store=tmp_path).max_batch_indices


@pytest.mark.parametrize("type_", list(ErrorType))
def test_error_body_round_trips(type_):
    body = error_body(type_, "what was wrong")
    assert ErrorResponse.model_validate(body).error.type is type_
    assert read_error(body) == (type_.value, "what was wrong")


def test_read_error_is_lenient():
    assert read_error({"error": {"type": "teapot", "message": 3}}) == ("teapot", "3")
    assert read_error({"error": {}}) == (None, "no message")
    for not_one in (None, [], "error", {"detail": "x"}, {"error": "plain"}):
        assert read_error(not_one) is None


def test_the_contract_module_is_light():
    heavy = ("httpx", "fastapi", "starlette", "torch", "pyarrow", "numpy", "lopd.server", "lopd.storage")
    code = f"import sys, lopd.http_contract; print(sorted(m for m in sys.modules if m.startswith({heavy!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _code_strings(path: Path) -> list[tuple[int, object]]:
    """(line, value) of every constant in a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and id(node) not in docstrings
    ]


def test_neither_side_copies_the_contracts_literals():
    """Media types, header names, error types and the index limit are imported from the contract, never retyped."""
    media = (ARROW_STREAM_MEDIA_TYPE, JSON_MEDIA_TYPE)
    exact = {h.lower() for h in (DATASET_HEADER, VERSION_HEADER, CONTENT_HASH_HEADER)} | {t.value for t in ErrorType}
    found = []
    for path in sorted((ROOT / "client").glob("*.py")) + sorted((ROOT / "server" / "api").glob("*.py")):
        for line, value in _code_strings(path):
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            is_copy = isinstance(text, str) and (text.lower() in exact or any(m in text for m in media))
            if is_copy or (type(value) is int and value == MAX_BATCH_INDICES):
                found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert found == []
