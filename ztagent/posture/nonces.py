"""Single-use attestation nonces, bound to the certificate they were issued to.

``issue`` hands out a random nonce that expires ``ttl_s`` later; ``consume`` accepts it once,
from the same certificate (SHA-256 fingerprint), before it expires. Consumed nonces are
remembered until they are purged, so a replay is ``nonce_reused`` rather than unknown; entries
are purged one ``ttl_s`` after their expiry (until then a late nonce is ``nonce_expired``).

Bounded: at most ``max_per_cert`` outstanding nonces per certificate and ``max_outstanding``
in all; when full, the oldest entry is dropped (that nonce then fails as unknown, so eviction
can only refuse, never accept). In-memory and thread-safe; one store per sidecar process.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from ztagent.posture.errors import PostureError, short_hex

MIN_NONCE_BYTES = 16


class Nonces(Protocol):
    """What attestation needs of a nonce store: ``NonceStore`` in one process,
    ``ztagent.sidecar.shared_nonces.SharedNonceStore`` across sidecar workers."""

    def issue(self, cert_fingerprint: str, now: datetime) -> tuple[bytes, datetime]: ...

    def consume(self, cert_fingerprint: str, nonce: bytes, now: datetime) -> None: ...


@dataclass
class _Entry:
    fingerprint: str
    expires_at: datetime
    consumed: bool = False


class NonceStore:
    """Issues and consumes nonces; time is always passed in (timezone-aware ``datetime``)."""

    def __init__(
        self,
        ttl_s: float = 60,
        nonce_bytes: int = 32,
        max_outstanding: int = 10_000,
        rng: Callable[[int], bytes] = secrets.token_bytes,
        max_per_cert: int = 16,
    ) -> None:
        if ttl_s <= 0 or nonce_bytes < MIN_NONCE_BYTES or max_outstanding < 1 or max_per_cert < 1:
            raise ValueError(
                f"ttl_s > 0, nonce_bytes >= {MIN_NONCE_BYTES}, max_outstanding >= 1 and "
                f"max_per_cert >= 1 expected, got {ttl_s}, {nonce_bytes}, {max_outstanding}, "
                f"{max_per_cert}"
            )
        self._ttl = timedelta(seconds=ttl_s)
        self._nonce_bytes = nonce_bytes
        self._max = max_outstanding
        self._max_per_cert = max_per_cert
        self._rng = rng
        self._entries: dict[bytes, _Entry] = {}  # insertion order = issue order
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def issue(self, cert_fingerprint: str, now: datetime) -> tuple[bytes, datetime]:
        """A fresh nonce for ``cert_fingerprint`` and the time it expires."""
        with self._lock:
            self._purge(now)
            mine = [n for n, e in self._entries.items() if e.fingerprint == cert_fingerprint]
            for nonce in mine[: max(0, len(mine) - self._max_per_cert + 1)]:
                del self._entries[nonce]
            while len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]
            nonce = self._rng(self._nonce_bytes)
            if len(nonce) != self._nonce_bytes or nonce in self._entries:
                raise RuntimeError("nonce generator returned a short or repeated value")
            expires_at = now + self._ttl
            self._entries[nonce] = _Entry(cert_fingerprint, expires_at)
            return nonce, expires_at

    def consume(self, cert_fingerprint: str, nonce: bytes, now: datetime) -> None:
        """Accept ``nonce`` once, from the certificate it was issued to, before it expires."""
        with self._lock:
            self._purge(now)
            entry = self._entries.get(bytes(nonce))
            if entry is None:
                raise PostureError(
                    "nonce_mismatch",
                    f"nonce {short_hex(bytes(nonce))} was not issued by this agent "
                    f"(or is long expired); expected a nonce from Challenge",
                )
            if entry.fingerprint != cert_fingerprint:
                raise PostureError(
                    "nonce_mismatch",
                    f"nonce was issued to certificate {short_hex(entry.fingerprint)}, "
                    f"presented by certificate {short_hex(cert_fingerprint)}",
                )
            if entry.consumed:
                raise PostureError("nonce_reused", "nonce was already used; expected a fresh one")
            if now >= entry.expires_at:
                entry.consumed = True
                raise PostureError(
                    "nonce_expired",
                    f"nonce expired at {entry.expires_at.isoformat()}, now {now.isoformat()}",
                )
            entry.consumed = True

    def _purge(self, now: datetime) -> None:
        cutoff = now - self._ttl
        stale = [n for n, e in self._entries.items() if e.expires_at <= cutoff]
        for nonce in stale:
            del self._entries[nonce]
