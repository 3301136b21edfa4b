"""Teacher scoring through a running vLLM OpenAI-compatible server (`/v1/completions` with prompt log-probs).

One request per record: `prompt` is `prompt + response` as a list of token ids (no text, so the
server cannot re-tokenize), `max_tokens = 1` (vLLM refuses 0) and `prompt_logprobs = 0`, a vLLM
extra body field. As vLLM defines it (`PromptLogprobs = list[dict[int, Logprob] | None]`, read in
its source), `choices[0].prompt_logprobs` has one element per prompt position: the first is null
(nothing predicts token 0) and element `t` maps token ids to `{"logprob", "rank",
"decoded_token"}`, always including the actual token `t` (with `prompt_logprobs = 0`, only it);
JSON makes the ids strings. This backend takes element `len(prompt) + j` for
response token j, keyed by that token's id, and refuses an answer whose length is not one per
input token, whose echoed `prompt_token_ids` (recent vLLM) are not the record's, or whose element
lacks the actual token, naming the record.

vLLM computes prompt log-probs for every position, prompt included (there is no start offset),
and, in V1 with the default `--logprobs-mode raw_logprobs`, before any temperature: the load
probe refuses a temperature other than 1 that the server ignores.

With `--top-k K` the request asks `prompt_logprobs = K`: each element then holds the top K (ranks 1..K)
and the actual token, K or K + 1 entries (`response_topk` keeps the best K by log-prob, then lower id).
The server caps K at its `--max-logprobs` (vLLM's default 20; a larger K is refused with HTTP 400 by
the load probe, which says to restart the server with `--max-logprobs K`).

The served model name comes from `GET /v1/models` (the only model it lists, or the one whose
`root` is the teacher directory) unless given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from lopd.errors import InvalidInput, TeacherServerError

from .base import TopKScores, best_k
from .http_teacher import HTTPTeacher, HTTPTeacherOptions, ServerFacts, finite_float32

log = logging.getLogger(__name__)


def response_logprobs(
    entries: Any, ids: list[int], n_prompt: int, *, what: str, record: int | None, echoed: Any = None
) -> np.ndarray:
    """The response tokens' log-probs from vLLM's `prompt_logprobs` for the input `ids`."""

    def refuse(problem: str) -> TeacherServerError:
        return TeacherServerError(
            f"{what}: vLLM's prompt_logprobs do not line up with the record ({problem})", record=record
        )

    if echoed is not None and list(echoed) != ids:
        raise refuse(f"the server echoed prompt_token_ids that are not the {len(ids)} ids sent")
    if not isinstance(entries, list) or len(entries) != len(ids):
        got = f"{len(entries)} entries" if isinstance(entries, list) else repr(type(entries).__name__)
        raise refuse(f"expected one entry per input token ({len(ids)}), got {got}")
    values = []
    for j, token in enumerate(ids[n_prompt:]):
        entry = entries[n_prompt + j]
        candidate = entry.get(str(token), entry.get(token)) if isinstance(entry, dict) else None
        if candidate is None:
            keys = sorted(entry)[:5] if isinstance(entry, dict) else entry
            raise refuse(
                f"position {n_prompt + j} (response token {j}) has no entry for its token id {token}; got {keys!r}"
            )
        values.append(candidate.get("logprob") if isinstance(candidate, dict) else candidate)
    return finite_float32(values, what=what, record=record)


def response_topk(
    entries: list[Any], n_prompt: int, n_response: int, k: int, *, what: str, record: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """[R, k] ids and log-probs at the response positions of `prompt_logprobs` asked with K = k (checked by
    `response_logprobs` first): the best k candidates by log-prob, then lower id, each of rank <= k."""
    ids = np.empty((n_response, k), np.int32)
    lps = np.empty((n_response, k), np.float32)
    for j in range(n_response):
        entry = entries[n_prompt + j]
        try:
            cand = [(int(t), v.get("logprob") if isinstance(v, dict) else v) for t, v in entry.items()]
            ranks = {int(t): v.get("rank") if isinstance(v, dict) else None for t, v in entry.items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise TeacherServerError(
                f"{what}: position {n_prompt + j} is not a map of token ids ({e})", record=record
            ) from e
        values = finite_float32([v for _, v in cand], what=what, record=record)
        picked = best_k([t for t, _ in cand], values.tolist(), k)
        if picked is None or any(isinstance(r, int) and r > k for r in (ranks[int(t)] for t in picked[0])):
            raise TeacherServerError(
                f"{what}: position {n_prompt + j} holds {len(cand)} candidates, not the top {k} asked", record=record
            )
        ids[j], lps[j] = picked
    return ids, lps


class OpenAIOptions(HTTPTeacherOptions):
    """The openai backend's options: those of every server-backed backend, and the served model's name."""

    name: ClassVar[str] = "openai"
    summary: ClassVar[str] = "a running vLLM OpenAI-compatible server at --teacher-url"

    served_model_name: str | None = Field(
        None, description="The model name the server serves (default: the one GET /v1/models lists)."
    )

    @classmethod
    def teacher_class(cls) -> type[HTTPTeacher]:
        return OpenAITeacher


class OpenAITeacher(HTTPTeacher):
    """Scores through a vLLM OpenAI-compatible server; `model_dir` is the directory it was started from."""

    backend = "openai"
    options_class = OpenAIOptions
    temperature_hint = (
        "vLLM returns prompt log-probs before temperature by default (V1, --logprobs-mode raw_logprobs); "
        "score at --temperature 1, or use a server that applies the temperature to prompt log-probs."
    )
    top_k_hint = (
        "vLLM caps prompt log-probs at its --max-logprobs (20 by default): restart the server with --max-logprobs "
        "at least --top-k."
    )

    def __init__(self, model_dir: str | Path, **kw: Any) -> None:
        self.model = kw.get("served_model_name")
        super().__init__(model_dir, **kw)

    def _connect(self) -> ServerFacts:
        listing = self.http.get_json("/v1/models", what="checking the server (GET /v1/models)")
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(cards, list) or not all(isinstance(c, dict) and "id" in c for c in cards):
            raise TeacherServerError(
                f"GET /v1/models at {self.http.base_url} did not answer an OpenAI model list: {str(listing)[:200]}"
            )
        names = [str(c["id"]) for c in cards]
        if self.model is None:
            local = str(self.local.path.resolve())
            by_root = [
                c for c in cards if isinstance(c.get("root"), str) and c["root"] in (local, str(self.local.path))
            ]
            if len(cards) == 1:
                self.model = names[0]
            elif len(by_root) == 1:
                self.model = str(by_root[0]["id"])
            else:
                raise InvalidInput(
                    f"the server at {self.http.base_url} serves {len(names)} models ({', '.join(names) or 'none'}); "
                    "name the teacher with --served-model-name"
                )
        if self.model not in names:
            raise InvalidInput(
                f"the server at {self.http.base_url} does not serve {self.model!r}; it serves: {', '.join(names)}"
            )
        card = cards[names.index(self.model)]
        root = card.get("root")
        if isinstance(root, str) and Path(root).name != self.local.path.resolve().name:
            log.warning(
                "the server at %s serves %r from %r, not obviously %s; make sure it was started from the same model "
                "(`lopd verify --backend transformers` on a sample checks the numbers)",
                self.http.base_url, self.model, root, self.local.path,
            )  # fmt: skip
        context = card.get("max_model_len")
        return ServerFacts(max_context=context if isinstance(context, int) and context > 0 else None)

    def _request(self, i: int | None, prompt: list[int], response: list[int], temperature: float, k: int) -> TopKScores:
        what = self.label(i)
        ids = prompt + response
        body = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "prompt_logprobs": k,
            "temperature": temperature,
            "stream": False,
        }
        answer = self.http.post_json("/v1/completions", body, what=what, record=i)
        try:
            choice = answer["choices"][0]
            entries = choice["prompt_logprobs"]
        except (KeyError, IndexError, TypeError) as e:
            raise TeacherServerError(
                f"{what}: the answer has no choices[0].prompt_logprobs ({e!r}); does the server support vLLM's "
                "prompt_logprobs extension?",
                record=i,
            ) from e
        echoed = choice.get("prompt_token_ids") if isinstance(choice, dict) else None
        logprobs = response_logprobs(entries, ids, len(prompt), what=what, record=i, echoed=echoed)
        if not k:
            return TopKScores(
                logprobs, np.empty((len(response), 0), np.int32), np.empty((len(response), 0), np.float32)
            )
        return TopKScores(logprobs, *response_topk(entries, len(prompt), len(response), k, what=what, record=i))
