"""The one writing path (plan -> staging -> parts -> publish) and `finalize`, on synthetic data."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from lopd.errors import Conflict, Corrupt, NotFound
from lopd.storage import layout
from lopd.storage.publish import finalize, published_versions
from lopd.storage.reader import Store
from lopd.storage.staging import PartPlan, Staging
from lopd.storage.writer import RunWriter, write_run
from tests.utils.factories import make_plan, part_table, random_samples, write_parts


@pytest.mark.parametrize("n, per_part", [(1, 4), (30, 7), (64, 8)])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
def test_workers_write_every_part_exactly_once(tmp_path: Path, n: int, per_part: int, num_workers: int) -> None:
    samples = random_samples(n, seed=n)
    plan = make_plan(samples, run_key="6" * 64, dataset="ds", per_part=per_part)
    owned = [[p.index for p in plan.parts_of_worker(k, num_workers)] for k in range(num_workers)]
    assert sorted(i for parts in owned for i in parts) == [p.index for p in plan.parts]

    runs = [RunWriter(tmp_path, plan) for _ in range(num_workers)]
    for k, run in enumerate(runs):
        assert run.missing_parts() == sorted(i for parts in owned[k:] for i in parts)
        for part in run.todo(run.plan.parts_of_worker(k, num_workers)):
            run.write_part(part.index, part_table(run.plan, samples, part.index))
    assert runs[-1].missing_parts() == []
    manifest = runs[-1].publish()

    single = write_run(tmp_path / "single", plan, lambda part: part_table(plan, samples, part.index))
    assert manifest.content_hash == single.content_hash and manifest.num_samples == n
    assert Store(tmp_path).open("ds").read_all()["sample_id"].to_pylist() == samples["ids"]


def test_part_rows_cover_the_samples_in_order() -> None:
    plan = make_plan(random_samples(23), run_key="7" * 64, dataset="ds", per_part=5)
    rows = [plan.part_rows(p.index) for p in plan.parts]
    assert [(r.start, r.stop) for r in rows] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    with pytest.raises(ValueError, match="0..num_workers-1"):
        plan.parts_of_worker(2, 2)


def test_a_resumed_writer_writes_only_missing_or_damaged_parts(tmp_path: Path) -> None:
    samples = random_samples(40)
    plan = make_plan(samples, run_key="8" * 64, dataset="ds", per_part=10)
    staging = Staging(tmp_path, "ds", plan.run_key)
    staging.open(plan)
    write_parts(staging, plan, samples, only={0, 1, 3})
    staging.part_path(1).write_bytes(b"not parquet")

    run = RunWriter(tmp_path, plan)
    assert run.done == {0, 3}
    assert [p.index for p in run.todo()] == [1, 2]
    assert run.missing_parts() == [1, 2]  # the damaged part was deleted
    with pytest.raises(Corrupt, match=r"parts \[1, 2\]"):
        run.publish()

    with pytest.raises(Conflict, match="different plan"):
        RunWriter(tmp_path, make_plan(random_samples(41), run_key="8" * 64, dataset="ds", per_part=10))


def test_write_run_returns_a_published_run_without_writing(tmp_path: Path) -> None:
    samples = random_samples(20)
    plan = make_plan(samples, run_key="9" * 64, dataset="ds", per_part=8)
    first = write_run(tmp_path, plan, lambda part: part_table(plan, samples, part.index))
    assert not layout.staging_dir(tmp_path, "ds", plan.run_key).exists()

    def no_writing(part: PartPlan) -> pa.Table:
        raise AssertionError(f"part {part.index} of a published run is written again")

    again = write_run(tmp_path, plan, no_writing)
    assert again == first and published_versions(tmp_path, "ds") == [1]
    assert not layout.staging_dir(tmp_path, "ds", plan.run_key).exists()


def test_finalize_publishes_complete_runs_and_reports_the_others(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no unfinished run of 'ds'"):
        finalize(tmp_path, "ds")

    complete, partial = random_samples(25, seed=1), random_samples(30, seed=2)
    complete_plan = make_plan(complete, run_key="a" * 64, dataset="ds", per_part=10)
    partial_plan = make_plan(partial, run_key="b" * 64, dataset="ds", per_part=10)
    for plan, samples, only in ((complete_plan, complete, None), (partial_plan, partial, {1})):
        staging = Staging(tmp_path, "ds", plan.run_key)
        staging.open(plan)
        write_parts(staging, plan, samples, only=only)

    results = finalize(tmp_path, "ds")
    assert [r.run_key for r in results] == ["a" * 64, "b" * 64]
    done, waiting = results
    assert done.manifest is not None and done.manifest.version == 1 and done.parts_missing == []
    assert str(done) == "published: ds v1: 25 samples"
    assert waiting.manifest is None and waiting.parts_missing == [0, 2] and waiting.parts_total == 3
    assert str(waiting) == f"run {'b' * 16}: 2 of 3 parts still missing"
    assert Store(tmp_path).open("ds").read_all()["sample_id"].to_pylist() == complete["ids"]
    assert not layout.staging_dir(tmp_path, "ds", "a" * 64).exists()
    assert layout.staging_dir(tmp_path, "ds", "b" * 64).exists()

    # The staging area of a run published before a crash could remove it: finalize returns that version.
    staging = Staging(tmp_path, "ds", complete_plan.run_key)
    staging.open(complete_plan)
    write_parts(staging, complete_plan, complete)
    again = [r for r in finalize(tmp_path, "ds") if r.run_key == "a" * 64]
    assert again[0].manifest == done.manifest and published_versions(tmp_path, "ds") == [1]
