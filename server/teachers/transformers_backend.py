"""In-process teacher scoring with Hugging Face transformers (CPU or CUDA).

The expensive, memory-hungry part of scoring is the LM head: full logits are
`[batch, seq, vocab]` floats (a 150k vocabulary makes that ~600 kB per token in float32), yet we
need one number per *response* token. So the decoder body runs on the padded batch, only the
hidden states that predict response tokens are gathered, and the head is applied to them in
row chunks bounded by `head_chunk_bytes`, each reduced at once to `target - logsumexp`. Prompt
positions never reach the head. With top-k, each chunk also gives its rows' K largest logits
(`topk(K + 1)`, so that a tie at the K-th place is seen and broken by the lower id) before it is
freed: no tensor larger than one chunk is ever held.

On CUDA the per-chunk normalisation (upcast, post-processing, logsumexp) is one `torch.compile`d
reduction over the low-precision logits instead of five float32 passes; on CPU the in-place eager
form is used (bench/bench_gpu_scoring.py, bench/bench_precompute.py).

Re-implementing the head's post-processing (scaling, softcapping) is only safe if it matches the
model's own forward, so every load runs a self-check against `model(input_ids).logits` and
refuses architectures whose head does something this path does not.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, cast

import numpy as np
from pydantic import Field

from lopd.errors import InvalidInput
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.batching import plan_batches
from lopd.server.teachers.base import (
    CONTEXT_KEYS,
    ScoringJob,
    Teacher,
    TeacherInfo,
    TeacherOptions,
    TokenIds,
    TopKScores,
    check_token_ids,
    snapshot_revision,
)

if TYPE_CHECKING:  # torch is imported where it is used: `lopd --help` must not pay for it
    import torch

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def _inference_mode(method: F) -> F:
    """`torch.inference_mode()` as a decorator that imports torch at the first call, not at module import."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return cast(F, wrapper)


class TransformersOptions(TeacherOptions):
    """The transformers backend's options (the `lopd` flags of the same names)."""

    name: ClassVar[str] = "transformers"
    summary: ClassVar[str] = "in this process with Hugging Face transformers (CPU or CUDA)"
    extra: ClassVar[str] = "teacher"
    supports_top_k: ClassVar[bool] = True

    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and activations.")
    head_chunk_bytes: int = Field(
        256 * 2**20, gt=0, description="Largest slice of LM-head logits held at once, in bytes (bounds peak memory)."
    )
    fused_head: bool | None = Field(
        None, description="Normalise head chunks with torch.compile (default: on CUDA only; checked at load)."
    )

    def precision(self) -> str:
        return self.dtype

    def load(self, model_dir: str | Path, job: ScoringJob) -> Teacher:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise InvalidInput(
                f"the transformers teacher backend needs torch and transformers ({e}); "
                "install them with: pip install 'lightning-opd[teacher]'"
            ) from e
        return TransformersTeacher(model_dir, **job.model_dump(), **self.model_dump())


# Max |head path - full forward| in log-prob units accepted by the load-time self-check. Half
# precision differs a little between a padded, masked batch and a lone sequence; a missing
# head transform (scaling, softcapping) differs by far more.
_SELF_CHECK_TOL = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


class TransformersTeacher:
    """A causal LM loaded with transformers that scores response tokens exactly and frugally."""

    backend = "transformers"

    def __init__(self, model_dir: str | Path, *, revision: str | None = None, **settings: Any) -> None:
        """`settings`: the fields of `TransformersOptions` and `ScoringJob` (checked there; defaults there)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options, job = TransformersOptions.split(settings)
        dtype, fused_head = options.dtype, options.fused_head
        path = Path(model_dir)
        if not path.is_dir():
            raise InvalidInput(f"model directory {path} does not exist")

        self.temperature = job.temperature
        self.top_k = job.top_k
        self.max_batch_tokens, self.max_batch_size = job.max_batch_tokens, job.max_batch_size
        self.head_chunk_bytes = options.head_chunk_bytes
        self.device = torch.device(options.device)
        fingerprint = model_fingerprint(path)  # first: a clear error for directories that are not models
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError) as e:
            raise InvalidInput(f"cannot load {path} as a causal LM with its tokenizer: {e}") from e
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' stub of .to

        self._head: Any = model.get_output_embeddings()
        self._body = model.get_decoder()
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
        if self._head is None or self._body is model:
            raise InvalidInput(f"{architecture} has no separable decoder body and LM head to score with")
        self._logit_scale = getattr(text_config, "logit_scale", None)
        self._logits_scaling = getattr(text_config, "logits_scaling", None)
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        self._head_rows = int(self._head.weight.shape[0])
        embedding: Any = model.get_input_embeddings()
        self._id_limit: int = min(len(self.tokenizer), int(embedding.weight.shape[0]))
        max_context = next((getattr(text_config, k) for k in CONTEXT_KEYS if getattr(text_config, k, None)), 0)

        self.info = TeacherInfo(
            name_or_path=str(model_dir),
            revision=revision if revision is not None else snapshot_revision(path),
            fingerprint=fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            architecture=str(architecture),
            vocab_size=len(self.tokenizer),
            max_context=int(max_context),
            dtype=dtype,
            backend=self.backend,
            device=str(self.device),
            temperature=self.temperature,
        )
        # On CUDA the normalisation of each head chunk is memory-bound: five passes over float32 logits
        # (bench/bench_gpu_scoring.py). torch.compile fuses upcast, scaling and logsumexp into one pass
        # over the low-precision logits. The self-check below compares it with the model's own forward;
        # if it cannot compile or does not match, the eager path is used.
        self._fused = None
        if fused_head if fused_head is not None else self.device.type == "cuda":
            self._fused = torch.compile(_target_minus_logsumexp, dynamic=True)
            try:
                self._self_check()
                return
            except Exception as e:  # no compiler toolchain, an unsupported GPU, or a mismatch
                log.warning("fused LM-head normalisation unavailable (%s); using the eager path", str(e)[:200])
                self._fused = None
        self._self_check()

    # ------------------------------------------------------------------ scoring

    def score(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[np.ndarray]:
        """`log_softmax(teacher(prompt + response[:j]) / T)[response[j]]` for every response token.

        Returns one float32 array per record, in input order. Records are regrouped into
        length-bucketed batches under the token budget; results do not depend on the grouping.
        """
        return [s.logprobs for s in self._score(prompts, responses, 0)]

    def score_topk(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[TopKScores]:
        """`score`, plus the job's top K at every response position (see `TopKScores`)."""
        if not self.top_k:
            raise ValueError("this teacher was loaded without top_k")
        if self.top_k > self._head_rows:
            raise InvalidInput(f"--top-k {self.top_k} exceeds the teacher's {self._head_rows} logits per position")
        return self._score(prompts, responses, self.top_k)

    def _score(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds], top_k: int) -> list[TopKScores]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if self.model is None:
            raise RuntimeError("this teacher has been closed")
        records = [self._validate(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        lengths = [len(p) + len(r) - 1 for p, r in records]  # the last token predicts nothing
        out: list[TopKScores] = [TopKScores(np.empty(0, np.float32), np.empty(0), np.empty(0))] * len(records)
        for batch in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size):
            for i, scores in zip(batch, self._score_batch([records[i] for i in batch], top_k)):
                out[i] = scores
        return out

    def _validate(self, i: int, prompt: TokenIds, response: TokenIds) -> tuple[np.ndarray, np.ndarray]:
        p, r = check_token_ids(i, prompt, response, self._id_limit)
        if self.info.max_context and p.size + r.size > self.info.max_context:
            raise ValueError(
                f"record {i}: {p.size + r.size} tokens exceed the teacher's context of "
                f"{self.info.max_context}; truncate or drop the record"
            )
        return p.astype(np.int64), r.astype(np.int64)

    @_inference_mode
    def _score_batch(self, records: Sequence[tuple[np.ndarray, np.ndarray]], top_k: int = 0) -> list[TopKScores]:
        """Right-pad, run the body once, gather the response-predicting rows, score them."""
        import torch

        width = max(len(p) + len(r) - 1 for p, r in records)
        ids = np.zeros((len(records), width), np.int64)  # pad id is irrelevant: masked and never read
        mask = np.zeros((len(records), width), np.int64)
        rows, cols = [], []
        for b, (p, r) in enumerate(records):
            n = len(p) + len(r) - 1
            ids[b, : len(p)], ids[b, len(p) : n] = p, r[:-1]
            mask[b, :n] = 1
            rows.append(np.full(len(r), b))
            cols.append(np.arange(len(p) - 1, n))  # position t predicts token t + 1
        out = self._body(
            input_ids=torch.from_numpy(ids).to(self.device),
            attention_mask=torch.from_numpy(mask).to(self.device),
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        r_idx = torch.from_numpy(np.concatenate(rows)).to(self.device)
        c_idx = torch.from_numpy(np.concatenate(cols)).to(self.device)
        targets = torch.from_numpy(np.concatenate([r for _, r in records])).to(self.device)
        logprobs, top_ids, top_lps = (
            t.cpu().numpy() for t in self._head_logprobs(hidden[r_idx, c_idx], targets, top_k)
        )
        bounds = np.cumsum([len(r) for _, r in records])[:-1]
        return [
            TopKScores(lp.astype(np.float32, copy=True), ids.astype(np.int32), vals.astype(np.float32))
            for lp, ids, vals in zip(*(np.split(a, bounds) for a in (logprobs, top_ids, top_lps)))
        ]

    def _head_logprobs(
        self, hidden: torch.Tensor, targets: torch.Tensor, top_k: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`target logit - logsumexp` per row, with at most `head_chunk_bytes` of float32 logits alive.

        Also the rows' `top_k` ids and log-probs ([rows, top_k], ordered; [rows, 0] when `top_k` is 0).
        """
        import torch

        chunk = max(1, self.head_chunk_bytes // (self._head_rows * 4))
        rows = hidden.shape[0]
        result = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        top_ids = torch.empty((rows, top_k), dtype=torch.int64, device=hidden.device)
        top_lps = torch.empty((rows, top_k), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            if self._fused is not None and not top_k:
                result[start:end] = self._fused(
                    self._head(hidden[start:end]), targets[start:end], self._logit_scale, self._logits_scaling,
                    self._softcap, self.temperature,
                )  # fmt: skip
                continue
            logits = _postprocess(
                self._head(hidden[start:end]).float(), self._logit_scale, self._logits_scaling, self._softcap,
                self.temperature,
            )  # fmt: skip
            target = logits.gather(1, targets[start:end, None]).squeeze(1)
            if top_k:
                top_vals, top_ids[start:end] = _topk_lowest_id_on_ties(logits, top_k)
            # logsumexp in place: `torch.logsumexp` allocates a temporary as large as the chunk (doubling
            # the peak) and is ~2.7x slower on CPU (bench/bench_precompute.py). Safe: no autograd here,
            # and `target` was gathered (copied) above.
            peak = logits.amax(dim=-1, keepdim=True)
            lse = logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(1))
            result[start:end] = target - lse
            if top_k:
                # Same float32 subtraction as the target's, so a sampled token in the top K has the same value.
                top_lps[start:end] = top_vals - lse[:, None]
            del logits, lse  # else this chunk is still alive while the next one is allocated: 2x the peak
        if top_k:
            # `logit - lse` can round two different logits to one log-prob: order by (log-prob desc, id asc).
            by_id = top_ids.argsort(dim=1)
            top_ids, top_lps = top_ids.gather(1, by_id), top_lps.gather(1, by_id)
            by_lp = top_lps.argsort(dim=1, descending=True, stable=True)
            top_ids, top_lps = top_ids.gather(1, by_lp), top_lps.gather(1, by_lp)
        return result, top_ids, top_lps

    @_inference_mode
    def _self_check(self) -> None:
        """Compare the chunked head path with the model's own forward on fixed, padded records."""
        import torch

        lim = self._id_limit
        seq = [(7 * k + 3) % lim for k in range(12)]
        records = [(np.array(seq[:3]), np.array(seq[3:])), (np.array(seq[5:9]), np.array(seq[9:11]))]
        try:
            got = [s.logprobs for s in self._score_batch(records)]
        except Exception as e:  # a body that rejects attention_mask/use_cache, odd outputs, ...
            raise InvalidInput(f"{self.info.architecture}: cannot run the decoder body on its own: {e}") from e
        worst = 0.0
        for (p, r), mine in zip(records, got):
            full = torch.from_numpy(np.concatenate([p, r])[None]).to(self.device)
            logits = self.model(input_ids=full, use_cache=False).logits[0].float() / self.temperature
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=self.device)
            ref = torch.log_softmax(logits, dim=-1)[pos, torch.from_numpy(r).to(self.device)]
            worst = max(worst, float(np.max(np.abs(ref.cpu().numpy() - mine))))
        tol = _SELF_CHECK_TOL[self.info.dtype]
        if not worst <= tol:  # also catches NaN
            raise InvalidInput(
                f"unsupported head post-processing in {self.info.architecture}: the chunked LM-head path "
                f"differs from the model's own forward by {worst:.3g} log-prob (tolerance {tol}); "
                "this backend cannot score this architecture exactly"
            )

    def close(self) -> None:
        """Drop the model so its (device) memory can be reclaimed."""
        self.model = self._head = self._body = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _topk_lowest_id_on_ties(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest values of each row and their columns, a tie at the k-th place going to the lower column.

    `torch.topk` picks among equal values in no stated order. Asking for k + 1 shows whether the k-th
    value is tied with one left out; only such rows (rare in float32, common in bf16) are redone.
    """
    import torch

    width = logits.shape[1]
    vals, idx = logits.topk(min(k + 1, width), dim=1)
    if width > k:
        for row in (vals[:, k] == vals[:, k - 1]).nonzero().flatten().tolist():
            kth = vals[row, k - 1]
            above = (logits[row] > kth).nonzero().flatten()
            tied = (logits[row] == kth).nonzero().flatten()[: k - above.numel()]  # ascending columns
            picked = torch.cat([above, tied])
            idx[row, :k], vals[row, :k] = picked, logits[row, picked]
    return vals[:, :k], idx[:, :k]


def _postprocess(
    x: torch.Tensor, logit_scale: float | None, logits_scaling: float | None, softcap: float | None, temperature: float
) -> torch.Tensor:
    """The head's post-processing, in the same order as the models that define these config keys, then 1/T."""
    if logit_scale is not None:
        x = x * logit_scale
    if logits_scaling is not None:
        x = x / logits_scaling
    if softcap is not None:
        x = (x / softcap).tanh() * softcap
    if temperature != 1.0:
        x = x / temperature
    return x


def _target_minus_logsumexp(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float | None,
    logits_scaling: float | None,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    """`log_softmax(post(logits) / T)[target]` per row in float32, written for torch.compile to fuse the
    upcast, the post-processing and the logsumexp into one reduction over the low-precision logits."""
    x = _postprocess(logits.float(), logit_scale, logits_scaling, softcap, temperature)
    return x.gather(1, targets[:, None]).squeeze(1) - x.logsumexp(dim=-1)
