"""An object-store outage while serving: 503 `unavailable` (never 500, never `corrupt`), and back without a restart.

A real SeaweedFS of this test's own is stopped under a running server and started again on the
same ports and data. While it is down, nothing is served and nothing is marked damaged (the scrub
runs throughout); once it is back, the same bytes are served by the same process, without
verifying the store again from scratch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from lopd.server.api.settings import ServerSettings
from lopd.storage.layout import check_store_path
from tests.server.api.conftest import running_server, wait_ready
from tests.utils.factories import build_dataset
from tests.utils.s3 import seaweedfs

pytestmark = pytest.mark.slow

INDICES = [1, 50, 99, 1]


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples (0 when it has none)."""
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _until(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_an_outage_answers_503_unavailable_and_serving_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lopd.server.api.catalog")
    with seaweedfs(tmp_path / "s3") as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        store = check_store_path(s3.store_url())
        build_dataset(store, "math", n=100, per_part=25, seed=4)
        # No row-group cache: every batch reads objects. The scrub on, at full speed: it must not call an outage damage.
        settings = ServerSettings(store=store, catalog_ttl_s=0.5, cache_bytes=0, scrub_bytes_per_s=64 * 2**20)
        with running_server(settings) as server, server.client() as c:
            assert wait_ready(c, timeout=60).status_code == 200
            before = c.post("/v1/datasets/math/batch", json={"indices": INDICES})
            assert before.status_code == 200

            s3.stop()
            down = c.post("/v1/datasets/math/batch", json={"indices": INDICES})
            assert down.status_code == 503, down.text
            error = down.json()["error"]
            assert error["type"] == "unavailable" and "AWS_ENDPOINT_URL" in error["message"], error
            sample = c.get("/v1/datasets/math/samples/7")
            assert sample.status_code == 503 and sample.json()["error"]["type"] == "unavailable", sample.text
            _until(lambda: c.get("/readyz").status_code == 503)
            problems = c.get("/readyz").json()["problems"]
            assert any("object store cannot be read" in p for p in problems), problems
            assert c.get("/livez").status_code == 200  # alive: an orchestrator must not restart it for this
            time.sleep(2)  # scrub passes and rescans during the outage
            metrics = c.get("/metrics").text
            assert _metric(metrics, "lopd_integrity_failures_total") == 0, "an outage is not damage"
            assert _metric(metrics, "lopd_damaged_versions") == 0

            s3.restart()
            _until(lambda: c.get("/readyz").status_code == 200)
            after = c.post("/v1/datasets/math/batch", json={"indices": INDICES})
            assert after.status_code == 200 and after.content == before.content
            metrics = c.get("/metrics").text
            assert (
                _metric(metrics, "lopd_integrity_failures_total") == 0
                and _metric(metrics, "lopd_damaged_versions") == 0
            )
            # what was verified before the outage is still trusted: the version was not verified again from scratch
            verifications = [r for r in caplog.records if r.getMessage().startswith("verified math v1")]
            assert len(verifications) == 1, [r.getMessage() for r in verifications]


def test_a_read_cut_off_between_its_check_and_its_get_is_unavailable_not_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object's stamp is checked (HEAD answered), then the service goes away before the GET of its pages."""
    from lopd.errors import Unavailable
    from lopd.storage.reader import Dataset, open_version

    with seaweedfs(tmp_path / "s3") as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        store = check_store_path(s3.store_url())
        build_dataset(store, "math", n=40, per_part=20, seed=5)
        dataset = open_version(store, "math", 1, verify=True)
        expected = dataset.take([3, 30])
        checked = Dataset._check_unchanged

        def then_outage(self, file_index):  # type: ignore[no-untyped-def]
            stamp = checked(self, file_index)
            s3.stop()
            return stamp

        monkeypatch.setattr(Dataset, "_check_unchanged", then_outage)
        with pytest.raises(Unavailable, match="AWS_ENDPOINT_URL"):
            dataset.take([3, 30])
        assert dataset.damage is None, "an outage is not damage"
        monkeypatch.setattr(Dataset, "_check_unchanged", checked)
        s3.restart()
        assert dataset.take([3, 30]).equals(expected)
