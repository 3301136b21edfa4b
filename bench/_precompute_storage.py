"""Bytes per response token: our store layout against the reference Lightning-OPD (slime) layout.

Both layouts hold the same samples. Ours: `build_table` written with `PARQUET_WRITE_OPTIONS`
(int32 ids, float32 log-probs with BYTE_STREAM_SPLIT, zstd-3, prompt ids instead of text). The
reference: `prompt` and `label` text, and a `metadata` struct of `is_lightning_opd`, int64
`response_tokens` and `loss_mask`, `response` text and float64 `teacher_log_probs`, written with
pyarrow's defaults (snappy, dictionaries) and with zstd-3.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402
from _synthetic import (  # noqa: E402
    TextModel,
    logprob_summary,
    rollout_lengths,
    trained_teacher_logprobs,
    zipf_entropy_bits,
    zipf_ids,
)

OURS = "ours (int32/float32, zstd-3, BSS)"
REF_DEFAULT = "reference, pyarrow defaults"
REF_ZSTD = "reference, zstd-3"


def _reference_table(
    prompt_text: list[str], labels: list[str], response_text: list[str], ids: list[np.ndarray], lps: list[np.ndarray]
) -> Any:
    import pyarrow as pa

    def lists(rows: list[np.ndarray], dtype: Any) -> Any:
        offsets = np.zeros(len(rows) + 1, np.int32)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(rows).astype(dtype)))

    meta = pa.StructArray.from_arrays(
        [
            pa.array([True] * len(ids)),
            lists(ids, np.int64),
            lists([np.ones(len(r), np.int64) for r in ids], np.int64),
            pa.array(response_text),
            lists(lps, np.float64),  # the float32 scores widened, as Python floats are
        ],
        names=["is_lightning_opd", "response_tokens", "loss_mask", "response", "teacher_log_probs"],
    )
    return pa.table({"prompt": pa.array(prompt_text), "label": pa.array(labels), "metadata": meta})


def _column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes of each leaf column, summed over row groups."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    out: dict[str, int] = defaultdict(int)
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            out[col.path_in_schema] += col.total_compressed_size
    return dict(out)


def _tiny_model_logprobs(work: Path, plen: np.ndarray, rlen: np.ndarray, seed: int) -> list[np.ndarray]:
    """Log-probs of a real (tiny, randomly initialised) model scoring English-like text, a token a character."""
    from lopd.server.teachers.transformers_backend import TransformersTeacher
    from lopd.testing import build_tiny_model

    teacher = TransformersTeacher(build_tiny_model(work / "teacher-small", "llama", seed=1, max_positions=2048))
    texts = TextModel(np.random.default_rng(seed + 1))

    def ids(n: int) -> np.ndarray:
        return np.asarray(teacher.tokenizer.convert_tokens_to_ids(list(texts.text(n))), np.int64)

    out = teacher.score([ids(int(p)) for p in plen], [ids(int(r)) for r in rlen])
    teacher.close()
    return out


def _bit_exact(path: Path, lps: list[np.ndarray], response_ids: list[np.ndarray]) -> bool:
    import pyarrow.parquet as pq

    from lopd.arrow import list_column

    back = pq.read_table(path)
    got = list_column(back.column("teacher_logprobs")).flat()
    want = np.concatenate(lps).astype(np.float32)
    ids = list_column(back.column("response_ids")).flat()
    return bool(
        got.dtype == np.float32
        and np.array_equal(got.view(np.uint32), want.view(np.uint32))
        and np.array_equal(ids, np.concatenate(response_ids))
    )


def _what_if(table: Any, path: Path, resp_tokens: int) -> dict[str, float]:
    """Bytes per response token of variants of our write options, for whoever tunes the schema."""
    import pyarrow.parquet as pq

    from lopd.storage.schema import PARQUET_WRITE_OPTIONS

    ids = {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in ("prompt_ids", "response_ids")}
    no_bss_lp = {k: v for k, v in PARQUET_WRITE_OPTIONS["column_encoding"].items() if "teacher" not in k}
    variants: dict[str, dict[str, Any]] = {
        "as shipped": {},
        "BYTE_STREAM_SPLIT on int32 ids too": {"column_encoding": {**PARQUET_WRITE_OPTIONS["column_encoding"], **ids}},
        "row groups of 1024 samples": {"row_group_size": 1024},
        "zstd level 9": {"compression_level": 9},
        "dictionary on log-probs (no BSS)": {
            "use_dictionary": ["sample_id", "teacher_logprobs.list.element"],
            "column_encoding": no_bss_lp,
        },
    }
    out = {}
    for name, override in variants.items():
        pq.write_table(table, path, **{**PARQUET_WRITE_OPTIONS, **override})
        out[name] = path.stat().st_size / resp_tokens
    return out


def bench_storage(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lopd.storage.schema import PARQUET_WRITE_OPTIONS, build_table

    rng = np.random.default_rng(args.seed)
    n = args.storage_samples
    plen, rlen = rollout_lengths(rng, n)
    resp_tokens = int(rlen.sum())
    bounds = np.cumsum(rlen)[:-1]
    prompt_ids = np.split(zipf_ids(rng, int(plen.sum())), np.cumsum(plen)[:-1])
    response_ids = np.split(zipf_ids(rng, resp_tokens), bounds)
    texts = TextModel(rng)
    prompt_text = [texts.text(4 * int(p)) for p in plen]
    response_text = [texts.text(4 * int(r)) for r in rlen]
    labels = [str(int(x)) if x < 1000 else texts.text(12) for x in rng.integers(0, 1300, n)]
    all_text = "".join(response_text).encode()
    text_bits = 8 * len(pa.Codec("zstd", 3).compress(all_text)) / len(all_text)
    sources = {
        "tiny model on text": _tiny_model_logprobs(work, plen, rlen, args.seed),
        "trained-teacher shape": np.split(trained_teacher_logprobs(rng, resp_tokens), bounds),
    }
    sample_ids = [f"r{i:07d}" for i in range(n)]

    results: dict[str, Any] = {
        "samples": n,
        "response_tokens": resp_tokens,
        "prompt_tokens": int(plen.sum()),
        "token_id_entropy_bits": zipf_entropy_bits(),
        "text_zstd3_bits_per_char": text_bits,
        "sources": {},
    }
    groups = {
        OURS: {"ids": ("prompt_ids", "response_ids"), "logprobs": ("teacher_logprobs",)},
        REF_DEFAULT: {"ids": ("metadata.response_tokens",), "logprobs": ("metadata.teacher_log_probs",)},
    }
    groups[REF_ZSTD] = groups[REF_DEFAULT]
    rows = []
    for source, lps in sources.items():
        paths = {OURS: work / "ours.parquet", REF_DEFAULT: work / "ref-default.parquet", REF_ZSTD: work / "ref.parquet"}
        table = build_table(sample_ids, prompt_ids, response_ids, lps, [None] * n)
        pq.write_table(table, paths[OURS], **PARQUET_WRITE_OPTIONS)
        ref = _reference_table(prompt_text, labels, response_text, response_ids, lps)
        pq.write_table(ref, paths[REF_DEFAULT])
        pq.write_table(ref, paths[REF_ZSTD], compression="zstd", compression_level=3)

        layouts: dict[str, Any] = {}
        for name, path in paths.items():
            cols = _column_bytes(path)
            per = {g: sum(v for k, v in cols.items() if k.startswith(c)) / resp_tokens for g, c in groups[name].items()}
            size = path.stat().st_size
            per["rest"] = size / resp_tokens - sum(per.values())  # text, loss mask, ids of samples, footer
            layouts[name] = {
                "file_bytes": size,
                "bytes_per_response_token": size / resp_tokens,
                "bytes_per_response_token_by_part": per,
                "column_bytes": cols,
            }
        ours = layouts[OURS]["bytes_per_response_token"]
        for name, lay in layouts.items():
            lay["ratio_ours_over_this"] = ours / lay["bytes_per_response_token"]
            per = lay["bytes_per_response_token_by_part"]
            rows.append(
                [
                    source,
                    name,
                    lay["bytes_per_response_token"],
                    per["ids"],
                    per["logprobs"],
                    per["rest"],
                    lay["ratio_ours_over_this"],
                ]
            )
        results["sources"][source] = {
            "logprobs": logprob_summary(np.concatenate(lps)),
            "layouts": layouts,
            "ours_bit_exact": _bit_exact(paths[OURS], lps, response_ids),
            "ours_what_if_bytes_per_response_token": _what_if(table, work / "what-if.parquet", resp_tokens),
        }
    print_table(
        f"Bytes per response token: {n} samples, {resp_tokens:,} response + {int(plen.sum()):,} prompt tokens; "
        f"Zipf ids over 150k ({results['token_id_entropy_bits']:.1f} bits entropy), text ~4 chars/token "
        f"({text_bits:.1f} bits/char under zstd-3); ours stores prompt ids, the reference prompt and response text",
        ["log-probs", "layout", "B/tok", "ids", "logprobs", "rest", "ours / this"],
        rows,
    )
    for source, r in results["sources"].items():
        s = r["logprobs"]
        print(
            f"  {source}: log-prob mean {s['mean']:.3f}, median {s['median']:.4f}, "
            f"{100 * s['frac_above_-0.01']:.0f}% above -0.01, {100 * s['distinct_values_frac']:.0f}% distinct; "
            f"ours float32 bit-exact on read-back: {r['ours_bit_exact']}"
        )
    what_if = {s: r["ours_what_if_bytes_per_response_token"] for s, r in results["sources"].items()}
    names = list(next(iter(what_if.values())))
    print_table(
        "Our layout with other write options (bytes per response token; not what the store writes)",
        ["option", *what_if],
        [[name, *(w[name] for w in what_if.values())] for name in names],
    )
    return results
