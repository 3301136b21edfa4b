"""The README's main command, in its fast variant: every stage and arm runs over real parts and leaves consistent
artifacts.

This checks the artifacts, not the research outcome (tiny models, four steps): every arm is evaluated at every
checkpoint, every claim is tested and rendered, the JSON is valid against its schema, the stores carry the right
consistency verdicts, and the offline arms really consumed the store over HTTP. The statistics themselves are
tested in tests/pipeline/test_stats.py and test_report.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from lopd.pipeline.report import METHODS, PipelineReport
from lopd.pipeline.run import ARMS, RESULTS_JSON, RESULTS_MD, RESULTS_PNG, dataset_name
from lopd.storage.reader import Store


@pytest.mark.slow
def test_demo_fast_runs_every_arm_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lopd", "demo", "--preset", "fast", "--run-dir", str(run), "--seeds", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in range(1, 9):
        assert f"[{stage}/8]" in out.stdout
    assert "teacher B refused for student A" in out.stdout
    assert "the trainer refuses seed3-student-A-teacher-Aprime without allow_inconsistent" in out.stdout

    report = PipelineReport.model_validate_json((run / RESULTS_JSON).read_text())
    cfg = report.config
    assert cfg.preset == "fast" and cfg.seeds == [3] and [s.seed for s in report.seeds] == [3]
    assert [t.name for t in report.teachers] == ["A", "B", "A'"]
    (seed,) = report.seeds
    assert [r.method for r in seed.runs] == [a.method for a in ARMS]
    for arm, r in zip(ARMS, seed.runs):
        steps = cfg.opd_steps * (cfg.inconsistent_steps_factor if arm.inconsistent else 1)
        assert r.steps == steps and [p.step for p in r.curve] == [0, *range(cfg.eval_every, steps + 1, cfg.eval_every)]
        assert all(len(p.correct) == cfg.test_problems for p in r.curve)
        assert all((p.gradient is not None) == arm.gradients for p in r.curve), r.method
        assert r.train_cpu_seconds > 0 and r.train_seconds > 0
        assert (r.teacher_forward_tokens > 0) == arm.online
    assert seed.rollouts == cfg.rollouts and seed.precompute_cpu_seconds > 0 and "refusing" in seed.refused
    assert {r.method for r in report.summary} == set(METHODS)
    assert len(report.claims) == 9 and all(c.measured for c in report.claims)
    assert "problems (seed 3 only)" in report.claims[0].measured  # one seed: tested over problems, and says so
    assert report.environment["torch_threads"] == cfg.torch_threads and report.environment["deterministic_algorithms"]
    assert (run / RESULTS_PNG).read_bytes()[:4] == b"\x89PNG"
    md = (run / RESULTS_MD).read_text()
    assert all(label in md for label in METHODS.values()) and "| holds |" in md

    # The table and the plot re-render from the JSON alone.
    (run / RESULTS_PNG).unlink()
    rerender = [sys.executable, "-m", "lopd", "pipeline", "report", str(run)]
    again = subprocess.run(rerender, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / RESULTS_MD).read_text() == md and (run / RESULTS_PNG).is_file()

    store = Store(run / "store")
    for student, teacher, verdict in (("A", "A", "consistent"), ("A", "A'", "inconsistent"),
                                      ("A", "B", "inconsistent"), ("B", "B", "consistent")):  # fmt: skip
        ds = store.open(dataset_name(3, student, teacher))
        assert ds.manifest.provenance.consistency.verdict == verdict and ds.manifest.num_samples == cfg.rollouts
    # The offline arms consumed the served store: their metrics show the steps and the fetches.
    for arm in ARMS:
        if arm.online:
            continue
        rows = list(csv.DictReader((run / "seed-3" / arm.method / "metrics.csv").open()))
        steps = cfg.opd_steps * (cfg.inconsistent_steps_factor if arm.inconsistent else 1)
        assert [int(r["step"]) for r in rows] == list(range(1, steps + 1)) and all(int(r["tokens"]) > 0 for r in rows)
    sft = json.loads((run / "seed-3" / "student-sft-A" / "sft_provenance.json").read_text())
    consistent = store.open(dataset_name(3, "A", "A")).manifest
    assert sft["teacher_fingerprint"] == consistent.provenance.sft_teacher_fingerprint
