"""Device identity through the real sidecar: every bad certificate is refused, nothing leaks.

gRPC's own TLS layer verifies the chain, the validity window and the certificate purpose
(clientAuth EKU) during the handshake, so those certificates never reach the per-call check
(the caller sees UNAVAILABLE with the TLS error); everything else is refused per call with
UNAUTHENTICATED and the stable code. In every case the upstream must not see the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.integration.conftest import Pki, channel, sidecar_assertion_pub
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.sidecar.server import Sidecar
from ztagent.tokens.assertion import AssertionVerifier

pytestmark = pytest.mark.integration

UNARY = f"/{SERVICE}/Unary"


def _load(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert_path.read_bytes()), key


async def call(pki: Pki, port: int, pair: builders.KeyPair | None, **kw: object) -> bytes:
    async with channel(pki, port, pair, **kw) as ch:  # type: ignore[arg-type]
        reply: bytes = await ch.unary_unary(UNARY)(b"ping", timeout=5)
        return reply


async def test_valid_device_is_admitted_and_identified(
    pki: Pki, sidecar: Sidecar, upstream: EchoUpstream
) -> None:
    assert await call(pki, sidecar.port, pki.mint("cam-7")) == b"ping"
    md = dict(upstream.seen[-1].metadata)
    assert md["x-ztagent-device-id"] == "cam-7"
    assert md["x-ztagent-spiffe-id"] == "spiffe://ztagent.dev/device/cam-7"


async def test_every_rpc_kind_carries_one_fresh_assertion_for_its_method(
    pki: Pki, sidecar: Sidecar, upstream: EchoUpstream
) -> None:
    """The workload's only source of the caller's identity: an assertion the sidecar signs
    per call, for that method, with the device of the certificate; a client's own
    x-ztagent-assertion never reaches the upstream."""
    verifier = AssertionVerifier([sidecar_assertion_pub(pki)])
    forged = (("x-ztagent-assertion", "forged.by.client"),)

    async def one() -> AsyncIterator[bytes]:
        yield b"x"

    async with channel(pki, sidecar.port, pki.mint("cam-7")) as ch:
        m = f"/{SERVICE}/"
        await ch.unary_unary(m + "Unary")(b"x", metadata=forged, timeout=5)
        _ = [r async for r in ch.unary_stream(m + "ServerStream")(b"x", metadata=forged, timeout=5)]
        await ch.stream_unary(m + "ClientStream")(one(), metadata=forged, timeout=5)
        _ = [r async for r in ch.stream_stream(m + "Bidi")(one(), metadata=forged, timeout=5)]
    seen = upstream.seen[-4:]
    assert [s.method for s in seen] == ["Unary", "ServerStream", "ClientStream", "Bidi"]
    decisions = set()
    for call_seen in seen:
        values = [v for k, v in call_seen.metadata if k == "x-ztagent-assertion"]
        assert len(values) == 1 and values[0] != "forged.by.client"
        who = verifier.verify(call_seen.metadata, f"/{SERVICE}/{call_seen.method}")
        assert (who.device_id, who.spiffe_id) == ("cam-7", "spiffe://ztagent.dev/device/cam-7")
        decisions.add(who.decision_id)
    assert len(decisions) == 4  # one admission, one decision id, one assertion per call


async def test_demo_device_from_ca_init_is_admitted(pki: Pki, sidecar: Sidecar) -> None:
    layout = pki.layout
    pair = builders.KeyPair(
        *_load(layout.device_cert("demo-device"), layout.device_key("demo-device"))
    )
    assert await call(pki, sidecar.port, pair) == b"ping"


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no_client_cert", grpc.StatusCode.UNAVAILABLE, None),
        ("other_ca", grpc.StatusCode.UNAVAILABLE, None),
        ("expired", grpc.StatusCode.UNAVAILABLE, None),
        ("not_yet_valid", grpc.StatusCode.UNAVAILABLE, None),
        ("lifetime_too_long", grpc.StatusCode.UNAUTHENTICATED, "cert_lifetime_too_long"),
        ("server_auth_only", grpc.StatusCode.UNAVAILABLE, None),
        ("no_uri_san", grpc.StatusCode.UNAUTHENTICATED, "spiffe_id_missing"),
        ("two_uri_sans", grpc.StatusCode.UNAUTHENTICATED, "spiffe_id_multiple"),
        ("wrong_trust_domain", grpc.StatusCode.UNAUTHENTICATED, "spiffe_id_wrong_trust_domain"),
        ("not_a_device", grpc.StatusCode.UNAUTHENTICATED, "spiffe_id_not_device"),
    ],
)
async def test_bad_certificates_are_refused(
    pki: Pki,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    case: str,
    status: grpc.StatusCode,
    code: str | None,
) -> None:
    _other_root, other_issuing = builders.new_ca("other", now=datetime.now(UTC))
    td = "spiffe://ztagent.dev/device"
    pairs: dict[str, builders.KeyPair | None] = {
        "no_client_cert": None,
        "other_ca": pki.mint(issuer=other_issuing),
        "expired": pki.mint(not_before=timedelta(days=-30), not_after=timedelta(minutes=-1)),
        "not_yet_valid": pki.mint(not_before=timedelta(hours=1), not_after=timedelta(days=2)),
        "lifetime_too_long": pki.mint(not_after=timedelta(days=91)),
        "server_auth_only": pki.mint(eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "no_uri_san": pki.mint(uris=[]),
        "two_uri_sans": pki.mint(uris=[f"{td}/a", f"{td}/b"]),
        "wrong_trust_domain": pki.mint(uris=["spiffe://evil.example/device/dev-1"]),
        "not_a_device": pki.mint(uris=["spiffe://ztagent.dev/workload/dev-1"]),
    }
    extra = [other_issuing.cert] if case == "other_ca" else []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(pki, sidecar.port, pairs[case], extra_chain=extra)
    assert info.value.code() == status, info.value.details()
    if code is not None:
        assert (info.value.details() or "").startswith(f"{code}: ")
        trailers = dict(info.value.trailing_metadata() or ())
        assert trailers["x-ztagent-error-code"] == code
    if case == "wrong_trust_domain":  # what was received and expected, as fields
        assert trailers["x-ztagent-error-received"] == '"evil.example"'
        assert trailers["x-ztagent-error-expected"] == '"ztagent.dev"'
    assert upstream.seen == []


async def test_revocation_takes_effect_without_restart(
    pki: Pki, sidecar: Sidecar, upstream: EchoUpstream
) -> None:
    cert_path = pki.layout.dir / "to-revoke.pem"
    ca_store.issue_device_cert(pki.layout.dir, "to-revoke", cert_path)
    pair = builders.KeyPair(*_load(cert_path, cert_path.with_suffix(".key")))
    assert await call(pki, sidecar.port, pair) == b"ping"
    ca_store.revoke(pki.layout.dir, cert_path=cert_path)
    for _ in range(50):  # reload_interval_s = 0.1
        try:
            await call(pki, sidecar.port, pair)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (err.details() or "").startswith("cert_revoked: ")
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("revocation was not picked up")
    # Other devices keep working.
    assert await call(pki, sidecar.port, pki.mint("still-good")) == b"ping"


async def test_health_does_not_bypass_the_identity_check(pki: Pki, sidecar: Sidecar) -> None:
    """Health used to answer SERVING to a revoked device and keep its Watch open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cert_path = pki.layout.dir / "watcher.pem"
    ca_store.issue_device_cert(pki.layout.dir, "watcher", cert_path)
    pair = builders.KeyPair(*_load(cert_path, cert_path.with_suffix(".key")))
    request = health_pb2.HealthCheckRequest(service="")
    async with channel(pki, sidecar.port, pair) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = await stub.Check(request, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = stub.Watch(request, timeout=30)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        ca_store.revoke(pki.layout.dir, cert_path=cert_path)
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # the open stream is ended
            while True:
                if await watch.read() is grpc.aio.EOF:
                    pytest.fail("the Watch of a revoked device ended without a status")
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (ended.value.details() or "").startswith("cert_revoked: ")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (info.value.details() or "").startswith("cert_revoked: ")
        assert dict(info.value.trailing_metadata() or ())["x-ztagent-error-code"] == "cert_revoked"
