"""Teacher scoring backends behind one interface (`Teacher`), picked by name with `load_teacher`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lopd.errors import InvalidInput
from lopd.server.teachers.base import Teacher, TeacherInfo

BACKENDS: tuple[str, ...] = ("transformers",)

__all__ = ["BACKENDS", "Teacher", "TeacherInfo", "load_teacher"]


def load_teacher(backend: str, model_dir: str | Path, **kw: Any) -> Teacher:
    """Load `model_dir` with the named backend; keyword arguments go to the backend's constructor.

    Backends are imported only here, so that the light install (no torch) can still import this
    package and get a clear message instead of an ImportError.
    """
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

        return TransformersTeacher(model_dir, **kw)
    raise InvalidInput(f"unknown teacher backend {backend!r}; available backends: {', '.join(BACKENDS)}")
