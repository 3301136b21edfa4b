"""The README's main command, small: every stage runs and leaves its artifacts."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from lopd.storage.reader import Store


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lopd", "demo", "--run-dir", str(run), "--samples", "16", "--train-steps", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for stage in range(1, 8):
        assert f"[{stage}/7]" in out.stdout
    assert "refused:" in out.stdout and "the trainer refuses demo-inconsistent" in out.stdout
    store = Store(run / "store")
    assert store.datasets() == ["demo", "demo-inconsistent"]
    assert store.open("demo").manifest.provenance.consistency.verdict == "consistent"
    assert store.open("demo-inconsistent").manifest.provenance.consistency.verdict == "inconsistent"
    rows = list(csv.DictReader((run / "train" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert (run / "train" / "checkpoint.pt").is_file()
    # a second run reuses the published datasets (precompute is idempotent) and trains afresh
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert Store(run / "store").versions("demo") == [1]
