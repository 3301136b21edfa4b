"""Teacher scoring backends behind one interface (`Teacher`), picked by name with `load_teacher`.

| backend | where the model runs | extra |
|---|---|---|
| `transformers` | in this process (CPU or CUDA) | `teacher` |
| `vllm` | in this process, a vLLM engine (GPU) | `vllm` |
| `sglang` | a running SGLang server (`--teacher-url`) | `http-teacher` |
| `openai` | a running vLLM OpenAI-compatible server (`--teacher-url`) | `http-teacher` |

Every backend gets the teacher's model directory: the server-backed ones read its fingerprint,
tokenizer and context length from it, so the consistency gate is the same for all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd.errors import InvalidInput
from lopd.server.teachers.base import Teacher, TeacherInfo

BACKENDS: tuple[str, ...] = ("transformers", "vllm", "sglang", "openai")
# Backends that call a running inference server at --teacher-url instead of loading weights.
HTTP_BACKENDS: tuple[str, ...] = ("sglang", "openai")
# Backends whose engine must generate at least one token per request (vLLM rejects max_tokens=0; the
# servers reserve room for one): a record may use the teacher's context minus one token.
GENERATING_BACKENDS: tuple[str, ...] = ("vllm", *HTTP_BACKENDS)

# The keyword options each backend's constructor understands. Callers (the precompute job,
# verify) pass every option they have; each backend gets only its own, so adding an option for
# one backend never breaks another.
_OPTIONS: dict[str, frozenset[str]] = {
    "transformers": frozenset(
        {
            "device",
            "dtype",
            "temperature",
            "max_batch_tokens",
            "max_batch_size",
            "head_chunk_bytes",
            "revision",
            "fused_head",
        }
    ),
    "vllm": frozenset(
        {
            "dtype",
            "temperature",
            "max_batch_tokens",
            "max_batch_size",
            "gpu_memory_utilization",
            "max_model_len",
            "tensor_parallel_size",
        }
    ),  # fmt: skip
    "sglang": frozenset({"url", "temperature", "max_concurrency", "timeout_s", "retry", "api_key", "revision"}),
    "openai": frozenset(
        {"url", "model", "temperature", "max_concurrency", "timeout_s", "retry", "api_key", "revision"}
    ),
}
_DEFAULT_DEVICE = {"transformers": "cpu", "vllm": "cuda"}
_DEFAULT_DTYPE = {"transformers": "float32", "vllm": "bfloat16", "sglang": "server", "openai": "server"}

__all__ = [
    "BACKENDS",
    "GENERATING_BACKENDS",
    "HTTP_BACKENDS",
    "BackendOptions",
    "Teacher",
    "TeacherInfo",
    "load_teacher",
    "resolve_backend_options",
]


def resolve_backend_options(
    backend: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    teacher_url: str | None = None,
    max_concurrency: int | None = None,
    gpu_memory_utilization: float | None = None,
    tensor_parallel_size: int | None = None,
    served_model_name: str | None = None,
) -> tuple[str | None, str]:
    """Check that the options given make sense for `backend`; return its (device, dtype) with defaults filled in.

    A server-backed teacher has no device or dtype of ours: they were chosen when the server was
    started, so the device is None and the dtype is recorded as "server".
    """
    if backend not in BACKENDS:
        raise InvalidInput(f"unknown teacher backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    http = backend in HTTP_BACKENDS
    if http and not teacher_url:
        raise InvalidInput(
            f"--backend {backend} scores through a running server: pass its address with --teacher-url "
            f"(e.g. http://127.0.0.1:30000), and --teacher the model directory it was started from"
        )
    for flag, value, allowed in (
        ("--teacher-url", teacher_url, HTTP_BACKENDS),
        ("--max-concurrency", max_concurrency, HTTP_BACKENDS),
        ("--served-model-name", served_model_name, ("openai",)),
        ("--gpu-memory-utilization", gpu_memory_utilization, ("vllm",)),
        ("--tensor-parallel-size", tensor_parallel_size, ("vllm",)),
    ):
        if value is not None and backend not in allowed:
            raise InvalidInput(f"{flag} only applies to --backend {' or '.join(allowed)}, not {backend}")
    if http and device is not None:
        raise InvalidInput(f"--device does not apply to --backend {backend}: the server's devices are its own")
    if http and dtype not in (None, "server"):
        raise InvalidInput(f"--dtype does not apply to --backend {backend}: the precision is the server's")
    if max_concurrency is not None and max_concurrency < 1:
        raise InvalidInput(f"--max-concurrency must be at least 1, got {max_concurrency}")
    return (device or _DEFAULT_DEVICE.get(backend)), (dtype or _DEFAULT_DTYPE[backend])


@dataclass(frozen=True)
class BackendOptions:
    """How to reach a teacher: the backend and its user-facing options, named as the CLI flags.

    One value carries them from the CLI to the jobs (precompute, verify), so each option is checked
    (`resolved`) and passed to the backend (`load`) in exactly one place.
    """

    backend: str = "transformers"
    device: str | None = None
    dtype: str | None = None
    teacher_url: str | None = None
    max_concurrency: int | None = None
    served_model_name: str | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None

    def resolved(self) -> BackendOptions:
        """Checked (`resolve_backend_options`), with the backend's own device and dtype filled in."""
        options = dataclasses.asdict(self)
        device, dtype = resolve_backend_options(options.pop("backend"), **options)
        return dataclasses.replace(self, device=device, dtype=dtype)

    def load(self, model_dir: str | Path, **kw: Any) -> Teacher:
        """`load_teacher` with these options; `kw` adds per-load settings (temperature, batch budgets)."""
        return load_teacher(
            self.backend, model_dir, device=self.device, dtype=self.dtype, url=self.teacher_url,
            max_concurrency=self.max_concurrency, model=self.served_model_name,
            gpu_memory_utilization=self.gpu_memory_utilization, tensor_parallel_size=self.tensor_parallel_size, **kw,
        )  # fmt: skip


def load_teacher(backend: str, model_dir: str | Path, **kw: Any) -> Teacher:
    """Load `model_dir` with the named backend; each backend gets the keyword options it understands.

    Options set to None are dropped too, so the backend's own default applies. Backends are
    imported only here, so that the light install (no torch) can still import this package and
    get a clear message instead of an ImportError.
    """
    if backend not in BACKENDS:
        raise InvalidInput(f"unknown teacher backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    options = {k: v for k, v in kw.items() if k in _OPTIONS[backend] and v is not None}
    if backend == "transformers":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise InvalidInput(
                f"the transformers teacher backend needs torch and transformers ({e}); "
                "install them with: pip install 'lightning-opd[teacher]'"
            ) from e
        from lopd.server.teachers.transformers_backend import TransformersTeacher

        return TransformersTeacher(model_dir, **options)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise InvalidInput(
                f"the vllm teacher backend needs vLLM ({e}); install it with: pip install 'lightning-opd[vllm]'"
            ) from e
        from lopd.server.teachers.vllm_backend import VLLMTeacher

        return VLLMTeacher(model_dir, **options)
    if "url" not in options:
        raise InvalidInput(f"the {backend} teacher backend needs the server's address (url=..., --teacher-url)")
    if backend == "sglang":
        from lopd.server.teachers.sglang_backend import SGLangTeacher

        return SGLangTeacher(model_dir, **options)
    from lopd.server.teachers.openai_backend import OpenAITeacher

    return OpenAITeacher(model_dir, **options)
