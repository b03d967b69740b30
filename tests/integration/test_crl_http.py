"""The CA's CRL over HTTP(S): real servers on 127.0.0.1 port 0, real clients (urllib, curl,
openssl, the sidecar's CrlFetcher), a CA made with ``ztagent.ca.store.init_ca``."""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.fixtures.sockets import closed_by_server, still_open
from ztagent._proto.v1 import enrollment_pb2, enrollment_pb2_grpc
from ztagent.ca import crl_http
from ztagent.ca import store as ca_store
from ztagent.ca.crl_http import (
    DEFAULT_MAX_AGE_S,
    CrlHttpServer,
    cache_max_age,
    start_crl_http,
)
from ztagent.ca.service import start_ca_server
from ztagent.cli import build_parser
from ztagent.device.crl_fetch import CrlFetcher
from ztagent.errors import ConfigError
from ztagent.pki.trust import load_crls

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def module_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(tmp_path_factory.mktemp("crl-http") / "ca").dir


@pytest.fixture
def layout(module_ca: Path, tmp_path: Path) -> ca_store.CaLayout:
    """A private copy of the CA, so a test may revoke."""
    target = tmp_path / "ca"
    shutil.copytree(module_ca, target)
    return ca_store.CaLayout(target)


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


def _crl(layout: ca_store.CaLayout) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(layout.crl.read_bytes())


@pytest.fixture
def clock(layout: ca_store.CaLayout) -> Clock:
    return Clock(_crl(layout).last_update_utc + timedelta(minutes=10))


@pytest.fixture
def served(layout: ca_store.CaLayout, clock: Clock) -> Iterator[CrlHttpServer]:
    server = start_crl_http(
        "127.0.0.1:0",
        layout.crl.read_bytes,
        tls=(layout.server_cert, layout.server_key),
        clock=clock,
    )
    try:
        yield server
    finally:
        server.close()


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _request(
    layout: ca_store.CaLayout,
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    tls: bool = True,
) -> Reply:
    if tls:
        context = ssl.create_default_context(cafile=str(layout.bundle))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, context=context, timeout=10
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def _etag(der: bytes) -> str:
    return f'"{hashlib.sha256(der).hexdigest()}"'


def test_der_and_pem_are_the_cas_crl(layout: ca_store.CaLayout, served: CrlHttpServer) -> None:
    crl = _crl(layout)
    der = _request(layout, served.port, "/crl.der")
    assert der.status == 200
    assert der.headers["Content-Type"] == "application/pkix-crl"
    assert der.body == crl.public_bytes(Encoding.DER)
    assert int(der.headers["Content-Length"]) == len(der.body)
    pem = _request(layout, served.port, "/crl.pem")
    assert pem.status == 200
    assert pem.headers["Content-Type"] == "application/x-pem-file"
    assert pem.body == layout.crl.read_bytes()
    assert served.url == f"https://127.0.0.1:{served.port}/crl.der"


def test_cache_headers_follow_the_crl_dates(
    layout: ca_store.CaLayout, served: CrlHttpServer, clock: Clock
) -> None:
    crl = _crl(layout)
    assert crl.next_update_utc is not None
    reply = _request(layout, served.port, "/crl.der")
    assert reply.headers["Last-Modified"] == format_datetime(crl.last_update_utc, usegmt=True)
    assert reply.headers["Expires"] == format_datetime(crl.next_update_utc, usegmt=True)
    assert parsedate_to_datetime(reply.headers["Expires"]) == crl.next_update_utc
    assert reply.headers["ETag"] == _etag(crl.public_bytes(Encoding.DER))
    # 62 days to nextUpdate: the cap (1 hour) decides
    assert reply.headers["Cache-Control"] == f"public, max-age={DEFAULT_MAX_AGE_S}"
    pem = _request(layout, served.port, "/crl.pem")
    assert pem.headers["ETag"] == _etag(crl.public_bytes(Encoding.DER))[:-1] + '.pem"'
    # close to nextUpdate, the time left decides; past it, 0
    clock.now = crl.next_update_utc - timedelta(seconds=100)
    assert _request(layout, served.port, "/crl.der").headers["Cache-Control"] == (
        "public, max-age=100"
    )
    clock.now = crl.next_update_utc + timedelta(seconds=5)
    assert _request(layout, served.port, "/crl.der").headers["Cache-Control"] == (
        "public, max-age=0"
    )


def test_cache_max_age_rule() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert cache_max_age(now + timedelta(days=30), now, 3600) == 3600
    assert cache_max_age(now + timedelta(seconds=42), now, 3600) == 42
    assert cache_max_age(now - timedelta(seconds=1), now, 3600) == 0
    assert cache_max_age(None, now, 3600) == 0


def test_conditional_requests_and_head(layout: ca_store.CaLayout, served: CrlHttpServer) -> None:
    first = _request(layout, served.port, "/crl.der")
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]
    same = _request(layout, served.port, "/crl.der", headers={"If-None-Match": etag})
    assert same.status == 304
    assert same.body == b""
    assert same.headers["ETag"] == etag
    assert same.headers["Cache-Control"] == first.headers["Cache-Control"]
    weak_in_list = {"If-None-Match": f'"other", W/{etag}'}
    assert _request(layout, served.port, "/crl.der", headers=weak_in_list).status == 304
    assert _request(layout, served.port, "/crl.der", headers={"If-None-Match": "*"}).status == 304
    other = _request(layout, served.port, "/crl.der", headers={"If-None-Match": '"nope"'})
    assert other.status == 200
    assert other.body == first.body
    # the DER's validator does not match the PEM representation
    assert _request(layout, served.port, "/crl.pem", headers={"If-None-Match": etag}).status == 200
    since = {"If-Modified-Since": last_modified}
    assert _request(layout, served.port, "/crl.der", headers=since).status == 304
    earlier = format_datetime(
        parsedate_to_datetime(last_modified) - timedelta(seconds=1), usegmt=True
    )
    earlier_reply = _request(
        layout, served.port, "/crl.der", headers={"If-Modified-Since": earlier}
    )
    assert earlier_reply.status == 200
    head = _request(layout, served.port, "/crl.der", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["Content-Length"] == str(len(first.body))
    assert head.headers["ETag"] == etag


def test_other_paths_methods_and_oversized_requests(
    layout: ca_store.CaLayout, served: CrlHttpServer
) -> None:
    assert _request(layout, served.port, "/").status == 404
    assert _request(layout, served.port, "/crl.der/../ca.key").status == 404
    assert _request(layout, served.port, "/crl").status == 404
    assert _request(layout, served.port, "/crl.der?x=1").status == 200
    for method in ("POST", "PUT", "DELETE"):
        reply = _request(layout, served.port, "/crl.der", method=method)
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"
    huge = _request(layout, served.port, "/crl.der", headers={"X-Filler": "a" * 20_000})
    assert huge.status == 431


def test_a_silent_client_does_not_block_the_others(
    layout: ca_store.CaLayout, served: CrlHttpServer
) -> None:
    """A connection that never starts its TLS handshake (handshakes run in the connection's
    thread, not in the accept loop)."""
    with socket.create_connection(("127.0.0.1", served.port)):  # no TLS handshake, nothing
        assert _request(layout, served.port, "/crl.der").status == 200


def test_connections_past_the_cap_are_closed_at_accept(
    layout: ca_store.CaLayout, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_CONNECTIONS silent sockets hold every slot: more are closed at once, without a
    thread, while those stay open (their timeout is longer than the test); once they are gone
    a request is served again. The kernel's accept order decides which sockets get the slots,
    so the test counts rather than names them."""
    monkeypatch.setattr(crl_http, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(crl_http._Handler, "timeout", 120.0)
    server = start_crl_http("127.0.0.1:0", layout.crl.read_bytes, tls=None, clock=clock)
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(5)]
        closed = closed_by_server(silent, 2)
        assert len(closed) == 2  # past the cap: closed by the server, not timed out
        held = [sock for i, sock in enumerate(silent) if i not in closed]
        assert still_open(held)
        for sock in silent:
            sock.close()
        for _ in range(50):  # their threads see the close and free the slots
            try:
                if _request(layout, server.port, "/crl.der", tls=False).status == 200:
                    break
            except (ConnectionError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        else:
            pytest.fail("no request served after the silent connections closed")
    finally:
        server.close()


def test_openssl_parses_what_curl_downloaded(
    layout: ca_store.CaLayout, served: CrlHttpServer, tmp_path: Path
) -> None:
    if shutil.which("curl") is None or shutil.which("openssl") is None:
        pytest.fail("curl and openssl are part of the base image")
    out = tmp_path / "crl.der"
    subprocess.run(
        ["curl", "-sSf", "--cacert", str(layout.bundle), "-o", str(out), served.url],
        check=True,
        timeout=30,
    )
    parsed = subprocess.run(
        [
            *("openssl", "crl", "-inform", "DER", "-in", str(out)),
            *("-noout", "-issuer", "-nextupdate", "-CAfile", str(layout.bundle)),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    crl = _crl(layout)
    assert "verify OK" in parsed.stderr + parsed.stdout
    assert crl.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value in parsed.stdout
    assert "nextUpdate=" in parsed.stdout
    # and the same bytes urllib gets
    context = ssl.create_default_context(cafile=str(layout.bundle))
    with urllib.request.urlopen(served.url, context=context, timeout=10) as reply:
        assert reply.read() == out.read_bytes()


async def test_sidecar_fetcher_takes_the_https_der_crl_and_sees_a_revocation(
    layout: ca_store.CaLayout, served: CrlHttpServer, tmp_path: Path
) -> None:
    stored = tmp_path / "sidecar" / "crl.pem"
    fetcher = CrlFetcher(served.url, layout.bundle, stored, timeout_s=10)
    now = datetime.now(UTC)
    assert await fetcher.fetch_once(now) is True
    assert fetcher.health().ok
    assert [c.public_bytes(Encoding.DER) for c in load_crls(stored.read_bytes())] == [
        _crl(layout).public_bytes(Encoding.DER)
    ]
    assert await fetcher.fetch_once(now) is False  # nothing newer

    device = tmp_path / "dev-7.pem"
    cert = ca_store.issue_device_cert(layout.dir, "dev-7", device)
    before = _request(layout, served.port, "/crl.der")
    ca_store.revoke(layout.dir, cert_path=device)
    after = _request(layout, served.port, "/crl.der")
    assert after.headers["ETag"] != before.headers["ETag"]
    revoked = x509.load_der_x509_crl(after.body)
    assert revoked.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert await fetcher.fetch_once(datetime.now(UTC)) is True
    (latest,) = load_crls(stored.read_bytes())
    assert latest.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    # the old validator no longer matches
    stale = _request(
        layout, served.port, "/crl.der", headers={"If-None-Match": before.headers["ETag"]}
    )
    assert stale.status == 200


def test_an_unreadable_crl_is_503_logged_once(
    layout: ca_store.CaLayout, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    good = layout.crl.read_bytes()
    state = {"data": b"not a CRL"}

    def crl_pem() -> bytes:
        if state["data"] is None:
            raise OSError("gone")
        return state["data"]

    server = start_crl_http("127.0.0.1:0", crl_pem, tls=None, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="ztagent.ca.crl_http"):
            for _ in range(3):
                reply = _request(layout, server.port, "/crl.der", tls=False)
                assert reply.status == 503
                assert reply.body == b"CRL unavailable (see the CA's log)\n"
                assert reply.headers["Cache-Control"] == "no-store"
            state["data"] = None  # a missing file: the same answer
            assert _request(layout, server.port, "/crl.pem", tls=False).status == 503
            failing = [r for r in caplog.records if "failing" in r.getMessage()]
            assert len(failing) == 1  # rate limited: one line, not one per request
            assert "ValueError" in failing[0].getMessage()
            state["data"] = good
            assert _request(layout, server.port, "/crl.der", tls=False).status == 200
            assert any("recovered" in r.getMessage() for r in caplog.records)
    finally:
        server.close()


def test_plain_http_and_bad_addresses(layout: ca_store.CaLayout, clock: Clock) -> None:
    server = start_crl_http("127.0.0.1:0", layout.crl.read_bytes, tls=None, clock=clock)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        reply = _request(layout, server.port, "/crl.der", tls=False)
        assert reply.body == _crl(layout).public_bytes(Encoding.DER)
        with pytest.raises(ConfigError, match=r"ca\.crl_http.*cannot bind"):
            start_crl_http(f"127.0.0.1:{server.port}", layout.crl.read_bytes, tls=None)
    finally:
        server.close()
    with pytest.raises(ConfigError, match=r"ca\.crl_http"):
        start_crl_http("unix:/tmp/crl.sock", layout.crl.read_bytes, tls=None)
    with pytest.raises(ConfigError, match=r"ca\.crl_http"):
        start_crl_http("127.0.0.1:99999", layout.crl.read_bytes, tls=None)
    with pytest.raises(ConfigError, match=r"ca\.crl_http.*TLS pair"):
        start_crl_http("127.0.0.1:0", layout.crl.read_bytes, tls=(layout.bundle, layout.bundle))


async def test_ca_serve_serves_the_getcrl_crl_over_https(layout: ca_store.CaLayout) -> None:
    """HTTP and gRPC serve the same CRL, and re-sign it by the same rule (here: 40 days on,
    less than half of the 62 days is left)."""
    later = Clock(datetime.now(UTC) + timedelta(days=40))
    running = await start_ca_server(
        layout.dir,
        listen="127.0.0.1:0",
        renew_listen="127.0.0.1:0",
        crl_http="127.0.0.1:0",
        clock=later,
    )
    try:
        assert running.crl_http is not None
        port = running.crl_http.port
        over_http = _request(layout, port, "/crl.der")
        assert over_http.status == 200
        crl = x509.load_der_x509_crl(over_http.body)
        assert abs(crl.last_update_utc - later.now) < timedelta(seconds=2)  # re-signed
        creds = grpc.ssl_channel_credentials(root_certificates=layout.bundle.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.enroll_port}", creds) as ch:
            reply = await enrollment_pb2_grpc.EnrollmentStub(ch).GetCRL(
                enrollment_pb2.GetCRLRequest(), timeout=10
            )
        assert x509.load_pem_x509_crl(reply.crl).public_bytes(Encoding.DER) == over_http.body
        assert _request(layout, port, "/crl.pem").body == reply.crl
    finally:
        await running.stop(None)
    with pytest.raises(OSError):
        _request(layout, port, "/crl.der")


async def test_ca_serve_refuses_an_unbindable_crl_address(layout: ca_store.CaLayout) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=r"ca\.crl_http"):
            await start_ca_server(
                layout.dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0", crl_http=address
            )


def test_cli_ca_serve_has_crl_http() -> None:
    args = build_parser().parse_args(["ca", "serve", "--dir", "d", "--crl-http", "0.0.0.0:8446"])
    assert args.crl_http == "0.0.0.0:8446"
    assert build_parser().parse_args(["ca", "serve", "--dir", "d"]).crl_http is None
