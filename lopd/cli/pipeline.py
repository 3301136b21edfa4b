"""`lopd pipeline <stage>`: each stage of the paper's pipeline as its own command, files in and files out.

`lopd demo` chains them; these let a user stop anywhere and bring their own piece: their own
teacher (skip `train-teacher`), SFT checkpoint (skip `sft`), rollouts (skip `rollouts`; any
file `lopd precompute` reads). Scoring, serving and offline training are `lopd precompute`,
`lopd serve` and `lopd train`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lopd.pipeline.config import PipelineConfig

from .params import cli_errors

app = typer.Typer(help="The paper's pipeline, one stage at a time (see `lopd demo` for all of them).")


@app.callback()
def _needs_the_demo_extra() -> None:
    """Every stage trains or samples tiny models: refuse up front, naming the extra, when they cannot run."""
    with cli_errors(extra="demo"):
        import matplotlib  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401


Digits = Annotated[int, typer.Option(help="Operand digits of the addition problems.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
MaxNew = Annotated[int, typer.Option(help="Longest response, in tokens.")]


# Defaults come from the pipeline's own config, so a stage run alone behaves as in `lopd demo`.
_D = PipelineConfig()
HELD_OUT = _D.test_problems  # the evaluation set every training-side stage excludes


def _problems(n: int, digits: int, seed: int) -> list:
    """Training-side problems: seeded, never among the held-out evaluation problems."""
    from lopd.pipeline.task import held_out_problems, make_problems

    return make_problems(n, digits, seed=seed, exclude=held_out_problems(HELD_OUT, digits))


@app.command("train-teacher")
def train_teacher_command(
    out: Annotated[Path, typer.Argument(help="Directory for the teacher (Hugging Face format).")],
    style: Annotated[str, typer.Option(help="Solution style: A or B.")] = "A",
    problems: Annotated[int, typer.Option(help="Training problems.")] = _D.train_problems,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = _D.teacher.hidden,
    layers: Annotated[int, typer.Option(help="Layers.")] = _D.teacher.layers,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = _D.teacher_steps,
    digits: Digits = _D.digits,
    seed: Seed = 1,
) -> None:
    """Train a teacher on worked solutions in one style."""
    from lopd.pipeline import lm
    from lopd.pipeline.config import ModelSize
    from lopd.pipeline.stages import train_teacher

    if style not in ("A", "B"):
        raise typer.BadParameter(f"--style must be A or B, got {style!r}")
    train_teacher(
        out, style, _problems(problems, digits, 1), ModelSize(hidden=hidden, layers=layers),  # type: ignore[arg-type]
        lm.FitConfig(steps=steps, batch_size=_D.fit_batch_size, lr=_D.fit_lr, seed=seed),
    )  # fmt: skip
    typer.echo(f"teacher {style} in {out}")


@app.command("sft-data")
def sft_data_command(
    teacher: Annotated[Path, typer.Argument(help="The teacher that writes the SFT data.")],
    out: Annotated[Path, typer.Argument(help="JSONL to write (prompt_ids, response_ids); provenance beside it.")],
    problems: Annotated[int, typer.Option(help="Problems to solve.")] = _D.sft_examples,
    digits: Digits = _D.digits,
    seed: Seed = 0,
    max_new_tokens: MaxNew = _D.max_new_tokens,
) -> None:
    """Sample SFT data from a teacher and record which teacher it was."""
    from lopd.pipeline.stages import generate_sft_data

    generate_sft_data(teacher, _problems(problems, digits, 1), out, seed=seed, max_new_tokens=max_new_tokens)
    typer.echo(f"SFT data in {out}")


@app.command("sft")
def sft_command(
    sft_data: Annotated[Path, typer.Argument(help="SFT data JSONL (from `sft-data`, or your own).")],
    out: Annotated[Path, typer.Argument(help="Directory for the student checkpoint.")],
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = _D.student.hidden,
    layers: Annotated[int, typer.Option(help="Layers.")] = _D.student.layers,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = _D.sft_steps,
    seed: Seed = 100,
) -> None:
    """Fine-tune a fresh student on SFT data (its provenance is copied into the checkpoint)."""
    from lopd.pipeline import lm
    from lopd.pipeline.config import ModelSize
    from lopd.pipeline.stages import sft_student

    fit = lm.FitConfig(steps=steps, batch_size=_D.fit_batch_size, lr=_D.fit_lr, seed=seed)
    sft_student(sft_data, out, ModelSize(hidden=hidden, layers=layers), fit)
    typer.echo(f"SFT student in {out}")


@app.command("rollouts")
def rollouts_command(
    policy: Annotated[Path, typer.Argument(help="The policy to sample (the SFT student).")],
    out: Annotated[Path, typer.Argument(help="JSONL for `lopd precompute` (ids as sampled + rollout_logprobs).")],
    problems: Annotated[int, typer.Option(help="Prompts to sample.")] = _D.rollouts,
    digits: Digits = _D.digits,
    seed: Seed = 0,
    max_new_tokens: MaxNew = _D.max_new_tokens,
) -> None:
    """Sample one rollout per prompt from a policy, with its log-probs."""
    from lopd.pipeline.stages import sample_rollouts

    sample_rollouts(policy, _problems(problems, digits, 1000 + seed), out, seed=seed, max_new_tokens=max_new_tokens)
    typer.echo(f"rollouts in {out}")


@app.command("online-opd")
def online_opd_command(
    student: Annotated[Path, typer.Argument(help="The SFT student to start from.")],
    teacher: Annotated[Path, typer.Argument(help="The live teacher.")],
    out: Annotated[Path, typer.Argument(help="Directory for the trained student.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = _D.opd_steps,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = _D.opd_batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = _D.opd_lr,
    problems: Annotated[int, typer.Option(help="Prompt pool.")] = _D.rollouts,
    digits: Digits = _D.digits,
    seed: Seed = 0,
    max_new_tokens: MaxNew = _D.max_new_tokens,
) -> None:
    """Standard online OPD: sample from the student and score with the live teacher at every step."""
    from lopd.pipeline import lm
    from lopd.pipeline.online_opd import OnlineOPDConfig, train_online_opd
    from lopd.server.teachers.transformers_backend import TransformersTeacher

    live = TransformersTeacher(teacher)
    prompts = [lm.encode_prompt(live.tokenizer, p.prompt) for p in _problems(problems, digits, 1000 + seed)]
    cfg = OnlineOPDConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, max_new_tokens=max_new_tokens)
    result = train_online_opd(student, live, prompts, cfg, out=out)
    typer.echo(json.dumps({"out": str(out), **result.__dict__}))


@app.command("evaluate")
def evaluate_command(
    student: Annotated[Path, typer.Argument(help="The model to evaluate.")],
    teacher: Annotated[Path, typer.Argument(help="The teacher the reverse KL is measured against.")],
    sft: Annotated[Path, typer.Argument(help="The SFT checkpoint the drift (KL to SFT) is measured against.")],
    problems: Annotated[int, typer.Option(help="Held-out problems.")] = HELD_OUT,
    kl_samples: Annotated[int, typer.Option(help="Problems sampled for the KLs.")] = _D.kl_samples,
    digits: Digits = _D.digits,
    seed: Seed = 0,
    max_new_tokens: MaxNew = _D.max_new_tokens,
) -> None:
    """Held-out greedy accuracy, reverse KL to the teacher and KL to the SFT checkpoint on the model's samples."""
    from lopd.pipeline import lm
    from lopd.pipeline.evaluate import evaluate
    from lopd.pipeline.task import held_out_problems
    from lopd.server.teachers.transformers_backend import TransformersTeacher

    model, tok = lm.load(student)
    result = evaluate(
        model, tok, held_out_problems(problems, digits), TransformersTeacher(teacher), TransformersTeacher(sft),
        kl_samples=kl_samples, seed=seed, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    typer.echo(json.dumps({k: v for k, v in result.to_json().items() if k != "correct"}))


@app.command("tune")
def tune_command(
    run_dir: Annotated[Path, typer.Argument(help="Working directory (teachers are kept between calls).")],
    lrs: Annotated[str, typer.Option(help="Comma-separated OPD learning rates to try.")] = "1e-5,2e-5,5e-5",
    preset: Annotated[str, typer.Option(help="The preset whose other settings are used.")] = "default",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    tis_cap: Annotated[float | None, typer.Option(help="Truncated importance weight cap of Lightning OPD.")] = None,
) -> None:
    """Choose the OPD learning rate (and TIS) on the validation split (never the test split): both Lightning OPD (the
    paper's algorithm) and online OPD must be stable; adds to tuning.json and tuning.md."""
    from lopd.pipeline.config import PipelineConfig
    from lopd.pipeline.tune import tune

    try:
        values = [float(x) for x in lrs.split(",") if x.strip()]
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--lrs and --seeds take comma-separated numbers, got {lrs!r}, {seeds!r}") from None
    if preset not in ("fast", "default", "full"):
        raise typer.BadParameter(f"--preset must be fast, default or full, got {preset!r}")
    cfg = PipelineConfig.preset_config(preset, seed_list).model_copy(update={"tis_cap": tis_cap})  # type: ignore[arg-type]
    typer.echo(tune(cfg, values, run_dir, echo=typer.echo))


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A `lopd demo` run directory (holds results.json).")],
) -> None:
    """Recompute the summary and claims from results.json's measurements; rewrite it, results.md and results.png."""
    from lopd.pipeline.report import PipelineReport, derive, markdown, plot
    from lopd.pipeline.run import RESULTS_JSON, RESULTS_MD, RESULTS_PNG

    path = run_dir / RESULTS_JSON
    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist; run `lopd demo --run-dir {run_dir}` first")
    old = PipelineReport.model_validate_json(path.read_text())
    report = derive(old.config, old.teachers, old.seeds, old.environment, old.total_seconds)
    path.write_text(report.model_dump_json(indent=2) + "\n")
    (run_dir / RESULTS_MD).write_text(markdown(report))
    plot(report, run_dir / RESULTS_PNG)
    typer.echo(markdown(report))
