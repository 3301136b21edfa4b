"""The teacher interface: token ids in, one float32 log-prob per response token out.

Every scoring backend (in-process transformers today; vLLM, SGLang or an OpenAI-compatible
server later) implements this one narrow contract, so the store cannot tell them apart:

* Inputs are token ids, never text. Tokenisation is done once, by the caller, with the
  tokenizer whose fingerprint the store records, so no backend can re-tokenise differently
  (chat templates, special tokens, whitespace merges) and silently shift ids.
* Output is exactly one float32 per response token,
  `log_softmax(teacher(prompt + response[:j]) / T)[response[j]]`, over the model's full
  vocabulary. No text, no backend-specific objects: the same record scored by two backends yields
  arrays that can be compared element-wise.
* Asked for top-k (`ScoringJob.top_k`, `lopd precompute --top-k K`), `score_topk` also returns the
  teacher's K most likely next tokens at every response position and their log-probs, ordered by
  descending log-prob with ties broken by the lower token id (`TopKScores`).
* `TeacherInfo` carries content fingerprints rather than names, so a store can prove which
  weights and which tokenizer produced its numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lopd.config import LopdSettings, invalid_input

# Config keys that give a model's context length, in the order architectures use them. One list for
# the precompute job (which reads config.json before loading any weights) and the backends.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def snapshot_revision(path: Path) -> str | None:
    """The commit hash when `path` is a hub cache snapshot (`.../snapshots/<40 hex>`)."""
    p = path.absolute()
    if p.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", p.name):
        return p.name
    return None


def config_context_length(config: dict[str, Any]) -> int | None:
    """The context length a `config.json` declares (multimodal configs nest it in `text_config`)."""
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return int(section[key])
    return None


# One record's token ids: a list or a 1-D integer array.
TokenIds = Sequence[int] | np.ndarray

# What a job asks of every teacher, declared once: the precompute and verify configs use these too.
Temperature = Annotated[
    float, Field(gt=0, allow_inf_nan=False, description="Scoring temperature: log_softmax(logits / T).")
]
MaxBatchTokens = Annotated[int, Field(ge=1, description="Padded tokens per forward batch.")]
MaxBatchSize = Annotated[int, Field(ge=1, description="Sequences per forward batch.")]
TopK = Annotated[
    int,
    Field(
        ge=0,
        le=1024,
        description="Also store the teacher's K most likely next tokens and their log-probs at every response "
        "position (teacher_topk_ids, teacher_topk_logprobs); 0: only the sampled token's log-prob.",
    ),
]
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_MAX_BATCH_SIZE = 256


class ScoringJob(BaseModel):
    """The job's side of scoring: the temperature, and the batch budgets of backends that batch in-process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Temperature = DEFAULT_TEMPERATURE
    max_batch_tokens: MaxBatchTokens = DEFAULT_MAX_BATCH_TOKENS
    max_batch_size: MaxBatchSize = DEFAULT_MAX_BATCH_SIZE
    top_k: TopK = 0


@dataclass(frozen=True)
class TopKScores:
    """One record scored with top-k: what `Teacher.score_topk` returns per record.

    `logprobs` [R] float32 is exactly what `score` returns (the sampled tokens' log-probs, whether or
    not they are among the top K); `ids` [R, K] int32 and `topk_logprobs` [R, K] float32 are the K most
    likely next tokens at each response position, by descending log-prob, ties broken by the lower id.
    """

    logprobs: np.ndarray
    ids: np.ndarray
    topk_logprobs: np.ndarray


def order_topk(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R, K] ids and log-probs reordered by descending log-prob, ties by the lower id (int32, float32).

    For backends whose engine returns the top K unordered or in its own tie order.
    """
    ids = np.asarray(ids, dtype=np.int32)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    order = np.lexsort((ids, -logprobs), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)


def best_k(ids: Sequence[int], logprobs: Sequence[float], k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The `k` best of one position's candidates, by descending log-prob, ties by the lower id; None if < k ids.

    For engines that return the top K plus the actual token (vLLM: K or K + 1 entries, the actual token
    possibly listed twice): the actual token is kept only where it is itself among the best K.
    """
    unique: dict[int, float] = {}
    for t, v in zip(ids, logprobs):
        unique.setdefault(int(t), float(v))
    if len(unique) < k:
        return None
    picked = sorted(unique.items(), key=lambda item: (-item[1], item[0]))[:k]
    return np.array([t for t, _ in picked], np.int32), np.array([v for _, v in picked], np.float32)


OptionsT = TypeVar("OptionsT", bound="TeacherOptions")


class TeacherOptions(LopdSettings):
    """A teacher backend: its options, each declared once as a field, and how to load it.

    Each backend's module subclasses this with its own fields (type, default, constraints and a
    description); `lopd.server.teachers` registers the subclass with one line. The `lopd`
    flags, their help, the `LOPD_*` environment variables, the precompute and verify configs and
    validation all derive from those fields, so adding an option touches the backend's module only.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # where the model runs, for --backend's help
    extra: ClassVar[str]  # the pip extra that installs what it needs
    # Scores through a running inference server: it cannot compute rollout log-probs locally.
    uses_server: ClassVar[bool] = False
    # The engine generates at least one token after each record (vLLM refuses max_tokens=0; servers
    # reserve room for one), so a record may use the teacher's context minus one token.
    generates_token: ClassVar[bool] = False
    # Can return the teacher's top-k per position (`Teacher.score_topk`, `lopd precompute --top-k`).
    supports_top_k: ClassVar[bool] = False

    def precision(self) -> str:
        """The dtype the manifest records ("server" where the server chose it)."""
        raise NotImplementedError

    def load(self, model_dir: str | Path, job: ScoringJob) -> Teacher:
        """The loaded teacher; heavy libraries are imported here, never at module import."""
        raise NotImplementedError

    @classmethod
    def split(cls: type[OptionsT], settings: Mapping[str, Any]) -> tuple[OptionsT, ScoringJob]:
        """Keyword settings of a backend's constructor: (its options, the job's part), both validated."""
        job_keys = ScoringJob.model_fields.keys()
        try:
            job = ScoringJob(**{k: v for k, v in settings.items() if k in job_keys})
            options = cls(**{k: v for k, v in settings.items() if k not in job_keys})
        except ValidationError as e:
            raise invalid_input(e, f"the {cls.name} teacher backend") from None
        return options, job


@dataclass(frozen=True)
class TeacherInfo:
    """What identifies a loaded teacher and the settings its log-probs were computed with."""

    name_or_path: str
    revision: str | None
    fingerprint: str
    tokenizer_fingerprint: str
    architecture: str
    vocab_size: int  # the tokenizer's size (len(tokenizer)): ids >= this are outside the vocabulary
    max_context: int  # max_position_embeddings (or equivalent)
    dtype: str
    backend: str
    device: str
    temperature: float


@runtime_checkable
class Teacher(Protocol):
    """A scoring backend. Implementations must be deterministic for a given input."""

    info: TeacherInfo
    tokenizer: Any

    def score(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[np.ndarray]:
        """One float32 array per record, `len == len(response)`, in input order."""
        ...

    def score_topk(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[TopKScores]:
        """`score`, plus the top K (the loaded job's `top_k`, >= 1) at every response position, in input order."""
        ...

    def close(self) -> None:
        """Release the model and any device memory it holds."""
        ...


def check_token_ids(i: int, prompt: TokenIds, response: TokenIds, id_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The checks every backend makes on record `i` before scoring it; returns the ids as arrays.

    A prompt needs at least one token (e.g. BOS) to predict the first response token; ids outside
    the vocabulary mean the record was tokenized with another tokenizer. The context-length check
    is the backend's own (each engine reserves differently).
    """
    p, r = np.asarray(prompt), np.asarray(response)
    for name, a in (("prompt", p), ("response", r)):
        if a.ndim != 1 or a.size == 0:
            raise ValueError(
                f"record {i}: {name} must be a non-empty 1-D sequence of token ids "
                "(a prompt needs at least one token, e.g. BOS, to predict the first response token)"
            )
        if a.dtype.kind not in "iu":
            raise ValueError(f"record {i}: {name} token ids must be integers, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= id_limit:
            raise ValueError(
                f"record {i}: {name} has token id {int(a.min() if a.min() < 0 else a.max())} outside "
                f"[0, {id_limit}); was it tokenized with a different tokenizer?"
            )
    return p, r
