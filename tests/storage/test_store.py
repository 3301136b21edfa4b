"""Publishing, reading, integrity and resumption of the store, on synthetic data."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from lopd.errors import Conflict, Corrupt, InvalidInput, NotFound
from lopd.storage import layout
from lopd.storage.publish import publish, published_versions
from lopd.storage.reader import Store, open_version, read_version_manifest
from lopd.storage.staging import Staging
from tests.utils.factories import build_dataset, make_plan, random_samples, write_parts


def _expected(samples, i):
    return samples["ids"][i], samples["responses"][i], samples["teacher"][i], samples["rollout"][i]


def test_published_dataset_reads_back_exactly(tmp_path):
    manifest, samples = build_dataset(tmp_path, "ds", n=100, per_part=16)
    assert manifest.version == 1 and manifest.num_samples == 100 and len(manifest.files) == 7
    assert manifest.num_response_tokens == sum(len(r) for r in samples["responses"])
    assert manifest.num_prompt_tokens == sum(len(p) for p in samples["prompts"])
    ds = Store(tmp_path).open("ds")
    table = ds.read_all()
    assert table["sample_id"].to_pylist() == samples["ids"]
    for i in (0, 15, 16, 99):
        sid, resp, teacher, rollout = _expected(samples, i)
        assert table["response_ids"][i].as_py() == resp.tolist()
        assert np.asarray(table["teacher_logprobs"][i].values).tobytes() == teacher.tobytes()
        got = table["rollout_logprobs"][i].as_py()
        assert got is None if rollout is None else np.array(got, np.float32).tobytes() == rollout.tobytes()


def test_take_returns_requested_order_across_files_and_row_groups(tmp_path):
    _, samples = build_dataset(tmp_path, "ds", n=300, per_part=100)
    ds = Store(tmp_path).open("ds")
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 300, 57).tolist() + [299, 0, 0, 64, 63]
    got = ds.take(idx)
    assert got["sample_id"].to_pylist() == [samples["ids"][i] for i in idx]
    assert [r.as_py() for r in got["response_ids"]] == [samples["responses"][i].tolist() for i in idx]
    assert ds.take([]).num_rows == 0


@pytest.mark.parametrize("bad", [-1, 100, 10**12])
def test_take_out_of_range_names_the_index(tmp_path, bad):
    build_dataset(tmp_path, "ds", n=100)
    with pytest.raises(InvalidInput, match=f"index {bad} is out of range"):
        Store(tmp_path).open("ds").take([0, bad])


def test_corrupt_shard_is_detected_by_checksum(tmp_path):
    manifest, _ = build_dataset(tmp_path, "ds", n=50)
    shard = layout.version_dir(tmp_path, "ds", 1) / manifest.files[1].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    shard.write_bytes(bytes(data))
    with pytest.raises(Corrupt, match=manifest.files[1].path):
        Store(tmp_path).open("ds")
    Store(tmp_path).open("ds", verify=False)  # opening without verification is still possible


def test_truncated_and_missing_shards_are_detected(tmp_path):
    manifest, _ = build_dataset(tmp_path, "ds", n=50)
    vdir = layout.version_dir(tmp_path, "ds", 1)
    (vdir / manifest.files[0].path).write_bytes(b"PAR1")
    with pytest.raises(Corrupt, match="bytes"):
        Store(tmp_path).open("ds")
    (vdir / manifest.files[0].path).unlink()
    with pytest.raises(Corrupt, match="missing"):
        Store(tmp_path).open("ds")


def test_unknown_dataset_version_and_names(tmp_path):
    build_dataset(tmp_path, "ds", n=10)
    store = Store(tmp_path)
    with pytest.raises(NotFound, match="no dataset 'nope'"):
        store.open("nope")
    with pytest.raises(NotFound, match="no version 7"):
        store.open("ds", 7)
    for bad in ("../ds", "/etc", "a/b", "..", "", "x\0y"):
        with pytest.raises(InvalidInput, match="invalid dataset name"):
            store.open(bad)
    with pytest.raises(NotFound, match="not a lightning-opd store"):
        Store(tmp_path / "ds")


def test_publish_is_idempotent_and_new_runs_get_new_versions(tmp_path):
    m1, samples = build_dataset(tmp_path, "ds", n=40, seed=0)
    m2, _ = build_dataset(tmp_path, "ds", n=30, seed=1)
    assert (m1.version, m2.version) == (1, 2)
    assert Store(tmp_path).versions("ds") == [1, 2]
    assert Store(tmp_path).open("ds").manifest.version == 2
    assert Store(tmp_path).open("ds", 1).read_all()["sample_id"].to_pylist() == samples["ids"]
    # publishing the same run again returns the existing version and writes nothing new
    plan = make_plan(samples, run_key="0000" + "e" * 60, dataset="ds", per_part=16)
    staging = Staging(tmp_path, "ds", plan.run_key)
    staging.open(plan)
    write_parts(staging, plan, samples)
    assert publish(staging, plan).version == 1
    assert published_versions(tmp_path, "ds") == [1, 2]


def test_publish_refuses_missing_parts_and_nothing_becomes_visible(tmp_path):
    samples = random_samples(50)
    plan = make_plan(samples, run_key="1" * 64, dataset="ds", per_part=10)
    staging = Staging(tmp_path, "ds", plan.run_key)
    staging.open(plan)
    write_parts(staging, plan, samples, only={0, 1, 3, 4})
    with pytest.raises(Corrupt, match=r"parts \[2\]"):
        publish(staging, plan)
    assert published_versions(tmp_path, "ds") == []
    assert not [p for p in layout.dataset_dir(tmp_path, "ds").iterdir() if p.name.startswith(".tmp-")]


def test_completed_parts_discard_damaged_or_foreign_parts(tmp_path):
    samples = random_samples(30)
    plan = make_plan(samples, run_key="2" * 64, dataset="ds", per_part=10)
    staging = Staging(tmp_path, "ds", plan.run_key)
    staging.open(plan)
    write_parts(staging, plan, samples)
    assert staging.completed_parts(plan) == {0, 1, 2}
    staging.part_path(1).write_bytes(b"garbage")  # damaged
    other = random_samples(30, seed=9)  # a part holding other samples
    other_plan = make_plan(other, run_key="2" * 64, dataset="ds", per_part=10)
    write_parts(staging, other_plan, other, only={2})
    assert staging.completed_parts(plan) == {0}
    assert not staging.part_path(1).exists() and not staging.part_path(2).exists()


def test_staging_refuses_a_different_plan_under_the_same_key(tmp_path):
    plan = make_plan(random_samples(30), run_key="3" * 64, dataset="ds", per_part=10)
    Staging(tmp_path, "ds", plan.run_key).open(plan)
    other = make_plan(random_samples(31), run_key="3" * 64, dataset="ds", per_part=10)
    with pytest.raises(Conflict, match="different plan"):
        Staging(tmp_path, "ds", plan.run_key).open(other)


def test_stale_temporary_files_are_ignored_and_cleaned(tmp_path):
    samples = random_samples(20)
    plan = make_plan(samples, run_key="4" * 64, dataset="ds", per_part=10)
    staging = Staging(tmp_path, "ds", plan.run_key)
    staging.open(plan)
    tmp = staging.dir / ".tmp-deadbeef-part-000000.parquet"
    tmp.write_bytes(b"half a shard")
    assert staging.completed_parts(plan) == set()
    staging.open(plan)
    assert not tmp.exists()


def test_shards_carry_run_and_teacher_in_their_footer(tmp_path):
    manifest, _ = build_dataset(tmp_path, "ds", n=20)
    meta = pq.ParquetFile(layout.version_dir(tmp_path, "ds", 1) / manifest.files[0].path).schema_arrow.metadata
    assert meta[b"lopd.run_key"].decode() == manifest.run_key
    assert meta[b"lopd.teacher_fingerprint"].decode() == manifest.provenance.teacher.fingerprint


def test_version_directory_is_read_only_content_addressed(tmp_path):
    m1, _ = build_dataset(tmp_path, "a", n=30, seed=5)
    m2, _ = build_dataset(tmp_path, "b", n=30, seed=5)
    assert m1.content_hash == m2.content_hash  # same content, same hash (names differ only in directory)
    assert os.path.isfile(layout.version_dir(tmp_path, "a", 1) / layout.MANIFEST)


def test_take_from_many_threads_at_once_returns_correct_rows(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _, samples = build_dataset(tmp_path, "ds", n=400, per_part=100)
    ds = Store(tmp_path).open("ds")
    rng = np.random.default_rng(3)
    requests = [rng.integers(0, 400, 40).tolist() for _ in range(64)]

    def fetch(idx):
        return ds.take(idx)["sample_id"].to_pylist() == [samples["ids"][i] for i in idx]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(fetch, requests))


def test_catalogue_lists_published_datasets_and_skips_what_is_not_one(tmp_path):
    build_dataset(tmp_path, "b", n=10, seed=1)
    build_dataset(tmp_path, "a", n=10, seed=2)
    build_dataset(tmp_path, "a", n=12, seed=3)
    samples = random_samples(10)
    plan = make_plan(samples, run_key="5" * 64, dataset="running", per_part=5)
    Staging(tmp_path, "running", plan.run_key).open(plan)
    (tmp_path / "not a name").mkdir()  # a directory validate_name refuses
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "file.txt").write_text("x")
    store = Store(tmp_path)
    assert store.catalogue() == {"a": [1, 2], "b": [1]}
    assert store.datasets() == ["a", "b"]
    assert store.unpublished() == ["running"]


def test_a_manifest_that_describes_another_version_is_corrupt(tmp_path):
    build_dataset(tmp_path, "ds", n=10, seed=1)
    build_dataset(tmp_path, "ds", n=10, seed=2)
    v1, v2 = layout.version_dir(tmp_path, "ds", 1), layout.version_dir(tmp_path, "ds", 2)
    (v2 / layout.MANIFEST).write_bytes((v1 / layout.MANIFEST).read_bytes())
    with pytest.raises(Corrupt, match=r"the manifest in ds/v2 describes 'ds' v1"):
        Store(tmp_path).open("ds", 2, verify=False)
    with pytest.raises(Corrupt, match="describes"):
        read_version_manifest(tmp_path, "ds", 2)
    assert open_version(tmp_path, "ds", 1).manifest.version == 1


@pytest.mark.parametrize("name", ["../ds/v1/manifest.json", "/etc/passwd", "..", ".lock", "a/part-000000.parquet", ""])
def test_manifest_file_names_cannot_leave_the_version_directory(tmp_path, name):
    with pytest.raises(Corrupt, match="not a file of that version"):
        layout.version_file(tmp_path / "ds" / "v1", name)
    assert layout.version_file(tmp_path, "part-000003.parquet") == tmp_path / "part-000003.parquet"


def test_token_counts_are_prompt_plus_response_per_sample(tmp_path):
    _, samples = build_dataset(tmp_path, "ds", n=70, per_part=16)
    counts = Store(tmp_path).open("ds").token_counts()
    expected = [len(p) + len(r) for p, r in zip(samples["prompts"], samples["responses"])]
    assert counts.dtype == np.int64 and counts.tolist() == expected


def test_token_counts_refuse_shards_that_disagree_with_the_manifest(tmp_path):
    manifest, _ = build_dataset(tmp_path, "ds", n=40, per_part=16)
    vdir = layout.version_dir(tmp_path, "ds", 1)
    last = vdir / manifest.files[-1].path
    pq.write_table(pq.read_table(last).slice(0, 2), last)
    with pytest.raises(Corrupt, match="the shards hold 34 samples, the manifest says 40"):
        open_version(tmp_path, "ds", 1, verify=False).token_counts()
    last.write_bytes(b"PAR1 not really")
    with pytest.raises(Corrupt, match="unreadable Parquet"):
        open_version(tmp_path, "ds", 1, verify=False).token_counts()
