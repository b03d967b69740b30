"""``SharedNonceStore``: single-use attestation nonces shared by sidecar worker processes.

With ``listen.workers > 1`` a device's Challenge and its Attest may reach different workers
(a reconnect in between, an aged connection). Each nonce is a file
``<state_dir>/nonces/<nonce hex>`` holding the certificate fingerprint and the expiry. It is
consumed by renaming it to ``<nonce hex>.used``: rename is atomic, so among concurrent
consumers in any number of processes exactly one succeeds. The certificate is checked
before the rename, so presenting another device's nonce does not burn it. Semantics and codes
are those of the in-memory ``NonceStore`` (``nonce_mismatch``, ``nonce_reused``,
``nonce_expired``); files are removed one TTL after they expire, and the supervisor empties the
directory when it starts. Nonces are not fsynced: after a crash the device simply asks again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from ztagent.files import KEY_MODE, empty_private_dir, make_private_dir
from ztagent.posture.errors import PostureError, short_hex
from ztagent.posture.nonces import MIN_NONCE_BYTES

NONCE_DIR = "nonces"
MAX_NONCE_BYTES = 64
USED = ".used"


def nonce_dir(state_dir: Path) -> Path:
    return state_dir / NONCE_DIR


def clear_shared_nonces(state_dir: Path) -> None:
    """Forget every outstanding nonce (at supervisor start); leaves an empty directory."""
    empty_private_dir(nonce_dir(state_dir))


class SharedNonceStore:
    """The ``NonceStore`` interface over a directory; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        ttl_s: float = 60,
        nonce_bytes: int = 32,
        max_per_cert: int = 16,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if ttl_s <= 0 or not MIN_NONCE_BYTES <= nonce_bytes <= MAX_NONCE_BYTES or max_per_cert < 1:
            raise ValueError(
                f"ttl_s > 0, {MIN_NONCE_BYTES} <= nonce_bytes <= {MAX_NONCE_BYTES} and "
                f"max_per_cert >= 1 expected, got {ttl_s}, {nonce_bytes}, {max_per_cert}"
            )
        self._dir = nonce_dir(state_dir)
        make_private_dir(self._dir)
        self._ttl = timedelta(seconds=ttl_s)
        self._nonce_bytes = nonce_bytes
        self._max_per_cert = max_per_cert
        self._rng = rng
        self._lock = threading.Lock()
        self._next_purge: datetime | None = None

    def __len__(self) -> int:
        return sum(1 for p in self._dir.iterdir() if not p.name.endswith(USED))

    def issue(self, cert_fingerprint: str, now: datetime) -> tuple[bytes, datetime]:
        """A fresh nonce for ``cert_fingerprint`` and the time it expires."""
        with self._lock:
            self._purge(now)
            self._limit(cert_fingerprint)
            nonce = self._rng(self._nonce_bytes)
            if len(nonce) != self._nonce_bytes:
                raise RuntimeError("nonce generator returned a short value")
            expires_at = now + self._ttl
            doc = {"fingerprint": cert_fingerprint, "expires_at": expires_at.isoformat()}
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self._dir / nonce.hex(), flags, KEY_MODE)
            try:
                os.fchmod(fd, KEY_MODE)  # 0600 whatever the umask
                os.write(fd, json.dumps(doc).encode())
            finally:
                os.close(fd)
            return nonce, expires_at

    def consume(self, cert_fingerprint: str, nonce: bytes, now: datetime) -> None:
        """Accept ``nonce`` once, from the certificate it was issued to, before it expires."""
        nonce = bytes(nonce)
        if not 1 <= len(nonce) <= MAX_NONCE_BYTES:
            raise PostureError(
                "nonce_mismatch",
                f"nonce of {len(nonce)} bytes was not issued by this agent; expected "
                f"{self._nonce_bytes} bytes from Challenge",
            )
        path = self._dir / nonce.hex()
        used = path.with_name(path.name + USED)
        entry = _read(path)
        if entry is None:
            if used.exists():
                raise PostureError("nonce_reused", "nonce was already used; expected a fresh one")
            raise PostureError(
                "nonce_mismatch",
                f"nonce {short_hex(nonce)} was not issued by this agent (or is long expired); "
                "expected a nonce from Challenge",
            )
        fingerprint, expires_at = entry
        if fingerprint != cert_fingerprint:
            raise PostureError(
                "nonce_mismatch",
                f"nonce was issued to certificate {short_hex(fingerprint)}, presented by "
                f"certificate {short_hex(cert_fingerprint)}",
            )
        try:
            os.rename(path, used)  # the one atomic step: exactly one consumer gets here
        except FileNotFoundError:
            raise PostureError(
                "nonce_reused", "nonce was already used; expected a fresh one"
            ) from None
        if now >= expires_at:
            raise PostureError(
                "nonce_expired",
                f"nonce expired at {expires_at.isoformat()}, now {now.isoformat()}",
            )

    def _limit(self, cert_fingerprint: str) -> None:
        """At most ``max_per_cert`` outstanding nonces per certificate: drop its oldest."""
        mine: list[tuple[float, Path]] = []
        for path in self._dir.iterdir():
            if path.name.endswith(USED):
                continue
            entry = _read(path)
            if entry is not None and entry[0] == cert_fingerprint:
                with contextlib.suppress(FileNotFoundError):
                    mine.append((path.stat().st_mtime, path))
        mine.sort()
        for _, path in mine[: max(0, len(mine) - self._max_per_cert + 1)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _purge(self, now: datetime) -> None:
        """Removes files one TTL past their expiry (at most every TTL/4)."""
        if self._next_purge is not None and now < self._next_purge:
            return
        self._next_purge = now + self._ttl / 4
        cutoff = now - self._ttl
        for path in self._dir.iterdir():
            entry = _read(path)
            if entry is None:  # unreadable, or being written by another worker right now
                with contextlib.suppress(FileNotFoundError):
                    age = datetime.now().timestamp() - path.stat().st_mtime
                    if age > 2 * self._ttl.total_seconds():
                        path.unlink()
            elif entry[1] <= cutoff:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _read(path: Path) -> tuple[str, datetime] | None:
    """(fingerprint, expires_at) of a nonce file; None when missing or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
        return str(doc["fingerprint"]), datetime.fromisoformat(doc["expires_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
