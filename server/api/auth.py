"""Bearer-token auth: who is asking (which lab), or 401.

Only sha256 digests of the tokens are kept in memory, and a presented token is compared with
every digest using `secrets.compare_digest`, so neither the table nor the time a check takes
reveals a token. Tokens are never logged; the lab name is what metrics and logs see. A tokens
file that other users can read is refused unless the operator says otherwise
(`insecure_tokens_file`).

`AuthMiddleware` checks the token before anything reads the request's body or routes it (an
unauthenticated client gets 401, never a 413 or a 422 that cost a body read); `require_token`
declares the scheme in the OpenAPI schema and returns the lab the middleware found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from lopd.config import flag
from lopd.errors import InvalidInput, Unauthorized
from lopd.http_contract import ErrorType

from .errors import send_error

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the lab label when the server runs without a tokens file
NO_TOKEN = "this server needs `Authorization: Bearer <token>`"
BAD_TOKEN = "the bearer token is not valid for this server"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """The tokens file, as digests: `{"<token>": "<lab name>", ...}`."""

    def __init__(self, tokens: dict[str, str]) -> None:
        if not tokens:
            raise InvalidInput("the tokens file lists no tokens: nobody could use the server; add at least one")
        for token, lab in tokens.items():
            if not isinstance(token, str) or not isinstance(lab, str) or not token or not lab:
                raise InvalidInput(
                    'the tokens file must map non-empty token strings to lab names: {"<token>": "<lab>"}'
                )
        self._entries = [(_digest(token), lab) for token, lab in tokens.items()]

    @classmethod
    def from_file(cls, path: str | Path, *, allow_insecure: bool = False) -> TokenTable:
        """Read a tokens file; refuse one that group or others can read unless `allow_insecure` (then warn)."""
        try:
            mode = Path(path).stat().st_mode
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read the tokens file {path}: {type(e).__name__}") from None
        if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
            exposed = f"the tokens file {path} can be read by other users ({stat.filemode(mode)})"
            if not allow_insecure:
                raise InvalidInput(
                    f"{exposed}: make it private with `chmod 600 {path}`, or pass "
                    f"{flag('insecure_tokens_file')} to use it anyway"
                )
            log.warning("%s; using it anyway (%s)", exposed, flag("insecure_tokens_file"))
        if not isinstance(data, dict):
            raise InvalidInput(f'the tokens file {path} must be a JSON object {{"<token>": "<lab>"}}')
        return cls(data)

    def lab_for(self, token: str | None) -> str | None:
        """The lab a token belongs to, or None; the time taken does not depend on which entry matches."""
        if not token:
            return None
        digest = _digest(token)
        found = None
        for entry, lab in self._entries:
            if secrets.compare_digest(entry, digest):
                found = lab
        return found


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None (absent, another scheme, empty)."""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


class AuthMiddleware:
    """401 (`WWW-Authenticate: Bearer`) for every request but the public paths without a known token."""

    def __init__(self, app: ASGIApp, tokens: TokenTable, public_paths: frozenset[str]) -> None:
        self.app = app
        self.tokens = tokens
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public_paths:
            token = bearer_token(scope)
            lab = self.tokens.lab_for(token)
            if lab is None:
                message = NO_TOKEN if token is None else BAD_TOKEN
                headers = {"WWW-Authenticate": "Bearer"}
                await send_error(send, 401, ErrorType.UNAUTHORIZED, message, headers=headers)
                return
            scope.setdefault("state", {})["lab"] = lab
        await self.app(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="A token from the server's tokens file.")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Router dependency: the lab `AuthMiddleware` found, or (without the middleware) the same check here."""
    lab = getattr(request.state, "lab", None)
    if lab is not None:
        return str(lab)
    table: TokenTable = request.app.state.tokens
    if credentials is None:
        raise Unauthorized(NO_TOKEN)
    lab = table.lab_for(credentials.credentials)
    if lab is None:
        raise Unauthorized(BAD_TOKEN)
    request.state.lab = lab
    return lab


def lab_of(request: Request) -> str:
    return getattr(request.state, "lab", ANONYMOUS)
