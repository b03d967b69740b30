"""``TokenVerifier``: the per-request user-token check with a bounded cache.

The sidecar calls ``verify`` with the bearer token from the request metadata and the
thumbprint of the connection's client certificate. A token that verified is reused until
its ``exp`` for the same certificate thumbprint, as long as the issuer's key set is the one
it was checked against (a refetched JWKS that differs drops the reuse: a key the issuer
withdrew stops working at once). Failures are not cached. An unknown ``kid`` asks the key
source for one (rate-limited) refetch, then the token is checked once more.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from joserfc.jwk import KeySet

from ztagent.tokens.errors import TokenError
from ztagent.tokens.jwks import JwksHealth
from ztagent.tokens.policy import TokenPolicy
from ztagent.tokens.verify import (
    VerifiedUser,
    anonymous_user_input,
    check_token_size,
    verify_token,
)

__all__ = ["KeySource", "TokenVerifier", "anonymous_user_input", "extract_bearer"]

_BEARER = re.compile(r"(?i:bearer) +([A-Za-z0-9\-._~+/]+=*)")


class KeySource(Protocol):
    """What ``TokenVerifier`` needs of a key source (``JwksSource`` implements it)."""

    async def get_keys(self) -> KeySet: ...

    async def refresh_for_unknown_kid(self) -> bool: ...

    def health(self) -> JwksHealth: ...


def extract_bearer(metadata_value: str) -> str:
    """The token of an ``authorization`` value ``Bearer <token>`` (scheme case-insensitive).

    Anything else (another scheme, no token, characters outside RFC 6750 b64token) is
    ``token_malformed``; the value itself is never echoed.
    """
    if not isinstance(metadata_value, str):
        raise TokenError(
            "token_malformed",
            f"authorization is {type(metadata_value).__name__} (expected 'Bearer <token>')",
        )
    match = _BEARER.fullmatch(metadata_value.strip())
    if match is None:
        first = metadata_value.strip().split(" ", 1)[0]
        scheme = repr(first) if first.isalpha() and len(first) <= 16 else "(none)"
        raise TokenError(
            "token_malformed",
            f"authorization scheme {scheme}, {len(metadata_value)} characters "
            "(expected 'Bearer <token>')",
        )
    return match.group(1)


@dataclass(frozen=True)
class _Entry:
    user: VerifiedUser
    keys: KeySet
    checked_at: datetime


class TokenVerifier:
    """Verifies bearer tokens against a key source and a policy; caches successes (LRU).

    ``clock`` returns the current time (timezone-aware); ``cache_size`` bounds the number
    of cached tokens.
    """

    def __init__(
        self,
        source: KeySource,
        policy: TokenPolicy,
        clock: Callable[[], datetime],
        cache_size: int = 10_000,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._source = source
        self._policy = policy
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()

    @property
    def policy(self) -> TokenPolicy:
        return self._policy

    def __len__(self) -> int:
        return len(self._cache)

    async def prime(self) -> None:
        """Load the key set now (start-up); raise ``JwksError`` if none can be loaded."""
        await self._source.get_keys()

    def health(self) -> JwksHealth:
        """The key source's health: degraded while refetches fail (last good keys in use)."""
        return self._source.health()

    async def verify(self, token: str, cert_thumbprint: str | None = None) -> VerifiedUser:
        """The ``VerifiedUser`` for this token and client certificate; raise ``TokenError``.

        ``JwksError`` (UNAVAILABLE) when no key set could ever be loaded.
        """
        check_token_size(token, self._policy)  # before hashing an attacker-sized string
        now = self._clock()
        keys = await self._source.get_keys()
        cache_key = hashlib.sha256(token.encode("utf-8", "replace")).digest() + (
            b"|" + (cert_thumbprint or "").encode("utf-8", "replace")
        )
        entry = self._cache.get(cache_key)
        if entry is not None:
            if entry.keys is keys and entry.checked_at <= now < entry.user.expires_at:
                self._cache.move_to_end(cache_key)
                return entry.user
            del self._cache[cache_key]
        try:
            user = verify_token(token, keys, self._policy, now, cert_thumbprint)
        except TokenError as err:
            if err.code != "token_kid_unknown" or not await self._source.refresh_for_unknown_kid():
                raise
            keys = await self._source.get_keys()
            user = verify_token(token, keys, self._policy, now, cert_thumbprint)
        if now < user.expires_at:
            self._cache[cache_key] = _Entry(user, keys, now)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return user
