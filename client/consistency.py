"""The pre-training gate: refuse to train on log-probs from the wrong teacher or tokenizer.

Two things must hold for Lightning OPD to be correct, and neither shows up in the loss curve
when it fails:

* Teacher consistency: the teacher that scored the rollouts must be the model that generated
  the student's SFT data (arXiv 2604.13010). The manifest records both fingerprints and a
  verdict; the trainer can also declare the SFT-data teacher it knows about.
* Tokenizer agreement: token id k must mean the same token to the student as to the teacher,
  otherwise every log-prob is attached to the wrong token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lopd.errors import Inconsistent, TeacherMismatch, TokenizerMismatch
from lopd.fingerprint import is_fingerprint, resolve_model_fingerprint, short_fingerprint, tokenizer_fingerprint

from .types import DatasetInfo

log = logging.getLogger(__name__)

TEACHER_CONSISTENCY = (
    "Lightning OPD requires teacher consistency: the teacher whose log-probs were precomputed must be the "
    "model that generated the student's SFT data. The SFT student imitates that teacher, so the rollouts "
    "it samples are where that teacher's log-probs are a meaningful per-token reward; with any other "
    "teacher the gradient is biased and training converges to a worse point (Lightning OPD, arXiv 2604.13010)."
)
TEACHER_FIX = (
    "Fix: precompute this dataset with the SFT-data teacher (`lopd precompute --teacher <that model>`), "
    "or pass --allow-inconsistent (allow_inconsistent=True) to train anyway, knowingly."
)
PROVENANCE_FIX = (
    "Fix: if the rows were scored by the model that generated the student's SFT data, import them again "
    "saying so (`lopd import ... --teacher-fingerprint FP --sft-teacher-fingerprint FP`, FP from "
    "`lopd fingerprint MODEL_DIR`), or pass --allow-inconsistent (allow_inconsistent=True) to train anyway, knowingly."
)
# The fingerprint a manifest records for a model nobody named (an import without fingerprints).
UNKNOWN_FINGERPRINT = "unknown"
TOKENIZER_FIX = (
    "Token ids mean different tokens to the student and to the teacher, so every stored log-prob would "
    "score the wrong token. Use a student with the teacher's tokenizer, or pass --allow-inconsistent "
    "(allow_inconsistent=True) if you have checked that the ids you train on agree."
)


def _student_tokenizer_fp(student_tokenizer: Any) -> str:
    if isinstance(student_tokenizer, str) and is_fingerprint(student_tokenizer):
        return student_tokenizer
    if isinstance(student_tokenizer, (str, Path)):
        return tokenizer_fingerprint(Path(student_tokenizer))
    return tokenizer_fingerprint(student_tokenizer)


def check_dataset_for_training(
    manifest: dict[str, Any] | DatasetInfo,
    *,
    student_tokenizer: Any = None,
    sft_teacher: str | None = None,
    allow_inconsistent: bool = False,
) -> list[str]:
    """Check a dataset version before training on it; raise unless it is safe (or overridden).

    `manifest`: the manifest JSON (or a dataset summary, or a parsed `DatasetInfo`).
    `student_tokenizer`: a tokenizer fingerprint, a tokenizer object or a tokenizer directory.
    `sft_teacher`: the fingerprint (or local directory) of the model that generated the student's
    SFT data, as the person training knows it.

    Raises `TeacherMismatch` when the manifest's verdict is inconsistent or the declared SFT
    teacher is not the manifest's, `TokenizerMismatch` when the tokenizers differ (both are
    `lopd.errors.Inconsistent`). With `allow_inconsistent=True` the problems are logged and
    returned instead. Returns the list of problems (empty when all checks pass).
    """
    info = manifest if isinstance(manifest, DatasetInfo) else DatasetInfo.from_json(manifest)
    where = f"dataset {info.name!r} v{info.version}"
    teacher_problems: list[str] = []
    tokenizer_problems: list[str] = []

    unknown = UNKNOWN_FINGERPRINT in (info.teacher_fingerprint, info.sft_teacher_fingerprint)
    routes = info.routes
    if routes:  # a multi-teacher dataset: every routed teacher on its own, named
        teacher_problems += _route_problems(where, routes, sft_teacher)
    elif info.verdict != "consistent" and unknown:
        teacher_problems.append(
            f"{where} is marked {info.verdict} because its provenance is unknown: it was imported without "
            "fingerprints, so nothing says which teacher scored it or generated the student's SFT data"
        )
    elif info.verdict != "consistent":
        teacher_problems.append(
            f"{where} is marked {info.verdict}: it was scored by teacher "
            f"{short_fingerprint(str(info.teacher_fingerprint))}, but the student's SFT data came from "
            f"{short_fingerprint(str(info.sft_teacher_fingerprint))}"
            + (" (built with --allow-teacher-mismatch)" if info.mismatch_allowed else "")
        )
    if sft_teacher is not None and not routes:
        declared = resolve_model_fingerprint(sft_teacher)
        if declared != info.sft_teacher_fingerprint:
            teacher_problems.append(
                f"you declared the SFT-data teacher {short_fingerprint(declared)}, but {where} records "
                f"{short_fingerprint(str(info.sft_teacher_fingerprint))} (scored by "
                f"{short_fingerprint(str(info.teacher_fingerprint))})"
            )
    elif sft_teacher is None:
        log.warning("no SFT-data teacher declared; relying on the manifest's verdict (%s) alone", info.verdict)

    if student_tokenizer is not None:
        student_fp = _student_tokenizer_fp(student_tokenizer)
        if student_fp != info.tokenizer_fingerprint:
            tokenizer_problems.append(
                f"the student's tokenizer {short_fingerprint(student_fp)} is not {where}'s tokenizer "
                f"{short_fingerprint(str(info.tokenizer_fingerprint))}"
            )
    else:
        log.warning("no student tokenizer given; token ids are assumed to agree with the teacher's")

    problems = teacher_problems + tokenizer_problems
    if not problems:
        return []
    parts = [f"refusing to train on {where}:"] + [f"  - {p}" for p in problems]
    if teacher_problems:
        parts += [TEACHER_CONSISTENCY, PROVENANCE_FIX if unknown else TEACHER_FIX]
    if tokenizer_problems:
        parts += [TOKENIZER_FIX]
    message = "\n".join(parts)
    if allow_inconsistent:
        log.warning("training anyway (allow_inconsistent):\n%s", message)
        return problems
    cls: type[Inconsistent] = TeacherMismatch if teacher_problems else TokenizerMismatch
    raise cls(message)


def _route_problems(where: str, routes: list[dict[str, Any]], sft_teacher: str | None) -> list[str]:
    """The problems of a multi-teacher dataset's routes: each inconsistent routed teacher, named by its key; with a
    declared SFT-data teacher, each route whose SFT data came from another model."""
    problems = []
    declared = resolve_model_fingerprint(sft_teacher) if sft_teacher is not None else None
    for r in routes:
        key = r.get("key")
        teacher_fp = str((r.get("teacher") or {}).get("fingerprint"))
        sft_fp = str(r.get("sft_teacher_fingerprint"))
        if not (r.get("consistency") or {}).get("teacher_consistent"):
            problems.append(
                f"{where}: routed teacher {key!r} ({short_fingerprint(teacher_fp)}, "
                f"{(r.get('teacher') or {}).get('name_or_path')}) is not the model that generated its domain's SFT "
                f"data ({short_fingerprint(sft_fp)})"
            )
        if declared is not None and declared != sft_fp:
            problems.append(
                f"you declared the SFT-data teacher {short_fingerprint(declared)}, but {where} records "
                f"{short_fingerprint(sft_fp)} for routed teacher {key!r}"
            )
    return problems
