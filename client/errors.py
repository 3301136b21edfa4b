"""Errors of the training client, mapped from the server's one error JSON shape.

Each class also derives from the matching `lopd.errors` class, so code (and the CLI) that catches
`NotFound`, `InvalidInput`, `Unauthorized` or `LopdError` handles remote failures the same way as
local ones. A request abandoned by its caller raises `lopd.errors.Cancelled`.
"""

from __future__ import annotations

from lopd.errors import InvalidInput, LopdError, NotFound, Unauthorized


class ServerError(LopdError):
    """The server answered with an error status, or an answer the client cannot use.

    `status` is the HTTP status (None when no answer came back at all), `error_type` the
    server's `error.type` (`not_found`, `invalid_input`, `corrupt`, ...), `message` its
    `error.message` (or a description of the transport failure).
    """

    def __init__(
        self, message: str, *, status: int | None = None, error_type: str | None = None, url: str = ""
    ) -> None:
        self.status = status
        self.error_type = error_type
        self.message = message
        self.url = url
        where = f" ({url})" if url else ""
        code = f"HTTP {status}" if status is not None else "no answer"
        kind = f" {error_type}" if error_type else ""
        super().__init__(f"{code}{kind}{where}: {message}")


class RemoteNotFound(ServerError, NotFound):
    """404: the dataset, version or sample does not exist on the server."""


class RemoteInvalidInput(ServerError, InvalidInput):
    """400/405/413/422: the request itself is wrong; retrying cannot help."""


class RemoteUnauthorized(ServerError, Unauthorized):
    """401/403: the token is missing or not accepted (pass `token=` / `--token`)."""


class ProtocolError(ServerError):
    """The server answered 2xx but the body is not what the HTTP contract promises."""


class RetryBudgetExhausted(ServerError):
    """Transient failures (connection errors, 408, 429, 5xx) outlasted every retry (`lopd.retry`).

    Carries the last failure: `status` (None for a connection error) and `message`.
    """

    def __init__(
        self, message: str, *, attempts: int, status: int | None = None, error_type: str | None = None, url: str = ""
    ) -> None:
        self.attempts = attempts
        super().__init__(
            f"gave up after {attempts} attempts; last failure: {message}",
            status=status,
            error_type=error_type,
            url=url,
        )
        self.message = message


_ERROR_CLASSES: dict[int, type[ServerError]] = {
    400: RemoteInvalidInput,
    401: RemoteUnauthorized,
    403: RemoteUnauthorized,
    404: RemoteNotFound,
    405: RemoteInvalidInput,
    409: RemoteInvalidInput,
    413: RemoteInvalidInput,
    422: RemoteInvalidInput,
}


def error_for_status(status: int, message: str, *, error_type: str | None = None, url: str = "") -> ServerError:
    """The error to raise for an error answer that retrying cannot fix (`ServerError` for unlisted statuses)."""
    return _ERROR_CLASSES.get(status, ServerError)(message, status=status, error_type=error_type, url=url)


class ResumeMismatch(InvalidInput, ValueError):
    """A saved loader state does not belong to this dataset or these settings; resuming would be wrong."""
