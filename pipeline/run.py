"""The paper's pipeline end to end: teachers, SFT, rollouts, precompute, serve, three ways to train, evaluate.

Read top to bottom it is the experiment of Lightning OPD (arXiv 2604.13010) at toy scale:

1. a task (addition with worked solutions) with a train / held-out split;
2. teachers A and B, similar accuracy, different solution styles;
3. SFT data sampled from A (provenance recorded) and a smaller student fine-tuned on it;
4. rollouts sampled once from the SFT student (ids as sampled, with their log-probs);
5. `lopd precompute` scores them with A (consistent); B is refused, then built with
   `--allow-teacher-mismatch` and marked inconsistent;
6. `lopd serve` serves the store on loopback;
7. from the same SFT checkpoint, same steps, batch and optimizer: Lightning OPD on A's store
   and on B's store (through the HTTP client, no teacher loaded), and online OPD with A live;
8. every `eval_every` steps: held-out greedy accuracy and reverse KL to A on fresh samples.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

import lopd
from lopd.errors import Inconsistent, TeacherMismatch
from lopd.fingerprint import model_fingerprint

from . import lm
from .config import PipelineConfig
from .evaluate import evaluate, greedy_accuracy
from .online_opd import OnlineOPDConfig, train_online_opd
from .report import MethodRun, PipelineReport, Point, SeedRun, TeacherResult, derive, markdown, plot
from .stages import generate_sft_data, sample_rollouts, sft_student, sft_teacher_of, train_teacher
from .task import Problem, held_out_problems, make_problems

RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "results.json", "results.md", "results.png"


def _environment() -> dict[str, Any]:
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
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class _Evaluator:
    """Evaluates a model on the held-out set and keeps the curve; times itself so training time excludes it."""

    def __init__(self, cfg: PipelineConfig, tok: Any, test: list[Problem], teacher: Any, seed: int) -> None:
        self.cfg, self.tok, self.test, self.teacher, self.seed = cfg, tok, test, teacher, seed
        self.curve: list[Point] = []
        self.seconds = 0.0

    def __call__(self, step: int, model: Any) -> None:
        if step % self.cfg.eval_every and step != self.cfg.opd_steps:
            return
        t0 = time.perf_counter()
        e = evaluate(
            model, self.tok, self.test, self.teacher, kl_samples=self.cfg.kl_samples,
            seed=self.seed * 7919 + 1, max_new_tokens=self.cfg.max_new_tokens,
        )  # fmt: skip
        self.curve.append(Point(step=step, **e.to_json()))
        self.seconds += time.perf_counter() - t0


def run_pipeline(cfg: PipelineConfig, run_dir: Path, *, echo: Callable[[str], None] = print) -> PipelineReport:
    """Run every stage into `run_dir` and write results.json / results.md / results.png there."""
    from lopd.client.trainer import TrainConfig, train_student
    from lopd.server.api.background import serve_in_background
    from lopd.server.api.settings import ServerSettings
    from lopd.server.precompute import PrecomputeConfig, run_precompute
    from lopd.server.teachers.transformers_backend import TransformersTeacher

    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    fit = lm.FitConfig(steps=cfg.teacher_steps, batch_size=cfg.fit_batch_size, lr=cfg.fit_lr)

    # 1. The task.
    test = held_out_problems(cfg.test_problems, cfg.digits)
    train = make_problems(cfg.train_problems, cfg.digits, seed=1, exclude=test)
    echo(f"[1/8] task: {cfg.digits}-digit addition, {len(train)} training prompts, {len(test)} held out")

    # 2. Teachers A and B: same task, same size, different solution styles.
    teachers: dict[str, Path] = {}
    infos = []
    styles: tuple[tuple[Literal["A", "B"], int], ...] = (("A", 1), ("B", 2))
    for style, seed in styles:
        path = run_dir / f"teacher-{style}"
        echo(f"[2/8] training teacher {style} ({cfg.teacher.hidden}x{cfg.teacher.layers}, {cfg.teacher_steps} steps)")
        teachers[style] = train_teacher(path, style, train, cfg.teacher, dataclasses.replace(fit, seed=seed))
        acc = greedy_accuracy(*lm.load(path), test, max_new_tokens=cfg.max_new_tokens)
        infos.append(TeacherResult(style=style, accuracy=acc, fingerprint=model_fingerprint(path)))
        echo(f"      teacher {style}: {acc:.1%} held-out accuracy")
    teacher_a = TransformersTeacher(teachers["A"])  # the live teacher of online OPD, and the KL reference
    tok = teacher_a.tokenizer

    seeds: list[SeedRun] = []
    store = run_dir / "store"
    if store.exists():  # the demo's own scratch store: a re-run measures its precompute afresh
        shutil.rmtree(store)
    for seed in cfg.seeds:
        sd = run_dir / f"seed-{seed}"
        if sd.exists():  # every stage of a re-run starts afresh
            shutil.rmtree(sd)
        # 3. SFT data from teacher A, and the student fine-tuned on it.
        echo(f"[3/8] seed {seed}: SFT data from teacher A, student SFT ({cfg.sft_steps} steps)")
        sft_data = generate_sft_data(
            teachers["A"], train[: cfg.sft_examples], sd / "sft-data.jsonl", seed=seed,
            max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
        student = sft_student(
            sft_data, sd / "student-sft", cfg.student,
            lm.FitConfig(steps=cfg.sft_steps, batch_size=cfg.fit_batch_size, lr=cfg.fit_lr, seed=100 + seed),
        )  # fmt: skip
        evaluator = _Evaluator(cfg, tok, test, teacher_a, seed)
        student_model, _ = lm.load(student)
        evaluator(0, student_model)
        sft_point = evaluator.curve[0]
        echo(f"      SFT student: {sft_point.accuracy:.1%} accuracy, reverse KL {sft_point.reverse_kl:.3f}")

        # 4. Rollouts from the SFT student, once.
        rollout_problems = make_problems(cfg.rollouts, cfg.digits, seed=1000 + seed, exclude=test)
        echo(f"[4/8] sampling {len(rollout_problems)} rollouts from the SFT student")
        t0 = time.perf_counter()
        rollouts = sample_rollouts(
            student, rollout_problems, sd / "rollouts.jsonl", seed=seed, max_new_tokens=cfg.max_new_tokens
        )
        rollout_seconds = time.perf_counter() - t0

        # 5. Score once with A; B is refused, then built on purpose and marked inconsistent.
        common = dict(
            rollouts=[rollouts], store=store, sft_teacher=sft_teacher_of(student), rollout_tokenizer=str(student),
            samples_per_part=1024, progress=True,
        )  # fmt: skip
        name_a, name_b = f"seed{seed}-teacher-A", f"seed{seed}-teacher-B"
        echo(f"[5/8] lopd precompute: scoring the rollouts once with teacher A -> {name_a}")
        t0 = time.perf_counter()
        pre = run_precompute(PrecomputeConfig(teacher=teachers["A"], dataset=name_a, **common))  # type: ignore[arg-type]
        precompute_seconds = time.perf_counter() - t0
        if pre.manifest is None:
            raise RuntimeError(f"precompute of {name_a} ended as {pre.status}, not published")
        # Every prompt and response token went through the teacher's forward pass once.
        scored_tokens = pre.manifest.num_prompt_tokens + pre.manifest.num_response_tokens
        try:
            run_precompute(PrecomputeConfig(teacher=teachers["B"], dataset=name_b, **common))  # type: ignore[arg-type]
            raise RuntimeError("the consistency gate let teacher B score a student fine-tuned on A's data")
        except TeacherMismatch as e:
            refused = refusal_reason(str(e))
            echo(f"      teacher B refused: {refused}")
        run_precompute(
            PrecomputeConfig(teacher=teachers["B"], dataset=name_b, allow_teacher_mismatch=True, **common)  # type: ignore[arg-type]
        )
        echo(f"      {name_b} built with --allow-teacher-mismatch (marked inconsistent)")

        runs: list[MethodRun] = []
        # 6-7. Serve the store; train offline through the client (no teacher in this loop).
        with serve_in_background(ServerSettings(store=store)) as server:
            echo(f"[6/8] lopd serve {store} at {server.base_url}")
            try:  # the trainer's own gate: an inconsistent dataset needs an explicit opt-in
                train_student(
                    TrainConfig(url=server.base_url, dataset=name_b, student=student, out=sd / "refused", steps=1,
                                sft_teacher=sft_teacher_of(student)),
                    echo=lambda line: None,
                )  # fmt: skip
                raise RuntimeError(f"the trainer accepted the inconsistent dataset {name_b}")
            except Inconsistent as e:
                echo(f"      the trainer refuses {name_b} without allow_inconsistent: {refusal_reason(str(e))}")
            for method, dataset, style in (
                ("lightning_opd", name_a, "A"),
                ("lightning_opd_inconsistent", name_b, "B"),
            ):
                echo(f"[7/8] seed {seed}: {method} on {dataset} over HTTP ({cfg.opd_steps} steps)")
                ev = _Evaluator(cfg, tok, test, teacher_a, seed)
                ev.curve.append(sft_point)
                bar = tqdm(total=cfg.opd_steps, desc=method, dynamic_ncols=True, leave=False)

                def on_step(step: int, model: Any, ev: _Evaluator = ev, bar: Any = bar) -> None:
                    bar.update(1)
                    ev(step, model)

                t0 = time.perf_counter()
                train_student(
                    TrainConfig(
                        url=server.base_url, dataset=dataset, student=student, out=sd / method,
                        steps=cfg.opd_steps, batch_size=cfg.opd_batch_size, lr=cfg.opd_lr, seed=seed,
                        sft_teacher=sft_teacher_of(student), allow_inconsistent=style == "B",
                        ratio_reference="rollout", log_every=cfg.opd_steps, checkpoint_every=cfg.opd_steps,
                    ),
                    echo=lambda line: None,
                    on_step=on_step,
                )  # fmt: skip
                bar.close()
                seconds = time.perf_counter() - t0 - ev.seconds
                runs.append(MethodRun(method=method, teacher=style, dataset=dataset, curve=ev.curve,
                                      train_seconds=seconds, teacher_forward_tokens=0))  # fmt: skip
                echo(f"      {_last(ev.curve)}; training {seconds:.1f} s")

        # 7. Online OPD: the same update, but sampling and scoring with the live teacher every step.
        echo(f"[7/8] seed {seed}: online OPD with teacher A live ({cfg.opd_steps} steps)")
        ev = _Evaluator(cfg, tok, test, teacher_a, seed)
        ev.curve.append(sft_point)
        online = train_online_opd(
            student, teacher_a, [lm.encode_prompt(tok, p.prompt) for p in rollout_problems],
            OnlineOPDConfig(steps=cfg.opd_steps, batch_size=cfg.opd_batch_size, lr=cfg.opd_lr, seed=seed,
                            max_new_tokens=cfg.max_new_tokens),
            out=sd / "online_opd", on_step=ev,
        )  # fmt: skip
        runs.append(MethodRun(method="online_opd", teacher="A", dataset=None, curve=ev.curve,
                              train_seconds=online.train_seconds,
                              teacher_forward_tokens=online.teacher_forward_tokens))  # fmt: skip
        echo(f"      {_last(ev.curve)}; training {online.train_seconds:.1f} s")
        seeds.append(
            SeedRun(
                seed=seed, sft=sft_point, rollout_seconds=rollout_seconds, precompute_seconds=precompute_seconds,
                precompute_teacher_tokens=scored_tokens, rollouts=len(rollout_problems),
                refused=refused, runs=runs,
            )
        )  # fmt: skip
    teacher_a.close()

    # 8. Results.
    report = derive(cfg, infos, seeds, _environment(), time.perf_counter() - start)
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
    return f"step {p.step}: accuracy {p.accuracy:.1%}, reverse KL {p.reverse_kl:.3f}"
