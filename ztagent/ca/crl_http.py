"""The CA's current CRL over HTTP(S), in the standard forms (``ca serve --crl-http ADDR``).

Besides the gRPC ``GetCRL``, standard tools (openssl, curl, an nginx cache) and sidecars with
``tls.crl_source = "https://<ca>:<port>/crl.der"`` fetch the CRL here:

- ``GET /crl.der``: the CRL as DER, ``Content-Type: application/pkix-crl`` (RFC 5280 §4.2.1.13);
- ``GET /crl.pem``: the same CRL as PEM, ``Content-Type: application/x-pem-file``;
- ``HEAD`` on either: the same headers, no body;
- any other path: 404; any other common method: 405 with ``Allow: GET, HEAD``;
- a CRL that cannot be read or parsed: 503, ``Cache-Control: no-store``, a one-line text body;
  the CA logs it through ``FailureLog`` (one line when it starts failing, a summary every
  5 minutes, one line when it recovers).

The CRL comes from a callable given at start (``crl_pem``), called on every request; the CA
service passes ``EnrollmentService.current_crl_pem``, the same function ``GetCRL`` uses, so
HTTP and gRPC serve the same CRL and both re-sign it once less than half of its validity is
left.

Headers (``crl_response``, pure):

- ``Last-Modified``: the CRL's thisUpdate; ``Expires``: its nextUpdate (absent without one);
- ``ETag``: ``"<SHA-256 of the DER, hex>"`` on ``/crl.der`` and the same with ``.pem``
  appended on ``/crl.pem`` (two representations, two strong validators);
- ``Cache-Control: public, max-age=N`` with N = the seconds until nextUpdate, at least 0 and at
  most ``max_age_s`` (default ``DEFAULT_MAX_AGE_S``, 1 hour). The CRL changes on every
  revocation, not only at nextUpdate, so the cap is what bounds how late a revocation reaches
  a client behind an HTTP cache; a cache never keeps a CRL past its nextUpdate. (ztagent's
  own fetcher does not cache: it sees a revocation at its next poll.)
- ``If-None-Match`` matching the ETag (or ``*``), or else ``If-Modified-Since`` at or after
  thisUpdate: 304 with the same validators and no body.

Transport: ``tls=(cert, key)`` serves HTTPS with that chain (``ca serve`` always passes the
CA's ``server.pem`` / ``server.key``, the certificate its gRPC ports present, so clients trust
``ca-bundle.pem``); ``tls=None`` serves plain HTTP (the CRL is signed, so integrity does not
depend on TLS, but ztagent's fetcher accepts only https:// or ca://). One request per
connection (HTTP/1.0 semantics), at most ``MAX_REQUEST_BYTES`` of request line and headers,
``REQUEST_TIMEOUT_S`` per socket operation (the TLS handshake included, done in the
connection's thread, not the accept loop), at most ``MAX_CONNECTIONS`` at once (more are
closed at accept), and no per-request log lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ztagent.addresses import AddressError, parse_address
from ztagent.connection_cap import CappedThreadingMixIn
from ztagent.errors import ConfigError
from ztagent.failure_log import FailureLog

log = logging.getLogger("ztagent.ca.crl_http")

DER_PATH: Final = "/crl.der"
PEM_PATH: Final = "/crl.pem"
DER_TYPE: Final = "application/pkix-crl"
PEM_TYPE: Final = "application/x-pem-file"
DEFAULT_MAX_AGE_S: Final = 3600
"""Upper bound of ``Cache-Control: max-age`` (seconds): the longest a cache may serve a CRL
without asking again, so the longest a revocation may stay hidden behind one."""
REQUEST_TIMEOUT_S: Final = 10.0
MAX_REQUEST_BYTES: Final = 16 * 1024
MAX_CONNECTIONS: Final = 64
DRAIN_BYTES: Final = 256 * 1024
DRAIN_TIMEOUT_S: Final = 1.0
SETTING: Final = "ca.crl_http"

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CrlResponse:
    """What both paths answer for one CRL at one moment."""

    der: bytes
    pem: bytes
    etag: str
    """The DER's validator, quoted; ``/crl.pem`` uses ``pem_etag``."""
    this_update: datetime
    next_update: datetime | None
    max_age_s: int

    @property
    def pem_etag(self) -> str:
        return f'{self.etag[:-1]}.pem"'


def cache_max_age(next_update: datetime | None, now: datetime, cap_s: int) -> int:
    """Seconds until ``next_update``, clamped to ``0..cap_s`` (0 without a nextUpdate)."""
    if next_update is None:
        return 0
    return max(0, min(cap_s, int((next_update - now).total_seconds())))


def crl_response(pem: bytes, now: datetime, *, max_age_s: int = DEFAULT_MAX_AGE_S) -> CrlResponse:
    """Parse ``pem`` (one PEM CRL) and compute the headers; ``ValueError`` if it is not one."""
    crl = x509.load_pem_x509_crl(pem)
    der = crl.public_bytes(Encoding.DER)
    return CrlResponse(
        der=der,
        pem=crl.public_bytes(Encoding.PEM),
        etag=f'"{hashlib.sha256(der).hexdigest()}"',
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        max_age_s=cache_max_age(crl.next_update_utc, now, max_age_s),
    )


def http_date(when: datetime) -> str:
    return format_datetime(when.astimezone(UTC), usegmt=True)


def not_modified(
    etag: str, last_modified: datetime, if_none_match: str | None, if_modified_since: str | None
) -> bool:
    """RFC 9110 §13.1.2/§13.1.3: ``If-None-Match`` (weak comparison) decides when present;
    otherwise ``If-Modified-Since`` at or after ``last_modified``."""
    if if_none_match is not None:
        tags = [t.strip() for t in if_none_match.split(",")]
        return any(t == "*" or t.removeprefix("W/") == etag for t in tags)
    if if_modified_since is not None:
        try:
            since = parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:
            return False
        return last_modified <= since
    return False


class _CappedReader:
    """The request stream, cut off after ``cap`` bytes (``exhausted`` tells it happened)."""

    def __init__(self, raw: io.BufferedIOBase | BinaryIO, cap: int) -> None:
        self._raw = raw
        self._left = cap

    @property
    def exhausted(self) -> bool:
        return self._left <= 0

    def readline(self, limit: int = -1) -> bytes:
        n = self._left if limit < 0 else min(limit, self._left)
        if n <= 0:
            return b""
        line = self._raw.readline(n)
        self._left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        if n <= 0:
            return b""
        data = self._raw.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._raw.close()


class _Handler(BaseHTTPRequestHandler):
    server: _CrlHttpd
    server_version = "ztagent-crl"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.rfile = _CappedReader(self.rfile, MAX_REQUEST_BYTES)  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if isinstance(self.rfile, _CappedReader) and self.rfile.exhausted:
            self.send_error(431, "Request header fields too large")
            self._drain()
            return False
        return True

    def _drain(self) -> None:
        """Read (a bounded amount of) what the client is still sending before the close, so
        the close does not reset the connection under the answer it has not read yet."""
        with contextlib.suppress(OSError):
            self.connection.settimeout(DRAIN_TIMEOUT_S)
            left = DRAIN_BYTES
            while left > 0 and (chunk := self.connection.recv(min(left, 16384))):
                left -= len(chunk)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _not_allowed(self) -> None:
        self._plain(405, "method not allowed (expected GET or HEAD)\n", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _plain(self, status: int, text: str, headers: dict[str, str], body: bool = True) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path not in (DER_PATH, PEM_PATH):
            self._plain(404, f"not found (expected {DER_PATH} or {PEM_PATH})\n", {}, body)
            return
        reply = self.server.current()
        if reply is None:
            headers = {"Cache-Control": "no-store", "Retry-After": "30"}
            self._plain(503, "CRL unavailable (see the CA's log)\n", headers, body)
            return
        is_der = path == DER_PATH
        etag = reply.etag if is_der else reply.pem_etag
        headers = {
            "ETag": etag,
            "Last-Modified": http_date(reply.this_update),
            "Cache-Control": f"public, max-age={reply.max_age_s}",
        }
        if reply.next_update is not None:
            headers["Expires"] = http_date(reply.next_update)
        if not_modified(
            etag,
            reply.this_update,
            self.headers.get("If-None-Match"),
            self.headers.get("If-Modified-Since"),
        ):
            self.send_response(304)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            return
        data = reply.der if is_der else reply.pem
        self.send_response(200)
        self.send_header("Content-Type", DER_TYPE if is_der else PEM_TYPE)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


class _CrlHttpd(CappedThreadingMixIn, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        family: socket.AddressFamily,
        address: tuple[str, int],
        crl_pem: Callable[[], bytes],
        tls: ssl.SSLContext | None,
        clock: Clock,
        max_age_s: int,
    ) -> None:
        self.address_family = family
        self._crl_pem = crl_pem
        self._tls = tls
        self._clock = clock
        self._max_age_s = max_age_s
        self.cap_connections(MAX_CONNECTIONS)
        self._failures = FailureLog(log, "serving the CRL over HTTP (answering 503)")
        self._lock = threading.Lock()
        """Guards ``_memo`` and ``_failures`` (requests run in threads)."""
        self._memo: tuple[bytes, CrlResponse] | None = None
        super().__init__(address, _Handler)

    def current(self) -> CrlResponse | None:
        """The response for the CRL the callable returns now; None (logged) if it fails."""
        try:
            pem = self._crl_pem()
            with self._lock:
                memo = self._memo
            if memo is None or memo[0] != pem:
                memo = (pem, crl_response(pem, self._clock(), max_age_s=self._max_age_s))
                with self._lock:
                    self._memo = memo
        except Exception as exc:  # a missing file, a CA error, a broken CRL: 503
            with self._lock:
                self._failures.failed(f"{type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self._failures.succeeded()
        parsed = memo[1]
        return replace(
            parsed, max_age_s=cache_max_age(parsed.next_update, self._clock(), self._max_age_s)
        )

    def refused_connection(self, client_address: Any) -> None:
        log.debug(
            "CRL HTTP: %d connections open, closing one from %s", MAX_CONNECTIONS, client_address
        )

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(REQUEST_TIMEOUT_S)
        try:
            tls_sock = self._tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("CRL HTTPS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls_sock, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls_sock.close()


class CrlHttpServer:
    """A started CRL server: ``port`` (the bound one), ``url`` (of ``/crl.der``), ``close()``."""

    def __init__(self, httpd: _CrlHttpd, scheme: str, host: str) -> None:
        self._httpd = httpd
        self.port: int = httpd.server_address[1]
        self.scheme = scheme
        self._host = f"[{host}]" if ":" in host else host
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name=f"crl-http-{self.port}",
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._host}:{self.port}{DER_PATH}"

    def close(self) -> None:
        """Stop accepting, close the socket (requests in flight finish in their threads)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(SETTING, f"cannot load the TLS pair {cert} / {key}: {exc}") from None
    return context


def start_crl_http(
    address: str,
    crl_pem: Callable[[], bytes],
    *,
    tls: tuple[Path, Path] | None,
    clock: Clock = _utc_now,
    max_age_s: int = DEFAULT_MAX_AGE_S,
) -> CrlHttpServer:
    """Bind ``address`` (``HOST:PORT``, port 0 picks one) and serve the CRL ``crl_pem()``
    returns, over HTTPS with ``tls=(cert chain, key)`` or plain HTTP with ``tls=None``.

    ``ConfigError`` naming ``ca.crl_http`` for an address that is not ``HOST:PORT`` or cannot
    be bound, or a TLS pair that does not load. ``clock`` is the time ``max-age`` counts from.
    """
    try:
        parsed = parse_address(address)
    except AddressError as err:
        raise ConfigError(SETTING, err.message) from None
    if parsed.host is None or parsed.port is None:
        raise ConfigError(SETTING, f"got {address!r} (a unix socket); expected HOST:PORT")
    if max_age_s < 0:
        raise ConfigError(SETTING, f"max-age cap {max_age_s} s (expected at least 0)")
    context = _tls_context(*tls) if tls is not None else None
    family = socket.AF_INET6 if ":" in parsed.host else socket.AF_INET
    try:
        httpd = _CrlHttpd(family, (parsed.host, parsed.port), crl_pem, context, clock, max_age_s)
    except OSError as exc:
        raise ConfigError(SETTING, f"cannot bind {address!r}: {exc.strerror or exc}") from None
    server = CrlHttpServer(httpd, "https" if context else "http", parsed.host)
    log.info(
        "CRL over %s on %s:%d (%s, %s)",
        server.scheme.upper(),
        parsed.host,
        server.port,
        DER_PATH,
        PEM_PATH,
    )
    return server


__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DER_PATH",
    "PEM_PATH",
    "CrlHttpServer",
    "CrlResponse",
    "cache_max_age",
    "crl_response",
    "not_modified",
    "start_crl_http",
]
