"""One error hierarchy for the whole project.

Every layer raises these; the HTTP layer maps them to status codes in one place and the CLI
prints their message. Messages say what was wrong and, where there is one, how to fix it.
"""

from __future__ import annotations


class LopdError(Exception):
    """Base class of every error this project raises on purpose."""


class NotFound(LopdError):
    """A dataset, version, sample or file that does not exist."""


class InvalidInput(LopdError):
    """Input that cannot be used as given (bad rollouts, bad arguments, out-of-range index)."""


class BadRecords(InvalidInput):
    """Some rollout records are malformed; `problems` lists (record id, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]], total: int) -> None:
        self.problems = problems
        self.total = total
        shown = "\n".join(f"  - {rid}: {reason}" for rid, reason in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(
            f"{len(problems)} of {total} rollout records are invalid; nothing was written.\n"
            f"{shown}{more}\n"
            "Fix the records, or pass --on-bad-record skip to leave them out "
            "(they are then listed in the dataset's coverage)."
        )


class Inconsistent(LopdError):
    """Teacher consistency (or tokenizer agreement) is violated."""


class TeacherMismatch(Inconsistent):
    """The scoring teacher is not the model that generated the student's SFT data."""


class TokenizerMismatch(Inconsistent):
    """Two parts of the pipeline use different tokenizers, so token ids do not mean the same thing."""


class Unauthorized(LopdError):
    """Missing or rejected credentials (a bearer token the server does not know)."""


class Cancelled(LopdError):
    """A request was abandoned because its caller stopped waiting (e.g. a loader or a teacher was closed)."""


class Corrupt(LopdError):
    """Stored bytes do not match their manifest (checksum, size or schema)."""


class Unavailable(LopdError):
    """The store cannot be read right now (its object store unreachable, say): nothing is known to be damaged,
    and the same request may succeed later."""


class Conflict(LopdError):
    """The operation conflicts with what is already stored (e.g. a staging area from other settings)."""


class TeacherServerError(LopdError):
    """A teacher inference server is unreachable, refused a request, or answered something unusable.

    `record` is the index, within the scored batch, of the record the failure concerns (None when
    it concerns the server as a whole), so the caller can name the sample by its id.
    """

    def __init__(self, message: str, *, record: int | None = None) -> None:
        super().__init__(message)
        self.record = record
