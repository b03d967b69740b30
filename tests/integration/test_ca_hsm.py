"""The CA's issuing key on a PKCS#11 token (a private SoftHSM2 token per test).

``ca init --key-store pkcs11:...`` generates the issuing CA key on the token (never
extractable, sensitive; no ``issuing-ca.key``), and everything it signs goes through the
token: certificates and CRLs (assembled around the token's signature), bootstrap tokens and
the audit log's checkpoints. Checked with cryptography, ``openssl verify``, the bootstrap
token verifier, ``ztagent log verify`` and a full enrollment against the running CA service.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute

from tests.fixtures.softhsm import SoftHsm, softhsm_fixture  # noqa: F401 (the fixture)
from ztagent.ca import ca_keys
from ztagent.ca import store as ca_store
from ztagent.ca.audit import audit_path, audit_revocation, verify_audit_log
from ztagent.ca.bootstrap import issue_bootstrap_token, verify_bootstrap_token
from ztagent.ca.issuance import IssuancePolicy, issue_for
from ztagent.ca.service import start_ca_server
from ztagent.cli import main
from ztagent.device.enroll import enroll, renew
from ztagent.enrollment import EnrollError
from ztagent.pkcs11_keys import PIN_ENV, close_all_sessions
from ztagent.pki.errors import CaError

pytestmark = pytest.mark.integration

TRUST_DOMAIN = "ztagent.dev"
KEY_STORE_ERROR = r"issuing CA key store pkcs11:token=ztagent-test;object=issuing-ca;id=\S+ "


@pytest.fixture
def hsm_ca(tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A CA whose issuing key is on the token; the PIN in ``ZTAGENT_PKCS11_PIN``."""
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    ca_dir = tmp_path / "ca"
    ca_store.init_ca(ca_dir, TRUST_DOMAIN, key_store=softhsm.uri("issuing-ca"))
    try:
        yield ca_dir
    finally:
        ca_keys.forget_token_keys()


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _issuing_public(layout: ca_store.CaLayout) -> ec.EllipticCurvePublicKey:
    key = _cert(layout.issuing_cert).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _openssl_verify(
    layout: ca_store.CaLayout, leaf: Path, *crl: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", *crl, "-CAfile", str(layout.bundle), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_init_keeps_the_issuing_key_on_the_token_non_extractable(
    hsm_ca: Path, softhsm: SoftHsm
) -> None:
    layout = ca_store.CaLayout(hsm_ca)
    assert not layout.issuing_key.exists()
    assert layout.root_key.exists()  # the root CA key stays a file (README)
    record = json.loads(ca_keys.keystore_path(hsm_ca).read_text())
    assert set(record) == {"type", "uri", "module"} and record["type"] == "pkcs11"
    assert record["uri"].startswith("pkcs11:token=ztagent-test;object=issuing-ca;id=")
    assert softhsm.pin not in json.dumps(record)

    issuing = ca_store.load_issuing(layout)
    assert isinstance(issuing.key, ca_keys.TokenCaKey)
    assert issuing.key.public_key() == issuing.cert.public_key()
    private = issuing.key.store.private_key_object
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.NEVER_EXTRACTABLE] is True
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        private[Attribute.VALUE]

    # what init signed with the token key: the issuing CA's children and the first CRL
    issuing.cert.verify_directly_issued_by(_cert(layout.root_cert))
    _cert(layout.server_cert).verify_directly_issued_by(issuing.cert)
    _cert(layout.device_cert("demo-device")).verify_directly_issued_by(issuing.cert)
    assert x509.load_pem_x509_crl(layout.crl.read_bytes()).is_signature_valid(
        _issuing_public(layout)
    )
    assert _openssl_verify(layout, layout.server_cert).returncode == 0


def test_enrollment_path_certificate_and_crl_verify(hsm_ca: Path, tmp_path: Path) -> None:
    layout = ca_store.CaLayout(hsm_ca)
    device_key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_for(hsm_ca, "edge-1", device_key.public_key(), IssuancePolicy(), datetime.now(UTC))
    issuing_cert = _cert(layout.issuing_cert)
    cert.verify_directly_issued_by(issuing_cert)
    other = ca_store.issue_device_for_key(hsm_ca, "edge-2", device_key.public_key())
    other.verify_directly_issued_by(issuing_cert)

    leaf = tmp_path / "edge-1.pem"
    leaf.write_bytes(ca_store.cert_pem(cert))
    ok = _openssl_verify(layout, leaf)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stdout + ok.stderr

    ca_store.revoke(hsm_ca, serial=cert.serial_number)
    crl = x509.load_pem_x509_crl(layout.crl.read_bytes())
    assert crl.is_signature_valid(_issuing_public(layout))
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    refused = _openssl_verify(layout, leaf, "-crl_check", "-CRLfile", str(layout.crl))
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    fine = tmp_path / "edge-2.pem"
    fine.write_bytes(ca_store.cert_pem(other))
    assert _openssl_verify(layout, fine, "-crl_check", "-CRLfile", str(layout.crl)).returncode == 0


def test_bootstrap_token_and_audit_checkpoints_are_signed_on_the_token(hsm_ca: Path) -> None:
    layout = ca_store.CaLayout(hsm_ca)
    issuing_cert = _cert(layout.issuing_cert)
    token = issue_bootstrap_token(hsm_ca, "edge-3")
    claims = verify_bootstrap_token(token, issuing_cert, TRUST_DOMAIN, datetime.now(UTC))
    assert claims.device_id == "edge-3"
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload[:-2]}{'AA' if payload[-2:] != 'AA' else 'BB'}.{signature}"
    with pytest.raises(EnrollError, match=r"token_bad_signature|token_malformed"):
        verify_bootstrap_token(forged, issuing_cert, TRUST_DOMAIN, datetime.now(UTC))

    demo = _cert(layout.device_cert("demo-device"))
    serial = ca_store.revoke(hsm_ca, serial=demo.serial_number)
    audit_revocation(hsm_ca, serial)
    audit_revocation(hsm_ca, serial, actor="test")
    assert verify_audit_log(hsm_ca).ok
    log = str(audit_path(hsm_ca))
    assert main(["log", "verify", "--key", str(layout.issuing_cert), log]) == 0
    assert main(["log", "verify", "--key", str(layout.root_cert), log]) == 1  # another key


def test_cli_init_with_a_pin_file(
    tmp_path: Path,
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    ca_dir = tmp_path / "ca"
    try:
        code = main(
            [
                "ca", "init", "--dir", str(ca_dir),
                "--key-store", softhsm.uri("issuing-ca"), "--pin-file", str(pin_file),
            ]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert "issuing_key        on the token: pkcs11:token=ztagent-test" in out
        layout = ca_store.CaLayout(ca_dir)
        assert not layout.issuing_key.exists()
        record = json.loads(ca_keys.keystore_path(ca_dir).read_text())
        assert record["pin_file"] == str(pin_file) and softhsm.pin not in json.dumps(record)

        # later commands find the PIN through the recorded pin file (no env, no flag)
        assert main(["ca", "token", "--dir", str(ca_dir), "--device-id", "edge-4"]) == 0
        token = capsys.readouterr().out.strip()
        issuing_cert = _cert(layout.issuing_cert)
        verify_bootstrap_token(token, issuing_cert, TRUST_DOMAIN, datetime.now(UTC))
        demo = layout.device_cert("demo-device")
        assert main(["ca", "revoke", "--dir", str(ca_dir), "--cert", str(demo)]) == 0
        crl = x509.load_pem_x509_crl(layout.crl.read_bytes())
        assert crl.is_signature_valid(_issuing_public(layout))
        assert crl.get_revoked_certificate_by_serial_number(_cert(demo).serial_number)
        assert (
            main(["log", "verify", "--key", str(layout.issuing_cert), str(audit_path(ca_dir))]) == 0
        )
    finally:
        ca_keys.forget_token_keys()


def test_a_wrong_pin_is_a_clear_error_naming_the_key_store(
    hsm_ca: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    layout = ca_store.CaLayout(hsm_ca)
    ca_keys.forget_token_keys()
    close_all_sessions()  # nothing logged in: the token itself judges the PIN
    with pytest.raises(
        CaError, match=KEY_STORE_ERROR + r".*: keystore_pin_incorrect: .*refused the PIN"
    ):
        ca_store.load_issuing(layout, pin="0000")

    monkeypatch.setenv(PIN_ENV, "0000")
    capsys.readouterr()
    assert main(["ca", "token", "--dir", str(hsm_ca), "--device-id", "edge-5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ztagent: error: ca_unavailable: issuing CA key store pkcs11:token="), err
    assert "keystore_pin_incorrect" in err and "Traceback" not in err and err.count("\n") == 1

    monkeypatch.delenv(PIN_ENV)
    with pytest.raises(
        CaError, match=r"ca_unavailable: issuing CA key store .* needs the token's PIN"
    ):
        ca_store.load_issuing(layout)

    # and at init: nothing of a CA is left behind, a retry with the right PIN works
    pin_file = tmp_path / "wrong.pin"
    pin_file.write_text("0000\n")
    again = tmp_path / "ca2"
    spec = "pkcs11:token=ztagent-test;object=second"
    assert (
        main(["ca", "init", "--dir", str(again), "--key-store", spec, "--pin-file", str(pin_file)])
        == 1
    )
    err = capsys.readouterr().err
    assert "key store pkcs11:token=ztagent-test;object=second" in err, err
    assert "keystore_pin_incorrect" in err and "Traceback" not in err
    assert not ca_store.CaLayout(again).root_cert.exists()


def test_a_token_without_the_key_is_a_clear_error(
    hsm_ca: Path, softhsm: SoftHsm, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = ca_store.CaLayout(hsm_ca)
    ca_store.load_issuing(layout).key.destroy()  # type: ignore[union-attr]
    with pytest.raises(CaError, match=KEY_STORE_ERROR + r".*: keystore_key_missing: "):
        ca_store.load_issuing(layout)
    assert main(["ca", "token", "--dir", str(hsm_ca), "--device-id", "edge-6"]) == 1
    err = capsys.readouterr().err
    assert "ca_state_invalid: issuing CA key store" in err and "keystore_key_missing" in err
    assert "Traceback" not in err

    # a spec naming a token that is not there
    with pytest.raises(
        CaError, match=r"key store pkcs11:token=no-such-token.*keystore_unavailable"
    ):
        ca_store.init_ca(
            hsm_ca.parent / "ca3",
            key_store=f"pkcs11:token=no-such-token;object=k?module-path={softhsm.module}",
        )


def test_a_token_key_that_is_not_the_certificates_is_refused(
    hsm_ca: Path, softhsm: SoftHsm
) -> None:
    """The record names another key on the token: loading it fails closed."""
    other = ca_keys.create_token_key(ca_keys.parse_token_spec(softhsm.uri("intruder")), softhsm.pin)
    path = ca_keys.keystore_path(hsm_ca)
    path.write_text(json.dumps({**json.loads(path.read_text()), "uri": str(other.store.uri)}))
    other.close()
    with pytest.raises(CaError, match="holds another key than the issuing CA certificate's"):
        ca_store.load_issuing(ca_store.CaLayout(hsm_ca))


async def test_full_enrollment_against_the_ca_service(
    hsm_ca: Path, softhsm: SoftHsm, tmp_path: Path
) -> None:
    """Enroll and renew against ``start_ca_server`` with the issuing key on the token; the
    device's own key is on the same token (one shared logged-in session for both)."""
    layout = ca_store.CaLayout(hsm_ca)
    server = await start_ca_server(hsm_ca, listen="127.0.0.1:0", renew_listen="127.0.0.1:0")
    try:
        out = tmp_path / "device"
        result = await enroll(
            f"127.0.0.1:{server.enroll_port}",
            issue_bootstrap_token(hsm_ca, "edge-7"),
            layout.bundle,
            out,
            softhsm.uri("device"),
            pin=softhsm.pin,
            renew_server=f"127.0.0.1:{server.renew_port}",
        )
        assert result.device_id == "edge-7"
        issuing_cert = _cert(layout.issuing_cert)
        first = _cert(out / "device.pem")
        first.verify_directly_issued_by(issuing_cert)
        assert _openssl_verify(layout, out / "device.pem").returncode == 0

        renewed = await renew(out, pin=softhsm.pin)  # mTLS with the device's token key
        second = _cert(out / "device.pem")
        second.verify_directly_issued_by(issuing_cert)
        assert renewed.key_rotated and second.serial_number != first.serial_number
    finally:
        await server.stop(None)
    report = verify_audit_log(hsm_ca)
    assert report.ok
    events = [json.loads(line) for line in audit_path(hsm_ca).read_text().splitlines()]
    assert [e["method"] for e in events if e.get("event") == "issued"] == ["enroll", "renew"]
    assert main(["log", "verify", "--key", str(layout.issuing_cert), str(audit_path(hsm_ca))]) == 0
