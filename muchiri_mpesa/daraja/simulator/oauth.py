"""OAuth: ``GET /oauth/v1/generate?grant_type=client_credentials`` with Basic auth, and the Bearer check.

Daraja answers ``{"access_token", "expires_in": "3599"}`` (a string); issuing a token revokes the consumer key's
previous ones (``invalidate_previous_tokens``); a missing, unknown, revoked or expired Bearer token is refused
with HTTP 401 404.001.03 before anything else of the request is looked at.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import string
import urllib.parse
from collections.abc import Mapping

from .state import _INVALID_AUTH, _INVALID_GRANT, _INVALID_TOKEN, SimState, _Refusal, _Response, _Token

OAUTH_PATH = "/oauth/v1/generate"

_TOKEN_ALPHABET = string.ascii_letters + string.digits


class OAuthApi:
    """Issues and checks access tokens."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    def issue(self, query: str, headers: Mapping[str, str]) -> _Response:
        settings = self.state.settings
        grant = urllib.parse.parse_qs(query).get("grant_type", [None])[0]
        if grant != "client_credentials":
            raise _Refusal(*_INVALID_GRANT)
        scheme, _, encoded = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "basic":
            raise _Refusal(*_INVALID_AUTH)
        try:
            key, sep, secret = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _Refusal(*_INVALID_AUTH) from None
        if not (
            sep
            and hmac.compare_digest(key.encode(), settings.consumer_key.encode())
            and hmac.compare_digest(secret.encode(), settings.consumer_secret.encode())
        ):
            raise _Refusal(*_INVALID_AUTH)
        value = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(28))
        with self.state.lock:
            tokens = self.state.tokens
            if settings.invalidate_previous_tokens:
                for old in [v for v, t in tokens.items() if t.consumer_key == key]:
                    del tokens[old]
            tokens[value] = _Token(key, self.state.clock() + settings.token_lifetime)
            self.state.tokens_issued += 1
        return _Response(200, {"access_token": value, "expires_in": str(settings.token_lifetime)})

    def check_bearer(self, headers: Mapping[str, str]) -> None:
        # Missing header, another scheme, unknown, revoked or expired token: all 401 404.001.03.
        scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _Refusal(*_INVALID_TOKEN)
        with self.state.lock:
            token = self.state.tokens.get(value.strip())
            if token is None or token.expires_at <= self.state.clock():
                raise _Refusal(*_INVALID_TOKEN)

    def expire_all(self) -> int:
        """Revoke every issued token; return how many were valid."""
        with self.state.lock:
            now = self.state.clock()
            count = sum(1 for t in self.state.tokens.values() if t.expires_at > now)
            self.state.tokens.clear()
            return count

    def valid_count(self) -> int:
        with self.state.lock:
            now = self.state.clock()
            return sum(1 for t in self.state.tokens.values() if t.expires_at > now)
