"""Teacher scoring through a running SGLang server (`/generate` with input log-probs).

One request per record: `input_ids = prompt + response`, `sampling_params.max_new_tokens = 0`,
`return_logprob = true` and `logprob_start_len = K`. The answer's `meta_info.input_token_logprobs`
is a list of `[logprob, token_id, text_or_null]`, one per input position from K on.

The offset convention, as read in SGLang's source (not copied):

* Recent SGLang (`_process_input_token_logprobs` in the scheduler's logprob processing; 2025 sources,
  v0.5.x): the ids are `origin_input_ids[K:]` and the values are the raw per-position results shifted by one,
  `[None] + values[:-1]`. So entry `i` is the log-prob of input token `K + i` given the tokens
  before it, there are `len(input) - K` entries, and entry 0 is always null, for any K (not
  only K = 0). This is also how slime (the reference Lightning-OPD code) reads it: K = 0, drop
  the leading null, keep the last `len(response)` entries.
* Older SGLang (2024, `Scheduler.add_logprob_return_values`): entries start at token `K + 1`
  (`len(input) - K - 1` of them) and a null entry for token 0 is prepended only when K = 0.

In both, an entry's value is the log-prob of the entry's own token given everything before it;
only where the list starts differs. This backend asks for K = len(prompt) - 1, so the prompt is
not scored (log-prob positions cost a full-vocabulary log-softmax each) and the answer is the
response tokens, preceded in recent versions by one entry for the last prompt token. It accepts
exactly those two shapes, checks that the token ids are the record's (the entry before the
response must be the last prompt token; the rest must equal the response ids, in order) and
that every response value is a finite number. Any other count, id or a null value raises an
error naming the record and what was expected, so a server version that moves the offset is
refused instead of silently shifting every stored log-prob by one token.

Top-k (`--top-k K`): the request adds `top_logprobs_num = K`, and `meta_info.input_top_logprobs` holds,
aligned entry for entry with `input_token_logprobs` (recent SGLang builds both as `[None] + values[:-1]` in
`_process_input_token_logprobs` / `_process_input_top_logprobs` of its scheduler's logprob processing; older
SGLang prepends the None only at K = 0), a list of K `[logprob, token_id, text_or_null]` per position, or
null. This backend drops the same leading entry as for the token log-probs and keeps the best K of each
list by log-prob, then lower id (SGLang's `topk` order on ties is its own). SGLang has no cap like vLLM's
`max_logprobs`. No SGLang server runs here (it needs a GPU): the parsing is tested on answers shaped as the
source builds them (tests/server/test_http_teachers.py), not against a live server.

Temperature: SGLang scales the returned log-probs by the sampling temperature only when the
server runs with `SGLANG_TEMP_SCALED_LOGPROBS=1` (slime's teacher launcher sets it); the load
probe refuses a temperature other than 1 that the server ignores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lopd.errors import InvalidInput, TeacherServerError

from .base import TopKScores, best_k
from .http_teacher import HTTPTeacher, HTTPTeacherOptions, ServerFacts, finite_float32

log = logging.getLogger(__name__)


def response_logprobs(
    entries: Any, prompt: list[int], response: list[int], *, what: str, record: int | None
) -> np.ndarray:
    """The response tokens' log-probs from `input_token_logprobs` asked with K = len(prompt) - 1."""

    def refuse(problem: str) -> TeacherServerError:
        return TeacherServerError(
            f"{what}: SGLang's input_token_logprobs does not line up with the record ({problem}); a server whose "
            "logprob_start_len convention differs from the documented one would store shifted log-probs, so the "
            "answer is refused",
            record=record,
        )

    n, k = len(response), len(prompt) - 1
    if not isinstance(entries, list):
        raise refuse(f"expected a list, got {type(entries).__name__}")
    if not all(isinstance(e, (list, tuple)) and len(e) >= 2 for e in entries):
        raise refuse("expected entries of the form [logprob, token_id, text]")
    if len(entries) == n + 1:  # recent SGLang: starts at token K (the last prompt token, always null)
        if entries[0][1] != prompt[-1]:
            raise refuse(
                f"{n + 1} entries, so the first should be the last prompt token (id {prompt[-1]} at position {k}), "
                f"but it is id {entries[0][1]!r}"
            )
        entries = entries[1:]
    elif len(entries) != n:  # older SGLang: starts at token K + 1
        raise refuse(
            f"with logprob_start_len={k} expected {n + 1} entries (the last prompt token, then the {n} response "
            f"tokens) or {n} (the response tokens only), got {len(entries)}"
        )
    ids = [e[1] for e in entries]
    if ids != response:
        j = next(j for j, (a, b) in enumerate(zip(ids, response)) if a != b)
        raise refuse(f"response token {j} should be id {response[j]}, the server scored id {ids[j]!r}")
    nulls = [j for j, e in enumerate(entries) if e[0] is None]
    if nulls:  # only the entry before the first scored position may be null
        raise refuse(f"response token {nulls[0]} has a null log-prob")
    return finite_float32([e[0] for e in entries], what=what, record=record)


def response_topk(
    top_entries: Any, prompt: list[int], response: list[int], k: int, *, what: str, record: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """[R, k] ids and log-probs from `input_top_logprobs` asked with `logprob_start_len = len(prompt) - 1`.

    Aligned with `input_token_logprobs` (already checked by `response_logprobs`): `len(response) + 1` lists
    (the first, for the last prompt token, dropped) or `len(response)`.
    """
    n = len(response)
    if not isinstance(top_entries, list) or len(top_entries) not in (n, n + 1):
        got = len(top_entries) if isinstance(top_entries, list) else type(top_entries).__name__
        raise TeacherServerError(
            f"{what}: SGLang's input_top_logprobs has {got} entries for {n} response tokens", record=record
        )
    top_entries = top_entries[len(top_entries) - n :]
    ids = np.empty((n, k), np.int32)
    lps = np.empty((n, k), np.float32)
    for j, entry in enumerate(top_entries):
        if not isinstance(entry, list) or not all(isinstance(e, (list, tuple)) and len(e) >= 2 for e in entry):
            raise TeacherServerError(
                f"{what}: SGLang's input_top_logprobs at response token {j} is {str(entry)[:100]}, not a list of "
                "[logprob, token_id, text]",
                record=record,
            )
        values = finite_float32([e[0] for e in entry], what=what, record=record)
        picked = best_k([int(e[1]) for e in entry], values.tolist(), k)
        if picked is None:
            raise TeacherServerError(
                f"{what}: SGLang returned {len(entry)} top log-probs at response token {j}, fewer than the {k} asked",
                record=record,
            )
        ids[j], lps[j] = picked
    return ids, lps


class SGLangOptions(HTTPTeacherOptions):
    """The sglang backend's options: those of every server-backed backend."""

    name: ClassVar[str] = "sglang"
    summary: ClassVar[str] = "a running SGLang server at --teacher-url"

    @classmethod
    def teacher_class(cls) -> type[HTTPTeacher]:
        return SGLangTeacher


class SGLangTeacher(HTTPTeacher):
    """Scores through SGLang's native `/generate`; `model_dir` is the directory the server was started from."""

    backend = "sglang"
    options_class = SGLangOptions
    temperature_hint = (
        "Start the SGLang server with SGLANG_TEMP_SCALED_LOGPROBS=1 so that returned log-probs are scaled by the "
        "request's temperature, or score at --temperature 1."
    )

    def _connect(self) -> ServerFacts:
        response = self.http.request("GET", "/get_model_info", what="checking the server (GET /get_model_info)")
        if response.status_code == 404:  # a version without it: health only (an empty 200)
            health = self.http.request("GET", "/health", what="checking the server (GET /health)")
            if health.status_code != 200:
                self.http.parse_json(health, what="checking the server (GET /health)")  # raises, with the message
                raise TeacherServerError(f"GET /health at {self.http.base_url} answered HTTP {health.status_code}")
            return ServerFacts()
        info = self.http.parse_json(response, what="checking the server (GET /get_model_info)")
        if isinstance(info, dict) and info.get("is_generation") is False:
            raise InvalidInput(
                f"the SGLang server at {self.http.base_url} serves {info.get('model_path')!r} as an embedding or "
                "reward model; start it as a generative model to score with it"
            )
        served = info.get("model_path") if isinstance(info, dict) else None
        if isinstance(served, str) and Path(served).name != self.local.path.resolve().name:
            # Paths differ between machines, so this is a warning; the fingerprint is the local directory's.
            log.warning(
                "the SGLang server at %s serves %r, not obviously %s; make sure it was started from the same "
                "model (`lopd verify --backend transformers` on a sample checks the numbers)",
                self.http.base_url, served, self.local.path,
            )  # fmt: skip
        return self._server_info()

    def _server_info(self) -> ServerFacts:
        """dtype and context length from `/get_server_info` when the server has it (best effort)."""
        try:
            response = self.http.request("GET", "/get_server_info", what="reading the settings (GET /get_server_info)")
            info = response.json() if response.status_code == 200 else None
        except (TeacherServerError, ValueError):
            return ServerFacts()
        if not isinstance(info, dict):
            return ServerFacts()
        dtype = info.get("dtype")
        context = info.get("context_length")
        return ServerFacts(
            dtype=dtype if isinstance(dtype, str) and dtype != "auto" else None,
            max_context=context if isinstance(context, int) and context > 0 else None,
        )

    def _request(self, i: int | None, prompt: list[int], response: list[int], temperature: float, k: int) -> TopKScores:
        what = self.label(i)
        body: dict[str, Any] = {
            "input_ids": prompt + response,
            "sampling_params": {"max_new_tokens": 0, "temperature": temperature},
            "return_logprob": True,
            "logprob_start_len": len(prompt) - 1,
        }
        if k:
            body["top_logprobs_num"] = k
        answer = self.http.post_json("/generate", body, what=what, record=i)
        if isinstance(answer, list) and len(answer) == 1:  # a batch of one
            answer = answer[0]
        try:
            entries = answer["meta_info"]["input_token_logprobs"]
            top = answer["meta_info"]["input_top_logprobs"] if k else None
        except (KeyError, TypeError) as e:
            raise TeacherServerError(
                f"{what}: the SGLang answer has no meta_info.{'input_top_logprobs' if k else 'input_token_logprobs'} "
                f"({e!r}); is this an SGLang server?",
                record=i,
            ) from e
        logprobs = response_logprobs(entries, prompt, response, what=what, record=i)
        if not k:
            return TopKScores(
                logprobs, np.empty((len(response), 0), np.int32), np.empty((len(response), 0), np.float32)
            )
        return TopKScores(logprobs, *response_topk(top, prompt, response, k, what=what, record=i))
