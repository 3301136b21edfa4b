"""Export a top-k dataset version in the layouts logit-distillation trainers read (`lopd export --format verl|trl`).

One Parquet row per sample, the top-k nested per response position ([R, K] as list<list<>>, which a
trainer's collate pads to (batch, seq, K)):

* **verl** (`verl/trainer/distillation/losses.py`, `compute_distillation_loss_topk` behind `loss_mode:
  forward_kl_topk|reverse_kl_topk|jsd_topk`, and its `common.py` `DistillationLossInputs`): `teacher_ids` int32
  and `teacher_logprobs` float32, each [R, K] with exactly K per position, most likely first; the sampled token's
  log-prob as `teacher_log_probs` [R] (what verl's estimator losses, `kl`/`k3`, read); `prompt_ids`,
  `response_ids`, and `data_source` (verl's `teacher_key`) for a multi-teacher dataset.
* **trl** (`trl/experimental/async_distillation/async_rollout_worker.py`, `RolloutSample`): `input_ids` (prompt +
  response), `completion_mask` (0 on the prompt, 1 on the response), `teacher_topk_ids` / `teacher_topk_logprobs`
  per completion position holding the teacher's top K plus the realized token when it fell outside them (as TRL's
  `_parse_teacher_logprobs_at_position` keeps it, with its exact `teacher_logprobs` value: K or K + 1 per
  position), and `teacher_id`: the route's key in a multi-teacher dataset, else "default" (TRL's own default id).

Values are the stored float32 and int32, unchanged (lossless). `sample_id` comes first in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lopd.errors import InvalidInput

from .atomic import atomic_write
from .reader import Store
from .schema import TOPK_IDS, TOPK_LOGPROBS

TopKFormat = Literal["verl", "trl"]
TOPK_FORMATS: tuple[str, ...] = ("verl", "trl")
# Samples read and written at a time: one row group of the output.
_CHUNK = 256


def export_topk(
    store_dir: str | Path, dataset: str, out: str | Path, fmt: TopKFormat, version: int | None = None
) -> int:
    """Write dataset `dataset` (the latest version, or `version`) to `out` in layout `fmt`; returns the samples."""
    if fmt not in TOPK_FORMATS:
        raise InvalidInput(f"unknown top-k export format {fmt!r}; choose one of {', '.join(TOPK_FORMATS)}")
    ds = Store(store_dir).open(dataset, version)
    prov = ds.manifest.provenance
    k = prov.top_k
    if not k:
        raise InvalidInput(
            f"dataset {dataset!r} v{ds.manifest.version} holds no teacher top-k (built without --top-k): "
            f"the {fmt} layout needs it; precompute it again with --top-k K"
        )
    keys = np.full(ds.manifest.num_samples, "default", dtype=object)
    for r in prov.routes:
        keys[r.start : r.start + r.num_samples] = r.key
    cols = ["sample_id", "prompt_ids", "response_ids", "teacher_logprobs", TOPK_IDS, TOPK_LOGPROBS]
    n = ds.manifest.num_samples

    def write(tmp: Path) -> None:
        writer: pq.ParquetWriter | None = None
        try:
            for start in range(0, n, _CHUNK):
                table = ds.take(np.arange(start, min(n, start + _CHUNK)), cols)
                chunk_keys = keys[start : start + table.num_rows]
                batch = _verl(table, k, chunk_keys, bool(prov.routes)) if fmt == "verl" else _trl(table, k, chunk_keys)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema, compression="zstd")
                writer.write_table(batch)
        finally:
            if writer is not None:
                writer.close()

    atomic_write(Path(out), write)
    return n


def _nested(flat: pa.ListArray, k: int, dtype: pa.DataType) -> pa.Array:
    """A flat list<v> column of R * k values per row as list<list<v>> of R lists of k."""
    values = flat.flatten().cast(dtype)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, k, dtype=np.int32)), values)
    rows = np.concatenate([[0], np.cumsum(np.asarray(flat.value_lengths()) // k)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(rows), inner)


def _verl(table: pa.Table, k: int, keys: np.ndarray, routed: bool) -> pa.Table:
    ids = table.column(TOPK_IDS).combine_chunks()
    lps = table.column(TOPK_LOGPROBS).combine_chunks()
    out = {
        "sample_id": table.column("sample_id"),
        "prompt_ids": table.column("prompt_ids"),
        "response_ids": table.column("response_ids"),
        "teacher_ids": _nested(ids, k, pa.int32()),
        "teacher_logprobs": _nested(lps, k, pa.float32()),
        "teacher_log_probs": table.column("teacher_logprobs"),
    }
    if routed:
        out["data_source"] = pa.array(keys.tolist(), pa.string())
    return pa.table(out)


def _trl(table: pa.Table, k: int, keys: np.ndarray) -> pa.Table:
    input_ids, masks, all_ids, all_lps = [], [], [], []
    for i in range(table.num_rows):
        prompt = np.asarray(table.column("prompt_ids")[i].values, np.int32)
        response = np.asarray(table.column("response_ids")[i].values, np.int32)
        sampled = np.asarray(table.column("teacher_logprobs")[i].values, np.float32)
        ids = np.asarray(table.column(TOPK_IDS)[i].values, np.int32).reshape(len(response), k)
        lps = np.asarray(table.column(TOPK_LOGPROBS)[i].values, np.float32).reshape(len(response), k)
        input_ids.append(np.concatenate([prompt, response]).tolist())
        masks.append([0] * len(prompt) + [1] * len(response))
        row_ids, row_lps = [], []
        for j, tok in enumerate(response.tolist()):
            inside = tok in ids[j]
            row_ids.append(ids[j].tolist() + ([] if inside else [tok]))
            row_lps.append(lps[j].tolist() + ([] if inside else [float(sampled[j])]))
        all_ids.append(row_ids)
        all_lps.append(row_lps)
    return pa.table(
        {
            "sample_id": table.column("sample_id"),
            "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
            "completion_mask": pa.array(masks, pa.list_(pa.int8())),
            "teacher_topk_ids": pa.array(all_ids, pa.list_(pa.list_(pa.int32()))),
            "teacher_topk_logprobs": pa.array(all_lps, pa.list_(pa.list_(pa.float32()))),
            "teacher_id": pa.array(keys.tolist(), pa.string()),
        }
    )
