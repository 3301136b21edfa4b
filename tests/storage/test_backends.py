"""The store contract on both backends: a local directory and a prefix on a real S3 server (SeaweedFS).

Each test takes `any_store` (tests/conftest.py) and runs once per backend: atomic publish (a
version is listed only once its manifest exists), N workers == 1 worker byte for byte, resume
after a crash, checksums verified before anything is read, a corrupt or missing object refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lopd.errors import Corrupt
from lopd.storage import layout
from lopd.storage.fs import ObjectPath, StoreDir, is_object, sha256_file
from lopd.storage.publish import finalize, find_published_run, published_versions
from lopd.storage.reader import Store
from lopd.storage.staging import Staging
from lopd.storage.writer import RunWriter, write_run
from tests.utils.factories import make_plan, part_table, random_samples

KEY = "5" * 64


def _version_bytes(store: StoreDir, name: str, version: int) -> dict[str, str]:
    """sha256 of every file of a version but its manifest (which holds the time of publishing)."""
    vdir = layout.version_dir(store, name, version)
    return {p.name: sha256_file(p) for p in sorted(vdir.iterdir()) if p.name.endswith(".parquet")}


def test_store_urls_are_decided_in_one_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(layout.check_store_path("s3://bucket/some/prefix"), ObjectPath)
    assert str(layout.check_store_path("s3:/bucket/x")) == "s3://bucket/x"  # as a Path-typed flag collapses it
    assert layout.check_store_path(tmp_path) == tmp_path
    with pytest.raises(Exception, match="gs://bucket/x is not supported"):
        layout.check_store_path("gs://bucket/x")


@pytest.mark.parametrize("num_workers", [1, 3])
def test_workers_publish_what_one_writer_does(any_store: StoreDir, num_workers: int) -> None:
    samples = random_samples(40, seed=4)
    plan = make_plan(samples, run_key=KEY, dataset="ds", per_part=7)
    runs = [RunWriter(any_store, plan, worker=k) for k in range(num_workers)]
    for k, run in enumerate(runs):
        for part in run.todo(run.plan.parts_of_worker(k, num_workers)):
            run.write_part(part.index, part_table(run.plan, samples, part.index))
    # every worker finds all parts and publishes: one version results, the same for all
    manifests = [run.publish() for run in runs]
    assert {(m.version, m.content_hash) for m in manifests} == {(1, manifests[0].content_hash)}
    assert published_versions(any_store, "ds") == [1]
    single_root = any_store / "single"
    single = write_run(single_root, plan, lambda part: part_table(plan, samples, part.index))
    assert single.content_hash == manifests[0].content_hash
    assert _version_bytes(any_store, "ds", 1) == _version_bytes(single_root, "ds", 1)
    ds = Store(any_store).open("ds")
    assert ds.read_all()["sample_id"].to_pylist() == samples["ids"]
    assert not layout.staging_dir(any_store, "ds", KEY).exists()  # staging is removed once published


def test_a_version_is_listed_only_once_its_manifest_exists(any_store: StoreDir) -> None:
    samples = random_samples(10, seed=5)
    plan = make_plan(samples, run_key=KEY, dataset="ds", per_part=4)
    first = write_run(any_store, plan, lambda p: part_table(plan, samples, p.index))
    assert first.version == 1
    # a second run's parts copied into v2/ without a manifest (a publisher killed before its commit point)
    v2 = layout.version_dir(any_store, "ds", 2)
    v2.mkdir()
    src = layout.version_dir(any_store, "ds", 1) / layout.part_name(0)
    (v2 / layout.part_name(0)).write_bytes(src.read_bytes())
    assert published_versions(any_store, "ds") == [1]
    assert Store(any_store).catalogue() == {"ds": [1]}


def test_a_resumed_run_rewrites_only_missing_or_damaged_parts(any_store: StoreDir) -> None:
    samples = random_samples(30, seed=6)
    plan = make_plan(samples, run_key=KEY, dataset="ds", per_part=10)
    with RunWriter(any_store, plan) as run:
        run.write_part(0, part_table(plan, samples, 0))
        run.write_part(2, part_table(plan, samples, 2))
    Staging(any_store, "ds", KEY).part_path(2).write_bytes(b"PAR1 truncated")  # torn part
    with RunWriter(any_store, plan) as run:
        assert run.done == {0}
        for part in run.todo():
            run.write_part(part.index, part_table(plan, samples, part.index))
        resumed = run.publish()
    reference = write_run(any_store / "ref", plan, lambda p: part_table(plan, samples, p.index))
    assert resumed.content_hash == reference.content_hash
    assert _version_bytes(any_store, "ds", 1) == _version_bytes(any_store / "ref", "ds", 1)


def test_finalize_publishes_runs_left_by_workers(any_store: StoreDir) -> None:
    samples = random_samples(12, seed=7)
    plan = make_plan(samples, run_key=KEY, dataset="ds", per_part=5)
    with RunWriter(any_store, plan) as run:
        for part in run.todo():
            run.write_part(part.index, part_table(plan, samples, part.index))
    [result] = finalize(any_store, "ds")
    assert result.manifest is not None and result.manifest.version == 1
    assert find_published_run(any_store, "ds", KEY) == result.manifest


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_corrupt_or_missing_object_is_refused_before_reading(any_store: StoreDir, damage: str) -> None:
    samples = random_samples(20, seed=8)
    plan = make_plan(samples, run_key=KEY, dataset="ds", per_part=10)
    write_run(any_store, plan, lambda p: part_table(plan, samples, p.index))
    shard = layout.version_dir(any_store, "ds", 1) / layout.part_name(1)
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with pytest.raises(Corrupt, match="part-000001.parquet"):
        Store(any_store).open("ds", verify=True)
    ds = Store(any_store).open("ds", verify=False)
    assert ds.take([0])["sample_id"].to_pylist() == [samples["ids"][0]]  # the intact shard still reads


def test_kill_9_while_writing_a_part_then_rerun_is_byte_identical(any_store: StoreDir) -> None:
    """A writer process killed (os._exit, like SIGKILL) inside a part write leaves no partial part behind."""
    script = textwrap.dedent(
        f"""
        import sys
        from lopd.storage.layout import check_store_path
        from lopd.storage.writer import write_run
        from tests.utils.factories import make_plan, part_table, random_samples
        samples = random_samples(30, seed=9)
        plan = make_plan(samples, run_key={KEY!r}, dataset="ds", per_part=10)
        write_run(check_store_path(sys.argv[1]), plan, lambda p: part_table(plan, samples, p.index))
        """
    )
    fault = {**os.environ, "LOPD_FAULT": "during_part_write:1"}
    run = subprocess.run([sys.executable, "-c", script, str(any_store)], env=fault, cwd=os.getcwd())
    assert run.returncode == 137
    staging = Staging(any_store, "ds", KEY)
    assert staging.part_path(0).exists() and not staging.part_path(1).exists()
    if is_object(any_store):  # no temporary object was left either: a PUT is all or nothing
        assert sorted(p.name for p in staging.dir.iterdir()) == sorted([layout.PLAN, layout.part_name(0)])
    assert subprocess.run([sys.executable, "-c", script, str(any_store)], cwd=os.getcwd()).returncode == 0
    samples = random_samples(30, seed=9)
    plan = make_plan(samples, run_key=KEY, dataset="ds", per_part=10)
    write_run(any_store / "ref", plan, lambda p: part_table(plan, samples, p.index))
    assert _version_bytes(any_store, "ds", 1) == _version_bytes(any_store / "ref", "ds", 1)
