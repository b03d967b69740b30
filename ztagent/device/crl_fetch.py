"""Revocation reaching the edge: fetch fresh CRLs from the CA, verify them, keep the last good
one on disk.

``ztagent.pki.crl_update.accept_crl_update`` is the pure check; ``CrlFetcher`` does the IO:
it polls the source (the CA's GetCRL over server-auth TLS, an https URL, or a file), and
writes each verified update atomically to the sidecar's ``tls.crl`` file, which the file
watcher then reloads. A failed fetch keeps the previous file: the sidecar starts and runs
offline on the last good CRL until it passes nextUpdate (+ ``identity.crl_grace_s``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from ztagent.errors import TransportError, ZtagentError
from ztagent.failure_log import FailureLog
from ztagent.files import make_private_dir, write_atomic
from ztagent.pki.crl_update import MAX_CRL_BYTES, accept_crl_update
from ztagent.pki.errors import CertError

log = logging.getLogger("ztagent.crl")


@dataclass(frozen=True)
class CrlFetchHealth:
    ok: bool
    last_error: str | None
    fetched_at: datetime | None
    fetch_failures: int = 0


class CrlFetcher:
    """Polls ``source`` and keeps ``crl_path`` current. ``fetch_once`` never raises."""

    def __init__(self, source: str, bundle_path: Path, crl_path: Path, *, timeout_s: float = 10):
        self.source = source
        self._bundle_path = bundle_path
        self._crl_path = crl_path
        self._timeout_s = timeout_s
        self._health = CrlFetchHealth(True, None, None)
        self._failures = FailureLog(log, f"CRL fetch from {source} (keeping the last good CRL)")

    def health(self) -> CrlFetchHealth:
        return replace(self._health, fetch_failures=self._failures.failures)

    async def _download(self) -> bytes:
        source = self.source
        if source.startswith("file:"):
            return await asyncio.to_thread(Path(source.removeprefix("file:")).read_bytes)
        if source.startswith("https://"):
            context = ssl.create_default_context(cafile=str(self._bundle_path))

            def get() -> bytes:
                with urllib.request.urlopen(  # noqa: S310 - https only (config checks)
                    source, timeout=self._timeout_s, context=context
                ) as reply:
                    data: bytes = reply.read(MAX_CRL_BYTES + 1)
                    return data

            return await asyncio.to_thread(get)
        import grpc

        from ztagent._proto.v1 import enrollment_pb2, enrollment_pb2_grpc

        creds = grpc.ssl_channel_credentials(root_certificates=self._bundle_path.read_bytes())
        async with grpc.aio.secure_channel(source.removeprefix("ca://"), creds) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            reply = await stub.GetCRL(enrollment_pb2.GetCRLRequest(), timeout=self._timeout_s)
            crl: bytes = reply.crl
            return crl

    async def fetch_once(self, now: datetime) -> bool:
        """True when a newer, verified CRL was written to disk."""
        try:
            data = await self._download()
            if len(data) > MAX_CRL_BYTES:
                raise CertError("crl_too_large", f"more than {MAX_CRL_BYTES} bytes")
            current = self._crl_path.read_bytes() if self._crl_path.exists() else None
            update = accept_crl_update(data, self._bundle_path.read_bytes(), current, now)
        except ZtagentError as err:
            self._fail(f"{err.code}: {err.message}", now)
            return False
        except Exception as exc:  # the network or the source: keep the last good CRL
            self._fail(str(TransportError("crl_unavailable", _reason(exc))), now)
            return False
        self._failures.succeeded()
        if update is None:
            self._health = CrlFetchHealth(True, None, now)
            return False
        try:
            make_private_dir(self._crl_path.parent)
            write_atomic(self._crl_path, update)  # never through a symlink (ELOOP)
        except OSError as exc:
            self._fail(f"crl_unwritable: {self._crl_path}: {exc.strerror}", now)
            return False
        self._health = CrlFetchHealth(True, None, now)
        log.info("new CRL from %s written to %s", self.source, self._crl_path)
        return True

    def _fail(self, message: str, now: datetime) -> None:
        self._failures.failed(message)
        self._health = CrlFetchHealth(False, message, self._health.fetched_at)


def _reason(exc: Exception) -> str:
    """One line for a failed download: a gRPC error's status and details (its ``str`` is a
    multi-line dump), else the exception's type and message."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{getattr(code(), 'name', code())}: {details()}"
    return f"{type(exc).__name__}: {exc}"
