"""The paper's experiment end to end at toy scale: teachers, SFT, rollouts, precompute, serve, seven arms, evaluate.

Read top to bottom it is the experiment of Lightning OPD (arXiv 2604.13010), reworked to test
the paper's claims as the paper states them:

1. a task (addition with worked solutions) with train / validation / test splits;
2. teachers A, A' (A's data, another seed) and B (same task, other style probabilities): equally
   accurate, and each finds the others' text plausible but less likely;
3. per seed, SFT data from A and a smaller student fine-tuned on it; the same from B (the control);
4. rollouts sampled once from each SFT student (ids as sampled, with their log-probs), enough
   for about `rollout_passes` passes;
5. `lopd precompute` scores them once per teacher; scoring A's student with A' or B is refused,
   then built with `--allow-teacher-mismatch` and marked inconsistent;
6. `lopd serve` serves the store on loopback; the offline arms train through the HTTP client
   (`lopd train`'s own trainer, no teacher loaded), the online arms with the teacher live;
7. every `eval_every` steps: accuracy, reverse KL to the arm's teacher and KL to its SFT start on
   fresh samples; for Lightning OPD with A and with B, the offline/online gradient cosine;
8. tables, plot and the claims' tests (`report.py`, `stats.py`).

Teachers are trained once and shared by all seeds; each seed redoes everything from the SFT data
on (SFT sample, student init, rollouts, training order, evaluation samples).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

import lopd
from lopd.errors import Inconsistent, TeacherMismatch
from lopd.fingerprint import model_fingerprint

from . import lm
from .config import PipelineConfig
from .evaluate import evaluate, greedy_accuracy
from .gradients import StoredBatch, compare_gradients, stored_batch
from .online_opd import OnlineOPDConfig, train_online_opd
from .report import GradientPoint, MethodRun, PipelineReport, Point, SeedRun, TeacherResult, derive, markdown, plot
from .stages import generate_sft_data, read_examples, sample_rollouts, sft_student, sft_teacher_of, train_teacher
from .task import Problem, StyleName, held_out_problems, make_problems, validation_problems

RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"
TeacherName = Literal["A", "A'", "B"]
# Each teacher: its solution style and its training seed (A' = A's style, another seed).
TEACHERS: dict[TeacherName, tuple[StyleName, int]] = {"A": ("A", 1), "A'": ("A", 3), "B": ("B", 2)}


@dataclass(frozen=True)
class Arm:
    """One training run of a seed: which SFT student it starts from, which teacher scores it, and how."""

    method: str  # a key of report.METHODS
    student: StyleName  # the SFT student fine-tuned on this teacher's data
    teacher: TeacherName
    online: bool = False
    ratio_reference: Literal["current", "rollout"] = "current"  # "current": the paper's ratio-1 update
    inconsistent: bool = False  # trained for `inconsistent_steps_factor` times the steps
    gradients: bool = False  # measure the offline/online gradient cosine at each evaluation


ARMS: tuple[Arm, ...] = (
    Arm("lightning_opd", "A", "A", gradients=True),
    Arm("online_opd", "A", "A", online=True),
    Arm("lightning_opd_trust_region", "A", "A", ratio_reference="rollout"),
    Arm("lightning_opd_a_prime", "A", "A'"),
    Arm("lightning_opd_inconsistent", "A", "B", inconsistent=True, gradients=True),
    Arm("online_opd_inconsistent", "A", "B", online=True, inconsistent=True),
    Arm("control_b", "B", "B"),
)


def dataset_name(seed: int, student: str, teacher: str) -> str:
    return f"seed{seed}-student-{student}-teacher-{teacher.replace(chr(39), 'prime')}"


def _environment(cfg: PipelineConfig) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "lightning_opd": lopd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def pin_determinism(cfg: PipelineConfig) -> None:
    """What can be pinned: thread count (float reductions depend on it) and deterministic kernels."""
    import torch

    torch.set_num_threads(cfg.torch_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Clock:
    """Wall-clock and CPU time (every thread of this process) of what ran inside `measure`."""

    wall: float = 0.0
    cpu: float = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c


def evaluation_problems(cfg: PipelineConfig) -> list[Problem]:
    """The problems the numbers are measured on: the test split, or the validation split when tuning."""
    if cfg.split == "validation":
        return validation_problems(cfg.test_problems, cfg.digits)
    return held_out_problems(cfg.test_problems, cfg.digits)


def training_problems(cfg: PipelineConfig, n: int, seed: int) -> list[Problem]:
    """Problems for teachers, SFT data and rollouts: never among the test or validation problems."""
    exclude = held_out_problems(cfg.test_problems, cfg.digits) + validation_problems(cfg.test_problems, cfg.digits)
    return make_problems(n, cfg.digits, seed=seed, exclude=exclude)


class Evaluator:
    """Evaluates a model every `eval_every` steps (and at the end), keeps the curve, and clocks itself so that
    training time excludes it."""

    def __init__(
        self, cfg: PipelineConfig, tok: Any, problems: list[Problem], teacher: Any, sft: Any, seed: int,
        last_step: int, gradients: StoredBatch | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.tok, self.problems, self.teacher, self.sft = cfg, tok, problems, teacher, sft
        self.seed, self.last_step, self.gradients = seed, last_step, gradients
        self.curve: list[Point] = []
        self.clock = Clock()

    def __call__(self, step: int, model: Any) -> None:
        if step % self.cfg.eval_every and step != self.last_step:
            return
        with self.clock.measure():
            e = evaluate(
                model, self.tok, self.problems, self.teacher, self.sft, kl_samples=self.cfg.kl_samples,
                seed=self.seed * 7919 + 1, max_new_tokens=self.cfg.max_new_tokens,
            )  # fmt: skip
            gradient = None
            if self.gradients is not None:
                g = compare_gradients(model, self.tok, self.gradients, self.teacher, seed=self.seed * 104729 + step,
                                      max_new_tokens=self.cfg.max_new_tokens)  # fmt: skip
                gradient = GradientPoint(**g.to_json())
            self.curve.append(Point(step=step, gradient=gradient, **e.to_json()))


@dataclass
class Student:
    """A seed's SFT student and the rollouts sampled from it once."""

    style: StyleName
    path: Path
    rollouts: Path
    problems: list[Problem]
    sampling: Clock


def prepare_teachers(
    cfg: PipelineConfig, run_dir: Path, names: Sequence[TeacherName], echo: Callable[[str], None]
) -> tuple[dict[TeacherName, Path], list[TeacherResult]]:
    """Train each named teacher (or keep it when `run_dir` already holds one trained with these settings)."""
    fit = lm.FitConfig(steps=cfg.teacher_steps, batch_size=cfg.fit_batch_size, lr=cfg.fit_lr)
    train = training_problems(cfg, cfg.train_problems, seed=1)
    stamp = f"{cfg.teacher.model_dump_json()} {cfg.teacher_steps} {cfg.fit_lr} {cfg.train_problems} {cfg.digits}\n"
    paths: dict[TeacherName, Path] = {}
    results = []
    for name in names:
        style, seed = TEACHERS[name]
        path = run_dir / f"teacher-{name.replace(chr(39), 'prime')}"
        if (path / "stamp.txt").is_file() and (path / "stamp.txt").read_text() == stamp:
            echo(f"      teacher {name}: kept from {path}")
        else:
            echo(f"[2/8] training teacher {name} (style {style}, {cfg.teacher.hidden}x{cfg.teacher.layers}, "
                 f"{cfg.teacher_steps} steps)")  # fmt: skip
            train_teacher(path, style, train, cfg.teacher, dataclasses.replace(fit, seed=seed))
            (path / "stamp.txt").write_text(stamp)
        paths[name] = path
        acc = greedy_accuracy(*lm.load(path), evaluation_problems(cfg), max_new_tokens=cfg.max_new_tokens)
        results.append(TeacherResult(name=name, style=style, accuracy=acc, fingerprint=model_fingerprint(path)))
        echo(f"      teacher {name}: {acc:.1%} accuracy")
    return paths, results


def prepare_student(cfg: PipelineConfig, seed_dir: Path, teacher: Path, style: StyleName, seed: int) -> Student:
    """SFT data from `teacher`, the student fine-tuned on it, and its rollouts (sampled once, clocked)."""
    offset = 0 if style == "A" else 50
    sft_data = generate_sft_data(
        teacher, training_problems(cfg, cfg.train_problems, seed=1)[: cfg.sft_examples],
        seed_dir / f"sft-data-{style}.jsonl", seed=seed + offset, max_new_tokens=cfg.max_new_tokens,
    )  # fmt: skip
    fit = lm.FitConfig(steps=cfg.sft_steps, batch_size=cfg.fit_batch_size, lr=cfg.fit_lr, seed=100 + seed + offset)
    student = sft_student(sft_data, seed_dir / f"student-sft-{style}", cfg.student, fit)
    problems = training_problems(cfg, cfg.rollouts, seed=1000 + seed + offset)
    clock = Clock()
    with clock.measure():
        rollouts = sample_rollouts(student, problems, seed_dir / f"rollouts-{style}.jsonl", seed=seed + offset,
                                   max_new_tokens=cfg.max_new_tokens)  # fmt: skip
    return Student(style, student, rollouts, problems, clock)


def score_store(
    cfg: PipelineConfig, store: Path, student: Student, teacher: Path, name: str, consistent: bool
) -> tuple[Any, Clock, str | None]:
    """`lopd precompute` of the student's rollouts with `teacher`; an inconsistent one is refused first, then
    built with --allow-teacher-mismatch. Returns (manifest, clock, what the refusal said)."""
    from lopd.server.precompute import PrecomputeConfig, run_precompute

    common: dict[str, Any] = dict(
        rollouts=[student.rollouts], store=store, sft_teacher=sft_teacher_of(student.path), teacher=teacher,
        rollout_tokenizer=str(student.path), samples_per_part=4096, dataset=name, progress=False,
    )  # fmt: skip
    refused = None
    if not consistent:
        try:
            run_precompute(PrecomputeConfig(**common))
            raise RuntimeError(f"the consistency gate let {teacher} score a student fine-tuned on other data")
        except TeacherMismatch as e:
            refused = refusal_reason(str(e))
    clock = Clock()
    with clock.measure():
        result = run_precompute(PrecomputeConfig(allow_teacher_mismatch=not consistent, **common))
    if result.manifest is None:
        raise RuntimeError(f"precompute of {name} ended as {result.status}, not published")
    return result.manifest, clock, refused


def run_arm(
    cfg: PipelineConfig,
    arm: Arm,
    seed: int,
    seed_dir: Path,
    student: Student,
    teachers: dict[TeacherName, Any],
    problems: list[Problem],
    url: str | None,
    echo: Callable[[str], None],
) -> MethodRun:
    """Train one arm from its SFT student, evaluating along the way; returns its curve and costs."""
    from lopd.client.trainer import TrainConfig, train_student
    from lopd.server.teachers.transformers_backend import TransformersTeacher

    steps = cfg.opd_steps * (cfg.inconsistent_steps_factor if arm.inconsistent else 1)
    live, sft = teachers[arm.teacher], TransformersTeacher(student.path)
    tok = sft.tokenizer
    batch = None
    if arm.gradients:
        examples = read_examples(student.rollouts)
        batch = stored_batch([p for p, _ in examples], [r for _, r in examples], live, cfg.grad_samples)
    ev = Evaluator(cfg, tok, problems, live, sft, seed, steps, batch)
    ev(0, lm.load(student.path)[0])
    ev.clock = Clock()  # only evaluations during training are subtracted from its time
    bar = tqdm(total=steps, desc=arm.method, dynamic_ncols=True, leave=False)

    def on_step(step: int, model: Any) -> None:
        bar.update(1)
        ev(step, model)

    dataset = None if arm.online else dataset_name(seed, arm.student, arm.teacher)
    echo(f"[7/8] seed {seed}: {arm.method} ({'online, teacher ' + arm.teacher + ' live' if arm.online else dataset}"
         f", {steps} steps)")  # fmt: skip
    clock, tokens = Clock(), 0
    with clock.measure():
        if arm.online:
            prompts = [lm.encode_prompt(tok, p.prompt) for p in student.problems]
            result = train_online_opd(
                student.path, live, prompts,
                OnlineOPDConfig(steps=steps, batch_size=cfg.opd_batch_size, lr=cfg.opd_lr, seed=seed,
                                max_new_tokens=cfg.max_new_tokens),
                out=seed_dir / arm.method, on_step=on_step, progress=False,
            )  # fmt: skip
            tokens = result.teacher_forward_tokens
        else:
            assert url is not None
            train_student(
                TrainConfig(
                    url=url, dataset=dataset, student=student.path, out=seed_dir / arm.method, steps=steps,
                    batch_size=cfg.opd_batch_size, lr=cfg.opd_lr, seed=seed, sft_teacher=sft_teacher_of(student.path),
                    allow_inconsistent=arm.teacher != arm.student, ratio_reference=arm.ratio_reference,
                    tis_cap=cfg.tis_cap, log_every=steps, checkpoint_every=steps,
                ),
                echo=lambda line: None,
                on_step=on_step,
            )  # fmt: skip
    bar.close()
    sft.close()
    run = MethodRun(
        method=arm.method, teacher=arm.teacher, student=arm.student, dataset=dataset, steps=steps, curve=ev.curve,
        train_seconds=clock.wall - ev.clock.wall, train_cpu_seconds=clock.cpu - ev.clock.cpu,
        teacher_forward_tokens=tokens,
    )  # fmt: skip
    echo(f"      {_last(ev.curve)}; training {run.train_cpu_seconds:.1f} s CPU, {run.train_seconds:.1f} s wall")
    return run


def run_seed(
    cfg: PipelineConfig,
    run_dir: Path,
    seed: int,
    arms: Sequence[Arm],
    teacher_paths: dict[TeacherName, Path],
    live: dict[TeacherName, Any],
    echo: Callable[[str], None],
) -> SeedRun:
    """Everything of one seed: SFT students, rollouts, stores, every arm."""
    from lopd.client.trainer import TrainConfig, train_student
    from lopd.server.api.background import serve_in_background
    from lopd.server.api.settings import ServerSettings

    seed_dir, store = run_dir / f"seed-{seed}", run_dir / "store"
    if seed_dir.exists():  # every stage of a re-run starts afresh
        shutil.rmtree(seed_dir)
    problems = evaluation_problems(cfg)
    students: dict[StyleName, Student] = {}
    for style in dict.fromkeys(a.student for a in arms):
        echo(f"[3/8] seed {seed}: SFT data from teacher {style}, student SFT ({cfg.sft_steps} steps)")
        echo(f"[4/8] sampling {cfg.rollouts:,} rollouts from the SFT student of {style}")
        students[style] = prepare_student(cfg, seed_dir, teacher_paths[style], style, seed)

    echo(f"[5/8] lopd precompute: scoring each student's rollouts once per teacher into {store}")
    clocks: dict[tuple[str, str], Clock] = {}
    refused = ""
    tokens = 0
    for student_style, teacher in dict.fromkeys((a.student, a.teacher) for a in arms if not a.online):
        consistent = teacher == student_style
        name = dataset_name(seed, student_style, teacher)
        manifest, clock, why = score_store(cfg, store, students[student_style], teacher_paths[teacher], name,
                                           consistent)  # fmt: skip
        clocks[(student_style, teacher)] = clock
        if consistent and student_style == "A":
            tokens = manifest.num_prompt_tokens + manifest.num_response_tokens
        if why:
            refused = refused or why
            echo(f"      teacher {teacher} refused for student {student_style}: {why}")
        echo(f"      {name}: {manifest.num_samples:,} samples, {manifest.provenance.consistency.verdict}")

    runs: list[MethodRun] = []
    with serve_in_background(ServerSettings(store=store)) as server:
        echo(f"[6/8] lopd serve {store} at {server.base_url}")
        bad = next((a for a in arms if not a.online and a.teacher != a.student), None)
        if bad is not None:  # the trainer's own gate: an inconsistent dataset needs an explicit opt-in
            name = dataset_name(seed, bad.student, bad.teacher)
            try:
                train_student(TrainConfig(url=server.base_url, dataset=name, student=students[bad.student].path,
                                          out=seed_dir / "refused", steps=1,
                                          sft_teacher=sft_teacher_of(students[bad.student].path)),
                              echo=lambda line: None)  # fmt: skip
                raise RuntimeError(f"the trainer accepted the inconsistent dataset {name}")
            except Inconsistent as e:
                echo(f"      the trainer refuses {name} without allow_inconsistent: {refusal_reason(str(e))}")
        for arm in arms:
            runs.append(run_arm(cfg, arm, seed, seed_dir, students[arm.student], live, problems,
                                server.base_url, echo))  # fmt: skip
    a = students.get("A") or next(iter(students.values()))
    pre = clocks.get((a.style, a.style), Clock())
    return SeedRun(
        seed=seed, rollouts=cfg.rollouts, rollout_seconds=a.sampling.wall, rollout_cpu_seconds=a.sampling.cpu,
        precompute_seconds=pre.wall, precompute_cpu_seconds=pre.cpu, precompute_teacher_tokens=tokens,
        refused=refused, runs=runs,
    )  # fmt: skip


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    echo: Callable[[str], None] = print,
    arms: Sequence[Arm] = ARMS,
    write: bool = True,
) -> PipelineReport:
    """Run every stage into `run_dir`; with `write`, results.json / results.md / results.png go there too."""
    from lopd.server.teachers.transformers_backend import TransformersTeacher

    start = time.perf_counter()
    pin_determinism(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    echo(f"[1/8] task: {cfg.digits}-digit addition, {cfg.train_problems} training prompts, {cfg.test_problems} "
         f"{cfg.split} problems")  # fmt: skip
    arms = [a for a in arms if a.method in cfg.arms]
    names: list[TeacherName] = list(dict.fromkeys([*(a.student for a in arms), *(a.teacher for a in arms)]))
    teacher_paths, infos = prepare_teachers(cfg, run_dir, names, echo)
    live: dict[TeacherName, Any] = {name: TransformersTeacher(path) for name, path in teacher_paths.items()}
    store = run_dir / "store"
    if store.exists():  # the demo's own scratch store: a re-run measures its precompute afresh
        shutil.rmtree(store)
    try:
        seeds = [run_seed(cfg, run_dir, seed, arms, teacher_paths, live, echo) for seed in cfg.seeds]
    finally:
        for teacher in live.values():
            teacher.close()
    report = derive(cfg, infos, seeds, _environment(cfg), time.perf_counter() - start)
    if write:
        (run_dir / RESULTS_JSON).write_text(report.model_dump_json(indent=2) + "\n")
        (run_dir / RESULTS_MD).write_text(markdown(report))
        plot(report, run_dir / RESULTS_PNG)
        echo(f"[8/8] results in {run_dir}: {RESULTS_JSON}, {RESULTS_MD}, {RESULTS_PNG}\n")
        echo(markdown(report))
    return report


def refusal_reason(message: str) -> str:
    """What a consistency refusal says about this case, whole, without the general explanation after it.

    The trainer's refusal is a line ending in ':', the problems as a list (`  - ...`), then the
    explanation: the problems are the reason. Precompute's is one sentence, then the explanation.
    """
    lines = message.splitlines()
    if len(lines) > 1 and lines[0].endswith(":"):
        problems = [line.strip()[2:] for line in itertools.takewhile(lambda x: x.startswith("  - "), lines[1:])]
        if problems:
            return "; ".join(problems)
    first, end, _ = message.partition(". ")
    return first + "." if end else message


def _last(curve: list[Point]) -> str:
    p = curve[-1]
    return f"step {p.step}: accuracy {p.accuracy:.1%}, reverse KL {p.reverse_kl:.3f}, KL to SFT {p.kl_to_sft:.3f}"
