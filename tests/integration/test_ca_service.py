"""The CA's enrollment service on loopback: Enroll, Renew over mTLS, GetCACerts, GetCRL.

A real ``grpc.aio`` server with both ports on 127.0.0.1 port 0; the device side is played
by plain ``cryptography`` CSRs and grpc channels (the real device client is tested elsewhere).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import TRUST_DOMAIN, Pki
from ztagent._proto.v1 import enrollment_pb2, enrollment_pb2_grpc
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.ca.audit import audit_path, audit_revocation, verify_audit_log
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.ca.service import CaServer, start_ca_server
from ztagent.errors import ConfigError
from ztagent.pki.device_check import verify_device_cert
from ztagent.pki.policy import DevicePolicy
from ztagent.pki.trust import TrustMaterial

pytestmark = pytest.mark.integration

DEVICE = "edge-42"


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[CaServer]:
    running = await start_ca_server(
        pki.layout.dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0"
    )
    try:
        yield running
    finally:
        await running.stop(None)


@dataclass
class Device:
    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    def key_pem(self) -> bytes:
        return builders.key_pem(self.key)


def _csr(key: ec.EllipticCurvePrivateKey, cn: str | None = DEVICE) -> bytes:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _channel(pki: Pki, port: int, device: Device | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.layout.bundle.read_bytes(),
        private_key=device.key_pem() if device else None,
        certificate_chain=device.chain_pem if device else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def _enroll(
    pki: Pki, server: CaServer, token: str, csr: bytes
) -> enrollment_pb2.EnrollResponse:
    async with _channel(pki, server.enroll_port) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        request = enrollment_pb2.EnrollRequest(csr=csr, bootstrap_token=token)
        response: enrollment_pb2.EnrollResponse = await stub.Enroll(request, timeout=10)
        return response


async def _renew(
    pki: Pki, port: int, device: Device, new_key: ec.EllipticCurvePrivateKey
) -> enrollment_pb2.EnrollResponse:
    async with _channel(pki, port, device) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        request = enrollment_pb2.RenewRequest(csr=_csr(new_key))
        response: enrollment_pb2.EnrollResponse = await stub.Renew(request, timeout=10)
        return response


async def _refused(coro: object, status: grpc.StatusCode, code: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code() == status, info.value.details()
    details = info.value.details() or ""
    assert details.startswith(f"{code}: "), details
    assert "Traceback" not in details
    return details


def _check_device(pki: Pki, chain_pem: bytes, device_id: str) -> x509.Certificate:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    trust = TrustMaterial.from_pem(pki.layout.bundle.read_bytes(), pki.layout.crl.read_bytes())
    verified = verify_device_cert(leaf, trust, DevicePolicy(TRUST_DOMAIN), datetime.now(UTC))
    assert verified.device_id == device_id
    assert verified.spiffe_id == f"spiffe://{TRUST_DOMAIN}/device/{device_id}"
    return leaf


async def test_enroll_renew_revoke_and_crl(pki: Pki, server: CaServer) -> None:
    ca_dir = pki.layout.dir
    key = ec.generate_private_key(ec.SECP256R1())
    token = issue_bootstrap_token(ca_dir, DEVICE)

    # a CSR naming another device is refused and does not burn the token
    await _refused(
        _enroll(pki, server, token, _csr(key, cn="someone-else")),
        grpc.StatusCode.PERMISSION_DENIED,
        "token_device_mismatch",
    )
    # a broken CSR neither
    await _refused(
        _enroll(pki, server, token, b"not a csr"), grpc.StatusCode.INVALID_ARGUMENT, "csr_malformed"
    )

    response = await _enroll(pki, server, token, _csr(key))
    assert response.ca_bundle == pki.layout.bundle.read_bytes()
    assert (response.device_id, response.spiffe_id) == (
        DEVICE,
        f"spiffe://{TRUST_DOMAIN}/device/{DEVICE}",
    )
    leaf = _check_device(pki, response.certificate_chain, DEVICE)
    assert leaf.public_key() == key.public_key()
    assert response.serial == format(leaf.serial_number, "x")
    assert response.not_after == int(leaf.not_valid_after_utc.timestamp())
    device = Device(key, response.certificate_chain)

    # the token is single use
    other_key = ec.generate_private_key(ec.SECP256R1())
    details = await _refused(
        _enroll(pki, server, token, _csr(other_key)),
        grpc.StatusCode.UNAUTHENTICATED,
        "token_reused",
    )
    assert token not in details
    # an expired token
    old = issue_bootstrap_token(
        ca_dir, DEVICE, ttl_s=60, now=datetime.now(UTC) - timedelta(hours=2)
    )
    await _refused(
        _enroll(pki, server, old, _csr(other_key)), grpc.StatusCode.UNAUTHENTICATED, "token_expired"
    )

    # renew over mTLS with a new key: new serial, same device
    rotated = ec.generate_private_key(ec.SECP256R1())
    renewed = await _renew(pki, server.renew_port, device, rotated)
    new_leaf = _check_device(pki, renewed.certificate_chain, DEVICE)
    assert new_leaf.serial_number != leaf.serial_number
    assert new_leaf.public_key() == rotated.public_key()
    assert renewed.device_id == DEVICE

    # Renew on the enrollment port: no client certificate is asked for there
    await _refused(
        _renew(pki, server.enroll_port, device, rotated),
        grpc.StatusCode.UNAUTHENTICATED,
        "renew_cert_missing",
    )

    # revoke the current cert (as `ztagent ca revoke` does): renewal with it is refused
    current = Device(rotated, renewed.certificate_chain)
    serial = ca_store.revoke(ca_dir, serial=new_leaf.serial_number)
    audit_revocation(ca_dir, serial)
    await _refused(
        _renew(pki, server.renew_port, current, ec.generate_private_key(ec.SECP256R1())),
        grpc.StatusCode.UNAUTHENTICATED,
        "renew_cert_revoked",
    )

    async with _channel(pki, server.enroll_port) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        crl_response = await stub.GetCRL(enrollment_pb2.GetCRLRequest(), timeout=10)
        bundle_response = await stub.GetCACerts(enrollment_pb2.GetCACertsRequest(), timeout=10)
    crl = x509.load_pem_x509_crl(crl_response.crl)
    assert crl.get_revoked_certificate_by_serial_number(new_leaf.serial_number) is not None
    assert crl.is_signature_valid(pki.issuing.cert.public_key())
    assert bundle_response.ca_bundle == pki.layout.bundle.read_bytes()

    # the audit log: chained, with every event
    report = verify_audit_log(ca_dir)
    assert report.ok, report.reason
    lines = [json.loads(line) for line in audit_path(ca_dir).read_text().splitlines()]
    events = [e for e in lines if "checkpoint" not in e]  # each event is followed by one
    summary = [(e["event"], e.get("method"), e.get("code")) for e in events]
    assert summary == [
        ("refused", "enroll", "token_device_mismatch"),
        ("refused", "enroll", "csr_malformed"),
        ("issued", "enroll", None),
        ("refused", "enroll", "token_reused"),
        ("refused", "enroll", "token_expired"),
        ("issued", "renew", None),
        ("refused", "renew", "renew_cert_missing"),
        ("revoked", None, None),
        ("refused", "renew", "renew_cert_revoked"),
    ]
    assert events[2]["serial"] == response.serial and events[2]["device_id"] == DEVICE
    assert events[5]["previous_serial"] == response.serial
    assert events[7]["serial"] == renewed.serial and events[7]["device_id"] == DEVICE


async def test_a_token_nested_past_the_parser_is_malformed_not_an_internal_error(
    pki: Pki, server: CaServer
) -> None:
    """The token's header is parsed before its signature is checked, so anyone who can reach
    the enrollment port chooses it: a header nested 1,400 deep is UNAUTHENTICATED
    ``token_malformed`` like any other bad token, not a traceback answered
    ``ca_unavailable``."""
    header = base64.urlsafe_b64encode(b"[" * 1400 + b"]" * 1400).decode().rstrip("=")
    details = await _refused(
        _enroll(pki, server, f"{header}.e30.c2ln", _csr(ec.generate_private_key(ec.SECP256R1()))),
        grpc.StatusCode.UNAUTHENTICATED,
        "token_malformed",
    )
    assert "nested more than 32 levels" in details


async def test_renew_refuses_a_cert_from_another_ca(
    pki: Pki, server: CaServer, tmp_path: Path
) -> None:
    """The TLS layer already refuses a client cert that does not chain to the bundle."""
    other = ca_store.init_ca(tmp_path / "other", TRUST_DOMAIN)
    device_pem = other.device_cert("demo-device").read_bytes()
    key = serialization.load_pem_private_key(other.device_key("demo-device").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _renew(pki, server.renew_port, Device(key, device_pem), key)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_get_crl_re_signs_a_crl_close_to_next_update(pki: Pki) -> None:
    ca_dir = pki.layout.dir
    # 12 h of its 62 days left: well past half
    ca_store.write_crl(ca_dir, now=datetime.now(UTC) - timedelta(days=61, hours=12))
    before = x509.load_pem_x509_crl(pki.layout.crl.read_bytes())
    running = await start_ca_server(ca_dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0")
    try:
        async with _channel(pki, running.enroll_port) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            response = await stub.GetCRL(enrollment_pb2.GetCRLRequest(), timeout=10)
    finally:
        await running.stop(None)
    after = x509.load_pem_x509_crl(response.crl)
    number = after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    old_number = before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == old_number + 1
    assert after.next_update_utc is not None and before.next_update_utc is not None
    assert after.next_update_utc > before.next_update_utc


async def test_start_refuses_a_lifetime_over_90_days(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"ca.lifetime_days: 365 days"):
        await start_ca_server(
            pki.layout.dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0", lifetime_days=365
        )
