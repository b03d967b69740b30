"""Certificate lifecycle at the sidecar: server cert rotation under load, connection age,
and CRLs fetched from a source, verified, kept on disk."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.config import load_config
from ztagent.pki.crl_update import accept_crl_update
from ztagent.pki.errors import CertError
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

UNARY = f"/{SERVICE}/Unary"


async def test_server_cert_rotates_while_a_client_calls_in_a_loop(
    pki: Pki, upstream: EchoUpstream
) -> None:
    config = write_config(
        pki,
        {SERVICE: upstream.address},
        extra="",
    )
    # Short connection age: the client's connection is renewed during the test and the new
    # handshake must present the rotated certificate.
    text = config.read_text().replace(
        "grace_period_s = 5",
        "grace_period_s = 5\nmax_connection_age_s = 1\nmax_connection_age_grace_s = 1",
    )
    config.write_text(text)
    car = Sidecar(load_config(config))
    await car.start()
    first = pki.layout.server_cert.read_bytes()
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal calls
        async with channel(pki, car.port, pki.mint("loop")) as ch:
            while not stop.is_set():
                try:
                    await ch.unary_unary(UNARY)(b"x", timeout=5, wait_for_ready=True)
                    calls += 1
                except grpc.aio.AioRpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                await asyncio.sleep(0.01)

    task = asyncio.create_task(client())
    try:
        await asyncio.sleep(0.5)
        # Rotate: a new server key and certificate from the same CA (key first, then cert:
        # the sidecar only swaps once the pair matches).
        pair = builders.build_leaf(
            pki.issuing,
            subject_cn="ztagent sidecar (rotated)",
            uris=[],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            not_before=datetime.now(UTC) - timedelta(minutes=1),
            not_after=datetime.now(UTC) + timedelta(days=30),
            dns=("localhost",),
            ips=("127.0.0.1", "::1"),
        )
        pki.layout.server_key.write_bytes(builders.key_pem(pair.key))
        pki.layout.server_cert.write_bytes(builders.cert_pem(pair.cert, pki.issuing.cert))
        await asyncio.sleep(2.5)  # > reload interval + connection age + grace
        served = await asyncio.to_thread(_served_certificate, pki, car.port)
    finally:
        stop.set()
        await task
        await car.stop(0)
    assert failures == []
    assert calls > 20
    assert pki.layout.server_cert.read_bytes() != first
    assert served == pair.cert.public_bytes(Encoding.DER)  # new handshakes get the new cert


def _served_certificate(pki: Pki, port: int) -> bytes:
    """The certificate the sidecar presents to a new TLS handshake (h2 ALPN, mTLS)."""
    import socket
    import ssl
    import tempfile

    device = pki.mint("probe")
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert.write_bytes(builders.cert_pem(device.cert))
        key.write_bytes(builders.key_pem(device.key))
        context = ssl.create_default_context(cafile=str(pki.layout.bundle))
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def _ca_device(pki: Pki, name: str) -> tuple[Path, builders.KeyPair]:
    """A device certificate issued by the CA store (so ``ca_store.revoke`` can revoke it):
    its path and its key pair."""
    from tests.integration.test_sidecar_identity import _load

    cert_path = pki.layout.dir / f"{name}.pem"
    ca_store.issue_device_cert(pki.layout.dir, name, cert_path)
    return cert_path, builders.KeyPair(*_load(cert_path, cert_path.with_suffix(".key")))


async def test_revoked_device_on_an_open_connection_is_cut_off(
    pki: Pki, upstream: EchoUpstream
) -> None:
    car = Sidecar(load_config(write_config(pki, {SERVICE: upstream.address})))
    await car.start()
    cert_path, pair = _ca_device(pki, "cam-open")
    try:
        async with channel(pki, car.port, pair) as ch:
            call = ch.unary_unary(UNARY)
            assert await call(b"before", timeout=5) == b"before"
            ca_store.revoke(pki.layout.dir, cert_path=cert_path)
            for _ in range(100):  # the same HTTP/2 connection, still open
                try:
                    await call(b"after", timeout=5)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert (err.details() or "").startswith("cert_revoked: ")
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the revoked device kept calling")
    finally:
        await car.stop(0)


async def test_an_open_stream_of_a_device_revoked_later_is_ended(
    pki: Pki, upstream: EchoUpstream
) -> None:
    """A bidirectional stream admitted before the revocation: the sidecar checks its
    credentials again every tls.reload_interval_s and ends it UNAUTHENTICATED cert_revoked
    (the upstream call cancelled), with a decision-log line marked ``open_call``."""
    car = Sidecar(load_config(write_config(pki, {SERVICE: upstream.address})))
    await car.start()
    cert_path, pair = _ca_device(pki, "cam-stream")
    try:
        async with channel(pki, car.port, pair) as ch:
            stream = ch.stream_stream(f"/{SERVICE}/Bidi")(timeout=30)
            await stream.write(b"abc")
            assert await stream.read() == b"cba"
            ca_store.revoke(pki.layout.dir, cert_path=cert_path)
            with pytest.raises(grpc.aio.AioRpcError):  # idle, as a Watch is: ended for it
                await asyncio.wait_for(stream.read(), 5)  # the recheck comes within 0.1 s
            assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await stream.details() or "").startswith("cert_revoked: ")
    finally:
        await car.stop(0)
    log_path = pki.layout.dir.parent / "decisions.jsonl"
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    ended = [line for line in lines if (line.get("refusal") or {}).get("open_call")]
    assert len(ended) == 1 and ended[0]["refusal"]["code"] == "cert_revoked"
    assert ended[0]["method"] == "Bidi"


async def test_crl_fetched_from_source_verified_and_kept_on_disk(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """tls.crl_source = file:<the CA's crl.pem>; the sidecar's own copy is tls.crl."""
    local_crl = tmp_path / "sidecar-crl.pem"
    shutil.copy(pki.layout.crl, local_crl)
    config = write_config(pki, {SERVICE: upstream.address})
    text = config.read_text().replace(
        f'crl = "{pki.layout.crl}"',
        f'crl = "{local_crl}"\ncrl_source = "file:{pki.layout.crl}"\ncrl_refresh_interval_s = 0.1',
    )
    config.write_text(text)
    car = Sidecar(load_config(config))
    await car.start()
    cert_path, pair = _ca_device(pki, "cam-crl")
    try:
        async with channel(pki, car.port, pair) as ch:
            assert await ch.unary_unary(UNARY)(b"x", timeout=5) == b"x"
            ca_store.revoke(pki.layout.dir, cert_path=cert_path)  # the CA publishes a new CRL
            for _ in range(100):
                if local_crl.read_bytes() == pki.layout.crl.read_bytes():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the new CRL was not fetched")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                for _ in range(40):
                    await ch.unary_unary(UNARY)(b"x", timeout=5)
                    await asyncio.sleep(0.05)
            assert (info.value.details() or "").startswith("cert_revoked: ")
    finally:
        await car.stop(0)

    # Offline start: the source is gone, the last good CRL on disk is used.
    pki.layout.crl.unlink()
    car = Sidecar(load_config(config))
    await car.start()
    try:
        assert car.crl_fetcher is not None and not car.crl_fetcher.health().ok
        async with channel(pki, car.port, pair) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(UNARY)(b"x", timeout=5)
        assert (info.value.details() or "").startswith("cert_revoked: ")
    finally:
        await car.stop(0)


def test_crl_updates_are_verified_and_never_roll_back(pki: Pki) -> None:
    bundle = pki.layout.bundle.read_bytes()
    old = pki.layout.crl.read_bytes()
    cert_path = pki.layout.dir / "cam-rb.pem"
    ca_store.issue_device_cert(pki.layout.dir, "cam-rb", cert_path)
    ca_store.revoke(pki.layout.dir, cert_path=cert_path)
    new = pki.layout.crl.read_bytes()
    # After the revocation: a validation time taken before it could fall in the second
    # before the new CRL's thisUpdate (crl_not_yet_valid), as it once did here.
    now = datetime.now(UTC) + timedelta(seconds=1)
    assert accept_crl_update(new, bundle, old, now) == new
    assert accept_crl_update(new, bundle, new, now) is None  # nothing new
    with pytest.raises(CertError) as info:
        accept_crl_update(old, bundle, new, now)  # replaying the old CRL would un-revoke
    assert info.value.code == "crl_rollback"
    _root, other_issuing = builders.new_ca("other", now=now)
    forged = builders.build_crl(
        builders.KeyPair(pki.issuing.cert, other_issuing.key),
        {},
        number=999,
        this_update=now - timedelta(minutes=1),
        next_update=now + timedelta(days=7),
    )
    with pytest.raises(CertError) as info:
        accept_crl_update(forged.public_bytes(Encoding.PEM), bundle, new, now)
    assert info.value.code == "crl_bad_signature"


def test_a_recreated_ca_replaces_a_stored_crl_it_does_not_vouch_for(pki: Pki) -> None:
    """After `make certs` the issuing CA has the same name and a new key: the stored CRL (higher
    number, signed by the old key) no longer verifies, so it is no floor for the new CA's first
    CRL. Without this, every device was refused crl_bad_signature until var/ was wiped."""
    now = datetime.now(UTC)
    _root, old_issuing = builders.new_ca("ztagent dev", now=now)
    stale = builders.build_crl(
        builders.KeyPair(pki.issuing.cert, old_issuing.key),
        {},
        number=999,
        this_update=now - timedelta(minutes=1),
        next_update=now + timedelta(days=7),
    ).public_bytes(Encoding.PEM)
    fresh = pki.layout.crl.read_bytes()
    assert accept_crl_update(fresh, pki.layout.bundle.read_bytes(), stale, now) == fresh


def test_a_crl_slightly_ahead_of_the_node_clock_is_accepted(pki: Pki) -> None:
    """Clock skew: a CRL whose thisUpdate is up to 5 minutes ahead is taken (the CA's clock
    runs a little ahead of the node's); further ahead is crl_not_yet_valid."""
    now = datetime.now(UTC)
    bundle = pki.layout.bundle.read_bytes()

    def crl(ahead: timedelta, number: int) -> bytes:
        return builders.build_crl(
            pki.issuing,
            {},
            number=number,
            this_update=now + ahead,
            next_update=now + ahead + timedelta(days=7),
        ).public_bytes(Encoding.PEM)

    ahead = crl(timedelta(minutes=2), 100)
    assert accept_crl_update(ahead, bundle, None, now) == ahead
    with pytest.raises(CertError) as info:
        accept_crl_update(crl(timedelta(minutes=10), 101), bundle, None, now)
    assert info.value.code == "crl_not_yet_valid"
    assert "more than 300 s after" in info.value.message


@pytest.mark.parametrize(
    ("maximum", "accepted"),
    [("TLSv1_1", False), ("TLSv1_2", True), ("TLSv1_3", True)],
)
async def test_tls_versions(pki: Pki, upstream: EchoUpstream, maximum: str, accepted: bool) -> None:
    """TLS 1.2 is the minimum the sidecar accepts; a client that allows 1.3 gets 1.3."""
    import socket
    import ssl
    import tempfile
    import warnings

    car = Sidecar(load_config(write_config(pki, {SERVICE: upstream.address})))
    await car.start()
    device = pki.mint("tls-probe")

    def handshake() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            cert.write_bytes(builders.cert_pem(device.cert))
            key.write_bytes(builders.key_pem(device.key))
            context = ssl.create_default_context(cafile=str(pki.layout.bundle))
            context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["h2"])
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            with warnings.catch_warnings():  # TLSv1_1 is deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                context.maximum_version = getattr(ssl.TLSVersion, maximum)
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions
            with (
                socket.create_connection(("127.0.0.1", car.port), timeout=5) as sock,
                context.wrap_socket(sock, server_hostname="localhost") as tls,
            ):
                return tls.version() or ""

    try:
        if accepted:
            version = await asyncio.to_thread(handshake)
            assert version == ("TLSv1.2" if maximum == "TLSv1_2" else "TLSv1.3")
        else:
            with pytest.raises(ssl.SSLError) as info:
                await asyncio.to_thread(handshake)
            # Refused by the server (alert or closed connection; gRPC logs UNSUPPORTED_PROTOCOL),
            # not by the client failing to offer TLS 1.1 at all.
            assert "no_protocols_available" not in str(info.value).lower(), info.value
    finally:
        await car.stop(0)


async def test_overall_health_says_not_serving_when_the_crl_ran_out(
    pki: Pki, upstream: EchoUpstream
) -> None:
    """Health used to stay SERVING while every device was refused crl_expired (fail closed):
    the overall status now follows the trust that would refuse everyone, on the mTLS port and
    on the plain health listener a kubelet probe uses (no client certificate)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    plain = '[health]\naddress = "127.0.0.1:0"\n'

    async def probe(port: int) -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            return int(reply.status)

    now = datetime.now(UTC)
    expired = builders.build_crl(
        pki.issuing,
        {},
        number=500,
        this_update=now - timedelta(days=10),
        next_update=now - timedelta(hours=1),
    )
    pki.layout.crl.write_bytes(expired.public_bytes(Encoding.PEM))
    car = Sidecar(load_config(write_config(pki, {SERVICE: upstream.address}, extra=plain)))
    await car.start()
    try:
        assert car.trust_refusing(now) is not None
        assert "crl_expired: the CRL was usable until" in (car.trust_refusing(now) or "")
        request = health_pb2.HealthCheckRequest(service="")
        status = await health.aio.HealthServicer.Check(car.health, request, None)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert car.health_port != 0
        assert await probe(car.health_port) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await car.stop(0)
    fresh = builders.build_crl(
        pki.issuing, {}, number=501, this_update=now, next_update=now + timedelta(days=7)
    )
    pki.layout.crl.write_bytes(fresh.public_bytes(Encoding.PEM))
    car = Sidecar(load_config(write_config(pki, {SERVICE: upstream.address}, extra=plain)))
    await car.start()
    try:
        assert car.trust_refusing(now) is None
        status = await health.aio.HealthServicer.Check(car.health, request, None)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        port = car.health_port
        assert await probe(port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await car.stop(0)
    with pytest.raises(grpc.aio.AioRpcError) as info:  # stopped with the sidecar
        await probe(port)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
