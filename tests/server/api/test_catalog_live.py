"""The catalogue while the server runs: damaged shards, new versions, runs still writing."""

from __future__ import annotations

import time
from pathlib import Path

from lopd.server.api.settings import ServerSettings
from lopd.storage.staging import Staging
from tests.server.api.conftest import running_server, wait_ready
from tests.utils.factories import build_dataset, make_plan, random_samples, write_parts

ROUTES = ["", "/coverage", "/consistency", "/samples/0"]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_shard_is_never_served(tmp_path: Path) -> None:
    build_dataset(tmp_path, "good", n=30, per_part=10, seed=1)
    build_dataset(tmp_path, "bad", n=30, per_part=10, seed=2)
    shard = tmp_path / "bad" / "v1" / "part-000001.parquet"
    flip_byte(shard, shard.stat().st_size // 2)  # same size, other bytes: only the checksum can tell

    with running_server(ServerSettings(store=tmp_path, catalog_ttl_s=0.2)) as srv, srv.client() as c:
        r = wait_ready(c)
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable"
        assert any("'bad' v1" in p and "part-000001.parquet" in p for p in body["problems"]), body
        assert str(tmp_path) not in str(body)

        for suffix in ROUTES:
            for version in ("", "?version=1"):
                r = c.get(f"/v1/datasets/bad{suffix}{version}")
                assert r.status_code == 503, (suffix, r.text)
                assert r.json()["error"]["type"] == "corrupt"
        for accept in ("application/json", "application/vnd.apache.arrow.stream"):
            r = c.post("/v1/datasets/bad/batch", json={"indices": [0, 15]}, headers={"Accept": accept})
            assert r.status_code == 503 and r.json()["error"]["type"] == "corrupt"
            assert r.headers["content-type"] == "application/json"

        # The other dataset is served as usual, and the listing shows only what can be served.
        for suffix in ROUTES:
            assert c.get(f"/v1/datasets/good{suffix}").status_code == 200, suffix
        assert c.post("/v1/datasets/good/batch", json={"indices": [29, 0]}).status_code == 200
        assert [d["name"] for d in c.get("/v1/datasets").json()["datasets"]] == ["good"]


def test_version_damaged_after_publish_but_before_first_use(tmp_path: Path) -> None:
    """The server verifies a new version on first use, so a version broken before then is refused too."""
    build_dataset(tmp_path, "ds", n=20, per_part=10, seed=1)
    with running_server(ServerSettings(store=tmp_path, catalog_ttl_s=60)) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200
        build_dataset(tmp_path, "late", n=20, per_part=10, seed=3)
        flip_byte(tmp_path / "late" / "v1" / "part-000000.parquet", 100)
        r = c.post("/v1/datasets/late/batch", json={"indices": [1]})  # an unknown name forces a rescan
        assert r.status_code == 503 and r.json()["error"]["type"] == "corrupt"
        assert c.get("/readyz").status_code == 503
        assert c.get("/v1/datasets/ds/samples/3").status_code == 200


def test_new_datasets_and_versions_appear_without_restart(tmp_path: Path) -> None:
    build_dataset(tmp_path, "first", n=20, per_part=10, seed=1)
    with running_server(ServerSettings(store=tmp_path, catalog_ttl_s=0.3)) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200
        assert [d["name"] for d in c.get("/v1/datasets").json()["datasets"]] == ["first"]

        _, second = build_dataset(tmp_path, "second", n=25, per_part=10, seed=2)
        r = c.post("/v1/datasets/second/batch", json={"indices": [24, 0]}, headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text  # at once: an unknown name triggers a rescan
        assert [s["sample_id"] for s in r.json()["samples"]] == [second["ids"][24], second["ids"][0]]

        # A second version of "first" (another run): asked for by number it is there at once ...
        _, v2 = build_dataset(tmp_path, "first", n=12, per_part=5, seed=7)
        r = c.get("/v1/datasets/first/samples/11?version=2")
        assert r.status_code == 200 and r.json()["sample_id"] == v2["ids"][11]
        # ... and within catalog_ttl_s it becomes the default and is listed.
        deadline = time.monotonic() + 5
        while c.get("/v1/datasets/first").json()["version"] != 2:
            assert time.monotonic() < deadline, "v2 did not become the latest version"
            time.sleep(0.05)
        listing = {d["name"]: d for d in c.get("/v1/datasets").json()["datasets"]}
        assert listing["first"]["versions"] == [1, 2] and listing["first"]["num_samples"] == 12
        assert c.get("/v1/datasets/first?version=1").json()["num_samples"] == 20
        assert wait_ready(c).json() == {"status": "ready", "datasets": 2}


def start_run(store: Path, dataset: str, *, n: int, per_part: int, done: set[int], seed: int) -> str:
    """A precompute run that has written only the parts in `done` (not published)."""
    samples = random_samples(n, seed)
    run_key = f"{seed:04d}" + "f" * 60
    plan = make_plan(samples, run_key=run_key, dataset=dataset, per_part=per_part)
    staging = Staging(store, dataset, run_key)
    plan = staging.open(plan)
    write_parts(staging, plan, samples, only=done)
    return run_key


def test_coverage_shows_runs_in_progress(tmp_path: Path) -> None:
    build_dataset(tmp_path, "pub", n=20, per_part=10, seed=1)
    with running_server(ServerSettings(store=tmp_path, catalog_ttl_s=0.2)) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200
        assert c.get("/v1/datasets/pub/coverage").json()["in_progress"] == []

        # The next version of a published dataset is being written: 1 of 3 parts done.
        run_key = start_run(tmp_path, "pub", n=30, per_part=10, done={0}, seed=5)
        cov = c.get("/v1/datasets/pub/coverage").json()
        assert cov["version"] == 1 and cov["scored"] == 20
        assert cov["in_progress"] == [
            {"run_key": run_key, "parts_done": 1, "parts_total": 3, "samples_done": 10, "samples_total": 30}
        ]

        # A dataset with nothing published yet: its coverage is only the run's progress.
        start_run(tmp_path, "fresh", n=8, per_part=4, done={0, 1}, seed=6)
        cov = c.get("/v1/datasets/fresh/coverage").json()
        assert cov["version"] is None and cov["scored"] == 0
        assert cov["in_progress"][0]["parts_done"] == 2 and cov["in_progress"][0]["samples_total"] == 8
        assert c.get("/v1/datasets/fresh").status_code == 404  # nothing to serve yet
        assert c.get("/v1/datasets/fresh/coverage?version=1").status_code == 404
        assert "fresh" not in [d["name"] for d in c.get("/v1/datasets").json()["datasets"]]


def test_missing_store_is_not_ready_but_alive(tmp_path: Path) -> None:
    with running_server(ServerSettings(store=tmp_path / "nowhere")) as srv, srv.client() as c:
        assert c.get("/livez").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503 and "store unavailable" in r.json()["problems"][0]
        assert c.get("/v1/datasets").json() == {"datasets": []}
        r = c.get("/v1/datasets/x/samples/0")
        assert r.status_code == 503 and str(tmp_path) not in r.text


def test_gc_never_removes_a_version_the_server_reads(tmp_path: Path) -> None:
    """Reading means served to a client: a version only verified in the background is not protected."""
    from lopd.storage.gc import collect_garbage
    from lopd.storage.readers import read_leases

    for seed in (1, 2, 3):
        build_dataset(tmp_path, "ds", n=12, per_part=5, seed=seed)
    with running_server(ServerSettings(store=tmp_path, catalog_ttl_s=0.2)) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200  # every version verified, none read yet
        (lease,) = read_leases(tmp_path)
        assert c.get("/v1/datasets/ds/samples/3?version=1").status_code == 200  # a trainer pinned to v1

        report = collect_garbage(tmp_path, "ds", keep=1)
        assert [i.name for i in report.removed] == ["v2"]  # verified by the server, never read: not protected
        assert [i.reason for i in report.kept if i.name == "v1"] == [f"being read ({lease.stem})"]
        assert c.get("/v1/datasets/ds/samples/4?version=1").status_code == 200
        r = c.get("/v1/datasets/ds/samples/0?version=2")
        assert r.status_code == 404, r.text  # gone: not found, not a damaged version
        assert wait_ready(c).status_code == 200
    assert read_leases(tmp_path) == {}  # a clean shutdown removes the lease
    assert [i.name for i in collect_garbage(tmp_path, "ds", keep=1).removed] == ["v1"]


def test_a_version_removed_before_its_first_read_is_not_found(tmp_path: Path) -> None:
    """The server writes its lease, then looks again: a version gc took meanwhile is 404, never half-served."""
    from lopd.storage.gc import collect_garbage

    for seed in (1, 2):
        build_dataset(tmp_path, "ds", n=12, per_part=5, seed=seed)
    with running_server(ServerSettings(store=tmp_path, catalog_ttl_s=60)) as srv, srv.client() as c:
        assert wait_ready(c).status_code == 200
        assert [i.name for i in collect_garbage(tmp_path, "ds", keep=1).removed] == ["v1"]
        r = c.get("/v1/datasets/ds/samples/0?version=1")  # the catalogue (60 s) still lists v1
        assert r.status_code == 404 and "no longer published" in r.json()["error"]["message"], r.text
        assert c.get("/readyz").status_code == 200


def test_concurrent_first_reads_wait_until_the_lease_lists_the_version(tmp_path: Path) -> None:
    import threading

    from lopd.server.api.catalog import Catalog
    from lopd.storage.readers import versions_being_read

    build_dataset(tmp_path, "ds", n=12, per_part=5, seed=1)
    catalog = Catalog(tmp_path, ttl_s=60)
    catalog.start()
    try:
        renew = catalog._lease.renew
        seen: list[bool] = []

        def slow_renew() -> bool:
            time.sleep(0.3)  # a slow filesystem: nobody may read v1 before this returns
            return renew()

        catalog._lease.renew = slow_renew  # type: ignore[method-assign]

        def read() -> None:
            catalog.open("ds", 1)
            seen.append(("ds", 1) in versions_being_read(tmp_path))

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == [True] * 4
    finally:
        catalog.close()
    assert versions_being_read(tmp_path) == {}
