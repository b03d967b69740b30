"""The issuer's key set (JWKS) fetched: the IO edge of token verification.

``JwksSource`` loads a JWKS from a file or an ``https://`` URL (optionally through OIDC
discovery: ``<issuer>/.well-known/openid-configuration`` names the ``jwks_uri``), and keeps
it in memory:

- the key set is reused for ``cache_ttl_s`` seconds; after that the next ``get_keys()``
  starts a refetch **in the background** and returns the keys it has: a slow or blackholed
  issuer never delays a call that has keys;
- a call waits for a fetch only when it cannot go on without one (no key set loaded yet,
  or a token naming an unknown ``kid``), and then at most ``fetch_timeout_s``
  (``tokens.jwks_fetch_timeout_s``, default 2 s); the HTTP request has the same timeout;
- fetches are rate-limited: at most one attempt per ``min_refresh_interval_s`` seconds,
  whatever triggers it (a stale cache, an unknown ``kid``, a failing issuer), so a flood of
  tokens with random kids cannot flood the issuer; concurrent callers share one in-flight
  fetch;
- when a fetch fails, the last good key set is kept and ``health()`` reports degraded; the
  failure is logged once, then summarised (``FailureLog``), and counted
  (``fetch_failures``); with no key set ever loaded (in memory or in ``cache_file``),
  ``get_keys()`` raises ``JwksError`` (``jwks_unavailable``).

Both intervals are measured with an injected monotonic clock, so tests do not sleep.
HTTP is the stdlib (``urllib.request`` + ``ssl``) run in a worker thread: no redirects to
anything but ``https://``, a size cap and a timeout on every response.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from joserfc.jwk import KeySet

from ztagent import json_input
from ztagent.errors import ConfigError
from ztagent.failure_log import FailureLog
from ztagent.files import KEY_MODE, make_private_dir, write_atomic
from ztagent.timefmt import parse_rfc3339, rfc3339
from ztagent.tokens.errors import JwksError
from ztagent.tokens.jwks import DISCOVERY_PATH, MAX_DOCUMENT_BYTES, JwksHealth, parse_jwks

log = logging.getLogger("ztagent.tokens")

DEFAULT_FETCH_TIMEOUT_S = 2.0
"""How long a call waits for a fetch it needs, and the HTTP timeout of every fetch."""

DEFAULT_MAX_STALE_S = 30 * 86400.0
"""How long a key set fetched from the issuer stays usable while the issuer cannot be
reached (running or after a restart from ``cache_file``): 30 days."""


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not newurl.startswith("https://"):
            raise JwksError(
                "jwks_unavailable", f"redirect to {newurl!r} (expected an https:// URL)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _https_get(url: str, context: ssl.SSLContext, timeout_s: float, max_bytes: int) -> bytes:
    """Blocking GET (run in a worker thread); every failure becomes ``JwksError``."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects()
    )
    request = urllib.request.Request(  # noqa: S310 (https:// only, checked at construction)
        url, headers={"Accept": "application/json", "User-Agent": "ztagent"}
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            data: bytes = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise JwksError("jwks_unavailable", f"GET {url}: HTTP {exc.code} (expected 200)") from None
    except urllib.error.URLError as exc:
        raise JwksError("jwks_unavailable", f"GET {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # TLS errors, timeouts, resets, bad status lines
        raise JwksError("jwks_unavailable", f"GET {url}: {type(exc).__name__}: {exc}") from None
    if len(data) > max_bytes:
        raise JwksError(
            "jwks_invalid", f"GET {url}: body over {max_bytes} bytes (expected at most that)"
        )
    return data


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise JwksError("jwks_unavailable", f"{path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise JwksError("jwks_invalid", f"{path}: over {max_bytes} bytes (expected at most that)")
    return data


def _utcnow() -> datetime:
    return datetime.now(UTC)


class JwksSource:
    """The issuer's key set from a file or an https URL, cached and rate-limited.

    ``location`` is a path (``Path`` or a string without ``https://``) or an ``https://``
    URL; with ``discover=True`` it is the issuer URL and the JWKS URL comes from its OpenID
    configuration (whose ``issuer`` must equal it, OIDC Discovery 1.0 section 4.3).
    ``ca_bundle`` is a PEM file of CAs for the TLS (default: the system trust store).
    ``clock`` is monotonic seconds (intervals); ``wall_clock`` dates ``health().fetched_at``.
    """

    def __init__(
        self,
        location: str | Path,
        *,
        ca_bundle: Path | None = None,
        discover: bool = False,
        cache_ttl_s: float = 300.0,
        min_refresh_interval_s: float = 30.0,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utcnow,
        cache_file: Path | None = None,
        max_stale_s: float = DEFAULT_MAX_STALE_S,
    ) -> None:
        self._cache_file = cache_file
        self._max_stale = timedelta(seconds=max_stale_s)
        if max_stale_s <= 0:
            raise ConfigError("tokens.jwks_max_stale_s", f"{max_stale_s} (expected > 0)")
        if fetch_timeout_s <= 0:
            raise ConfigError("tokens.jwks_fetch_timeout_s", f"{fetch_timeout_s} (expected > 0)")
        if cache_ttl_s <= 0:
            raise ConfigError("tokens.jwks_cache_ttl_s", f"{cache_ttl_s} (expected > 0)")
        if min_refresh_interval_s < 0:
            raise ConfigError(
                "tokens.jwks_min_refresh_interval_s", f"{min_refresh_interval_s} (expected >= 0)"
            )
        self._url: str | None = None
        self._path: Path | None = None
        self._context: ssl.SSLContext | None = None
        text = str(location)
        if isinstance(location, str) and "://" in location:
            if not location.startswith("https://"):
                raise ConfigError("tokens.jwks_url", f"{location!r} (expected an https:// URL)")
            self._url = location
            self._context = _ssl_context(ca_bundle)
        elif discover:
            raise ConfigError("tokens.issuer", f"{text!r} (discovery needs an https:// URL)")
        else:
            self._path = Path(location)
        self._discover = discover
        self._issuer = text if discover else None
        self._jwks_url: str | None = None if discover else self._url
        self._location = text
        self._ttl = cache_ttl_s
        self._min_interval = min_refresh_interval_s
        self._timeout = fetch_timeout_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._wall_clock = wall_clock

        self._keys: KeySet | None = None
        self._raw: bytes | None = None
        self._fetched_mono: float | None = None
        self._fetched_at: datetime | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._fetches = 0
        self._cache_file_read = False
        self._failures = FailureLog(log, f"JWKS fetch from {text}", clock=clock)

    @property
    def location(self) -> str:
        return self._location

    @property
    def fetch_count(self) -> int:
        """Fetch attempts made so far (successful or not)."""
        return self._fetches

    def health(self) -> JwksHealth:
        return JwksHealth(
            ok=self._fetched_mono is not None and self._last_error is None,
            last_error=self._last_error,
            fetched_at=self._fetched_at,
            fetch_failures=self._failures.failures,
        )

    async def get_keys(self) -> KeySet:
        """The current key set. Older than ``cache_ttl_s``: a background refetch starts
        (rate-limited) and the current set is returned at once.

        With no key set in memory, wait (at most ``fetch_timeout_s``) for a fetch, then fall
        back to ``cache_file``. Raise ``JwksError`` when there is no key set at all, or when
        the one there is was fetched more than ``max_stale_s`` ago.
        """
        if self._keys is None:
            await self._refresh(wait=True)
            if self._keys is None and not self._cache_file_read:
                self._cache_file_read = True  # once: not a file read per refused call
                self._load_cache_file()
        elif self._stale():
            await self._refresh(wait=False)
        if self._keys is None:
            reason = self._last_error or "not fetched yet"
            raise JwksError(
                "jwks_unavailable", f"no key set loaded from {self._location} ({reason})"
            )
        if self._fetched_at is not None and self._wall_clock() - self._fetched_at > self._max_stale:
            raise JwksError(
                "jwks_unavailable",
                f"the last good key set from {self._location} was fetched at "
                f"{rfc3339(self._fetched_at)}, more than tokens.jwks_max_stale_s "
                f"({self._max_stale.total_seconds():.0f} s) ago ({self._last_error or 'stale'})",
            )
        return self._keys

    def _load_cache_file(self) -> None:
        """The last good key set from ``cache_file`` (a restart while the issuer is down).
        A missing, unreadable, foreign or symlinked file is ignored (and logged)."""
        path = self._cache_file
        if path is None:
            return
        try:
            if path.is_symlink():
                raise ValueError("is a symlink (refused)")
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("location") != self._location:
                raise ValueError(f"holds keys of {doc.get('location')!r}")
            fetched_at = parse_rfc3339(str(doc["fetched_at"]))
            raw = str(doc["jwks"]).encode()
            keys = parse_jwks(raw, f"{path} (last good copy)")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, JwksError) as exc:
            log.warning("ignoring the JWKS cache file %s: %s", path, exc)
            return
        self._keys, self._raw, self._fetched_at = keys, raw, fetched_at
        log.warning(
            "issuer %s unreachable (%s): using the last good key set fetched at %s from %s",
            self._location,
            self._last_error or f"no answer within {self._timeout:g} s",
            rfc3339(fetched_at),
            path,
        )

    def _store_cache_file(self, data: bytes) -> None:
        path = self._cache_file
        if path is None or self._fetched_at is None:
            return
        doc = {
            "location": self._location,
            "fetched_at": rfc3339(self._fetched_at),
            "jwks": data.decode("utf-8", "replace"),
        }
        try:
            make_private_dir(path.parent)
            write_atomic(path, json.dumps(doc, sort_keys=True).encode(), KEY_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # planted by someone else: left alone, and said so
                log.error(
                    "refusing to write the JWKS cache file %s: it is a symbolic link (remove "
                    "it; the last good key set is not kept on disk until then)",
                    path,
                )
            else:
                log.warning("cannot write the JWKS cache file %s: %s", path, exc.strerror)

    async def refresh_for_unknown_kid(self) -> bool:
        """Refetch because a token named a kid the set lacks; True if a fetch succeeded
        within ``fetch_timeout_s``.

        At most one fetch per ``min_refresh_interval_s``; False (no fetch) inside it.
        """
        return await self._refresh(wait=True)

    async def idle(self) -> None:
        """Wait until no fetch is in flight (a background refetch finished)."""
        inflight = self._inflight
        if inflight is not None:
            await asyncio.shield(inflight)

    def _stale(self) -> bool:
        return self._fetched_mono is None or self._clock() - self._fetched_mono >= self._ttl

    async def _refresh(self, *, wait: bool) -> bool:
        """Start a fetch (unless one is in flight or the rate limit says no); with ``wait``,
        True if it succeeded within ``fetch_timeout_s``. The fetch itself is never cancelled
        by a caller giving up: it finishes (or times out) in the background."""
        inflight = self._inflight
        if inflight is None:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
                return False
            self._last_attempt = now
            self._fetches += 1
            inflight = asyncio.get_running_loop().create_task(self._fetch_and_store())
            self._inflight = inflight
        if not wait:
            return False
        try:
            # shield: a caller that times out or is cancelled must not cancel the fetch
            return await asyncio.wait_for(asyncio.shield(inflight), self._timeout)
        except TimeoutError:
            return False

    async def _fetch_and_store(self) -> bool:
        try:
            data = await self._fetch()
            keys = self._keys if self._keys is not None and data == self._raw else None
            if keys is None:
                keys = parse_jwks(data, self._jwks_url or self._location)
            self._keys, self._raw = keys, data
            self._fetched_mono = self._clock()
            self._fetched_at = self._wall_clock()
            self._last_error = None
            self._failures.succeeded()
            if self._cache_file is not None:  # every fetch: its time bounds the staleness
                await asyncio.to_thread(self._store_cache_file, data)
            return True
        except JwksError as exc:
            self._failed(str(exc))
            return False
        except Exception as exc:  # never let the shared task die with an unhandled error
            self._failed(f"jwks_unavailable: {type(exc).__name__}: {exc}")
            return False
        finally:
            self._inflight = None

    def _failed(self, reason: str) -> None:
        self._last_error = reason
        self._failures.failed(reason)

    async def _fetch(self) -> bytes:
        if self._path is not None:
            return await asyncio.to_thread(_read_file, self._path, self._max_bytes)
        if self._jwks_url is None:
            self._jwks_url = await self._discover_jwks_url()
        return await self._get(self._jwks_url)

    async def _get(self, url: str) -> bytes:
        assert self._context is not None
        return await asyncio.to_thread(
            _https_get, url, self._context, self._timeout, self._max_bytes
        )

    async def _discover_jwks_url(self) -> str:
        assert self._issuer is not None
        url = self._issuer.rstrip("/") + DISCOVERY_PATH
        try:  # fetched from the network: nesting bounded
            doc = json_input.loads(await self._get(url))
        except ValueError as exc:  # also not UTF-8, nested too deep
            raise JwksError("jwks_invalid", f"{url} is not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise JwksError("jwks_invalid", f"{url} is not a JSON object")
        if doc.get("issuer") != self._issuer:
            raise JwksError(
                "jwks_invalid",
                f"{url}: issuer {doc.get('issuer')!r} (expected {self._issuer!r})",
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise JwksError(
                "jwks_invalid", f"{url}: jwks_uri {jwks_uri!r} (expected an https:// URL)"
            )
        return jwks_uri


def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    if ca_bundle is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tokens.jwks_ca_bundle", f"{ca_bundle}: {exc} (expected a PEM CA bundle)"
        ) from None
