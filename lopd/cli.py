"""The `lopd` command line.

Each command is a thin wrapper: parse flags, call one library function, print its result. Heavy
modules (torch, transformers, DuckDB) are imported inside the commands, so `lopd --help` and the
client-side commands work on an install without the `teacher` or `server` extras.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from lopd.client.train_command import train
from lopd.errors import LopdError
from lopd.pipeline.cli import app as pipeline_app
from lopd.server.api.command import serve
from lopd.server.interop_command import export, import_

app = typer.Typer(
    name="lopd",
    help="Lightning OPD: precompute teacher log-probs once, serve them, train students offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Backend(str, Enum):
    transformers = "transformers"
    vllm = "vllm"
    sglang = "sglang"
    openai = "openai"


# Help texts shared by `precompute` and `verify`.
_BACKEND_HELP = (
    "Scoring engine: transformers or vllm (in this process), sglang or openai (a running SGLang or vLLM "
    "OpenAI-compatible server at --teacher-url; --teacher stays the model directory it was started from)."
)
_DEVICE_HELP = "cpu, cuda or cuda:N (default: cpu for transformers, cuda for vllm; not for servers)."
_DTYPE_HELP = "float32, bfloat16 or float16 (default: float32 for transformers, bfloat16 for vllm; not for servers)."
_URL_HELP = "sglang/openai: the server's address, e.g. http://127.0.0.1:30000 (API key: LOPD_TEACHER_API_KEY)."
_CONCURRENCY_HELP = "sglang/openai: requests in flight at once (default 8)."
_SERVED_HELP = "openai: the model name the server serves (default: the one GET /v1/models lists)."
_GPU_MEM_HELP = "vllm: fraction of GPU memory the engine may use (default 0.85)."
_TP_HELP = "vllm: GPUs to shard the teacher over (default 1)."


class OnBadRecord(str, Enum):
    stop = "stop"
    skip = "skip"


def _quiet_transformers() -> None:
    """transformers draws a bar for every weight load; ours are the ones that mean progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(err: Exception) -> NoReturn:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def precompute(
    rollouts: Annotated[list[Path], typer.Argument(help="Rollout files (JSONL, JSONL.gz, Parquet) or directories.")],
    teacher: Annotated[Path, typer.Option(help="Teacher model directory (Hugging Face format).")],
    sft_teacher: Annotated[
        str, typer.Option(help="The model (directory or fingerprint) that generated the student's SFT data.")
    ],
    store: Annotated[Path, typer.Option(help="Store directory (created if missing).")],
    dataset: Annotated[str, typer.Option(help="Dataset name inside the store.")],
    backend: Annotated[Backend, typer.Option(help=_BACKEND_HELP)] = Backend.transformers,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
    dtype: Annotated[str | None, typer.Option(help=_DTYPE_HELP)] = None,
    teacher_url: Annotated[str | None, typer.Option(help=_URL_HELP)] = None,
    max_concurrency: Annotated[int | None, typer.Option(help=_CONCURRENCY_HELP)] = None,
    served_model_name: Annotated[str | None, typer.Option(help=_SERVED_HELP)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help=_GPU_MEM_HELP)] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help=_TP_HELP)] = None,
    temperature: Annotated[float, typer.Option(help="Scoring temperature: log_softmax(logits / T).")] = 1.0,
    allow_teacher_mismatch: Annotated[
        bool, typer.Option(help="Build even if the teacher is not the SFT-data teacher (marked inconsistent).")
    ] = False,
    rollout_policy: Annotated[
        Path | None, typer.Option(help="The sampling policy: computes rollout_logprobs where records lack them.")
    ] = None,
    rollout_tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer (directory or fingerprint) the rollouts were sampled with.")
    ] = None,
    rollout_temperature: Annotated[float, typer.Option(help="Sampling temperature of the rollout policy.")] = 1.0,
    num_shards: Annotated[int, typer.Option(help="Number of workers splitting the job.")] = 1,
    shard_index: Annotated[int, typer.Option(help="This worker's index, 0..num_shards-1.")] = 0,
    on_bad_record: Annotated[
        OnBadRecord, typer.Option(help="stop: refuse and write nothing; skip: leave bad records out.")
    ] = OnBadRecord.stop,
    samples_per_part: Annotated[int, typer.Option(help="Samples per shard (the unit of resumption).")] = 1024,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward batch.")] = 16384,
    max_batch_size: Annotated[int, typer.Option(help="Sequences per forward batch.")] = 256,
    no_publish: Annotated[bool, typer.Option("--no-publish", help="Leave publishing to `lopd finalize`.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Score rollouts with a teacher, once, into an immutable dataset (resumable, shardable)."""
    from lopd.server.precompute import PrecomputeConfig, run_precompute

    _quiet_transformers()

    cfg = PrecomputeConfig(
        rollouts=list(rollouts),
        teacher=teacher,
        sft_teacher=sft_teacher,
        store=store,
        dataset=dataset,
        backend=backend.value,
        device=device,
        dtype=dtype,
        temperature=temperature,
        allow_teacher_mismatch=allow_teacher_mismatch,
        rollout_policy=rollout_policy,
        rollout_tokenizer=rollout_tokenizer,
        rollout_temperature=rollout_temperature,
        num_shards=num_shards,
        shard_index=shard_index,
        on_bad_record=on_bad_record.value,
        samples_per_part=samples_per_part,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        progress=progress,
        publish=not no_publish,
        teacher_url=teacher_url,
        max_concurrency=max_concurrency,
        served_model_name=served_model_name,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    )
    try:
        result = run_precompute(cfg)
    except LopdError as e:
        _fail(e)
    for notice in result.notices:
        typer.secho(f"note: {notice}", fg=typer.colors.YELLOW, err=True)
    if result.manifest is not None:
        m = result.manifest
        verb = "published" if result.status == "published" else "already published (nothing to do)"
        typer.echo(
            f"{verb}: {m.name} v{m.version}: {m.num_samples} samples, {m.num_response_tokens} response tokens, "
            f"{len(m.files)} shards, {m.provenance.consistency.verdict}"
        )
    else:
        typer.echo(
            f"worker {shard_index + 1}/{num_shards} done ({result.parts_scored} parts scored); waiting for "
            f"{len(result.parts_missing)} parts from other workers. The last worker to finish publishes, "
            "or run `lopd finalize`."
        )


@app.command()
def finalize(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
) -> None:
    """Publish finished runs of a dataset whose workers did not publish (e.g. --no-publish)."""
    from lopd.storage.publish import missing_parts, publish
    from lopd.storage.staging import Staging, list_staging_plans

    try:
        plans = list_staging_plans(store, dataset)
        if not plans:
            _fail(LopdError(f"no unfinished run of {dataset!r} in {store}"))
        for _, plan in plans:
            staging = Staging(store, dataset, plan.run_key)
            missing = missing_parts(staging, plan)
            if missing:
                typer.echo(f"run {plan.run_key[:16]}: {len(missing)} of {len(plan.parts)} parts still missing")
                continue
            m = publish(staging, plan)
            typer.echo(f"published: {m.name} v{m.version}: {m.num_samples} samples")
    except LopdError as e:
        _fail(e)


@app.command()
def stats(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's sha256 against the manifest first.")] = True,
) -> None:
    """Coverage and consistency of a dataset (DuckDB over its shards)."""
    from lopd.storage import stats as st
    from lopd.storage.reader import Store

    try:
        cov = st.coverage(store, dataset, version)
        con = None
        if cov.version is not None:
            if verify:
                Store(store).open(dataset, cov.version, verify=True)
            con = st.consistency(store, dataset, cov.version)
    except LopdError as e:
        _fail(e)
    if as_json:
        out = {"coverage": cov.model_dump(mode="json"), "consistency": con.model_dump(mode="json") if con else None}
        typer.echo(json.dumps(out, indent=2))
        return
    from lopd.stats_text import render_text

    typer.echo(render_text(cov, con))


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    teacher: Annotated[Path, typer.Option(help="The teacher to re-score with (model directory).")],
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
    samples: Annotated[int, typer.Option(help="How many random samples to re-score.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the random sample.")] = 0,
    tolerance: Annotated[float, typer.Option(help="Largest accepted |stored - rescored| per token.")] = 1e-3,
    backend: Annotated[Backend, typer.Option(help=_BACKEND_HELP)] = Backend.transformers,
    device: Annotated[str | None, typer.Option(help=_DEVICE_HELP)] = None,
    dtype: Annotated[str | None, typer.Option(help=_DTYPE_HELP)] = None,
    teacher_url: Annotated[str | None, typer.Option(help=_URL_HELP)] = None,
    max_concurrency: Annotated[int | None, typer.Option(help=_CONCURRENCY_HELP)] = None,
    served_model_name: Annotated[str | None, typer.Option(help=_SERVED_HELP)] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help=_GPU_MEM_HELP)] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help=_TP_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Re-score a random sample with a teacher; exit 1 if the stored log-probs differ beyond the tolerance."""
    from lopd.server.verify import verify_dataset

    _quiet_transformers()
    try:
        report = verify_dataset(
            store, dataset, teacher, version=version, samples=samples, seed=seed, tolerance=tolerance,
            backend=backend.value, device=device, dtype=dtype, teacher_url=teacher_url, max_concurrency=max_concurrency,
            served_model_name=served_model_name, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
        )  # fmt: skip
    except LopdError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        verdict = "PASSED" if report.passed else "FAILED"
        typer.echo(
            f"{verdict}: {report.dataset} v{report.version}, {report.samples} samples, {report.tokens} tokens: "
            f"max |diff| {report.max_abs_diff:.3g}, mean {report.mean_abs_diff:.3g} (tolerance {report.tolerance:g}; "
            f"worst sample {report.worst_sample_id})"
        )
        if not report.fingerprint_matches:
            typer.echo(
                f"note: this teacher's fingerprint {report.teacher_fingerprint} is not the manifest's "
                f"{report.manifest_teacher_fingerprint}"
            )
    if not report.passed:
        raise typer.Exit(code=1)


@app.command()
def fingerprint(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    tokenizer: Annotated[bool, typer.Option("--tokenizer", help="Fingerprint the tokenizer instead.")] = False,
) -> None:
    """Print a model's fingerprint (config + every weight tensor), usable wherever a model is asked for."""
    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint

    try:
        typer.echo(tokenizer_fingerprint(str(model_dir)) if tokenizer else model_fingerprint(model_dir))
    except LopdError as e:
        _fail(e)


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Where to save the model and its tokenizer.")],
    arch: Annotated[str, typer.Option(help="llama, qwen2 or mistral.")] = "llama",
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 2,
) -> None:
    """Build a tiny random causal LM with a char-level tokenizer (for trying things out offline)."""
    from lopd.server.tiny_models import build_tiny_model

    _quiet_transformers()

    try:
        path = build_tiny_model(out_dir, arch, seed=seed, hidden=hidden, layers=layers)
    except ValueError as e:
        _fail(e)
    typer.echo(str(path))


class Preset(str, Enum):
    fast = "fast"
    default = "default"
    full = "full"


@app.command()
def demo(
    run_dir: Annotated[
        Path, typer.Option(help="Working directory: models, data, the store and the results (a re-run starts afresh).")
    ] = Path("demo-run"),
    preset: Annotated[
        Preset, typer.Option(help="fast: seconds, tiny (CI); default: one seed, minutes; full: three seeds.")
    ] = Preset.default,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (overrides the preset's).")] = None,
) -> None:
    """The paper's pipeline on CPU: teachers, SFT, rollouts, precompute, serve, Lightning vs online OPD, results."""
    from lopd.pipeline.config import PipelineConfig
    from lopd.pipeline.run import run_pipeline

    _quiet_transformers()
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    cfg = PipelineConfig.preset_config(preset.value, seed_list)
    try:
        run_pipeline(cfg, run_dir, echo=typer.echo)
    except LopdError as e:
        _fail(e)


app.add_typer(pipeline_app, name="pipeline")
app.command()(serve)
app.command()(train)
app.command("export")(export)
app.command("import")(import_)


def main() -> None:  # pragma: no cover - console entry point alias
    sys.exit(app())
