"""The README's main command, in its fast variant: every stage runs over real parts and leaves consistent artifacts.

This checks the artifacts, not the research outcome (tiny models, four steps): every method is
evaluated at every checkpoint, the JSON is valid against its schema, the stores carry the right
consistency verdicts, and the offline runs really consumed the store over HTTP.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from lopd.pipeline.report import METHODS, PipelineReport
from lopd.pipeline.run import RESULTS_JSON, RESULTS_MD, RESULTS_PNG
from lopd.storage.reader import Store


@pytest.mark.slow
def test_demo_fast_runs_the_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lopd", "demo", "--preset", "fast", "--run-dir", str(run), "--seeds", "0,1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in range(1, 9):
        assert f"[{stage}/8]" in out.stdout
    assert "teacher B refused" in out.stdout and "the trainer refuses seed0-teacher-B" in out.stdout

    report = PipelineReport.model_validate_json((run / RESULTS_JSON).read_text())
    cfg = report.config
    assert cfg.preset == "fast" and cfg.seeds == [0, 1]
    assert [s.seed for s in report.seeds] == [0, 1]
    expected_steps = [0, *range(cfg.eval_every, cfg.opd_steps + 1, cfg.eval_every)]
    for s in report.seeds:
        assert {r.method for r in s.runs} == set(METHODS) - {"sft"}
        for r in s.runs:
            assert [p.step for p in r.curve] == expected_steps, r.method
            assert r.curve[0] == s.sft  # every method starts from the same SFT checkpoint
            assert r.train_seconds > 0
            assert (r.teacher_forward_tokens > 0) == (r.method == "online_opd")
        assert s.precompute_teacher_tokens > 0 and "refusing" in s.refused
    assert {r.method for r in report.summary} == set(METHODS)
    assert len(report.claims) == 5
    assert report.environment["torch"] and report.environment["cpu_count"]
    assert (run / RESULTS_PNG).read_bytes()[:4] == b"\x89PNG"
    md = (run / RESULTS_MD).read_text()
    assert all(label in md for label in METHODS.values())

    # The table and the plot re-render from the JSON alone.
    (run / RESULTS_PNG).unlink()
    rerender = [sys.executable, "-m", "lopd", "pipeline", "report", str(run)]
    again = subprocess.run(rerender, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / RESULTS_MD).read_text() == md and (run / RESULTS_PNG).is_file()

    store = Store(run / "store")
    for seed in (0, 1):
        good, bad = store.open(f"seed{seed}-teacher-A"), store.open(f"seed{seed}-teacher-B")
        assert good.manifest.provenance.consistency.verdict == "consistent"
        assert bad.manifest.provenance.consistency.verdict == "inconsistent"
        assert good.manifest.num_samples == cfg.rollouts
        # The offline trainer consumed the served store: its metrics show the steps and the fetches.
        for method in ("lightning_opd", "lightning_opd_inconsistent"):
            rows = list(csv.DictReader((run / f"seed-{seed}" / method / "metrics.csv").open()))
            assert [int(r["step"]) for r in rows] == list(range(1, cfg.opd_steps + 1))
            assert all(int(r["tokens"]) > 0 for r in rows)
        sft = json.loads((run / f"seed-{seed}" / "student-sft" / "sft_provenance.json").read_text())
        assert sft["teacher_fingerprint"] == good.manifest.provenance.sft_teacher_fingerprint
