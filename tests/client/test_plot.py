"""`lopd plot`: a run's metrics.csv (and eval.csv) as a PNG of panels; missing columns and a
missing matplotlib are handled."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lopd.cli.train import plot_command
from lopd.client.plot import PANELS, plot_run
from lopd.client.rundir import EVAL, EVAL_COLUMNS, METRIC_COLUMNS, METRICS, CSVLog
from lopd.errors import InvalidInput, NotFound

pytest.importorskip("matplotlib")

ALL_PANELS = [p[0] for p in PANELS]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _write_run(run: Path, steps: int = 20, *, with_eval: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    metrics = CSVLog(run / METRICS, METRIC_COLUMNS, resume_step=0)
    for s in range(1, steps + 1):
        kl = 1.0 / s
        metrics.write({
            "step": s, "loss": kl, "mean_advantage": -kl, "reverse_kl": kl, "clip_frac": 0.1 * math.exp(-s),
            "data_wait_s": 0.001, "step_time_s": 0.5, "tokens": 100, "mean_importance_weight": 1.0, "lr": 1e-5,
            "epoch": 0,
        })  # fmt: skip
    if with_eval:
        evals = CSVLog(run / EVAL, EVAL_COLUMNS, resume_step=0)
        for s in range(0, steps + 1, 5):
            evals.write({"step": s, "eval_loss": 1.2 / (s + 1), "eval_reverse_kl": 1.1 / (s + 1), "eval_tokens": 50})


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(plot_command)  # registered in lopd.cli as `lopd plot`
    return app


def test_plots_every_panel_with_the_held_out_curve(tmp_path):
    _write_run(tmp_path / "run")
    plot = plot_run(tmp_path / "run")
    assert plot.path == tmp_path / "run" / "metrics.png"
    assert plot.panels == ALL_PANELS and plot.missing == []
    assert plot.path.stat().st_size > 20_000  # five drawn panels, not an empty canvas
    width, height = _png_size(plot.path)
    assert width > height  # 3 x 2 panels


def test_missing_columns_leave_their_panels_out(tmp_path):
    run = tmp_path / "old-run"
    run.mkdir()
    (run / METRICS).write_text("step,loss,clip_frac,data_wait_s\n1,0.5,0.0,0.01\n2,0.4,,0.02\n3,nan,0.1,0.01\n")
    plot = plot_run(run, out=tmp_path / "plots" / "old.png")
    assert plot.path == tmp_path / "plots" / "old.png" and plot.path.stat().st_size > 10_000
    assert plot.panels == ["loss", "clip fraction", "data wait"]  # data wait in seconds: no step time
    assert plot.missing == ["mean advantage", "reverse KL"]
    assert not (run / "metrics.png").exists()


def test_runs_without_rows_or_known_columns_are_refused_with_a_reason(tmp_path):
    with pytest.raises(NotFound, match="no metrics.csv"):
        plot_run(tmp_path)
    (tmp_path / METRICS).write_text(",".join(METRIC_COLUMNS) + "\n")
    with pytest.raises(InvalidInput, match="no rows yet"):
        plot_run(tmp_path)
    (tmp_path / METRICS).write_text("step,something\n1,2\n")
    with pytest.raises(InvalidInput, match="none of the columns"):
        plot_run(tmp_path)


def test_missing_matplotlib_names_the_extra_and_exits_2(tmp_path, monkeypatch):
    _write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(InvalidInput, match=r"pip install 'lightning-opd\[demo\]'"):
        plot_run(tmp_path / "run")
    result = CliRunner().invoke(_cli(), [str(tmp_path / "run")])
    assert result.exit_code == 2 and "lightning-opd[demo]" in result.output
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_plot_command(tmp_path):
    _write_run(tmp_path / "run", with_eval=False)
    result = CliRunner().invoke(_cli(), [str(tmp_path / "run"), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'm.png'}" in result.output and (tmp_path / "m.png").is_file()
    missing = CliRunner().invoke(_cli(), [str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no metrics.csv" in missing.output


def test_plots_a_real_run(served, tiny_qwen2_dir, tmp_path):
    from tests.client.test_trainer import run_training, train_config

    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", steps=2, eval_samples=4, eval_every=1))
    plot = plot_run(tmp_path / "run")
    assert plot.panels == ALL_PANELS and plot.path.stat().st_size > 20_000
