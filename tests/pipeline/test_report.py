"""Claims are measured against a noise threshold; the table and the plot render from the JSON."""

from __future__ import annotations

from pathlib import Path

from lopd.pipeline.config import PipelineConfig
from lopd.pipeline.report import (
    MethodRun,
    PipelineReport,
    Point,
    SeedRun,
    TeacherResult,
    check_claims,
    markdown,
    plot,
    summarize,
)


def _seed(seed: int, sft: float, light: float, online: float, bad: float, light_s=10.0, online_s=40.0) -> SeedRun:
    def run(method: str, acc: float, secs: float, tokens: int) -> MethodRun:
        curve = [Point(step=0, accuracy=sft, reverse_kl=0.5, sampled_accuracy=sft / 2)]
        curve.append(Point(step=10, accuracy=acc, reverse_kl=0.3, sampled_accuracy=acc / 2))
        return MethodRun(method=method, teacher="A", dataset=None, curve=curve, train_seconds=secs,
                         teacher_forward_tokens=tokens)  # fmt: skip

    return SeedRun(
        seed=seed, sft=Point(step=0, accuracy=sft, reverse_kl=0.5, sampled_accuracy=sft / 2),
        precompute_seconds=1.0, precompute_teacher_tokens=1000, rollouts=100, refused="refusing",
        runs=[run("lightning_opd", light, light_s, 0), run("online_opd", online, online_s, 5000),
              run("lightning_opd_inconsistent", bad, light_s, 0)],
    )  # fmt: skip


def _report(seeds: list[SeedRun], n_test: int = 500) -> PipelineReport:
    summary = summarize(seeds)
    return PipelineReport(
        config=PipelineConfig(test_problems=n_test, seeds=[s.seed for s in seeds]),
        teachers=[TeacherResult(style="A", accuracy=0.99, fingerprint="sha256:a")],
        seeds=seeds, summary=summary, claims=check_claims(seeds, summary, n_test), environment={}, total_seconds=1.0,
    )  # fmt: skip


def test_claims_hold_when_the_differences_are_large():
    report = _report([_seed(0, 0.50, 0.80, 0.81, 0.10), _seed(1, 0.52, 0.82, 0.80, 0.12)])
    assert [c.holds for c in report.claims] == [True, True, True, True]
    assert "4.0x" in report.claims[3].measured


def test_claims_fail_when_differences_are_within_noise_or_reversed():
    report = _report([_seed(0, 0.50, 0.51, 0.80, 0.52, light_s=30.0, online_s=40.0)], n_test=100)
    held = {c.claim: c.holds for c in report.claims}
    assert held == {
        "Lightning OPD is clearly above SFT": False,
        "Lightning OPD is within noise of online OPD": False,
        "the inconsistent teacher is clearly below the consistent one": False,
        "Lightning OPD's training phase is several times faster than online OPD's": False,
    }


def test_the_comparison_is_paired_so_the_common_sft_quality_cancels():
    # SFT checkpoints of very different quality, each improved by 8-9 points: unpaired, the
    # seed-to-seed spread (about 30 points) would hide the gain; paired, it is clear.
    report = _report([_seed(0, 0.2, 0.28, 0.29, 0.0), _seed(1, 0.5, 0.59, 0.58, 0.0), _seed(2, 0.8, 0.88, 0.87, 0.0)])
    assert report.claims[0].holds is True and "paired difference +8.3%" in report.claims[0].measured
    sft = next(r for r in report.summary if r.method == "sft")
    assert sft.accuracy_std > 0.25


def test_seed_spread_widens_the_noise_threshold():
    # The mean gain is 10 points, but the per-seed gains disagree wildly: not "clearly above".
    report = _report([_seed(0, 0.5, 0.9, 0.9, 0.2), _seed(1, 0.5, 0.3, 0.3, 0.2), _seed(2, 0.5, 0.6, 0.6, 0.2)])
    assert report.claims[0].holds is False
    light = next(r for r in report.summary if r.method == "lightning_opd")
    assert light.seeds == 3 and light.accuracy_std > 0.25


def test_markdown_and_plot_render_every_method(tmp_path: Path):
    report = _report([_seed(0, 0.5, 0.8, 0.8, 0.1)])
    md = markdown(report)
    for label in ("SFT (start point)", "Lightning OPD (offline, teacher A)", "online OPD (live teacher A)",
                  "Lightning OPD, inconsistent (teacher B)"):  # fmt: skip
        assert label in md
    assert "| 5,000 |" in md  # teacher tokens of online OPD
    png = plot(report, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert PipelineReport.model_validate_json(report.model_dump_json()) == report


def test_the_end_to_end_claim_counts_the_one_off_cost():
    seeds = [_seed(0, 0.5, 0.8, 0.8, 0.1, light_s=10.0, online_s=40.0)]
    summary = summarize(seeds)
    cheap = check_claims(seeds, summary, 500, one_off_seconds=5.0)
    dear = check_claims(seeds, summary, 500, one_off_seconds=35.0)
    assert len(cheap) == 5 and cheap[4].holds and "2.7x" in cheap[4].measured
    assert dear[4].holds is False
    assert len(check_claims(seeds, summary, 500)) == 4
