"""Policy bundles pulled from a bundle server, the way OPA fleets get theirs.

``BundleFetcher`` polls ``[policy] bundle_url`` (``https://``, or ``http://`` on loopback
only) and keeps the node's copy (``policy.path``, a ``.tar.gz``) current:

- every request sends ``If-None-Match`` with the ``ETag`` of the copy it holds: an unchanged
  bundle is a ``304`` and costs nothing (the ETag is kept beside the copy, so this holds
  across restarts too);
- a new bundle is read up to ``max_bytes`` (a larger one is refused, ``bundle_too_large``)
  within ``timeout_s``, written to a temporary file beside the copy, and **verified and
  compiled** (``validate``: signature, then a full engine build) before it atomically
  replaces the copy; the engine's hot reload then serves it. A refused bundle never touches
  the copy: the previous revision keeps serving, and ``health()`` says why;
- polls are ``min_delay_s`` to ``max_delay_s`` apart, with jitter, so a fleet does not hit
  the server in step; failures are logged once, summarised, and counted (``FailureLog``).

Authentication to the server: ``bundle_ca_bundle`` (the server's CA), a bearer token read
from ``bundle_token_file`` on every request (so it can be rotated), and/or the node's own
mTLS identity: ``bundle_client_cert`` (PEM chain) with ``bundle_client_key``, a PEM key file
or the device directory's ``keystore.json`` — then a PKCS#11 or TPM key signs the handshake
where it is kept (``ztagent.device.keystore_tls``: TLS 1.3, the server checked against
``bundle_ca_bundle``, which is then required).

HTTP is the stdlib (``urllib.request``, with ``ssl`` for file keys), run in a worker thread.
Redirects are not followed: a bundle URL is configuration, and a redirect elsewhere is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ztagent.addresses import check_bundle_url
from ztagent.device.keystore_tls import (
    DeviceIdentity,
    KeystoreHTTPSHandler,
    KeystoreTlsClient,
    client_key_source,
    keystore_client,
)
from ztagent.device.keystores import resolve_pin
from ztagent.errors import ConfigError, TransportError, ZtagentError
from ztagent.failure_log import FailureLog
from ztagent.files import KEY_MODE, make_private_dir, refuse_symlink, write_atomic

log = logging.getLogger("ztagent.policy")

DEFAULT_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BundleFetchHealth:
    ok: bool
    last_error: str | None
    fetched_at: datetime | None
    """Last time the server answered with a bundle or a 304 (None: never)."""
    revision: str | None
    """The revision of the copy on disk, as ``validate`` reported it."""
    fetch_failures: int = 0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str):  # type: ignore[no-untyped-def]
        raise TransportError(
            "bundle_unavailable", f"the bundle server redirected to {newurl!r} (not followed)"
        )


class BundleFetcher:
    """Keeps ``dest`` equal to the newest valid bundle at ``url``. ``fetch_once`` never
    raises; ``validate(path)`` returns the revision of a usable bundle or raises a
    ``ZtagentError`` (signature, compile) for one that must not be installed."""

    def __init__(
        self,
        url: str,
        dest: Path,
        validate: Callable[[Path], str],
        *,
        ca_bundle: Path | None = None,
        token_file: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
        min_delay_s: float = 60.0,
        max_delay_s: float = 120.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 10.0,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        check_bundle_url(url)
        if not 0 < min_delay_s <= max_delay_s:
            raise ConfigError(
                "policy.bundle_min_delay_s",
                f"{min_delay_s} (expected > 0 and <= bundle_max_delay_s {max_delay_s})",
            )
        self.url = url
        self.dest = dest
        self._validate = validate
        self._token_file = token_file
        self._min, self._max = min_delay_s, max_delay_s
        self._max_bytes = max_bytes
        self._timeout = timeout_s
        self._rng = rng
        self._clock = clock
        self._context: ssl.SSLContext | None = None
        self._keystore: KeystoreTlsClient | None = None
        if url.startswith("https"):
            self._tls_setup(ca_bundle, client_cert)
        self._failures = FailureLog(log, f"bundle download from {url}")
        self._etag_path = dest.with_name(dest.name + ".etag")
        self._etag = self._load_etag()
        self._health = BundleFetchHealth(True, None, None, None)

    def _tls_setup(self, ca_bundle: Path | None, client_cert: tuple[Path, Path] | None) -> None:
        if client_cert is None:
            self._context = self._ssl_context(ca_bundle, None)
            return
        cert, key = client_cert
        source = client_key_source(
            cert, key, key_name="policy.bundle_client_key", pin=resolve_pin(None)
        )
        if not isinstance(source, DeviceIdentity):
            self._context = self._ssl_context(ca_bundle, (cert, source))
            return
        self._keystore = keystore_client(ca_bundle, source, ca_key="policy.bundle_ca_bundle")

    @staticmethod
    def _ssl_context(
        ca_bundle: Path | None, client_cert: tuple[Path, Path] | None
    ) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("policy.bundle_ca_bundle", f"{ca_bundle}: {exc}") from None
        if client_cert is not None:
            try:
                context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("policy.bundle_client_cert", f"{client_cert[0]}: {exc}") from None
        return context

    def health(self) -> BundleFetchHealth:
        return BundleFetchHealth(
            self._health.ok,
            self._health.last_error,
            self._health.fetched_at,
            self._health.revision,
            self._failures.failures,
        )

    def next_delay(self) -> float:
        """Seconds until the next poll: uniform in [min_delay_s, max_delay_s]."""
        return self._min + (self._max - self._min) * self._rng()

    def _load_etag(self) -> str | None:
        """The ETag of the copy on disk, if the copy is still the one it describes."""
        try:
            doc = json.loads(self._etag_path.read_text(encoding="utf-8"))
            if doc.get("url") == self.url and self.dest.exists():
                etag = doc.get("etag")
                return etag if isinstance(etag, str) else None
        except (OSError, ValueError, AttributeError):
            pass
        return None

    def _request(self) -> tuple[int, bytes, str | None]:
        """Blocking GET (worker thread): (status, body, etag). 304 has an empty body."""
        headers = {"User-Agent": "ztagent", "Accept": "application/gzip, */*"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        if self._token_file is not None:
            try:
                token = self._token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise TransportError(
                    "bundle_unavailable", f"cannot read {self._token_file}: {exc.strerror}"
                ) from None
            headers["Authorization"] = f"Bearer {token}"
        handlers: list[Any] = [_NoRedirects()]
        if self._context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._context))
        if self._keystore is not None:
            handlers.append(KeystoreHTTPSHandler(self._keystore))  # TlsError passes through
        opener = urllib.request.build_opener(*handlers)
        request = urllib.request.Request(self.url, headers=headers)  # noqa: S310 (checked)
        try:
            with opener.open(request, timeout=self._timeout) as response:
                body: bytes = response.read(self._max_bytes + 1)
                etag = response.headers.get("ETag")
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return 304, b"", self._etag
            raise TransportError(
                "bundle_unavailable", f"GET {self.url}: HTTP {exc.code} (expected 200 or 304)"
            ) from None
        except urllib.error.URLError as exc:
            raise TransportError("bundle_unavailable", f"GET {self.url}: {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise TransportError(
                "bundle_unavailable", f"GET {self.url}: {type(exc).__name__}: {exc}"
            ) from None
        if len(body) > self._max_bytes:
            raise TransportError(
                "bundle_too_large",
                f"GET {self.url}: more than policy.bundle_max_bytes ({self._max_bytes}) bytes",
            )
        return status, body, etag

    async def fetch_once(self) -> bool:
        """One poll; True when a new bundle was verified and installed at ``dest``."""
        try:
            status, body, etag = await asyncio.to_thread(self._request)
            if status == 304:
                self._ok(self._health.revision)
                return False
            revision = await asyncio.to_thread(self._install, body, etag)
        except ZtagentError as err:
            self._fail(f"{err.code}: {err.message}")
            return False
        except Exception as exc:  # never let the poll loop die
            self._fail(f"bundle_unavailable: {type(exc).__name__}: {exc}")
            return False
        self._ok(revision)
        log.info("policy bundle revision %s from %s installed at %s", revision, self.url, self.dest)
        return True

    def _install(self, body: bytes, etag: str | None) -> str:
        make_private_dir(self.dest.parent)
        candidate = self.dest.with_name(
            f".{self.dest.name}.{secrets.token_hex(6)}.candidate.tar.gz"
        )
        try:
            write_atomic(candidate, body, KEY_MODE)
            revision = self._validate(candidate)  # signature, compile: before it may serve
            refuse_symlink(self.dest)
            os.replace(candidate, self.dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
        self._etag = etag
        if etag is not None:
            write_atomic(self._etag_path, json.dumps({"url": self.url, "etag": etag}).encode())
        return revision

    def _ok(self, revision: str | None) -> None:
        self._failures.succeeded()
        self._health = BundleFetchHealth(True, None, self._clock(), revision)

    def _fail(self, message: str) -> None:
        self._failures.failed(message)
        h = self._health
        self._health = BundleFetchHealth(False, message, h.fetched_at, h.revision)
