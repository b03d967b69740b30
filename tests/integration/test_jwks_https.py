"""JwksSource against a real HTTPS issuer on loopback (TLS from a throwaway CA).

The issuer is a stdlib ``http.server`` on 127.0.0.1, port 0, whose JWKS and status the test
controls and whose requests it counts. The monotonic clock is injected: intervals are moved,
never slept through.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.unit.tokens._support import (
    NOW,
    POLICY,
    FakeMonotonic,
    FakeWallClock,
    claims,
    jwks_bytes,
    new_key,
    sign,
)
from ztagent.ca import builders
from ztagent.device.jwks_fetch import JwksSource
from ztagent.tokens.errors import JwksError, TokenError
from ztagent.tokens.jwks import DISCOVERY_PATH
from ztagent.tokens.verifier import TokenVerifier

pytestmark = pytest.mark.integration

JWKS_PATH = "/jwks.json"


@dataclass
class Issuer:
    """What the fake issuer serves; the handler reads it on every request."""

    url: str = ""
    ca_bundle: Path = Path()
    jwks: bytes = b""
    status: int = 200
    discovery: dict[str, object] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fetches(self) -> int:
        with self.lock:
            return self.hits[JWKS_PATH]


def _handler(issuer: Issuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with issuer.lock:
                issuer.hits[self.path] += 1
            if self.path == JWKS_PATH:
                body, status = issuer.jwks, issuer.status
            elif self.path == DISCOVERY_PATH:
                body, status = json.dumps(issuer.discovery).encode(), issuer.status
            else:
                body, status = b"not found", 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A throwaway CA and a localhost server cert, valid at the real time (TLS checks it)."""
    now = datetime.now(UTC)
    root, issuing = builders.new_ca("jwks test", now=now)
    leaf = builders.build_leaf(
        issuing,
        subject_cn="issuer",
        uris=[],
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        dns=("localhost",),
        ips=("127.0.0.1",),
    )
    d = tmp_path_factory.mktemp("jwks-tls")
    (d / "bundle.pem").write_bytes(builders.cert_pem(root.cert, issuing.cert))
    (d / "server.pem").write_bytes(builders.cert_pem(leaf.cert, issuing.cert))
    (d / "server.key").write_bytes(builders.key_pem(leaf.key))
    other_root, _ = builders.new_ca("unrelated", now=now)
    (d / "other.pem").write_bytes(builders.cert_pem(other_root.cert))
    return d / "bundle.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def issuer(tls_material: tuple[Path, Path, Path]) -> Iterator[Issuer]:
    bundle, cert, key = tls_material
    state = Issuer(ca_bundle=bundle)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def clocks() -> tuple[FakeMonotonic, FakeWallClock]:
    return FakeMonotonic(), FakeWallClock()


def _verifier(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock]
) -> tuple[TokenVerifier, JwksSource]:
    mono, wall = clocks
    source = JwksSource(
        issuer.url + JWKS_PATH, ca_bundle=issuer.ca_bundle, clock=mono, wall_clock=wall
    )
    return TokenVerifier(source, POLICY, wall), source


async def test_random_kids_cause_at_most_one_fetch_per_interval(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock]
) -> None:
    key = new_key()
    issuer.jwks = jwks_bytes(key)
    tv, _ = _verifier(issuer, clocks)
    assert (await tv.verify(sign(key), None)).sub == "alice"
    assert issuer.fetches() == 1

    async def attempt() -> str:
        try:
            await tv.verify(sign(key, kid=secrets.token_urlsafe(12)), None)
        except TokenError as err:
            return err.code
        return "accepted"

    codes = [await attempt() for _ in range(100)]  # inside the interval of the first fetch
    assert set(codes) == {"token_kid_unknown"} and issuer.fetches() == 1
    clocks[0].advance(31)
    codes = list(await asyncio.gather(*(attempt() for _ in range(100))))  # concurrent flood
    assert set(codes) == {"token_kid_unknown"} and issuer.fetches() == 2
    codes = [await attempt() for _ in range(100)]
    assert issuer.fetches() == 2


async def test_issuer_down_keeps_last_good_keys_and_reports_degraded(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock]
) -> None:
    key = new_key()
    issuer.jwks = jwks_bytes(key)
    tv, source = _verifier(issuer, clocks)
    await tv.prime()
    assert tv.health().ok and tv.health().fetched_at == NOW
    issuer.status = 503
    clocks[0].advance(301)  # keys are stale: the next verify starts a refetch, which fails
    assert (await tv.verify(sign(key), None)).sub == "alice"
    await source.idle()
    health = tv.health()
    assert not health.ok and health.fetched_at == NOW
    assert health.last_error is not None and "HTTP 503" in health.last_error
    assert issuer.fetches() == 2
    # stale and failing: no retry before the minimum interval has passed
    assert (await tv.verify(sign(key, claims(sub="bob")), None)).sub == "bob"
    assert issuer.fetches() == 2
    issuer.status = 200
    clocks[0].advance(30)
    await tv.verify(sign(key), None)
    await source.idle()
    assert tv.health().ok and issuer.fetches() == 3
    assert source.fetch_count == 3


async def test_rotated_keys_accepted_after_exactly_one_refetch(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock]
) -> None:
    old, new = new_key(), new_key()
    issuer.jwks = jwks_bytes(old)
    tv, _ = _verifier(issuer, clocks)
    await tv.verify(sign(old), None)
    issuer.jwks = jwks_bytes(new, old)  # the issuer rotates
    clocks[0].advance(31)
    user = await tv.verify(sign(new), None)
    assert user.sub == "alice" and issuer.fetches() == 2
    await tv.verify(sign(new), None)
    await tv.verify(sign(old), None)
    assert issuer.fetches() == 2


async def test_untrusted_tls_and_never_loaded_keys_are_unavailable(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock]
) -> None:
    issuer.jwks = jwks_bytes(new_key())
    other = issuer.ca_bundle.parent / "other.pem"
    source = JwksSource(issuer.url + JWKS_PATH, ca_bundle=other, clock=clocks[0])
    with pytest.raises(JwksError) as info:
        await source.get_keys()
    assert info.value.code == "jwks_unavailable" and "CERTIFICATE_VERIFY_FAILED" in (
        source.health().last_error or ""
    )
    assert issuer.fetches() == 0  # the handshake failed before any request


async def test_oidc_discovery(issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock]) -> None:
    key = new_key()
    issuer.jwks = jwks_bytes(key)
    issuer.discovery = {"issuer": issuer.url, "jwks_uri": issuer.url + JWKS_PATH}
    source = JwksSource(issuer.url, discover=True, ca_bundle=issuer.ca_bundle, clock=clocks[0])
    assert [k.kid for k in await source.get_keys()] == [key.kid]
    assert issuer.hits[DISCOVERY_PATH] == 1 and issuer.fetches() == 1

    issuer.discovery = {"issuer": "https://evil.example", "jwks_uri": issuer.url + JWKS_PATH}
    bad = JwksSource(issuer.url, discover=True, ca_bundle=issuer.ca_bundle, clock=clocks[0])
    with pytest.raises(JwksError):
        await bad.get_keys()
    assert "jwks_invalid" in (bad.health().last_error or "")
    assert "evil.example" in (bad.health().last_error or "")


async def test_a_restart_while_the_issuer_is_down_uses_the_last_good_keys_on_disk(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock], tmp_path: Path
) -> None:
    """A sidecar restarted while offline used to exit (jwks_unavailable: keys were in memory
    only). With tokens.jwks_cache_file the last good set is on disk, used up to
    tokens.jwks_max_stale_s after it was fetched; then the refusal is explicit."""
    mono, wall = clocks
    key = new_key()
    issuer.jwks = jwks_bytes(key)
    cache = tmp_path / "state" / "jwks-cache.json"

    def source() -> JwksSource:
        return JwksSource(
            issuer.url + JWKS_PATH,
            ca_bundle=issuer.ca_bundle,
            clock=mono,
            wall_clock=wall,
            cache_file=cache,
            max_stale_s=7 * 86400,
        )

    first = TokenVerifier(source(), POLICY, wall)
    assert (await first.verify(sign(key), None)).sub == "alice"
    assert cache.exists() and oct(cache.stat().st_mode & 0o777) == "0o600"
    issuer.status = 503  # the uplink is gone; the sidecar restarts
    restarted = TokenVerifier(source(), POLICY, wall)
    assert (await restarted.verify(sign(key), None)).sub == "alice"
    assert not restarted.health().ok  # serving from the last good copy, and saying so
    wall.now += timedelta(days=8)  # past the staleness bound (keys are looked up first)
    mono.advance(8 * 86400)
    with pytest.raises(JwksError, match=r"jwks_unavailable: the last good key set .* more than"):
        await TokenVerifier(source(), POLICY, wall).verify(sign(key), None)


async def test_a_cache_file_for_another_issuer_or_a_symlink_is_ignored(
    issuer: Issuer, clocks: tuple[FakeMonotonic, FakeWallClock], tmp_path: Path
) -> None:
    mono, wall = clocks
    cache = tmp_path / "jwks-cache.json"
    cache.write_text(
        '{"location": "https://elsewhere.example/jwks", "fetched_at": "2026-11-26T12:00:00Z",'
        ' "jwks": "{\\"keys\\": []}"}'
    )
    issuer.status = 503

    def source() -> JwksSource:
        return JwksSource(
            issuer.url + JWKS_PATH, ca_bundle=issuer.ca_bundle, clock=mono, wall_clock=wall,
            cache_file=cache,
        )  # fmt: skip

    with pytest.raises(JwksError, match="jwks_unavailable: no key set loaded"):
        await source().get_keys()
    # a good copy of this issuer's keys, reachable only through a symlink: not read
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {
                "location": issuer.url + JWKS_PATH,
                "fetched_at": "2026-11-26T12:00:00Z",
                "jwks": jwks_bytes(new_key()).decode(),
            }
        )
    )
    direct = JwksSource(
        issuer.url + JWKS_PATH, ca_bundle=issuer.ca_bundle, clock=mono, wall_clock=wall,
        cache_file=good,
    )  # fmt: skip
    assert len(list(await direct.get_keys())) == 1  # the same file, not through a link: used
    cache.unlink()
    cache.symlink_to(good)
    with pytest.raises(JwksError, match="jwks_unavailable: no key set loaded"):
        await source().get_keys()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An https URL whose server accepts TCP connections (the kernel's backlog) and never
    answers: the issuer is blackholed, every fetch runs into its timeout."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}{JWKS_PATH}"
    finally:
        listener.close()


async def test_a_blackholed_issuer_never_delays_a_call_that_has_keys(
    blackhole: str, clocks: tuple[FakeMonotonic, FakeWallClock], tmp_path: Path
) -> None:
    """A call waits for a fetch only when it needs one, and then at most the fetch timeout
    (start-up, then the copy on disk; an unknown kid, then token_kid_unknown). Stale keys are
    refetched in the background: the call answers from memory while the fetch still hangs."""
    mono, wall = clocks
    key = new_key()
    cache = tmp_path / "jwks-cache.json"
    cache.write_text(
        json.dumps(
            {"location": blackhole, "fetched_at": "2026-11-26T12:00:00Z",
             "jwks": jwks_bytes(key).decode()}
        )
    )  # fmt: skip
    source = JwksSource(
        blackhole, clock=mono, wall_clock=wall, cache_file=cache, fetch_timeout_s=1.0,
        min_refresh_interval_s=0,
    )  # fmt: skip
    tv = TokenVerifier(source, POLICY, wall)
    assert (await asyncio.wait_for(tv.verify(sign(key), None), 10)).sub == "alice"
    assert not tv.health().ok  # serving the copy on disk, and saying so
    await source.idle()
    assert tv.health().fetch_failures == 1 and "timed out" in (tv.health().last_error or "")
    with pytest.raises(TokenError) as info:
        await asyncio.wait_for(tv.verify(sign(key, kid="rotated-away"), None), 10)
    assert info.value.code == "token_kid_unknown"
    await source.idle()
    assert tv.health().fetch_failures == 2
    mono.advance(301)  # stale: a background refetch starts, the call answers from memory
    assert (await tv.verify(sign(key, claims(sub="bob")), None)).sub == "bob"
    assert source.fetch_count == 3 and tv.health().fetch_failures == 2  # still hanging
    await source.idle()
    assert tv.health().fetch_failures == 3
