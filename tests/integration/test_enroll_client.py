"""``enroll`` / ``renew`` / ``renew_watch`` against the real CA service on loopback.

The CA is ``ztagent.ca.service.start_ca_server`` over a fresh ``ca init`` directory,
on ephemeral ports, stopped after each test. PKCS#11 runs on a private SoftHSM2 token per
test: the device key is generated on the token, is never extractable, and signs both the CSR
and the mTLS handshake of ``Renew`` (gRPC's custom-signer hook).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass

from tests.fixtures.softhsm import SoftHsm, softhsm_fixture  # noqa: F401 (the fixture)
from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.ca.service import CaServer, start_ca_server
from ztagent.device.enroll import EnrollResult, enroll, renew, renew_at, renew_watch
from ztagent.device.errors import CaUnreachable, EnrollClientError
from ztagent.device.keystores import KeyStoreError, Pkcs11KeyStore
from ztagent.enrollment import EnrollError

pytestmark = pytest.mark.integration

DEVICE = "edge-7"


class Ca:
    def __init__(self, ca_dir: Path) -> None:
        self.dir = ca_dir
        self.layout = ca_store.CaLayout(ca_dir)
        self.server: CaServer | None = None
        self.enroll_port = 0
        self.renew_port = 0

    async def start(self) -> None:
        self.server = await start_ca_server(
            self.dir,
            listen=f"127.0.0.1:{self.enroll_port}",
            renew_listen=f"127.0.0.1:{self.renew_port}",
            lifetime_days=3,
        )
        self.enroll_port, self.renew_port = self.server.enroll_port, self.server.renew_port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.enroll_port}"

    @property
    def renew_address(self) -> str:
        return f"127.0.0.1:{self.renew_port}"

    def token(self, device_id: str = DEVICE) -> str:
        return issue_bootstrap_token(self.dir, device_id)

    async def enroll(
        self,
        out: Path,
        key_store: str = "file",
        *,
        token: str | None = None,
        pin: str | None = None,
        now: datetime | None = None,
    ) -> EnrollResult:
        return await enroll(
            self.address,
            token or self.token(),
            self.layout.bundle,
            out,
            key_store,
            pin=pin,
            renew_server=self.renew_address,
            now=now,
        )


@pytest.fixture
async def authority(tmp_path: Path) -> AsyncIterator[Ca]:
    ca_store.init_ca(tmp_path / "ca")
    running = Ca(tmp_path / "ca")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def _chain_to_ca(device_dir: Path, layout: ca_store.CaLayout) -> x509.Certificate:
    leaf, *_ = x509.load_pem_x509_certificates((device_dir / "device.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
    root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    leaf.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    return leaf


def _spiffe(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


async def test_enroll_with_file_store(authority: Ca, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    result = await authority.enroll(out)
    leaf = _chain_to_ca(out, authority.layout)
    assert _spiffe(leaf) == [f"spiffe://ztagent.dev/device/{DEVICE}"]
    assert stat.S_IMODE(os.stat(out / "device.key").st_mode) == 0o600
    assert json.loads((out / "keystore.json").read_text()) == {"type": "file"}
    state = json.loads((out / "enrollment.json").read_text())
    assert state["device_id"] == DEVICE
    assert state["serial"] == format(leaf.serial_number, "x") == result.serial
    assert state["renew_server"] == authority.renew_address
    assert (out / "ca-bundle.pem").read_bytes() == authority.layout.bundle.read_bytes()
    assert not list(out.glob(".*.tmp")) and not (out / ".device.key.new").exists()

    with pytest.raises(EnrollClientError, match=r"already_enrolled: .* use renew"):
        await authority.enroll(out)


async def test_enrollment_records_the_renewal_port_the_ca_announced(
    authority: Ca, tmp_path: Path
) -> None:
    """Without --renew-server the device used to record port 8445 whatever the CA listened
    on; the CA now announces its bound renewal port and the device records that."""
    assert authority.renew_port != 8445
    out = tmp_path / "dev"
    await enroll(authority.address, authority.token(), authority.layout.bundle, out, "file")
    state = json.loads((out / "enrollment.json").read_text())
    assert state["renew_server"] == f"127.0.0.1:{authority.renew_port}"
    renewed = await renew(out)  # and renewal finds the CA there
    assert renewed.device_id == DEVICE


async def test_reused_token_is_refused_and_no_key_left(authority: Ca, tmp_path: Path) -> None:
    token = authority.token()
    await authority.enroll(tmp_path / "a", token=token)
    with pytest.raises(EnrollError, match="token_reused"):
        await authority.enroll(tmp_path / "b", token=token)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == []


async def test_pkcs11_enroll_and_renew_over_mtls_with_the_hsm_key(
    authority: Ca, softhsm: SoftHsm, tmp_path: Path
) -> None:
    out = tmp_path / "dev"
    await authority.enroll(out, softhsm.uri("device"), pin=softhsm.pin)
    assert not (out / "device.key").exists()
    record = json.loads((out / "keystore.json").read_text())
    assert record["type"] == "pkcs11" and softhsm.pin not in json.dumps(record)
    first = _chain_to_ca(out, authority.layout)

    store = Pkcs11KeyStore.load(record["uri"], record["module"], softhsm.pin)
    try:
        assert store.public_key() == first.public_key()
        private = store.private_key_object
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]
    finally:
        store.close()

    renewed = await renew(out, pin=softhsm.pin)  # mTLS signed on the token
    second = _chain_to_ca(out, authority.layout)
    assert renewed.device_id == DEVICE and renewed.key_rotated
    assert renewed.previous_serial == format(first.serial_number, "x")
    assert second.serial_number != first.serial_number
    assert _spiffe(second) == _spiffe(first)
    assert second.public_key() != first.public_key()
    new_record = json.loads((out / "keystore.json").read_text())
    assert new_record["uri"] != record["uri"]
    lib = pkcs11.lib(softhsm.module)
    with lib.get_token(token_label=softhsm.token_label).open(user_pin=softhsm.pin) as session:
        keys = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        assert len(keys) == 1  # the rotated-out key was deleted from the token
        assert keys[0][Attribute.EXTRACTABLE] is False

    kept = await renew(out, pin=softhsm.pin, rotate_key=False)
    third = _chain_to_ca(out, authority.layout)
    assert not kept.key_rotated and third.public_key() == second.public_key()
    assert third.serial_number != second.serial_number


async def test_renew_on_the_enrollment_port_is_refused(authority: Ca, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    await authority.enroll(out)
    with pytest.raises(EnrollError, match="renew_cert_missing"):
        await renew(out, server=authority.address)


async def test_expired_cert_recovery_keeps_the_device_id(authority: Ca, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    await authority.enroll(out)
    first = _chain_to_ca(out, authority.layout)
    later = first.not_valid_after_utc + timedelta(seconds=1)

    with pytest.raises(EnrollClientError, match=r"cert_expired: .*fresh bootstrap token"):
        await renew(out, now=later)
    with pytest.raises(EnrollClientError, match=r"device_id_mismatch: .*'other-1'"):
        await authority.enroll(out, token=authority.token("other-1"), now=later)
    assert (
        (out / "device.pem").read_bytes().startswith(first.public_bytes(serialization.Encoding.PEM))
    )

    result = await authority.enroll(out, now=later)
    second = _chain_to_ca(out, authority.layout)
    assert result.recovered and result.device_id == DEVICE
    assert second.serial_number != first.serial_number
    assert _spiffe(second) == _spiffe(first)
    assert await renew(out)  # the recovered directory renews normally


async def test_renew_watch_retries_until_the_ca_is_back(authority: Ca, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    await authority.enroll(out)
    cert = _chain_to_ca(out, authority.layout)
    due = renew_at(cert) + timedelta(seconds=1)
    await authority.stop()

    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            await authority.start()  # same ports as before

    results = await renew_watch(
        out, sleep=fake_sleep, clock=lambda: due, rng=lambda: 0.0, max_attempts=4
    )
    assert sleeps == [1.0, 2.0, 4.0]  # three failures, exponential backoff, no jitter
    assert len(results) == 1
    assert results[0].device_id == DEVICE
    assert results[0].serial != format(cert.serial_number, "x")


async def test_renew_with_ca_down_is_a_transport_error(authority: Ca, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    await authority.enroll(out)
    await authority.stop()
    with pytest.raises(CaUnreachable, match="ca_unreachable: Renew: UNAVAILABLE"):
        await renew(out)
    assert not (out / ".device.key.new").exists()


async def test_handshake_is_signed_on_the_token_and_a_failing_token_fails_the_call(
    authority: Ca, softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "dev"
    await authority.enroll(out, softhsm.uri("device"), pin=softhsm.pin)
    real = Pkcs11KeyStore.sign_digest_ecdsa
    calls: list[bytes] = []

    def counting(self: Pkcs11KeyStore, digest: bytes) -> bytes:
        calls.append(digest)
        return real(self, digest)

    monkeypatch.setattr(Pkcs11KeyStore, "sign_digest_ecdsa", counting)
    await renew(out, pin=softhsm.pin, rotate_key=False)
    assert len(calls) == 2  # the CSR, then the TLS 1.3 CertificateVerify of the handshake

    def failing_after_csr(self: Pkcs11KeyStore, digest: bytes) -> bytes:
        calls.append(digest)
        if len(calls) > 3:
            raise KeyStoreError("keystore_failed", "token removed")
        return real(self, digest)

    monkeypatch.setattr(Pkcs11KeyStore, "sign_digest_ecdsa", failing_after_csr)
    serial = json.loads((out / "enrollment.json").read_text())["serial"]
    with pytest.raises(CaUnreachable, match="UNAVAILABLE"):
        await renew(out, pin=softhsm.pin, rotate_key=False, rpc_timeout_s=10)
    assert json.loads((out / "enrollment.json").read_text())["serial"] == serial
