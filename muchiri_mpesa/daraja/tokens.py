"""OAuth access tokens and where they are kept between requests.

Fetching a new token can invalidate the previous one, so every worker using the same
credentials must share one token (docs/design.md, 3. Daraja facts).  A TokenStore holds it;
``refresh`` runs under the store's lock and first checks whether another worker already
replaced the token, so a burst of workers that all see an expired token fetch exactly one new
token.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol

__all__ = [
    "DEFAULT_TOKEN_MARGIN",
    "UTC",
    "AccessToken",
    "MemoryTokenStore",
    "TokenStore",
    "token_cache_key",
]

DEFAULT_TOKEN_MARGIN = timedelta(seconds=60)
UTC = timezone.utc


def _utc(moment: datetime) -> datetime:
    """Aware UTC; a naive datetime is read as UTC (Odoo stores naive UTC datetimes)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class AccessToken:
    """A bearer token and when it stops working; the value never shows in a repr.

    Tokens are equal when their values are: a copy loaded from a database, whose datetime lost
    its microseconds, is still recognised as the ``stale`` token Daraja refused.
    """

    value: str = field(repr=False)
    expires_at: datetime = field(compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise ValueError("An access token needs a non-empty value.")
        object.__setattr__(self, "expires_at", _utc(self.expires_at))

    def is_fresh(self, now: datetime, margin: timedelta = DEFAULT_TOKEN_MARGIN) -> bool:
        """Still usable for ``margin`` after ``now``, so it cannot expire on the way to Daraja."""
        return _utc(now) + margin < self.expires_at


class TokenStore(Protocol):
    """Where the shared token lives (memory here; the database in the Odoo layer)."""

    def load(self, key: str) -> AccessToken | None:
        """The stored token for ``key``, fresh or not, or None."""
        ...

    def refresh(
        self, key: str, fetch: Callable[[], AccessToken], stale: AccessToken | None
    ) -> AccessToken:
        """Under the store's lock: return the stored token if it is fresh and is not ``stale``
        (another worker already refreshed; compare with ``==``, i.e. by value); else call
        ``fetch()``, save and return its token."""
        ...


def token_cache_key(base_url: str, consumer_key: str, consumer_secret: str) -> str:
    """A key per (environment, credentials): new credentials get a new key, the secret stays hidden."""
    material = "\n".join((base_url.rstrip("/"), consumer_key, consumer_secret))
    return "daraja-token-" + hashlib.sha256(material.encode()).hexdigest()


class MemoryTokenStore:
    """A TokenStore for one process: a dict and one lock per key.

    Share one instance between clients of the same process to share their tokens.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        margin: timedelta = DEFAULT_TOKEN_MARGIN,
    ) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._margin = margin
        self._tokens: dict[str, AccessToken] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def load(self, key: str) -> AccessToken | None:
        return self._tokens.get(key)

    def refresh(
        self, key: str, fetch: Callable[[], AccessToken], stale: AccessToken | None
    ) -> AccessToken:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            current = self._tokens.get(key)
            if (
                current is not None
                and current != stale
                and current.is_fresh(self._clock(), self._margin)
            ):
                return current
            token = fetch()
            self._tokens[key] = token
            return token
