"""What the vllm backend asks of vLLM and reads back, as pure functions (no vLLM, no torch; tested on CPU).

The request (`build_request`, `sampling_kwargs`, `engine_kwargs`), the reading of prompt
log-probs in both of vLLM's forms (`response_logprobs`), and the memory arithmetic: what bounds
`max_num_batched_tokens` (`prompt_logprob_token_budget`, with the transient's share on a GPU,
`transient_target_bytes`, or on CPU, `cpu_transient_target_bytes`) and the KV cache a scoring job
needs (`scoring_kv_cache_bytes`). Why each is the way it is: the `vllm_backend` module docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import struct
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lopd.errors import InvalidInput, TeacherServerError
from lopd.server.teachers.base import best_k

log = logging.getLogger(__name__)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Share of the memory outside vLLM's budget, `(1 - gpu_memory_utilization) * total`, that the prompt-logprob
# transient may take; the rest is for the CUDA context, CUDA-graph pools, NCCL buffers and fragmentation.
TRANSIENT_SHARE = 0.5
# Below this many tokens a step, prefill is so fragmented that scoring would crawl: refuse instead.
MIN_BATCH_TOKENS = 256
# Engines keep room for the one token they generate: a record may use the context minus this.
CONTEXT_RESERVE = 1
GiB = 2**30
# The backend's default share of GPU memory for weights and KV cache (vLLM's own is 0.92; the rest is the
# prompt-logprob transient's, see `transient_target_bytes`). Not used on CPU, where the KV cache is sized explicitly.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85
# vLLM's default engine option `max_logprobs`: the most candidates a request may ask per position.
DEFAULT_MAX_LOGPROBS = 20
# The smallest KV cache the CPU default asks for (block tables and rounding need some room even for tiny models).
MIN_KV_CACHE_BYTES = 64 * 2**20
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


# ------------------------------------------------------------------ pure pieces (tested on CPU)


def check_temperature(temperature: float) -> float:
    """The temperature as a float when this backend can score at it (only 1), else `InvalidInput` saying why."""
    if isinstance(temperature, bool) or not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise InvalidInput(f"temperature must be a positive finite number, got {temperature!r}")
    if float(temperature) != 1.0:
        raise InvalidInput(
            f"the vllm backend cannot score at temperature {temperature:g}: vLLM computes prompt log-probs from "
            "the raw logits (T = 1) whatever the request's temperature, and its logprobs_mode "
            "'processed_logprobs' applies to sampled tokens only (vLLM issue #35832, PR #47680), so the store "
            "would hold T = 1 values labelled T = "
            f"{temperature:g}. Score at --temperature 1, or use --backend transformers for T != 1"
        )
    return 1.0


def prompt_logprob_bytes_per_token(vocab_size: int, dtype: str) -> int:
    """GPU bytes per scheduled prompt token at the peak of vLLM's prompt-logprob computation.

    Over the full vocabulary: the logits in the model's dtype and the float32 log-probs, plus the
    larger of the float32 copy `log_softmax(dtype=float32)` takes of bfloat16 logits (CUDA float16
    and float32 are read as they are) and the one-byte mask of the rank computation
    (`(logprobs >= logprob of the actual token).sum()`), which comes after the copy is freed.
    """
    if dtype not in DTYPE_BYTES:
        raise InvalidInput(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_BYTES)}")
    cast_copy = 4 if dtype == "bfloat16" else 0
    return int(vocab_size) * (DTYPE_BYTES[dtype] + 4 + max(cast_copy, 1))


def transient_target_bytes(total_bytes: int, gpu_memory_utilization: float) -> int:
    """The bytes the prompt-logprob transient may use: `TRANSIENT_SHARE` of what vLLM leaves outside its budget."""
    return int(total_bytes * (1.0 - gpu_memory_utilization) * TRANSIENT_SHARE)


def cpu_transient_target_bytes(available_bytes: int, weight_bytes: int, kv_cache_bytes: int) -> int:
    """On CPU: `TRANSIENT_SHARE` of the memory available now that neither the weights nor the KV cache will take.

    vLLM's CPU backend reserves the KV cache explicitly (`kv_cache_memory_bytes`, or `VLLM_CPU_KVCACHE_SPACE`) and
    the weights take what they take; the prompt-logprob transient comes on top of both, in the same RAM.
    """
    return max(0, int((available_bytes - weight_bytes - kv_cache_bytes) * TRANSIENT_SHARE))


def prompt_logprob_token_budget(
    vocab_size: int, dtype: str, transient_bytes: int, *, remedy: str = "lower gpu_memory_utilization"
) -> int:
    """The most tokens one engine step may schedule so that the prompt-logprob transient fits `transient_bytes`.

    Raises `InvalidInput` when fewer than `MIN_BATCH_TOKENS` fit, saying `remedy` (what to change).
    """
    per_token = prompt_logprob_bytes_per_token(vocab_size, dtype)
    budget = int(transient_bytes) // per_token
    if budget < MIN_BATCH_TOKENS:
        raise InvalidInput(
            f"only {budget} tokens a step fit the {transient_bytes / GiB:.2f} GiB left for vLLM's prompt log-probs "
            f"({per_token / 2**20:.1f} MiB a token with a {vocab_size}-token vocabulary in {dtype}); {remedy} "
            f"so at least {MIN_BATCH_TOKENS} fit"
        )
    return budget


def kv_cache_bytes_per_token(config: Mapping[str, Any], dtype: str) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer, `num_key_value_heads x head_dim` each.

    Read from a `config.json` (multimodal configs nest it in `text_config`); `head_dim` defaults to
    `hidden_size / num_attention_heads`, `num_key_value_heads` to `num_attention_heads` (no GQA).
    """
    if dtype not in DTYPE_BYTES:
        raise InvalidInput(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_BYTES)}")
    section = config.get("text_config") or config
    try:
        layers = int(section["num_hidden_layers"])
        heads = int(section["num_attention_heads"])
        kv_heads = int(section.get("num_key_value_heads") or heads)
        head_dim = int(section.get("head_dim") or int(section["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"config.json lacks {e} to size the KV cache; pass --kv-cache-gib") from None
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def scoring_kv_cache_bytes(config: Mapping[str, Any], dtype: str, max_batch_tokens: int, max_model_len: int) -> int:
    """The KV cache a scoring job needs: one engine step's tokens plus one whole record.

    A scoring request generates one token and ends, so the cache only holds the requests being prefilled:
    `max_batch_tokens` of them a step, plus the earlier chunks of the one longest record that spans several steps.
    A bigger cache buys no speed; a smaller one only limits how many records are prefilled at once.
    """
    need = kv_cache_bytes_per_token(config, dtype) * (int(max_batch_tokens) + int(max_model_len))
    return max(MIN_KV_CACHE_BYTES, need)


def weight_bytes(model_dir: str | Path, dtype: str) -> int:
    """Bytes the model's weights take in memory at `dtype`, counted from the safetensors headers.

    Floating-point tensors are counted at `dtype` (the engine casts them), others at their stored size;
    checkpoints in other formats (or unreadable headers) by file size, an estimate.
    """
    per_param = DTYPE_BYTES.get(dtype, 4)
    total = 0
    for f in sorted(Path(model_dir).iterdir()):
        if f.suffix in (".bin", ".pt", ".pth"):
            total += f.stat().st_size
        elif f.suffix == ".safetensors":
            try:
                with f.open("rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    if n > f.stat().st_size - 8:
                        raise ValueError("not a safetensors header")
                    header = json.loads(fh.read(n))
                for name, t in header.items():
                    if name != "__metadata__":
                        stored = SAFETENSORS_DTYPE_BYTES.get(t["dtype"], 4)
                        total += math.prod(t["shape"]) * (per_param if t["dtype"] in FLOAT_DTYPES else stored)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
                total += f.stat().st_size
    return total


def sampling_param_fields(cls: Any) -> frozenset[str]:
    """The field names `SamplingParams` accepts (a msgspec Struct, a dataclass, or a plain class), to feature-detect."""
    fields = getattr(cls, "__struct_fields__", None)
    if fields is None and dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
    if fields is None:
        fields = list(inspect.signature(cls).parameters)
    return frozenset(fields)


def sampling_kwargs(sampling_fields: Collection[str] = (), prompt_logprobs: int = 0) -> dict[str, Any]:
    """Keyword arguments of the one `SamplingParams` every scoring request uses (`prompt_logprobs`: top K, or 0).

    `temperature=1.0` only shapes the one throw-away sampled token (prompt log-probs ignore it, see the
    module docstring). No per-request `seed`: prompt log-probs do not depend on it, and vLLM's CPU engine
    fails with one on longer jobs (`CPU Generator does not use offset`, measured with vllm-cpu 0.32.0).
    """
    kw: dict[str, Any] = {
        "n": 1,
        "max_tokens": 1,  # vLLM refuses 0
        # The actual token's log-prob at every prompt position, plus the top K there when K > 0.
        "prompt_logprobs": int(prompt_logprobs),
        "logprobs": None,
        "detokenize": False,
        "temperature": 1.0,
    }
    if "flat_logprobs" in sampling_fields:
        kw["flat_logprobs"] = True
    return kw


def build_request(
    prompt: Sequence[int], response: Sequence[int], *, sampling_fields: Collection[str] = ()
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """(a `TokensPrompt` for `prompt + response`, the `SamplingParams` keyword arguments) for one record.

    `TokensPrompt` is a TypedDict, so the plain dict is the request vLLM documents.
    """
    ids = [int(t) for t in prompt] + [int(t) for t in response]
    return {"prompt_token_ids": ids}, sampling_kwargs(sampling_fields)


def engine_kwargs(
    model_dir: str | Path,
    *,
    dtype: str,
    gpu_memory_utilization: float | None,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int | None,
    tensor_parallel_size: int,
    kv_cache_memory_bytes: int | None = None,
    enforce_eager: bool = False,
    top_k: int = 0,
    engine_fields: Collection[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM`; options not in `engine_fields` (the installed `EngineArgs`) are dropped.

    `gpu_memory_utilization` and `kv_cache_memory_bytes` are passed only when set (None: vLLM's rule);
    `max_logprobs` only when `top_k` exceeds vLLM's default cap (`DEFAULT_MAX_LOGPROBS`).
    """
    kw: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "skip_tokenizer_init": True,  # token ids in, no text out: the engine never needs the tokenizer
        "dtype": dtype,
        "seed": 0,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_prefix_caching": False,  # prompt-logprob requests skip the cache anyway
        "enable_chunked_prefill": True,  # records longer than the step budget are prefilled in several steps
        "logprobs_mode": "raw_logprobs",  # log-softmax of the raw logits, whatever a future default becomes
        "enforce_eager": enforce_eager,
    }
    if gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    if kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if top_k > DEFAULT_MAX_LOGPROBS:
        kw["max_logprobs"] = int(top_k)
    if engine_fields is not None:
        if top_k > DEFAULT_MAX_LOGPROBS and "max_logprobs" not in engine_fields:
            raise InvalidInput(
                f"--top-k {top_k}: this vLLM caps prompt log-probs at {DEFAULT_MAX_LOGPROBS} candidates a position and "
                f"has no max_logprobs engine option to raise it; use --top-k {DEFAULT_MAX_LOGPROBS} or less, or "
                "--backend transformers"
            )
        dropped = sorted(k for k in kw if k not in engine_fields and k != "model")
        if dropped:
            log.info("this vLLM has no engine option(s) %s; using its defaults", ", ".join(dropped))
        kw = {k: v for k, v in kw.items() if k == "model" or k in engine_fields}
    return kw


def misaligned(record: int | None, problem: str) -> TeacherServerError:
    where = "the load-time check" if record is None else f"record {record}"
    return TeacherServerError(
        f"{where}: vLLM's prompt_logprobs do not line up with the record ({problem})", record=record
    )


def _finite(values: list[Any], record: int | None) -> np.ndarray:
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise misaligned(record, f"response token {j} has log-prob {v!r}, not a number")
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr > 1e-3)
    if bad.any():
        j = int(np.argmax(bad))
        raise misaligned(record, f"response token {j} has log-prob {values[j]!r}, not a finite log-probability")
    return arr.astype(np.float32)


def _entry_logprob(value: Any) -> Any:
    """`Logprob.logprob`, or the number itself, or a dict's "logprob" (how a dumped Logprob looks)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        return value.get("logprob")
    return getattr(value, "logprob", None)


def response_logprobs(
    prompt_logprobs: Any, prompt_len: int, response: Sequence[int], *, record: int | None = None
) -> np.ndarray:
    """The response tokens' log-probs (float32) from `RequestOutput.prompt_logprobs` of `prompt + response`.

    `prompt_logprobs` is vLLM's `list[dict[int, Logprob] | None]` (None at position 0) or a
    `FlatLogprobs` (duck-typed by its `start_indices`/`end_indices`/`token_ids`/`logprobs` columns).
    Position `prompt_len + j` must hold an entry for `response[j]`. Anything else (a count that is
    not one per input token, a missing entry, a non-finite value) raises `TeacherServerError`
    naming `record`, the record's index in the scored batch.
    """
    resp = [int(t) for t in response]
    n = prompt_len + len(resp)
    if prompt_logprobs is None:
        raise misaligned(record, "the engine returned no prompt_logprobs; were they requested?")
    if all(hasattr(prompt_logprobs, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs")):
        # Read each column once: newer FlatLogprobs build a new list on every attribute access.
        starts, ends = list(prompt_logprobs.start_indices), list(prompt_logprobs.end_indices)
        token_ids, logprobs = prompt_logprobs.token_ids, prompt_logprobs.logprobs
        if len(starts) != n or len(ends) != n:
            raise misaligned(record, f"expected {n} positions (one per input token), got {len(starts)}")
        values = []
        for j, tok in enumerate(resp):
            pos = prompt_len + j
            span = range(starts[pos], ends[pos])
            k = next((k for k in span if int(token_ids[k]) == tok), None)
            if k is None:
                got = [int(token_ids[k]) for k in span]
                raise misaligned(record, f"position {pos} (response token {j}) has no entry for id {tok}; got {got}")
            values.append(float(logprobs[k]))
        return _finite(values, record)
    if not isinstance(prompt_logprobs, Sequence) or isinstance(prompt_logprobs, (str, bytes)):
        raise misaligned(record, f"expected a list or FlatLogprobs, got {type(prompt_logprobs).__name__}")
    if len(prompt_logprobs) != n:
        raise misaligned(record, f"expected {n} positions (one per input token), got {len(prompt_logprobs)}")
    values = []
    for j, tok in enumerate(resp):
        pos = prompt_len + j
        entry = prompt_logprobs[pos]
        value = entry.get(tok) if isinstance(entry, Mapping) else None
        lp = _entry_logprob(value) if value is not None else None
        if lp is None:
            got = sorted(entry)[:5] if isinstance(entry, Mapping) else entry
            raise misaligned(record, f"position {pos} (response token {j}) has no entry for id {tok}; got {got!r}")
        values.append(lp)
    return _finite(values, record)


def response_topk(
    prompt_logprobs: Any, prompt_len: int, response: Sequence[int], k: int, *, record: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` ([R, k] int32 ids, float32 log-probs, ordered as `base.order_topk`) at each response position.

    From `RequestOutput.prompt_logprobs` asked with `prompt_logprobs=k`: each position holds the top k
    (ranks 1..k) and the actual token (k or k + 1 entries, either form `response_logprobs` reads). The best
    k of them by (log-prob, lower id) are kept, so the actual token stays only where it is among them; a
    position with fewer than k distinct entries, or a kept entry whose rank is above k, is refused.
    """
    n = prompt_len + len(response)
    ids = np.empty((len(response), k), np.int32)
    lps = np.empty((len(response), k), np.float32)
    flat = all(hasattr(prompt_logprobs, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs"))
    if flat:
        starts, ends = list(prompt_logprobs.start_indices), list(prompt_logprobs.end_indices)
        token_ids, values = list(prompt_logprobs.token_ids), list(prompt_logprobs.logprobs)
        ranks = list(getattr(prompt_logprobs, "ranks", None) or [None] * len(token_ids))
        if len(starts) != n:
            raise misaligned(record, f"expected {n} positions (one per input token), got {len(starts)}")
    elif not isinstance(prompt_logprobs, Sequence) or len(prompt_logprobs) != n:
        raise misaligned(record, f"expected {n} positions (one per input token)")
    for j in range(len(response)):
        pos = prompt_len + j
        if flat:
            span = range(starts[pos], ends[pos])
            cand = [(int(token_ids[e]), _entry_logprob(values[e]), ranks[e]) for e in span]
        else:
            entry = prompt_logprobs[pos]
            if not isinstance(entry, Mapping):
                raise misaligned(record, f"position {pos} (response token {j}) has no candidates: {entry!r}")
            cand = [(int(t), _entry_logprob(v), getattr(v, "rank", None)) for t, v in entry.items()]
        if not all(isinstance(c[1], (int, float)) and math.isfinite(c[1]) and c[1] <= 1e-3 for c in cand):
            raise misaligned(record, f"position {pos} has a candidate that is not a finite log-probability: {cand!r}")
        picked = best_k([c[0] for c in cand], [c[1] for c in cand], k)
        if picked is None:
            raise misaligned(record, f"position {pos} has {len(cand)} candidates, fewer than the {k} asked")
        rank_of = {c[0]: c[2] for c in cand}
        if any(isinstance(rank_of[int(t)], int) and rank_of[int(t)] > k for t in picked[0]):
            raise misaligned(record, f"position {pos}: a kept candidate has a rank above {k}")
        ids[j], lps[j] = picked
    return ids, lps
