"""The pipeline's results: one JSON schema, a Markdown table, a plot, and the paper's claims checked.

The JSON (`results.json`) is the source of truth; the table and the plot are rendered from it.
Claims are *measured*: each says what was compared, the numbers, the noise threshold used, and
whether it held. Nothing here knows what the answer should be.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .config import PipelineConfig

METHODS = {
    "sft": "SFT (start point)",
    "lightning_opd": "Lightning OPD (offline, teacher A)",
    "online_opd": "online OPD (live teacher A)",
    "lightning_opd_inconsistent": "Lightning OPD, inconsistent (teacher B)",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Point(_Model):
    step: int
    accuracy: float
    reverse_kl: float
    sampled_accuracy: float


class MethodRun(_Model):
    method: str
    teacher: str  # "A" or "B"; what scored the training signal
    dataset: str | None  # the store dataset (offline methods)
    curve: list[Point]  # step 0 is the SFT checkpoint
    train_seconds: float  # wall-clock of training, evaluation excluded
    teacher_forward_tokens: int  # tokens a teacher scored *during training*


class SeedRun(_Model):
    seed: int
    sft: Point
    rollout_seconds: float | None = None  # one-off: sampling the rollouts from the SFT student
    precompute_seconds: float  # one-off: scoring the rollouts with teacher A (the consistent store)
    precompute_teacher_tokens: int
    rollouts: int
    refused: str  # what the consistency gate said when asked to build the inconsistent store without the flag
    runs: list[MethodRun]


class TeacherResult(_Model):
    """A trained teacher in the results: its solution style, held-out accuracy and content fingerprint.

    Not the loaded teacher's identity (`lopd.server.teachers.TeacherInfo`): this is what the report shows.
    """

    style: str
    accuracy: float
    fingerprint: str


class SummaryRow(_Model):
    method: str
    label: str
    seeds: int
    accuracy_mean: float
    accuracy_std: float  # over seeds (0 with one seed)
    reverse_kl_mean: float
    reverse_kl_std: float
    sampled_accuracy_mean: float
    train_seconds_mean: float | None
    teacher_forward_tokens_mean: float | None


class Claim(_Model):
    claim: str
    measured: str
    threshold: str
    holds: bool


class PipelineReport(_Model):
    config: PipelineConfig
    teachers: list[TeacherResult]
    seeds: list[SeedRun]
    summary: list[SummaryRow]
    claims: list[Claim]
    environment: dict[str, str | int | float | None]
    total_seconds: float


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return float(statistics.fmean(xs)), float(statistics.stdev(xs)) if len(xs) > 1 else 0.0


def summarize(seeds: Sequence[SeedRun]) -> list[SummaryRow]:
    rows = []
    for method, label in METHODS.items():
        if method == "sft":
            finals = [s.sft for s in seeds]
            secs, tokens = None, None
        else:
            runs = [r for s in seeds for r in s.runs if r.method == method]
            if not runs:
                continue
            finals = [r.curve[-1] for r in runs]
            secs = statistics.fmean(r.train_seconds for r in runs)
            tokens = statistics.fmean(r.teacher_forward_tokens for r in runs)
        acc, acc_sd = _mean_std([p.accuracy for p in finals])
        kl, kl_sd = _mean_std([p.reverse_kl for p in finals])
        rows.append(
            SummaryRow(
                method=method, label=label, seeds=len(finals), accuracy_mean=acc, accuracy_std=acc_sd,
                reverse_kl_mean=kl, reverse_kl_std=kl_sd,
                sampled_accuracy_mean=statistics.fmean(p.sampled_accuracy for p in finals),
                train_seconds_mean=secs, teacher_forward_tokens_mean=tokens,
            )
        )  # fmt: skip
    return rows


def _final_accuracies(seeds: Sequence[SeedRun], method: str) -> list[float]:
    """Each seed's final accuracy of `method`, in seed order ("sft": the starting checkpoint)."""
    if method == "sft":
        return [s.sft.accuracy for s in seeds]
    return [next(r for r in s.runs if r.method == method).curve[-1].accuracy for s in seeds]


def paired_difference(seeds: Sequence[SeedRun], a: str, b: str, n_test: int) -> tuple[float, float]:
    """(mean over seeds of accuracy(a) - accuracy(b), twice its standard error).

    Paired: within a seed every method starts from the same SFT checkpoint, so how good that
    checkpoint happened to be is common to both and cancels in the difference. The standard error
    is the larger of the binomial error of `n_test` problems and the spread of the per-seed
    differences over the seeds (with one seed only the binomial error is known).
    """
    diffs = [x - y for x, y in zip(_final_accuracies(seeds, a), _final_accuracies(seeds, b))]
    k = len(diffs)
    pa, pb = (statistics.fmean(_final_accuracies(seeds, m)) for m in (a, b))
    pa, pb = (min(max(p, 1 / n_test), 1 - 1 / n_test) for p in (pa, pb))
    binomial = math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / (n_test * k))
    spread = statistics.stdev(diffs) / math.sqrt(k) if k > 1 else 0.0
    return statistics.fmean(diffs), 2 * max(binomial, spread)


def check_claims(
    seeds: Sequence[SeedRun], summary: Sequence[SummaryRow], n_test: int, one_off_seconds: float | None = None
) -> list[Claim]:
    """The paper's claims at toy scale, each measured against a stated threshold.

    `one_off_seconds` (sampling + scoring the rollouts once) adds the end-to-end cost comparison."""
    rows = {r.method: r for r in summary}
    need = ("sft", "lightning_opd", "online_opd", "lightning_opd_inconsistent")
    if not all(m in rows for m in need):
        return []
    light, online = rows["lightning_opd"], rows["online_opd"]
    claims = []

    def acc_claim(text: str, a: str, b: str, kind: str) -> None:
        diff, noise = paired_difference(seeds, a, b, n_test)
        holds = diff > noise if kind == "above" else abs(diff) <= noise
        claims.append(
            Claim(
                claim=text,
                measured=f"{rows[a].accuracy_mean:.1%} vs {rows[b].accuracy_mean:.1%} (paired difference {diff:+.1%})",
                threshold=f"2 standard errors of the paired difference = {noise:.1%}",
                holds=holds,
            )
        )

    acc_claim("Lightning OPD is clearly above SFT", "lightning_opd", "sft", "above")
    acc_claim("Lightning OPD is within noise of online OPD", "lightning_opd", "online_opd", "within")
    acc_claim(
        "the inconsistent teacher is clearly below the consistent one", "lightning_opd", "lightning_opd_inconsistent",
        "above",
    )  # fmt: skip
    if light.train_seconds_mean and online.train_seconds_mean:
        ratio = online.train_seconds_mean / light.train_seconds_mean
        claims.append(
            Claim(
                claim="Lightning OPD's training phase is several times faster than online OPD's",
                measured=f"{online.train_seconds_mean:.1f} s vs {light.train_seconds_mean:.1f} s ({ratio:.1f}x)",
                threshold="at least 2x",
                holds=ratio >= 2.0,
            )
        )
        if one_off_seconds is not None:
            total = one_off_seconds + light.train_seconds_mean
            claims.append(
                Claim(
                    claim="counting the one-off sampling and scoring too, Lightning OPD costs less than online OPD",
                    measured=f"{online.train_seconds_mean:.1f} s vs {total:.1f} s "
                    f"({online.train_seconds_mean / total:.1f}x)",
                    threshold="more than 1x",
                    holds=online.train_seconds_mean > total,
                )
            )
    return claims


def derive(
    config: PipelineConfig,
    teachers: list[TeacherResult],
    seeds: list[SeedRun],
    environment: dict[str, str | int | float | None],
    total_seconds: float,
) -> PipelineReport:
    """The report from its measurements: the summary and the claims are always recomputed from the
    per-seed runs, so a report cannot disagree with its own data."""
    summary = summarize(seeds)
    one_off = statistics.fmean((s.rollout_seconds or 0.0) + s.precompute_seconds for s in seeds)
    return PipelineReport(
        config=config, teachers=teachers, seeds=seeds, summary=summary,
        claims=check_claims(seeds, summary, config.test_problems, one_off), environment=environment,
        total_seconds=total_seconds,
    )  # fmt: skip


def markdown(report: PipelineReport) -> str:
    cfg = report.config
    lines = [
        f"Preset `{cfg.preset}`, seeds {cfg.seeds}; {cfg.test_problems} held-out {cfg.digits}-digit problems; "
        f"{cfg.opd_steps} OPD steps of {cfg.opd_batch_size} samples from the same SFT checkpoint.",
        "",
        "| method | accuracy (greedy) | reverse KL to A (nats/token) | pass@1 at T=1 | training wall-clock | "
        "teacher tokens during training |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.summary:
        spread = f" ± {r.accuracy_std:.1%}" if r.seeds > 1 else ""
        kl_spread = f" ± {r.reverse_kl_std:.3f}" if r.seeds > 1 else ""
        secs = "-" if r.train_seconds_mean is None else f"{r.train_seconds_mean:.1f} s"
        tokens = "-" if r.teacher_forward_tokens_mean is None else f"{r.teacher_forward_tokens_mean:,.0f}"
        lines.append(
            f"| {r.label} | {r.accuracy_mean:.1%}{spread} | {r.reverse_kl_mean:.3f}{kl_spread} | "
            f"{r.sampled_accuracy_mean:.1%} | {secs} | {tokens} |"
        )
    pre = statistics.fmean(s.precompute_seconds for s in report.seeds)
    pre_tokens = statistics.fmean(s.precompute_teacher_tokens for s in report.seeds)
    sampled = [s.rollout_seconds for s in report.seeds if s.rollout_seconds is not None]
    sampling = f"sampling them {statistics.fmean(sampled):.1f} s, " if sampled else ""
    lines += [
        "",
        f"One-off cost of Lightning OPD ({report.seeds[0].rollouts:,} rollouts): {sampling}scoring them once with "
        f"teacher A (`lopd precompute`) {pre:.1f} s and {pre_tokens:,.0f} teacher tokens. Teachers: "
        + ", ".join(f"{t.style} {t.accuracy:.1%}" for t in report.teachers)
        + " greedy accuracy.",
        "",
        "| claim (paper, at toy scale) | measured | noise threshold | holds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.claim} | {c.measured} | {c.threshold} | {'yes' if c.holds else 'NO'} |" for c in report.claims]
    return "\n".join(lines) + "\n"


def plot(report: PipelineReport, out: Path) -> Path:
    """Against training steps, one line per method (mean over seeds, min-max band): held-out accuracy,
    its change from each seed's own SFT checkpoint (the paired view the claims use), and reverse KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    colors = {"lightning_opd": "tab:blue", "online_opd": "tab:green", "lightning_opd_inconsistent": "tab:red"}
    panels: list[tuple[str, Callable[[SeedRun, Point], float]]] = [
        ("held-out accuracy (greedy)", lambda s, p: p.accuracy),
        ("accuracy minus the seed's SFT accuracy", lambda s, p: p.accuracy - s.sft.accuracy),
        ("reverse KL to teacher A (nats/token, log scale)", lambda s, p: p.reverse_kl),
    ]
    for method, color in colors.items():
        runs = [(s, r) for s in report.seeds for r in s.runs if r.method == method]
        if not runs:
            continue
        steps = [p.step for p in runs[0][1].curve]
        for ax, (_, value) in zip(axes, panels):
            ys = [[value(s, p) for p in r.curve] for s, r in runs]
            ax.plot(
                steps, [statistics.fmean(c) for c in zip(*ys)], color=color, marker="o", ms=3, label=METHODS[method]
            )
            if len(runs) > 1:
                ax.fill_between(steps, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], color=color, alpha=0.15)
    sft = (
        statistics.fmean(s.sft.accuracy for s in report.seeds),
        0.0,
        statistics.fmean(s.sft.reverse_kl for s in report.seeds),
    )
    for ax, (label, _), y in zip(axes, panels, sft):
        ax.axhline(y, color="gray", ls="--", lw=1, label=METHODS["sft"])
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")  # the inconsistent run is an order of magnitude above the others
    axes[0].legend(fontsize=8)
    cfg = report.config
    fig.suptitle(f"Lightning OPD vs online OPD vs an inconsistent teacher ({cfg.preset} preset, seeds {cfg.seeds})")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
