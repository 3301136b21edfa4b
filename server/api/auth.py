"""Bearer-token auth: who is asking (which lab), or 401.

Only sha256 digests of the tokens are kept in memory, and a presented token is compared with
every digest using `secrets.compare_digest`, so neither the table nor the time a check takes
reveals a token. Tokens are never logged; the lab name is what metrics and logs see.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lopd.errors import InvalidInput, Unauthorized

ANONYMOUS = "anonymous"  # the lab label when the server runs without a tokens file


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
    def from_file(cls, path: str | Path) -> TokenTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read the tokens file {path}: {type(e).__name__}") from None
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


_bearer = HTTPBearer(auto_error=False, description="A token from the server's tokens file.")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Router dependency: 401 unless the request carries a known bearer token; records the lab."""
    table: TokenTable = request.app.state.tokens
    if credentials is None:
        raise Unauthorized("this server needs `Authorization: Bearer <token>`")
    lab = table.lab_for(credentials.credentials)
    if lab is None:
        raise Unauthorized("the bearer token is not valid for this server")
    request.state.lab = lab
    return lab


def lab_of(request: Request) -> str:
    return getattr(request.state, "lab", ANONYMOUS)
