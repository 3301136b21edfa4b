"""In-process teacher scoring with a vLLM engine (`vllm.LLM`), through prompt log-probs.

vLLM has no scoring entry point, so each record is sent as a one-token generation whose prompt is
`prompt + response` with `prompt_logprobs=0`: vLLM then returns, for every prompt position t >= 1,
the log-prob of the actual token t under the model given tokens < t (position 0 is None; with 0
requested candidates an entry holds just the actual token). We keep positions
`len(prompt) .. len(prompt)+len(response)-1`, pick each by the response token's id, and refuse
anything that does not line up (`response_logprobs`) with a `TeacherServerError` whose `record` lets
the precompute job name the sample. `max_tokens=1` because vLLM refuses 0, and so a record may use
the context minus one token. The prompt is scored too (there is no start offset), and the engine
schedules requests itself, so one `LLM.generate` call takes many records. Written against the V1
engine's `LLM` API (chunked prefill with prompt log-probs, `TokensPrompt`).

What was checked in vLLM's sources and trackers (the module must import without vLLM; the GPU tests
compare it with the naive reference where vLLM is installed):

* **Temperature: prompt log-probs are raw (T = 1), so T != 1 is refused.** The V1 runner computes them
  as `compute_logits(hidden)` then `sampler.compute_logprobs(logits)` (a float32 log-softmax) with no
  temperature (`GPUModelRunner._get_prompt_logprobs_dict`; Trinity-RFT patches exactly this "does not
  apply temperature scaling to logits when calculating prompt logprobs", vLLM 0.10.2-0.11.0). The
  engine option `logprobs_mode="processed_logprobs"` does not help: "processed" means after the
  sampler's transforms, which only the sampled tokens go through; prompt log-probs ignored
  `logprobs_mode` altogether (vLLM issue #35832, PRs #35885, #36539), and the fix that landed (PR
  #47680) switches them between logits and log-probs only, its author noting that processed modes
  are not applied to prompt log-probs. A `prompt_logprobs_temperature` request field was proposed
  (PR #37082) and was not merged when this was written. So a temperature other than 1 cannot be
  scored correctly here and raises `InvalidInput` before anything loads (use the transformers backend).
  We pin `logprobs_mode="raw_logprobs"` where the engine has the option, so a future default cannot
  turn the values into logits.
* **`flat_logprobs`.** Newer releases (the `SamplingParams.flat_logprobs` field; docs: vllm.logprobs)
  can return `FlatLogprobs` instead of `list[dict[int, Logprob]]`: a sequence with one position per
  prompt token whose columns are `start_indices`, `end_indices` (per position, a range into the
  flat lists; position 0 is an empty range) and `token_ids`, `logprobs`, `ranks`, `decoded_tokens`
  (per entry). It avoids one dict and one `Logprob` object per token. We request it only where the
  installed `SamplingParams` has the field, and read both forms.
* **The memory vLLM does not plan for.** Prompt log-probs take full-vocabulary logits and a float32
  log-softmax for every scheduled prompt token, outside the profiling run that sizes the KV cache,
  a known OOM (vLLM #5907, #38830): ~7.5 GiB is the figure quoted at 8k tokens x 152k vocabulary.
  Per scheduled token and vocabulary entry the peak holds the logits in the model's dtype, the
  float32 log-probs (`logits.log_softmax(dim=-1, dtype=torch.float32)`), and either the float32
  copy PyTorch makes of bfloat16 input first (its `log_softmax` reads only CUDA float16 directly:
  aten/src/ATen/native/SoftMax.cpp) or, right after, the boolean mask of the rank computation:
  10 bytes in bfloat16 (11.6 GiB at 8k x 152k), 7 in float16, 9 in float32. One step schedules at
  most `max_num_batched_tokens` tokens (requests are processed one after the other, so their sum
  bounds the peak). We bound that setting so the transient fits half of what
  `gpu_memory_utilization` leaves outside vLLM's budget (the other half is for the CUDA context,
  CUDA-graph pools, NCCL buffers and fragmentation): `prompt_logprob_token_budget`. Prefix caching
  is off (prompt-logprob requests skip it anyway) and chunked prefill on, so records longer than
  the budget are prefilled in several steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lopd.errors import InvalidInput, TeacherServerError
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.batching import plan_batches
from lopd.server.teachers.base import TeacherInfo, check_token_ids, config_context_length, snapshot_revision

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Share of the memory outside vLLM's budget, `(1 - gpu_memory_utilization) * total`, that the prompt-logprob
# transient may take; the rest is for the CUDA context, CUDA-graph pools, NCCL buffers and fragmentation.
TRANSIENT_SHARE = 0.5
# Below this many tokens a step, prefill is so fragmented that scoring would crawl: refuse instead.
MIN_BATCH_TOKENS = 256
# Records per `LLM.generate` call are capped by their total tokens, so that the Python objects vLLM
# builds for every prompt position (a dict and a Logprob each, unless flat) stay a few hundred MB.
GENERATE_CHUNK_TOKENS = 1 << 19
# Engines keep room for the one token they generate: a record may use the context minus this.
CONTEXT_RESERVE = 1
_GiB = 2**30


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
    if dtype not in _DTYPE_BYTES:
        raise InvalidInput(f"dtype {dtype!r} is not supported; choose one of {', '.join(_DTYPE_BYTES)}")
    cast_copy = 4 if dtype == "bfloat16" else 0
    return int(vocab_size) * (_DTYPE_BYTES[dtype] + 4 + max(cast_copy, 1))


def transient_target_bytes(total_bytes: int, gpu_memory_utilization: float) -> int:
    """The bytes the prompt-logprob transient may use: `TRANSIENT_SHARE` of what vLLM leaves outside its budget."""
    return int(total_bytes * (1.0 - gpu_memory_utilization) * TRANSIENT_SHARE)


def prompt_logprob_token_budget(vocab_size: int, dtype: str, transient_bytes: int) -> int:
    """The most tokens one engine step may schedule so that the prompt-logprob transient fits `transient_bytes`.

    Raises `InvalidInput` when fewer than `MIN_BATCH_TOKENS` fit, with what to change.
    """
    per_token = prompt_logprob_bytes_per_token(vocab_size, dtype)
    budget = int(transient_bytes) // per_token
    if budget < MIN_BATCH_TOKENS:
        raise InvalidInput(
            f"only {budget} tokens a step fit the {transient_bytes / _GiB:.2f} GiB left for vLLM's prompt log-probs "
            f"({per_token / 2**20:.1f} MiB a token with a {vocab_size}-token vocabulary in {dtype}); lower "
            f"gpu_memory_utilization so at least {MIN_BATCH_TOKENS} fit"
        )
    return budget


def sampling_param_fields(cls: Any) -> frozenset[str]:
    """The field names `SamplingParams` accepts (a msgspec Struct, a dataclass, or a plain class), to feature-detect."""
    fields = getattr(cls, "__struct_fields__", None)
    if fields is None and dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
    if fields is None:
        fields = list(inspect.signature(cls).parameters)
    return frozenset(fields)


def sampling_kwargs(sampling_fields: Collection[str] = ()) -> dict[str, Any]:
    """Keyword arguments of the one `SamplingParams` every scoring request uses.

    `temperature=1.0` only shapes the one throw-away sampled token (prompt log-probs ignore it, see the
    module docstring); `seed` makes that token, and so the whole request, deterministic.
    """
    kw: dict[str, Any] = {
        "n": 1,
        "max_tokens": 1,  # vLLM refuses 0
        "prompt_logprobs": 0,  # the actual token's log-prob at every prompt position, no other candidates
        "logprobs": None,
        "detokenize": False,
        "temperature": 1.0,
        "seed": 0,
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
    gpu_memory_utilization: float,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_model_len: int | None,
    tensor_parallel_size: int,
    engine_fields: Collection[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM`; options not in `engine_fields` (the installed `EngineArgs`) are dropped."""
    kw: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "skip_tokenizer_init": True,  # token ids in, no text out: the engine never needs the tokenizer
        "dtype": dtype,
        "seed": 0,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_prefix_caching": False,  # prompt-logprob requests skip the cache anyway
        "enable_chunked_prefill": True,  # records longer than the step budget are prefilled in several steps
        "logprobs_mode": "raw_logprobs",  # log-softmax of the raw logits, whatever a future default becomes
    }
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if engine_fields is not None:
        dropped = sorted(k for k in kw if k not in engine_fields and k != "model")
        if dropped:
            log.info("this vLLM has no engine option(s) %s; using its defaults", ", ".join(dropped))
        kw = {k: v for k, v in kw.items() if k == "model" or k in engine_fields}
    return kw


def _misaligned(record: int | None, problem: str) -> TeacherServerError:
    where = "the load-time check" if record is None else f"record {record}"
    return TeacherServerError(
        f"{where}: vLLM's prompt_logprobs do not line up with the record ({problem})", record=record
    )


def _finite(values: list[Any], record: int | None) -> np.ndarray:
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _misaligned(record, f"response token {j} has log-prob {v!r}, not a number")
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr > 1e-3)
    if bad.any():
        j = int(np.argmax(bad))
        raise _misaligned(record, f"response token {j} has log-prob {values[j]!r}, not a finite log-probability")
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
        raise _misaligned(record, "the engine returned no prompt_logprobs; were they requested?")
    if all(hasattr(prompt_logprobs, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs")):
        # Read each column once: newer FlatLogprobs build a new list on every attribute access.
        starts, ends = list(prompt_logprobs.start_indices), list(prompt_logprobs.end_indices)
        token_ids, logprobs = prompt_logprobs.token_ids, prompt_logprobs.logprobs
        if len(starts) != n or len(ends) != n:
            raise _misaligned(record, f"expected {n} positions (one per input token), got {len(starts)}")
        values = []
        for j, tok in enumerate(resp):
            pos = prompt_len + j
            span = range(starts[pos], ends[pos])
            k = next((k for k in span if int(token_ids[k]) == tok), None)
            if k is None:
                got = [int(token_ids[k]) for k in span]
                raise _misaligned(record, f"position {pos} (response token {j}) has no entry for id {tok}; got {got}")
            values.append(float(logprobs[k]))
        return _finite(values, record)
    if not isinstance(prompt_logprobs, Sequence) or isinstance(prompt_logprobs, (str, bytes)):
        raise _misaligned(record, f"expected a list or FlatLogprobs, got {type(prompt_logprobs).__name__}")
    if len(prompt_logprobs) != n:
        raise _misaligned(record, f"expected {n} positions (one per input token), got {len(prompt_logprobs)}")
    values = []
    for j, tok in enumerate(resp):
        pos = prompt_len + j
        entry = prompt_logprobs[pos]
        value = entry.get(tok) if isinstance(entry, Mapping) else None
        lp = _entry_logprob(value) if value is not None else None
        if lp is None:
            got = sorted(entry)[:5] if isinstance(entry, Mapping) else entry
            raise _misaligned(record, f"position {pos} (response token {j}) has no entry for id {tok}; got {got!r}")
        values.append(lp)
    return _finite(values, record)


# ------------------------------------------------------------------ the backend


class VLLMTeacher:
    """A teacher scored by an in-process vLLM engine (GPU), one float32 per response token at T = 1."""

    backend = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "bfloat16",
        temperature: float = 1.0,
        max_batch_tokens: int = 16384,
        max_batch_size: int = 256,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        # Everything that can be refused is refused before vLLM is imported or anything is loaded.
        self.temperature = check_temperature(temperature)
        if dtype not in _DTYPE_BYTES:
            raise InvalidInput(f"dtype {dtype!r} is not supported; choose one of {', '.join(_DTYPE_BYTES)}")
        plan_batches([], max_batch_tokens, max_batch_size)  # validates the budget arguments
        if isinstance(gpu_memory_utilization, bool) or not (
            isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization < 1
        ):
            raise InvalidInput(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization!r}")
        for name, value in (("max_model_len", max_model_len), ("tensor_parallel_size", tensor_parallel_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        path = Path(model_dir)
        if not path.is_dir():
            raise InvalidInput(f"model directory {path} does not exist")
        try:
            import vllm
        except ImportError as e:
            raise InvalidInput(
                f"the vllm teacher backend needs vLLM ({e}); install it with: pip install 'lightning-opd[vllm]'"
            ) from e
        from transformers import AutoTokenizer

        fingerprint = model_fingerprint(path)  # first: a clear error for directories that are not models
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as e:
            raise InvalidInput(f"cannot read the tokenizer and config of {path}: {e}") from e
        text_config = config.get("text_config") or {}
        logits_width = config.get("vocab_size") or text_config.get("vocab_size")
        if not isinstance(logits_width, int) or logits_width < 1:
            raise InvalidInput(f"{path}/config.json has no vocab_size; cannot size vLLM's prompt log-probs")
        self._id_limit = min(len(self.tokenizer), logits_width)
        context = config_context_length(config) or 0
        limits = [c for c in (context, max_model_len) if c]
        self._max_tokens = min(limits) - CONTEXT_RESERVE if limits else 0

        total = _device_total_memory()
        target = transient_target_bytes(total, float(gpu_memory_utilization))
        budget = prompt_logprob_token_budget(logits_width, dtype, target)
        batch_tokens = min(max_batch_tokens, budget)
        self.max_batch_tokens, self.max_batch_size = batch_tokens, min(max_batch_size, batch_tokens)
        log.info(
            "vLLM scoring: max_num_batched_tokens=%d (asked %d; %d fit %.1f GiB of prompt-logprob transient at "
            "vocabulary %d in %s), max_num_seqs=%d",
            batch_tokens, max_batch_tokens, budget, target / _GiB, logits_width, dtype, self.max_batch_size,
        )  # fmt: skip

        try:
            from vllm.engine.arg_utils import EngineArgs

            engine_fields: frozenset[str] | None = frozenset(f.name for f in dataclasses.fields(EngineArgs))
        except (ImportError, TypeError):
            engine_fields = None
        self._sampling_fields = sampling_param_fields(vllm.SamplingParams)
        self._params = vllm.SamplingParams(**sampling_kwargs(self._sampling_fields))
        kwargs = engine_kwargs(
            path,
            dtype=dtype,
            gpu_memory_utilization=float(gpu_memory_utilization),
            max_num_batched_tokens=batch_tokens,
            max_num_seqs=self.max_batch_size,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            engine_fields=engine_fields,
        )
        try:
            self.llm: Any = vllm.LLM(**kwargs)
        except ValueError as e:  # how vLLM reports unusable settings and unsupported models
            raise InvalidInput(f"vLLM cannot load {path} with these settings: {e}") from e

        self.info = TeacherInfo(
            name_or_path=str(model_dir),
            revision=snapshot_revision(path),
            fingerprint=fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            architecture=str((config.get("architectures") or [config.get("model_type", "unknown")])[0]),
            vocab_size=len(self.tokenizer),
            max_context=int(context),
            dtype=dtype,
            backend=self.backend,
            device="cuda" if tensor_parallel_size == 1 else f"cuda x{tensor_parallel_size} (tensor parallel)",
            temperature=self.temperature,
        )
        try:
            self._probe()
        except BaseException:
            self.close()
            raise

    def _probe(self) -> None:
        """Score one fixed record at load, so that an engine whose output this backend misreads (another
        vLLM release, another shape) is refused before any part is scored, not in the middle of a run."""
        seq = [(7 * k + 3) % self._id_limit for k in range(12)]
        self._generate([self._validate(0, seq[:4], seq[4:])], None)

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`log_softmax(teacher(prompt + response[:j]))[response[j]]` for every response token, in input order.

        The engine schedules the requests itself (continuous batching under `max_num_batched_tokens`);
        results do not depend on how records are grouped into calls.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if self.llm is None:
            raise RuntimeError("this teacher has been closed")
        records = [self._validate(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(records)
        start = 0
        while start < len(records):
            end, tokens = start, 0
            while end < len(records) and (end == start or tokens + records[end][2] <= GENERATE_CHUNK_TOKENS):
                tokens += records[end][2]
                end += 1
            for i, arr in zip(range(start, end), self._generate(records[start:end], start)):
                out[i] = arr
            start = end
        return out

    def _generate(self, records: Sequence[tuple[list[int], list[int], int]], first: int | None) -> list[np.ndarray]:
        """Score `records` in one `LLM.generate` call; `first` is the index of the first (None: the load probe)."""
        requests = [build_request(p, r)[0] for p, r, _ in records]
        outputs = self.llm.generate(requests, sampling_params=self._params, use_tqdm=False)
        if len(outputs) != len(records):
            raise TeacherServerError(f"vLLM returned {len(outputs)} outputs for {len(records)} requests")
        result = []
        for k, ((p, r, _), request, output) in enumerate(zip(records, requests, outputs)):
            record = None if first is None else first + k
            echoed = getattr(output, "prompt_token_ids", None)
            if echoed is not None and list(echoed) != request["prompt_token_ids"]:
                raise _misaligned(record, "the output is for other prompt token ids than the request's")
            result.append(response_logprobs(output.prompt_logprobs, len(p), r, record=record))
        return result

    def _validate(self, i: int, prompt: Sequence[int], response: Sequence[int]) -> tuple[list[int], list[int], int]:
        """The transformers backend's checks, against the engine's context minus the token it generates."""
        p, r = check_token_ids(i, prompt, response, self._id_limit)
        if self._max_tokens and p.size + r.size > self._max_tokens:
            raise ValueError(
                f"record {i}: {p.size + r.size} tokens exceed the {self._max_tokens} the vLLM engine accepts (its "
                f"context minus the {CONTEXT_RESERVE} token it generates); truncate or drop the record"
            )
        return p.tolist(), r.tolist(), int(p.size + r.size)

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (weights, KV cache, distributed state).

        Never raises: it also runs while another error (a failed load-time check) is on its way up.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if callable(getattr(core, "shutdown", None)):  # V1 runs the engine core in a child process
                core.shutdown()
            del llm, core
            import vllm.distributed as dist

            if hasattr(dist, "cleanup_dist_env_and_memory"):  # what vLLM's maintainers point to (issue #18806)
                dist.cleanup_dist_env_and_memory()
            else:  # older releases: what vLLM's own tests did before that helper (issue #6544)
                dist.destroy_model_parallel()
                dist.destroy_distributed_environment()
        except Exception as e:  # a half-dead engine must not hide the error that is being raised
            log.warning("vLLM engine cleanup failed (%s: %s); its GPU memory may not be released", type(e).__name__, e)
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _device_total_memory() -> int:
    """Total memory of the first visible GPU, through vLLM's platform layer (NVML: no CUDA context in this
    process, so vLLM may still fork its workers), else torch."""
    with contextlib.suppress(Exception):
        from vllm.platforms import current_platform

        return int(current_platform.get_device_total_memory(0))
    import torch

    if not torch.cuda.is_available():
        raise InvalidInput("the vllm teacher backend needs a CUDA GPU, and none is visible")
    return int(torch.cuda.get_device_properties(0).total_memory)
