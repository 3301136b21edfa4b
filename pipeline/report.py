"""The pipeline's results: one JSON schema, Markdown tables, a plot, and the paper's claims tested.

The JSON (`results.json`) is the source of truth; tables, plot and claims are recomputed from
it (`lopd pipeline report`). Each claim is tested as the paper states it, with the statistic of
`stats.py` and a margin fixed in the config before the run; nothing here knows what the answer
should be, and a claim that fails is printed as failing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .config import PipelineConfig
from .stats import MIN_SEEDS, TestResult, accuracy_differences, equivalence, superiority

METHODS = {
    "sft": "SFT (start point)",
    "lightning_opd": "Lightning OPD, teacher A (the paper's algorithm)",
    "online_opd": "online OPD, live teacher A",
    "lightning_opd_trust_region": "variant: Lightning OPD with a rollout trust region",
    "lightning_opd_a_prime": "Lightning OPD, teacher A' (A's data, other seed)",
    "lightning_opd_inconsistent": "Lightning OPD, inconsistent teacher B",
    "online_opd_inconsistent": "online OPD, inconsistent teacher B",
    "control_b": "control: student SFT'd on B's data, Lightning OPD with B",
}
COLORS = {
    "lightning_opd": "tab:blue",
    "online_opd": "tab:green",
    "lightning_opd_trust_region": "tab:cyan",
    "lightning_opd_a_prime": "tab:purple",
    "lightning_opd_inconsistent": "tab:red",
    "online_opd_inconsistent": "tab:orange",
    "control_b": "tab:brown",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GradientPoint(_Model):
    cosine: float
    norm_ratio: float
    noise_cosine: float


class Point(_Model):
    step: int
    accuracy: float
    reverse_kl: float  # to the run's own teacher
    kl_to_sft: float  # to the run's SFT checkpoint (drift)
    sampled_accuracy: float
    correct: str  # greedy correctness per evaluation problem ("0"/"1")
    gradient: GradientPoint | None = None  # offline vs online gradient (offline runs with teacher A or B)


class MethodRun(_Model):
    method: str
    teacher: str  # "A", "A'" or "B": what scored the training signal
    student: str  # "A" or "B": whose data the SFT student was fine-tuned on
    dataset: str | None  # the store dataset (offline methods)
    steps: int
    curve: list[Point]  # step 0 is the SFT checkpoint
    train_seconds: float  # wall-clock of training, evaluation excluded
    train_cpu_seconds: float  # CPU time of the same
    teacher_forward_tokens: int  # tokens a teacher scored *during training*


class SeedRun(_Model):
    seed: int
    rollouts: int
    rollout_seconds: float  # one-off: sampling the rollouts from the SFT student (wall)
    rollout_cpu_seconds: float
    precompute_seconds: float  # one-off: scoring them with teacher A (the consistent store)
    precompute_cpu_seconds: float
    precompute_teacher_tokens: int
    refused: str  # what the consistency gate said when asked to build the inconsistent store without the flag
    runs: list[MethodRun]

    def run(self, method: str) -> MethodRun | None:
        return next((r for r in self.runs if r.method == method), None)


class TeacherResult(_Model):
    """A trained teacher in the results: its name, solution style, held-out accuracy and content fingerprint."""

    name: str
    style: str
    accuracy: float
    fingerprint: str


class SummaryRow(_Model):
    method: str
    label: str
    seeds: int
    steps: int | None
    accuracy_mean: float
    accuracy_std: float  # over seeds (0 with one seed)
    reverse_kl_mean: float
    reverse_kl_std: float
    kl_to_sft_mean: float
    sampled_accuracy_mean: float
    train_seconds_mean: float | None
    train_cpu_seconds_mean: float | None
    teacher_forward_tokens_mean: float | None


class Claim(_Model):
    claim: str  # as the paper states it
    test: str  # what was compared, how
    measured: str
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
            runs = [r for r in (s.run("lightning_opd") for s in seeds) if r is not None]
            finals = [r.curve[0] for r in runs]
        else:
            runs = [r for r in (s.run(method) for s in seeds) if r is not None]
            finals = [r.curve[-1] for r in runs]
        if not runs:
            continue
        trained = method != "sft"
        acc, acc_sd = _mean_std([p.accuracy for p in finals])
        kl, kl_sd = _mean_std([p.reverse_kl for p in finals])
        rows.append(
            SummaryRow(
                method=method, label=label, seeds=len(finals), steps=runs[0].steps if trained else None,
                accuracy_mean=acc, accuracy_std=acc_sd, reverse_kl_mean=kl, reverse_kl_std=kl_sd,
                kl_to_sft_mean=statistics.fmean(p.kl_to_sft for p in finals),
                sampled_accuracy_mean=statistics.fmean(p.sampled_accuracy for p in finals),
                train_seconds_mean=statistics.fmean(r.train_seconds for r in runs) if trained else None,
                train_cpu_seconds_mean=statistics.fmean(r.train_cpu_seconds for r in runs) if trained else None,
                teacher_forward_tokens_mean=(
                    statistics.fmean(r.teacher_forward_tokens for r in runs) if trained else None
                ),
            )
        )  # fmt: skip
    return rows


def _finals(seeds: Sequence[SeedRun], method: str) -> list[str]:
    """Each seed's final per-problem correctness of `method` ("sft": the consistent arm's start)."""
    if method == "sft":
        return [_need(s, "lightning_opd").curve[0].correct for s in seeds]
    return [_need(s, method).curve[-1].correct for s in seeds]


def _need(seed: SeedRun, method: str) -> MethodRun:
    run = seed.run(method)
    if run is None:
        raise KeyError(method)
    return run


def _mean_cosine(run: MethodRun) -> float:
    return statistics.fmean(p.gradient.cosine for p in run.curve if p.gradient is not None)


def _one_off_cpu(s: SeedRun) -> float:
    return s.rollout_cpu_seconds + s.precompute_cpu_seconds


def check_claims(seeds: Sequence[SeedRun], cfg: PipelineConfig) -> list[Claim]:
    """The paper's three claims (and its cost figure), each tested as stated, where the run has the arms it needs."""

    def have(*methods: str) -> bool:
        return all(s.run(m) for s in seeds for m in methods)

    if not have("lightning_opd", "online_opd"):
        return []
    ids = [s.seed for s in seeds]
    per_seed = len(seeds) >= MIN_SEEDS
    claims: list[Claim] = []

    def acc_test(a: str, b: str, kind: str) -> TestResult:
        diffs, unit = accuracy_differences(_finals(seeds, a), _finals(seeds, b), ids)
        if kind == "equivalence":
            return equivalence(diffs, cfg.margin_accuracy, unit, cfg.alpha)
        return superiority(diffs, unit, cfg.alpha)

    def add(claim: str, test: str, result: TestResult, fmt: str, extra: str = "") -> None:
        claims.append(Claim(claim=claim, test=test, measured=extra + result.describe(fmt), holds=result.holds))

    def acc_pair(a: str, b: str) -> str:
        rows = {r.method: r for r in summarize(seeds)}
        return f"{rows[a].accuracy_mean:.1%} vs {rows[b].accuracy_mean:.1%}; "

    consistent = "under teacher consistency, Lightning OPD incurs no degradation compared to online OPD"
    add(consistent, f"accuracy, Lightning OPD - online OPD (teacher A, equal steps): paired TOST, margin "
        f"±{cfg.margin_accuracy:.0%}", acc_test("lightning_opd", "online_opd", "equivalence"), ".1%",
        acc_pair("lightning_opd", "online_opd"))  # fmt: skip
    kl_diffs = [_need(s, "lightning_opd").curve[-1].reverse_kl - _need(s, "online_opd").curve[-1].reverse_kl
                for s in seeds]  # fmt: skip
    add(consistent, f"reverse KL to A, Lightning OPD - online OPD: paired TOST over seeds, margin ±{cfg.margin_kl}",
        equivalence(kl_diffs, cfg.margin_kl, "seeds", cfg.alpha), ".3f")  # fmt: skip
    add("Lightning OPD improves over the SFT student", "accuracy, Lightning OPD - SFT: paired one-sided t",
        acc_test("lightning_opd", "sft", "superiority"), ".1%", acc_pair("lightning_opd", "sft"))  # fmt: skip
    factor = cfg.inconsistent_steps_factor
    bias = "violating teacher consistency makes both offline and online OPD converge to a worse point"
    if have("lightning_opd_inconsistent", "online_opd_inconsistent"):
        _inconsistency_claims(seeds, cfg, bias, factor, add, acc_test, acc_pair, have("control_b"))
    if have("lightning_opd_inconsistent"):
        _gradient_claim(seeds, cfg, add, ids, per_seed)
    _cost_claims(seeds, claims, per_seed, cfg.alpha)
    return claims


def _inconsistency_claims(
    seeds: Sequence[SeedRun],
    cfg: PipelineConfig,
    bias: str,
    factor: int,
    add: Callable[..., None],
    acc_test: Callable[..., TestResult],
    acc_pair: Callable[..., str],
    control: bool,
) -> None:
    add(f"{bias}, regardless of training duration (offline)",
        f"accuracy, Lightning OPD with A ({cfg.opd_steps} steps) - with B ({factor}x the steps): one-sided t",
        acc_test("lightning_opd", "lightning_opd_inconsistent", "superiority"), ".1%",
        acc_pair("lightning_opd", "lightning_opd_inconsistent"))  # fmt: skip
    add(f"{bias}, regardless of training duration (online)",
        f"accuracy, online OPD with A - with B ({factor}x the steps): one-sided t",
        acc_test("online_opd", "online_opd_inconsistent", "superiority"), ".1%",
        acc_pair("online_opd", "online_opd_inconsistent"))  # fmt: skip
    if not control:
        return
    add("control: B is not simply a worse teacher (B as the SFT-data teacher does as well as A)",
        f"accuracy, control (SFT on B, Lightning OPD with B) - Lightning OPD with A: paired TOST, margin "
        f"±{cfg.margin_accuracy:.0%}", acc_test("control_b", "lightning_opd", "equivalence"), ".1%",
        acc_pair("control_b", "lightning_opd"))  # fmt: skip


def _gradient_claim(seeds: Sequence[SeedRun], cfg: PipelineConfig, add: Callable[..., None], ids: list[int],
                    per_seed: bool) -> None:  # fmt: skip
    """Theory: offline-online gradient agreement, consistent (A) against inconsistent (B)."""
    cos_diffs: list[float]
    if per_seed:
        cos_diffs = [_mean_cosine(_need(s, "lightning_opd")) - _mean_cosine(_need(s, "lightning_opd_inconsistent"))
                     for s in seeds]  # fmt: skip
        unit = "seeds (mean over checkpoints)"
    else:
        a, b = _need(seeds[0], "lightning_opd"), _need(seeds[0], "lightning_opd_inconsistent")
        ga = [p.gradient.cosine for p in a.curve if p.gradient is not None]
        gb = [p.gradient.cosine for p in b.curve if p.gradient is not None][: len(ga)]
        cos_diffs, unit = [x - y for x, y in zip(ga, gb)], f"checkpoints (seed {ids[0]} only)"
    ceiling = statistics.fmean(p.gradient.noise_cosine for s in seeds for r in s.runs for p in r.curve if p.gradient)
    a_cos = statistics.fmean(_mean_cosine(_need(s, "lightning_opd")) for s in seeds)
    b_cos = statistics.fmean(_mean_cosine(_need(s, "lightning_opd_inconsistent")) for s in seeds)
    add("bounded gradient discrepancy under teacher consistency, an irreducible bias without it",
        "cosine(offline, online gradient) with teacher A - with teacher B, along training: one-sided t",
        superiority(cos_diffs, unit, cfg.alpha), ".3f",
        f"A {a_cos:.3f} vs B {b_cos:.3f} (noise ceiling {ceiling:.3f}); ")  # fmt: skip


def _cost_claims(seeds: Sequence[SeedRun], claims: list[Claim], per_seed: bool, alpha: float) -> None:
    """Cost: end to end (sampling + scoring once + training) against online OPD, in CPU time, equal steps."""
    log_ratios = [
        math.log(max(_need(s, "online_opd").train_cpu_seconds, 1e-9)
                 / max(_one_off_cpu(s) + _need(s, "lightning_opd").train_cpu_seconds, 1e-9))
        for s in seeds
    ]  # fmt: skip
    ratio = math.exp(statistics.fmean(log_ratios))
    cost = superiority(log_ratios, "seeds" if per_seed else f"seeds ({len(seeds)}: no test below {MIN_SEEDS})",
                       alpha) if per_seed else None  # fmt: skip
    claims.append(
        Claim(
            claim="Lightning OPD needs less compute than online OPD (the paper: 4.0x less GPU time)",
            test="CPU time, end to end (rollout sampling + scoring + training) vs online OPD's training, equal steps "
            "and samples seen: one-sided t on the log ratio",
            measured=f"{ratio:.2f}x less (geometric mean over seeds)"
            + (f"; {cost.describe('.3f')}" if cost else f"; {len(seeds)} seed(s): not tested below {MIN_SEEDS}"),
            holds=bool(cost and cost.holds),
        )
    )
    claims.append(
        Claim(
            claim="... by as much as the paper's 4.0x",
            test="the same ratio against 4.0",
            measured=f"{ratio:.2f}x",
            holds=ratio >= 4.0,
        )
    )


def derive(
    config: PipelineConfig,
    teachers: list[TeacherResult],
    seeds: list[SeedRun],
    environment: dict[str, str | int | float | None],
    total_seconds: float,
) -> PipelineReport:
    """The report from its measurements: the summary and the claims are always recomputed from the
    per-seed runs, so a report cannot disagree with its own data."""
    return PipelineReport(
        config=config, teachers=teachers, seeds=seeds, summary=summarize(seeds),
        claims=check_claims(seeds, config), environment=environment, total_seconds=total_seconds,
    )  # fmt: skip


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def markdown(report: PipelineReport) -> str:
    cfg = report.config
    lines = [
        f"Preset `{cfg.preset}`, seeds {cfg.seeds}; {cfg.test_problems} {cfg.split} {cfg.digits}-digit problems; "
        f"OPD: {cfg.opd_steps} steps of {cfg.opd_batch_size} samples (inconsistent arms "
        f"{cfg.inconsistent_steps_factor}x), lr {cfg.opd_lr:g}, {report.seeds[0].rollouts:,} rollouts "
        f"({cfg.rollout_passes:g} passes), every arm from its seed's SFT checkpoint. Mean ± std over seeds.",
        "",
        "| method | steps | accuracy (greedy) | reverse KL to its teacher | KL to SFT (drift) | pass@1 at T=1 | "
        "training CPU | training wall | teacher tokens in training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.summary:
        spread = f" ± {r.accuracy_std:.1%}" if r.seeds > 1 else ""
        kl_spread = f" ± {r.reverse_kl_std:.3f}" if r.seeds > 1 else ""
        tokens = "-" if r.teacher_forward_tokens_mean is None else f"{r.teacher_forward_tokens_mean:,.0f}"
        lines.append(
            f"| {r.label} | {r.steps or '-'} | {r.accuracy_mean:.1%}{spread} | {r.reverse_kl_mean:.3f}{kl_spread} | "
            f"{r.kl_to_sft_mean:.3f} | {r.sampled_accuracy_mean:.1%} | {_secs(r.train_cpu_seconds_mean)} | "
            f"{_secs(r.train_seconds_mean)} | {tokens} |"
        )
    seeds = report.seeds
    rows = {r.method: r for r in report.summary}
    if "lightning_opd" in rows and "online_opd" in rows:
        one_cpu = statistics.fmean(_one_off_cpu(s) for s in seeds)
        one_wall = statistics.fmean(s.rollout_seconds + s.precompute_seconds for s in seeds)
        light, online = rows["lightning_opd"], rows["online_opd"]
        assert light.train_cpu_seconds_mean and online.train_cpu_seconds_mean
        assert light.train_seconds_mean and online.train_seconds_mean
        lines += [
            "",
            "Cost at equal steps and equal samples seen (teacher A), CPU time (all threads) and wall-clock:",
            "",
            "| | Lightning OPD | online OPD | online / Lightning |",
            "|---|---|---|---|",
            f"| training only, CPU | {light.train_cpu_seconds_mean:.1f} s | {online.train_cpu_seconds_mean:.1f} s | "
            f"{online.train_cpu_seconds_mean / light.train_cpu_seconds_mean:.2f}x |",
            f"| end to end (sampling {statistics.fmean(s.rollout_cpu_seconds for s in seeds):.1f} s + scoring "
            f"{statistics.fmean(s.precompute_cpu_seconds for s in seeds):.1f} s + training), CPU | "
            f"{one_cpu + light.train_cpu_seconds_mean:.1f} s | {online.train_cpu_seconds_mean:.1f} s | "
            f"{online.train_cpu_seconds_mean / (one_cpu + light.train_cpu_seconds_mean):.2f}x |",
            f"| end to end, wall-clock | {one_wall + light.train_seconds_mean:.1f} s | "
            f"{online.train_seconds_mean:.1f} s | "
            f"{online.train_seconds_mean / (one_wall + light.train_seconds_mean):.2f}x |",
        ]  # fmt: skip
    lines += [
        "",
        "Teachers (greedy accuracy): " + ", ".join(f"{t.name} {t.accuracy:.1%}" for t in report.teachers) + ".",
    ]
    if report.claims:
        lines += [
            "",
            f"Claims (alpha {cfg.alpha}, margins fixed in advance: accuracy ±{cfg.margin_accuracy:.0%}, "
            f"KL ±{cfg.margin_kl} nats):",
            "",
            "| claim (as the paper states it) | test | measured | holds |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c.claim} | {c.test} | {c.measured} | {'yes' if c.holds else 'NO'} |" for c in report.claims]
    return "\n".join(lines) + "\n"


def plot(report: PipelineReport, out: Path) -> Path:
    """Against training steps, one line per method (mean over seeds, min-max band): accuracy, reverse KL to
    its teacher, KL to the SFT checkpoint (drift), and the offline/online gradient cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    panels: list[tuple[str, Callable[[Point], float | None]]] = [
        ("held-out accuracy (greedy)", lambda p: p.accuracy),
        ("reverse KL to the run's teacher (nats/token, log scale)", lambda p: p.reverse_kl),
        ("KL to the SFT checkpoint on fresh samples (drift)", lambda p: p.kl_to_sft),
        ("cos(offline gradient, online gradient)", lambda p: p.gradient.cosine if p.gradient else None),
    ]
    for method, color in COLORS.items():
        runs = [r for s in report.seeds for r in s.runs if r.method == method]
        if not runs:
            continue
        steps = [p.step for p in runs[0].curve]
        for ax, (_, value) in zip(axes.flat, panels):
            ys = [[value(p) for p in r.curve] for r in runs]
            if any(y is None for c in ys for y in c):
                continue
            cols = list(zip(*ys))
            ax.plot(steps, [statistics.fmean(c) for c in cols], color=color, marker="o", ms=3, label=METHODS[method])  # type: ignore[arg-type]
            if len(runs) > 1:
                ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.12)  # type: ignore[type-var]
    noise = [(p.step, p.gradient.noise_cosine) for s in report.seeds for r in s.runs for p in r.curve if p.gradient]
    if noise:
        by_step: dict[int, list[float]] = {}
        for step, cosine in noise:
            by_step.setdefault(step, []).append(cosine)
        xs = sorted(by_step)
        axes[1, 1].plot(xs, [statistics.fmean(by_step[x]) for x in xs], color="gray", ls=":", label="noise ceiling")
    for ax, (label, _) in zip(axes.flat, panels):
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 1].set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    axes[1, 1].legend(fontsize=7)
    cfg = report.config
    fig.suptitle(f"Lightning OPD, online OPD, teacher consistency ({cfg.preset} preset, seeds {cfg.seeds})")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
