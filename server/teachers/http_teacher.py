"""The base of the teachers whose log-probs come from a running inference server (SGLang, vLLM).

* **Identity from local files.** The server only computes; what it computes with is proven by
  the model directory it was started from: the fingerprint, the tokenizer fingerprint, the
  vocabulary and the context length are all read locally, so the consistency gate works exactly
  as for the in-process backends.
* **Validation before sending.** Ids outside the vocabulary and records longer than the server
  accepts are refused locally, naming the record, before any request.
* **A probe at load.** One tiny request checks the server answers in the shape and alignment
  the backend expects before any part is scored; at a temperature other than 1, a second one
  checks the server applies it (servers that return unscaled log-probs are refused rather than
  silently storing log-probs at T = 1 labelled otherwise).

Requests, retries and concurrency are `http_scoring.HTTPClient`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from lopd.errors import InvalidInput, TeacherServerError
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint

from .base import (
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
from .http_scoring import HTTPClient, RetryPolicy


class HTTPTeacherOptions(TeacherOptions):
    """Options of every backend that scores through a running inference server."""

    uses_server: ClassVar[bool] = True
    generates_token: ClassVar[bool] = True
    supports_top_k: ClassVar[bool] = True
    extra: ClassVar[str] = "http-teacher"

    teacher_url: str = Field(
        description="The address of the running server it scores through, e.g. http://127.0.0.1:30000 "
        "(--teacher stays the model directory the server was started from)."
    )
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(600.0, gt=0, description="Seconds to wait for one answer before retrying.")
    teacher_api_key: str | None = Field(None, repr=False, description="Bearer token for the server.")

    def precision(self) -> str:
        return "server"  # chosen when the server was started

    def load(self, model_dir: str | Path, job: ScoringJob) -> Teacher:
        return self.teacher_class()(model_dir, temperature=job.temperature, top_k=job.top_k, **self.model_dump())

    @classmethod
    def teacher_class(cls) -> type[HTTPTeacher]:
        raise NotImplementedError


@dataclass(frozen=True)
class LocalModel:
    """What identifies a server's model, read from the model directory it was started from."""

    path: Path
    fingerprint: str
    tokenizer: Any
    tokenizer_fingerprint: str
    architecture: str
    vocab_size: int  # len(tokenizer)
    id_limit: int  # ids below this are valid: the tokenizer's and the embedding's sizes, whichever is smaller
    max_context: int


def read_local_model(model_dir: str | Path) -> LocalModel:
    """Fingerprints, tokenizer, vocabulary and context length of `model_dir`, without loading weights."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InvalidInput(
            f"model directory {path} does not exist: pass the directory the server was started from as --teacher "
            "(its files prove which model the server runs)"
        )
    fingerprint = model_fingerprint(path)  # first: a clear error for directories that are not models
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InvalidInput(
            f"the server-backed teachers read the model's tokenizer with transformers ({e}); "
            "install it with: pip install 'lightning-opd[http-teacher]'"
        ) from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot load the tokenizer of {path}: {e}") from e
    config = json.loads((path / "config.json").read_text())
    text_config = config.get("text_config") or {}
    embedding_rows = config.get("vocab_size") or text_config.get("vocab_size")
    id_limit = min(len(tokenizer), int(embedding_rows)) if isinstance(embedding_rows, int) else len(tokenizer)
    return LocalModel(
        path=path,
        fingerprint=fingerprint,
        tokenizer=tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        architecture=str((config.get("architectures") or [config.get("model_type", "unknown")])[0]),
        vocab_size=len(tokenizer),
        id_limit=id_limit,
        max_context=config_context_length(config) or 0,
    )


@dataclass(frozen=True)
class ServerFacts:
    """What a server says about itself at load (each None when it does not say)."""

    dtype: str | None = None
    max_context: int | None = None


class HTTPTeacher:
    """A `Teacher` whose log-probs come from an inference server, one request per record.

    Subclasses say how to check the server (`_connect`) and how to score one record
    (`_score_record`); this class does validation, concurrency, identity and the load probe.
    """

    backend: ClassVar[str] = ""
    options_class: ClassVar[type[HTTPTeacherOptions]] = HTTPTeacherOptions
    # Appended to the refusal when the server ignores the temperature: how to make it apply it.
    temperature_hint: ClassVar[str] = ""
    # Appended to the refusal when the server will not return the top K asked: how to make it.
    top_k_hint: ClassVar[str] = ""
    # Both SGLang and vLLM refuse an input as long as the context: the server wants room for one
    # generated token (vLLM generates it; SGLang checks `input >= context` even with 0 new tokens).
    context_reserve: ClassVar[int] = 1

    def __init__(
        self, model_dir: str | Path, *, retry: RetryPolicy | None = None, revision: str | None = None, **settings: Any
    ) -> None:
        """`settings`: the fields of the backend's options class and `temperature` (checked, with defaults, there)."""
        options, job = self.options_class.split(settings)
        self.options = options
        self.temperature = job.temperature
        self.top_k = job.top_k
        self.local = read_local_model(model_dir)
        self.tokenizer = self.local.tokenizer
        self.http = HTTPClient(
            options.teacher_url, backend=self.backend, max_concurrency=options.max_concurrency,
            timeout_s=options.timeout_s, retry=retry, api_key=options.teacher_api_key,
        )  # fmt: skip
        try:
            facts = self._connect()
            contexts = [c for c in (self.local.max_context, facts.max_context) if c]
            self.max_tokens = min(contexts) - self.context_reserve if contexts else 0
            self.info = TeacherInfo(
                name_or_path=str(model_dir),
                revision=revision if revision is not None else snapshot_revision(self.local.path),
                fingerprint=self.local.fingerprint,
                tokenizer_fingerprint=self.local.tokenizer_fingerprint,
                architecture=self.local.architecture,
                vocab_size=self.local.vocab_size,
                max_context=self.local.max_context,
                dtype=facts.dtype or "server",
                backend=self.backend,
                device=self.http.base_url,
                temperature=self.temperature,
            )
            self._probe()
        except BaseException:
            self.http.close()
            raise

    # ------------------------------------------------------------------ subclass hooks

    def _connect(self) -> ServerFacts:
        """Check the server is up and serves a generative model; say what it reports about itself."""
        raise NotImplementedError

    def _request(self, i: int | None, prompt: list[int], response: list[int], temperature: float, k: int) -> TopKScores:
        """One record's response log-probs (float32) at `temperature`, with the top `k` at each position (none for
        k = 0) ordered as `base.order_topk`; `i` is None for the load probe. Each server's own request."""
        raise NotImplementedError

    def _score_record(self, i: int | None, prompt: list[int], response: list[int], temperature: float) -> np.ndarray:
        return self._request(i, prompt, response, temperature, 0).logprobs

    def _score_record_topk(
        self, i: int | None, prompt: list[int], response: list[int], temperature: float
    ) -> TopKScores:
        return self._request(i, prompt, response, temperature, self.top_k)

    # ------------------------------------------------------------------ scoring

    def score_topk(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[TopKScores]:
        """`score`, plus the job's top K at every response position (see `TopKScores`), in input order."""
        if not self.top_k:
            raise ValueError("this teacher was loaded without top_k")
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if self.http is None:
            raise RuntimeError("this teacher has been closed")
        records = [self._validate(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.http.map_ordered(len(records), lambda i: self._score_record_topk(i, *records[i], self.temperature))

    def score(self, prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> list[np.ndarray]:
        """`log_softmax(teacher(prompt + response[:j]) / T)[response[j]]` per response token, in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if self.http is None:
            raise RuntimeError("this teacher has been closed")
        records = [self._validate(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.http.map_ordered(len(records), lambda i: self._score_record(i, *records[i], self.temperature))

    def _validate(self, i: int, prompt: TokenIds, response: TokenIds) -> tuple[list[int], list[int]]:
        """The checks of the in-process backends, plus the server's context limit; lists of ints for JSON."""
        p, r = check_token_ids(i, prompt, response, self.local.id_limit)
        if self.max_tokens and p.size + r.size > self.max_tokens:
            raise TeacherServerError(
                f"record {i}: {p.size} prompt + {r.size} response tokens exceed the {self.max_tokens} tokens the "
                f"{self.backend} server accepts (its context minus the {self.context_reserve} token it generates); "
                "truncate or drop the record",
                record=i,
            )
        return p.tolist(), r.tolist()

    @staticmethod
    def label(i: int | None) -> str:
        return "the load-time probe" if i is None else f"record {i}"

    def _probe(self) -> None:
        """Score a fixed record at load: the answer's shape and alignment, and that T is applied."""
        lim = self.local.id_limit
        seq = [(7 * k + 3) % lim for k in range(12)]
        prompt, response = seq[:4], seq[4:]
        at_t = self._score_record(None, prompt, response, self.temperature)
        if self.top_k:
            if self.top_k > self.local.id_limit:
                raise InvalidInput(f"--top-k {self.top_k} exceeds the teacher's vocabulary of {self.local.id_limit}")
            try:
                self._score_record_topk(None, prompt, response, self.temperature)
            except TeacherServerError as e:
                raise InvalidInput(
                    f"the {self.backend} server at {self.http.base_url} does not return the top {self.top_k} "
                    f"log-probs asked: {e}. {self.top_k_hint}"
                ) from e
        if self.temperature == 1.0:
            return
        at_1 = self._score_record(None, prompt, response, 1.0)
        if float(np.max(np.abs(at_t.astype(np.float64) - at_1))) < 1e-6:
            raise InvalidInput(
                f"the {self.backend} server at {self.http.base_url} returns the same log-probs at temperature "
                f"{self.temperature:g} as at 1: it does not apply the temperature to the log-probs it returns, so "
                f"the store would hold log-probs at T = 1 labelled T = {self.temperature:g}. {self.temperature_hint}"
            )

    def close(self) -> None:
        """Close the connection pool; the server keeps running."""
        if self.http is not None:
            self.http.close()
            self.http = None  # type: ignore[assignment]


def finite_float32(values: list[Any], *, what: str, record: int | None) -> np.ndarray:
    """Server log-probs as float32, refusing nulls and non-finite numbers (a null may be an encoded -inf)."""
    for j, v in enumerate(values):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v > 1e-3:
            raise TeacherServerError(
                f"{what}: the server's log-prob of response token {j} is {v!r}, not a finite log-probability",
                record=record,
            )
    return np.asarray(values, dtype=np.float64).astype(np.float32)
