"""A loopback inference server that speaks SGLang's and vLLM's scoring APIs, for the HTTP teacher tests.

It answers in the servers' documented shapes with real log-probs from a tiny transformers model
(one unbatched full forward, like `tests/utils/naive.py`), so the backends are tested against
real numbers, real sockets and real HTTP, not mocks:

* SGLang: `POST /generate` (`input_ids`, `sampling_params`, `return_logprob`, `logprob_start_len`;
  `meta_info.input_token_logprobs` as `[logprob, token_id, null]`; with `top_logprobs_num` K,
  `meta_info.input_top_logprobs` aligned with it, K `[logprob, token_id, null]` per position, null first),
  `GET /get_model_info`, `GET /get_server_info`, `GET /health`. The offset convention follows SGLang's source: recent
  versions return tokens `K..L-1` with a null first entry; `sglang_convention="2024"` returns
  tokens `K+1..L-1` (and a null entry for token 0 only when K = 0).
* vLLM OpenAI-compatible: `POST /v1/completions` (token-id `prompt`, `prompt_logprobs`;
  `choices[0].prompt_logprobs` = `[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]`, with
  `prompt_logprobs` K the top K too (ranks 1..K), K above `max_logprobs` (20) refused as vLLM does),
  `GET /v1/models`.

`Faults` injects what real servers do under load or after an upgrade: connections dropped
without an answer, 503/429 (with `Retry-After`), context-length 400s, refusals after N requests,
a moved `logprob_start_len` offset, ids it did not score, an ignored temperature. The standard
library's threading HTTP server is used (not uvicorn) because it can drop a connection at the
socket, which is the fault a client sees when a server process dies mid-request.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

SCORING_PATHS = ("/generate", "/v1/completions")


@dataclass
class Faults:
    """Misbehaviour to inject; request counters count scoring requests only (in arrival order)."""

    drop_first: int = 0  # the first N scoring requests: connection closed, no answer at all
    fail_first: int = 0  # the first N scoring requests: answered with `fail_status`
    fail_status: int = 503
    retry_after: str | None = None  # Retry-After header sent with those failures
    refuse_from: int | None = None  # scoring requests from this one on: 400 (a request the server rejects)
    context_length: int | None = None  # inputs this long or longer: the server's own 400 context-length error
    sglang_convention: Literal["recent", "2024"] = "recent"
    sglang_shift: int = 0  # SGLang answers as if logprob_start_len were K + shift (a moved offset)
    wrong_ids: bool = False  # the ids in SGLang's entries / vLLM's keys are not the tokens sent
    ignore_temperature: bool = False  # log-probs at T = 1 whatever the request says
    no_model_info: bool = False  # an SGLang without /get_model_info and /get_server_info (404)
    latency_s: float = 0.0  # added to every scoring request
    latency_by_length_s: float = 0.0  # plus this times (100 - input length), >= 0: long inputs answer first


@dataclass
class InferenceServer:
    url: str
    model_dir: Path
    served_model_name: str
    faults: Faults = field(default_factory=Faults)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, JSON body)
    scoring_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def reset(self, **faults: Any) -> None:
        """New faults; forget the requests seen so far."""
        self.faults = Faults(**faults)
        self.requests.clear()
        self.scoring_requests = self.in_flight = self.max_in_flight = 0

    def bodies(self, path: str) -> list[Any]:
        return [body for _, p, body in self.requests if p == path]


class _App:
    def __init__(self, state: InferenceServer) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.state = state
        self.model = AutoModelForCausalLM.from_pretrained(str(state.model_dir)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(state.model_dir))
        self.vocab = int(self.model.get_input_embeddings().weight.shape[0])
        self.lock = threading.Lock()  # state counters, and one forward at a time

    # ------------------------------------------------------------------ the model

    def full_logprobs(self, ids: list[int], temperature: float) -> torch.Tensor:
        """[L, V] float32: row t is log p(. | ids[:t + 1]) at `temperature`."""
        t = 1.0 if self.state.faults.ignore_temperature else temperature
        with self.lock, torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits / t, dim=-1)

    def top(self, ids: list[int], temperature: float, k: int) -> list[list[tuple[float, int]] | None]:
        """Per position t: None at 0, else the top `k` (log-prob, id) of log p(. | ids[:t]), most likely first."""
        vals, idx = self.full_logprobs(ids, temperature)[:-1].topk(k, dim=-1)
        return [None] + [list(zip(v.tolist(), i.tolist())) for v, i in zip(vals, idx)]

    def logprobs(self, ids: list[int], temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """Per position t >= 1: log p(ids[t] | ids[:t]) at `temperature`, and its rank (1 = most likely)."""
        lp = self.full_logprobs(ids, temperature)
        target = torch.tensor(ids[1:])
        chosen = lp[:-1].gather(1, target[:, None])
        ranks = 1 + (lp[:-1] > chosen).sum(dim=1)
        nan = np.array([np.nan])
        return np.concatenate([nan, chosen[:, 0].numpy().astype(np.float64)]), np.concatenate([nan, ranks.numpy()])

    # ------------------------------------------------------------------ HTTP

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        path = h.path.split("?")[0]
        faults = self.state.faults
        with self.lock:
            self.state.requests.append((method, path, body))
            n = None
            if path in SCORING_PATHS:
                n = self.state.scoring_requests
                self.state.scoring_requests += 1
                self.state.in_flight += 1
                self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
        try:
            if n is not None:
                if n < faults.drop_first:
                    h.close_connection = True
                    h.connection.shutdown(socket.SHUT_RDWR)
                    return
                if n < faults.fail_first:
                    headers = {"Retry-After": faults.retry_after} if faults.retry_after else {}
                    self.send(h, faults.fail_status, {"error": {"message": "injected: overloaded"}}, headers)
                    return
                if faults.refuse_from is not None and n >= faults.refuse_from:
                    self.send(h, 400, {"error": {"message": "injected: request refused"}})
                    return
                ids = (body or {}).get("input_ids") or (body or {}).get("prompt") or []
                time.sleep(faults.latency_s + max(0.0, faults.latency_by_length_s * (100 - len(ids))))
            route = {
                ("GET", "/health"): lambda: self.send(h, 200, None),
                ("GET", "/get_model_info"): lambda: self.send(h, 200, self.model_info()),
                ("GET", "/get_server_info"): lambda: self.send(h, 200, self.server_info()),
                ("POST", "/generate"): lambda: self.generate(h, body),
                ("GET", "/v1/models"): lambda: self.send(h, 200, self.models()),
                ("POST", "/v1/completions"): lambda: self.completions(h, body),
            }.get((method, path))
            if faults.no_model_info and path in ("/get_model_info", "/get_server_info"):
                route = None
            if route is None:
                self.send(h, 404, {"detail": "Not Found"})
            else:
                route()
        finally:
            if n is not None:
                with self.lock:
                    self.state.in_flight -= 1

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    # ------------------------------------------------------------------ SGLang

    def model_info(self) -> dict[str, Any]:
        path = str(self.state.model_dir)
        return {"model_path": path, "tokenizer_path": path, "is_generation": True}

    def server_info(self) -> dict[str, Any]:
        return {"dtype": "float32", "context_length": self.state.faults.context_length, "version": "fake"}

    def generate(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        faults = self.state.faults
        ids: list[int] = body["input_ids"]
        params = body.get("sampling_params") or {}
        if faults.context_length is not None and len(ids) >= faults.context_length:
            message = (
                f"The input ({len(ids)} tokens) is longer than the model's context length "
                f"({faults.context_length} tokens)."
            )
            return self.send(h, 400, {"error": {"message": message}})
        k = body.get("logprob_start_len", -1)
        if not body.get("return_logprob") or k is None or k < 0 or k >= len(ids):
            return self.send(h, 400, {"error": {"message": f"bad logprob_start_len {k} for {len(ids)} tokens"}})
        lp, _ = self.logprobs(ids, float(params.get("temperature", 1.0)))
        start = k + faults.sglang_shift
        if faults.sglang_convention == "recent":  # tokens start..L-1, the first value always null
            entries = [[None if t == start else lp[t], ids[t], None] for t in range(start, len(ids))]
        else:  # 2024: tokens start+1..L-1, a null entry for token 0 only when starting at 0
            entries = [[lp[t], ids[t], None] for t in range(start + 1, len(ids))]
            if start == 0:
                entries.insert(0, [None, ids[0], None])
        if faults.wrong_ids:
            entries = [[v, (i + 1) % self.vocab, text] for v, i, text in entries]
        top_n = int(body.get("top_logprobs_num") or 0)
        tops: list[Any] = []
        if top_n:  # aligned with `entries`: the same positions, the first null (the scheduler's `[None] + ...`)
            top = self.top(ids, float(params.get("temperature", 1.0)), top_n)
            first = start if faults.sglang_convention == "recent" else start + 1
            tops = [None if t == start else [[v, i, None] for v, i in top[t] or []] for t in range(first, len(ids))]
            if faults.sglang_convention != "recent" and start == 0:
                tops.insert(0, None)
        meta = {
            "id": f"req-{self.state.scoring_requests}",
            "prompt_tokens": len(ids),
            "completion_tokens": 0,
            "finish_reason": {"type": "length", "length": 0},
            "input_token_logprobs": entries,
            "output_token_logprobs": [],
            **({"input_top_logprobs": tops, "output_top_logprobs": []} if top_n else {}),
        }
        self.send(h, 200, {"text": "", "meta_info": meta})

    # ------------------------------------------------------------------ vLLM OpenAI-compatible

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.state.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "vllm",
            "root": str(self.state.model_dir),
            "parent": None,
            "max_model_len": self.state.faults.context_length or 2048,
        }
        return {"object": "list", "data": [card]}

    def completions(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        faults = self.state.faults
        if body.get("model") != self.state.served_model_name:
            message = f"The model `{body.get('model')}` does not exist."
            return self.send(h, 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}})
        ids: list[int] = body["prompt"]
        max_tokens = int(body.get("max_tokens", 16))
        limit = faults.context_length or 2048
        if len(ids) + max_tokens > limit:
            message = (
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
            return self.send(h, 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}})
        k = int(body.get("prompt_logprobs") or 0)
        if k > 20:
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed: 20"
            return self.send(h, 400, {"error": {"message": message, "type": "BadRequestError", "code": 400}})
        lp, ranks = self.logprobs(ids, float(body.get("temperature", 1.0)))
        top = self.top(ids, float(body.get("temperature", 1.0)), k) if k else None
        prompt_logprobs: list[Any] = [None]
        for t in range(1, len(ids)):
            key = (ids[t] + 1) % self.vocab if faults.wrong_ids else ids[t]
            entry = {"logprob": lp[t], "rank": int(ranks[t]), "decoded_token": self.tokenizer.decode([ids[t]])}
            position = {str(key): entry}
            for rank, (v, i) in enumerate((top or [None] * len(ids))[t] or [], 1):  # vLLM: the top K, then the actual
                position = {str(i): {"logprob": v, "rank": rank, "decoded_token": ""}, **position}
            prompt_logprobs.append(position)
        choice = {
            "index": 0,
            "text": "x",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": prompt_logprobs,
        }
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
        answer = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }
        self.send(h, 200, answer)


def _handler(app: _App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real servers

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
            app.handle(self, "GET")

        def do_POST(self) -> None:  # noqa: N802
            app.handle(self, "POST")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    return Handler


@contextmanager
def inference_server(
    model_dir: Path, *, served_model_name: str = "teacher", **faults: Any
) -> Iterator[InferenceServer]:
    """The fake SGLang + vLLM server for `model_dir` on 127.0.0.1:<free port> until the block ends."""
    state = InferenceServer(url="", model_dir=Path(model_dir), served_model_name=served_model_name)
    state.reset(**faults)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(_App(state)))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def closed_port_url() -> str:
    """An address nothing listens on (a port just released): connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
