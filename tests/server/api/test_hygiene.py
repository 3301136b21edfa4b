"""HEAD on GET routes, strict integers, the Host allow-list, private tokens files, no local paths over HTTP."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from lopd.errors import InvalidInput
from lopd.server.api.auth import TokenTable
from lopd.server.api.edge import host_allowed, host_name
from lopd.server.api.redaction import redact_path
from lopd.server.api.settings import ServerSettings
from lopd.storage.manifest import ModelRef, RolloutSource
from lopd.storage.reader import Store
from tests.server.api.conftest import GOOD_TOKEN, TOKENS, Running, running_server, wait_ready
from tests.server.api.test_security import PATH_VALUES, all_routes, assert_error
from tests.utils.factories import provenance, publish_samples, random_samples

# -- HEAD ----------------------------------------------------------------------------------------


def get_paths(app) -> list[str]:
    paths = []
    for route in all_routes(app):
        if "GET" in route.methods:
            paths.append(re.sub(r"{(\w+)}", lambda m: PATH_VALUES[m.group(1)], route.path))
    return paths


@pytest.mark.parametrize("with_token", [True, False])
def test_head_answers_on_every_get_route_as_get_does_without_a_body(auth_server: Running, with_token: bool) -> None:
    paths = get_paths(auth_server.app)
    assert {"/", "/livez", "/readyz", "/metrics", "/openapi.json", "/v1/datasets/beta/samples/3"} <= set(paths)
    headers = {"Authorization": f"Bearer {GOOD_TOKEN}"} if with_token else {}
    with httpx.Client(base_url=auth_server.base_url, headers=headers, timeout=30) as c:
        for path in paths:
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
            assert head.content == b"", path
            same = ("content-type", "content-length", "etag", "www-authenticate")
            if path != "/metrics":  # (its counters move between the two requests)
                assert {h: head.headers.get(h) for h in same} == {h: got.headers.get(h) for h in same}, path


def test_head_on_a_post_only_route_is_405(client: httpx.Client) -> None:
    r = client.head("/v1/datasets/alpha/batch")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""


def test_head_requests_are_counted_under_their_route(server: Running, client: httpx.Client) -> None:
    assert client.head("/v1/datasets/alpha").status_code == 200
    text = client.get("/metrics").text
    pattern = r'lopd_http_requests_total\{lab="anonymous",method="HEAD",route="/v1/datasets/\{name\}",status="200"\}'
    assert re.search(pattern, text), text


# -- strict integers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"indices": ["1"]},
        {"indices": [True]},
        {"indices": [1.0]},
        {"indices": [0, False]},
        {"indices": [1], "version": True},
        {"indices": [1], "version": "1"},
        {"indices": [1], "version": 1.0},
    ],
)
def test_batch_indices_and_versions_are_json_integers_only(client: httpx.Client, body: dict) -> None:
    err = assert_error(client.post("/v1/datasets/alpha/batch", json=body), 422, "invalid_input")
    assert "integer" in err["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/datasets/alpha/samples/1.0",
        "/v1/datasets/alpha/samples/+1",
        "/v1/datasets/alpha/samples/1_0",
        "/v1/datasets/alpha/samples/true",
        "/v1/datasets/alpha/samples/%201",
        "/v1/datasets/alpha?version=1.0",
        "/v1/datasets/alpha?version=%2B1",
        "/v1/datasets/alpha?version=true",
        "/v1/datasets/alpha/coverage?version=1_0",
        "/v1/datasets/alpha/consistency?version=%201",
    ],
)
def test_url_indices_and_versions_are_digits_only(client: httpx.Client, path: str) -> None:
    assert_error(client.get(path), 422, "invalid_input")


def test_plain_integers_still_work(client: httpx.Client) -> None:
    assert client.get("/v1/datasets/alpha/samples/10?version=1").json()["index"] == 10
    assert client.get("/v1/datasets/alpha/samples/010").json()["index"] == 10
    r = client.post(
        "/v1/datasets/alpha/batch", json={"indices": [3, 0], "version": 1}, headers={"Accept": "application/json"}
    )
    assert [s["index"] for s in r.json()["samples"]] == [3, 0]


# -- Host ----------------------------------------------------------------------------------------


def test_host_names_are_parsed_and_matched() -> None:
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1" and host_name("::1") == "::1"
    assert host_name("store") == "store"
    allowed = frozenset({"store", "*.lab.example"})
    assert host_allowed("store", allowed) and host_allowed("a.lab.example", allowed)
    assert not host_allowed("lab.example", allowed) and not host_allowed("store.evil", allowed)


def test_the_allow_list_defaults_to_loopback_names_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert ServerSettings(store=tmp_path).host_allow_list == {"127.0.0.1", "localhost", "::1"}
    assert ServerSettings(store=tmp_path, host="0.0.0.0").host_allow_list is None  # exposed: any, unless listed
    listed = ServerSettings(store=tmp_path, host="0.0.0.0", allowed_hosts=["Store, store.lab.example", "[::1]"])
    assert listed.host_allow_list == {"store", "store.lab.example", "::1"}
    assert ServerSettings(store=tmp_path, allowed_hosts=["*"]).host_allow_list is None
    monkeypatch.setenv("LOPD_ALLOWED_HOSTS", "a.example,b.example")
    assert ServerSettings(store=tmp_path).allowed_hosts == ["a.example", "b.example"]


def test_a_listed_host_is_answered_and_others_are_400(store) -> None:
    settings = ServerSettings(store=store[0], allowed_hosts=["store.lab.example"])
    with running_server(settings) as srv, srv.client() as c:
        assert_error(c.get("/livez"), 400, "invalid_input")  # 127.0.0.1 is not listed
        assert c.get("/livez", headers={"Host": "store.lab.example:8000"}).status_code == 200
        # refused before auth and before the body: the answer closes the connection it did not read
        r = c.post("/v1/datasets/alpha/batch", content=b"x" * 100_000, headers={"Host": "evil.example"})
        assert_error(r, 400, "invalid_input")
        assert r.headers["connection"] == "close"


# -- the tokens file -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_tokens_file_others_can_read_is_refused_unless_allowed(tmp_path: Path, mode: int, caplog) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    path.chmod(mode)
    with pytest.raises(InvalidInput, match=r"can be read by other users .*chmod 600 .*--insecure-tokens-file"):
        TokenTable.from_file(path)
    with caplog.at_level(logging.WARNING):
        assert TokenTable.from_file(path, allow_insecure=True).lab_for(GOOD_TOKEN) == "lab-a"
    assert "can be read by other users" in caplog.text and GOOD_TOKEN not in caplog.text
    path.chmod(0o600)
    assert TokenTable.from_file(path).lab_for(GOOD_TOKEN) == "lab-a"
    path.chmod(0o400)
    assert TokenTable.from_file(path).lab_for(GOOD_TOKEN) == "lab-a"


# -- local paths ---------------------------------------------------------------------------------


def test_redact_path() -> None:
    assert redact_path("/home/alice/models/Qwen3-8B") == "Qwen3-8B"
    assert redact_path("/home/alice/models/Qwen3-8B/") == "Qwen3-8B"
    assert redact_path("~/ckpt/teacher") == "teacher" and redact_path("./ckpt/teacher") == "teacher"
    assert redact_path("C:\\Users\\alice\\teacher") == "teacher"
    assert redact_path("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # a hub name is not a path


SECRET_DIR = "/home/alice/secret-project"


@pytest.fixture(scope="module")
def pathful_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset whose provenance names absolute paths, as `lopd precompute` records them."""
    root = tmp_path_factory.mktemp("pathful")
    base = provenance()
    prov = base.model_copy(
        update={
            "teacher": base.teacher.model_copy(update={"name_or_path": f"{SECRET_DIR}/models/teacher-7b"}),
            "sft_teacher_source": f"{SECRET_DIR}/models/teacher-7b",
            "rollout_policy": ModelRef(name_or_path=f"{SECRET_DIR}/student", fingerprint="sha256:" + "f" * 64),
            "rollouts": RolloutSource(
                paths=[f"{SECRET_DIR}/data/rollouts-0.jsonl", "data/rollouts-1.jsonl"],
                fingerprint="sha256:" + "d" * 64,
                records=12,
                retokenized=0,
            ),
        }
    )
    publish_samples(root, "paths", random_samples(12, seed=5), prov=prov, per_part=6)
    return root


@pytest.mark.parametrize("redact", [True, False])
def test_provenance_paths_are_redacted_over_http_only(pathful_store: Path, redact: bool) -> None:
    with running_server(ServerSettings(store=pathful_store, redact_paths=redact)) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200
        manifest = c.get("/v1/datasets/paths")
        listing = c.get("/v1/datasets")
        same_etag = c.get("/v1/datasets/paths", headers={"If-None-Match": manifest.headers["etag"]})
    assert manifest.status_code == listing.status_code == 200 and same_etag.status_code == 304
    prov = manifest.json()["provenance"]
    teacher = listing.json()["datasets"][0]["teacher"]
    if redact:
        assert SECRET_DIR not in manifest.text and SECRET_DIR not in listing.text and "/home/" not in manifest.text
        assert prov["teacher"]["name_or_path"] == teacher["name_or_path"] == "teacher-7b"
        assert prov["sft_teacher_source"] == "teacher-7b" and prov["rollout_policy"]["name_or_path"] == "student"
        assert prov["rollouts"]["paths"] == ["rollouts-0.jsonl", "rollouts-1.jsonl"]
    else:
        assert teacher["name_or_path"] == f"{SECRET_DIR}/models/teacher-7b"
        assert prov["rollouts"]["paths"][0] == f"{SECRET_DIR}/data/rollouts-0.jsonl"
    assert prov["teacher"]["fingerprint"] == provenance().teacher.fingerprint  # what identifies the model stays
    on_disk = Store(pathful_store).manifest("paths")  # the manifest on disk keeps its paths
    assert on_disk.provenance.teacher.name_or_path == f"{SECRET_DIR}/models/teacher-7b"
