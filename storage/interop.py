"""Interop with the reference Lightning-OPD (slime) Parquet layout.

The reference stores one row per sample:

    prompt    string                  the prompt as text
    label     string                  may be empty
    metadata  struct<
        is_lightning_opd   bool
        response_tokens    list<int64>     the sampled response ids
        loss_mask          list<int64>     1 per response token
        response           string          the response as text
        teacher_log_probs  list<double>    one per response token
        student_log_probs  list<double>    one per response token; only when rollout log-probs exist
    >

`export_lightning_opd` writes a dataset version in that layout (plus a top-level `sample_id`
column, which the reference reader ignores); `import_lightning_opd` reads it back into a new
dataset version. Exporting widens float32 to float64 exactly, so store -> export -> import gives
back bit-identical log-probs and response ids.

The tokenizer is any object with the Hugging Face tokenizer interface (`decode`, and calling it on
text); nothing here loads a model. An import is written through the store's one writing path
(`writer.write_run`), exactly like a precompute run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import lopd
from lopd.arrow import NullValueError, list_column, list_lengths, list_rows
from lopd.errors import InvalidInput
from lopd.fingerprint import tokenizer_fingerprint

from . import layout
from .atomic import atomic_write
from .manifest import (
    IMPORT_BACKEND_PREFIX,
    UNKNOWN_FINGERPRINT,
    Consistency,
    Manifest,
    ModelRef,
    Provenance,
    RolloutSource,
)
from .reader import Store
from .schema import FORMAT_VERSION, build_table
from .staging import RunPlan
from .writer import write_run

FORMAT_NAME = "lightning-opd"
IMPORT_BACKEND = f"{IMPORT_BACKEND_PREFIX}{FORMAT_NAME}"
UNKNOWN = UNKNOWN_FINGERPRINT


def lightning_opd_schema(with_student_log_probs: bool) -> pa.Schema:
    """The reference layout's schema (plus `sample_id`); `student_log_probs` only when present."""
    fields = [
        pa.field("is_lightning_opd", pa.bool_()),
        pa.field("response_tokens", pa.list_(pa.int64())),
        pa.field("loss_mask", pa.list_(pa.int64())),
        pa.field("response", pa.string()),
        pa.field("teacher_log_probs", pa.list_(pa.float64())),
    ]
    if with_student_log_probs:
        fields.append(pa.field("student_log_probs", pa.list_(pa.float64())))
    return pa.schema(
        [
            pa.field("prompt", pa.string()),
            pa.field("label", pa.string()),
            pa.field("metadata", pa.struct(fields)),
            pa.field("sample_id", pa.string()),
        ]
    )


# ---------------------------------------------------------------------------------------------- export


def export_lightning_opd(
    store_dir: str | Path, dataset: str, out_path: str | Path, tokenizer: Any, version: int | None = None
) -> int:
    """Write a dataset version (the latest by default) as one reference-layout Parquet file.

    Prompt and response text are `tokenizer.decode(ids, skip_special_tokens=False)` (without
    clean-up of tokenization spaces, so the text is exactly the tokens). `label` is empty (the store
    keeps none). `student_log_probs` is written only when some sample has rollout log-probs; samples
    without them get a null there. Returns the number of rows written.
    """
    ds = Store(store_dir).open(dataset, version)
    table = ds.read_all()
    n = table.num_rows
    prompt_rows = list_column(table.column("prompt_ids"), np.int32).required_rows("prompt_ids")
    response_rows = list_column(table.column("response_ids"), np.int32).required_rows("response_ids")
    prompts = [_decode(tokenizer, ids) for ids in prompt_rows]
    responses = [_decode(tokenizer, ids) for ids in response_rows]
    rollout_col = table.column("rollout_logprobs").combine_chunks()
    has_student = rollout_col.null_count < n

    metadata: dict[str, pa.Array] = {
        "is_lightning_opd": pa.array([True] * n, pa.bool_()),
        "response_tokens": _widen(table.column("response_ids"), pa.int64()),
        "loss_mask": pa.array([[1] * int(k) for k in list_lengths(table.column("response_ids"))], pa.list_(pa.int64())),
        "response": pa.array(responses, pa.string()),
        "teacher_log_probs": _widen(table.column("teacher_logprobs"), pa.float64()),
    }
    if has_student:
        metadata["student_log_probs"] = _widen(rollout_col, pa.float64())
    schema = lightning_opd_schema(has_student)
    struct = pa.StructArray.from_arrays(list(metadata.values()), fields=list(schema.field("metadata").type))
    out_table = pa.table(
        {
            "prompt": pa.array(prompts, pa.string()),
            "label": pa.array([""] * n, pa.string()),
            "metadata": struct,
            "sample_id": table.column("sample_id").combine_chunks().cast(pa.string()),
        },
        schema=schema,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: pq.write_table(out_table, tmp, compression="zstd"))
    return n


def _decode(tokenizer: Any, ids: np.ndarray) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _widen(column: pa.ChunkedArray | pa.Array, value_type: pa.DataType) -> pa.Array:
    """A list column cast to list<value_type> (int32 -> int64, float32 -> float64: both exact)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.cast(pa.list_(value_type))


# ---------------------------------------------------------------------------------------------- import


def import_lightning_opd(
    paths: Sequence[str | Path],
    store_dir: str | Path,
    dataset: str,
    tokenizer: Any,
    *,
    teacher_fingerprint: str | None = None,
    sft_teacher_fingerprint: str | None = None,
    samples_per_part: int = 1024,
) -> Manifest:
    """Read reference-layout Parquet files into a new version of `dataset` (published atomically).

    - Response ids are `metadata.response_tokens`, exactly as sampled.
    - Prompt ids are `tokenizer(prompt, add_special_tokens=False)`: the reference stores the prompt
      as text only, so prompt ids are a re-tokenization and may differ from the ids the policy saw
      (the manifest's `rollouts.retokenized` counts every sample for that reason).
    - `teacher_log_probs` (float64) are cast to float32, the store's dtype (provenance dtype
      "float64->float32"); `student_log_probs` become `rollout_logprobs` (null where absent).
    - `sample_id` comes from a `sample_id` column when there is one, else `row-<i>` (i counting rows
      over all files in order). `label` and `loss_mask` are not stored.
    - The reference does not say which teacher scored the rows: unless fingerprints are given, the
      teacher is recorded as "unknown" and the dataset is marked inconsistent.

    A row whose log-probs length differs from its `response_tokens` is refused, naming the row; nothing
    is written then. Importing the same files with the same settings again returns the published version.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise InvalidInput("no input files to import")
    for f in files:
        if not f.is_file():
            raise InvalidInput(f"{f} is not a file")
    store = layout.check_store_path(store_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)

    ids: list[str] = []
    prompts: list[np.ndarray] = []
    responses: list[np.ndarray] = []
    teacher: list[np.ndarray] = []
    rollout: list[np.ndarray | None] = []
    for f in files:
        _read_file(f, tokenizer, ids, prompts, responses, teacher, rollout)
    if not ids:
        raise InvalidInput(f"no rows in {', '.join(map(str, files))}")
    seen: set[str] = set()
    for sid in ids:
        if sid in seen:
            raise InvalidInput(f"sample_id {sid!r} appears more than once in the input")
        seen.add(sid)
    # Validate everything (lengths, finiteness, empty prompts) before anything is written.
    table = build_table(ids, prompts, responses, teacher, rollout)

    input_fp = _files_fingerprint(files)
    prov = _provenance(files, input_fp, len(ids), rollout, tok_fp, teacher_fingerprint, sft_teacher_fingerprint)
    run_key = _run_key(dataset, input_fp, prov, samples_per_part)
    plan = RunPlan.build(
        run_key=run_key,
        dataset=dataset,
        sample_ids=ids,
        samples_per_part=samples_per_part,
        input_records=len(ids),
        skipped=[],
        provenance=prov,
    )
    return write_run(store, plan, lambda part: _rows_of(table, plan.part_rows(part.index)))


def _rows_of(table: pa.Table, rows: slice) -> pa.Table:
    return table.slice(rows.start, rows.stop - rows.start)


def _read_file(
    path: Path,
    tokenizer: Any,
    ids: list[str],
    prompts: list[np.ndarray],
    responses: list[np.ndarray],
    teacher: list[np.ndarray],
    rollout: list[np.ndarray | None],
) -> None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise InvalidInput(f"{path}: not a readable Parquet file ({e})") from e
    for col in ("prompt", "metadata"):
        if col not in table.column_names:
            raise InvalidInput(f"{path}: no {col!r} column; not the Lightning-OPD layout")
    meta = table.column("metadata").combine_chunks()
    if not pa.types.is_struct(meta.type):
        raise InvalidInput(f"{path}: 'metadata' is {meta.type}, not a struct")
    names = {meta.type.field(i).name for i in range(meta.type.num_fields)}
    for name in ("response_tokens", "teacher_log_probs"):
        if name not in names:
            raise InvalidInput(f"{path}: metadata has no {name!r} field")
    n = table.num_rows
    base = len(ids)
    if "sample_id" in table.column_names:
        row_ids = table.column("sample_id").to_pylist()
        row_ids = [str(s) if s is not None else f"row-{base + j}" for j, s in enumerate(row_ids)]
    else:
        row_ids = [f"row-{base + j}" for j in range(n)]

    def where(j: int) -> str:
        return f"{path} row {j} (sample {row_ids[j]!r})"

    meta_null = meta.is_null().to_numpy(zero_copy_only=False) if meta.null_count else np.zeros(n, dtype=bool)
    resp = _field_rows(meta, "response_tokens", np.int64, path, where)
    tlp = _field_rows(meta, "teacher_log_probs", np.float64, path, where)
    slp = _field_rows(meta, "student_log_probs", np.float64, path, where) if "student_log_probs" in names else None
    prompt_text = table.column("prompt").to_pylist()

    for j in range(n):
        if meta_null[j]:
            raise InvalidInput(f"{where(j)}: metadata is null")
        r, t = resp[j], tlp[j]
        if r is None:
            raise InvalidInput(f"{where(j)}: response_tokens is null")
        if t is None:
            raise InvalidInput(f"{where(j)}: teacher_log_probs is null")
        if len(t) != len(r):
            raise InvalidInput(f"{where(j)}: {len(t)} teacher_log_probs for {len(r)} response_tokens")
        s = slp[j] if slp is not None else None
        if s is not None and len(s) != len(r):
            raise InvalidInput(f"{where(j)}: {len(s)} student_log_probs for {len(r)} response_tokens")
        if r.size and (r.min() < 0 or r.max() > np.iinfo(np.int32).max):
            raise InvalidInput(f"{where(j)}: response token id out of range")
        if prompt_text[j] is None:
            raise InvalidInput(f"{where(j)}: prompt is null")
        prompt_ids = tokenizer(prompt_text[j], add_special_tokens=False)["input_ids"]
        ids.append(row_ids[j])
        prompts.append(np.asarray(prompt_ids, dtype=np.int32))
        responses.append(r.astype(np.int32))
        teacher.append(t.astype(np.float32))
        rollout.append(None if s is None else s.astype(np.float32))


def _field_rows(
    meta: pa.StructArray, name: str, dtype: type, path: Path, where: Callable[[int], str]
) -> list[np.ndarray | None]:
    arr = meta.field(name)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise InvalidInput(f"{path}: metadata.{name} is {arr.type}, not a list")
    try:
        return list_rows(arr, dtype)
    except NullValueError as e:
        raise InvalidInput(f"{where(e.row)}: null value in {name}") from e
    except (TypeError, ValueError, pa.ArrowException) as e:
        raise InvalidInput(f"{path}: metadata.{name} has values of type {arr.values.type}") from e


def _files_fingerprint(files: list[Path]) -> str:
    """sha256 over the input files' bytes, in order."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def _provenance(
    files: list[Path],
    input_fp: str,
    records: int,
    rollout: list[np.ndarray | None],
    tok_fp: str,
    teacher_fp: str | None,
    sft_fp: str | None,
) -> Provenance:
    with_lp = sum(r is not None for r in rollout)
    source: Literal["input", "rollout_policy", "mixed", "none"] = (
        "input" if with_lp == len(rollout) else "none" if with_lp == 0 else "mixed"
    )
    consistent = teacher_fp is not None and sft_fp is not None and teacher_fp == sft_fp
    return Provenance(
        teacher=ModelRef(name_or_path=None, fingerprint=teacher_fp or UNKNOWN),
        tokenizer_fingerprint=tok_fp,
        sft_teacher_fingerprint=sft_fp or UNKNOWN,
        sft_teacher_source=None,
        rollout_policy=None,
        rollout_tokenizer_fingerprint=None,
        rollout_logprobs_source=source,
        rollouts=RolloutSource(
            paths=[str(f) for f in files],
            fingerprint=input_fp,
            records=records,
            # Every prompt was given as text and tokenized here.
            retokenized=records,
        ),
        backend=IMPORT_BACKEND,
        dtype="float64->float32",
        temperature=1.0,
        consistency=Consistency(
            teacher_consistent=consistent, mismatch_allowed=not consistent, rollout_tokenizer_checked=False
        ),
        tool_version=lopd.__version__,
    )


def _run_key(dataset: str, input_fp: str, prov: Provenance, samples_per_part: int) -> str:
    """Hash of what determines the imported version: the input bytes, dataset, tokenizer and settings."""
    key = {
        "format_version": FORMAT_VERSION,
        "kind": IMPORT_BACKEND,
        "dataset": dataset,
        "input": input_fp,
        "tokenizer": prov.tokenizer_fingerprint,
        "teacher": prov.teacher.fingerprint,
        "sft_teacher": prov.sft_teacher_fingerprint,
        "samples_per_part": samples_per_part,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
