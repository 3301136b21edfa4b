"""Two versions of equal samples share a content hash but not an ETag: a client's cached manifest of v1
must not be confirmed (304) as the latest once v2 is published."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from lopd.server.api.app import create_app
from lopd.server.api.settings import ServerSettings
from tests.utils.factories import publish_samples, random_samples


def test_equal_content_in_two_versions_gets_two_etags(tmp_path: Path) -> None:
    samples = random_samples(8, seed=3)
    v1 = publish_samples(tmp_path, "ds", samples, run_key="1" * 64)
    v2 = publish_samples(tmp_path, "ds", samples, run_key="2" * 64)
    assert (v1.version, v2.version) == (1, 2) and v1.content_hash == v2.content_hash
    settings = ServerSettings(store=tmp_path, catalog_ttl_s=0.0, allowed_hosts=["testserver"])
    with TestClient(create_app(settings)) as client:
        first = client.get("/v1/datasets/ds", params={"version": 1})
        assert first.status_code == 200, first.text
        latest = client.get("/v1/datasets/ds", headers={"If-None-Match": first.headers["etag"]})
        assert latest.status_code == 200 and latest.json()["version"] == 2
        assert latest.headers["etag"] != first.headers["etag"]
        again = client.get("/v1/datasets/ds", headers={"If-None-Match": latest.headers["etag"]})
        assert again.status_code == 304
