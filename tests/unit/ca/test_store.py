"""The dev CA: files, permissions, extensions, revocation and CRL refresh."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.unit.pki._support import NOW, Pki
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.pki.errors import CaError, CertError
from ztagent.pki.verify import DevicePolicy, TrustMaterial, explain, verify_device_cert


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_lists_its_paths(session_pki: Pki) -> None:
    paths = vars(session_pki.layout)
    assert paths["crl"] == session_pki.dir / "crl.pem"
    assert paths["devices_dir"] == session_pki.dir / "devices"
    assert paths["state"] == session_pki.dir / "ca.db"
    assert len(paths) == 12


def test_init_writes_the_documented_files(session_pki: Pki) -> None:
    names = {p.relative_to(session_pki.dir).as_posix() for p in session_pki.dir.rglob("*")}
    assert {
        "root-ca.pem",
        "root-ca.key",
        "issuing-ca.pem",
        "issuing-ca.key",
        "ca-bundle.pem",
        "server.pem",
        "server.key",
        "crl.pem",
        "ca.db",
        "devices",
        "devices/demo-device.pem",
        "devices/demo-device.key",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]


def test_key_files_are_0600_pkcs8(session_pki: Pki) -> None:
    keys = list(session_pki.dir.rglob("*.key"))
    assert len(keys) == 4
    for key in keys:
        assert _mode(key) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_init_refuses_to_overwrite_without_force(session_pki: Pki, pki: Pki) -> None:
    with pytest.raises(CaError, match="already exists") as info:
        ca_store.init_ca(pki.dir, now=NOW)
    assert info.value.code == "ca_exists"
    assert pki.layout.root_cert.read_bytes() == session_pki.layout.root_cert.read_bytes()
    ca_store.init_ca(pki.dir, force=True, now=NOW)
    assert pki.layout.root_cert.read_bytes() != session_pki.layout.root_cert.read_bytes()


def test_issuing_ca_has_path_length_0_and_ca_extensions(session_pki: Pki) -> None:
    issuing = session_pki.issuing.cert
    bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = issuing.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    issuing.verify_directly_issued_by(session_pki.root.cert)
    root = session_pki.root.cert
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(days=3650)
    assert issuing.not_valid_after_utc - issuing.not_valid_before_utc == timedelta(days=1825)


def test_crl_is_signed_by_issuing_ca(session_pki: Pki) -> None:
    crl = x509.load_pem_x509_crl(session_pki.layout.crl.read_bytes())
    assert crl.issuer == session_pki.issuing.cert.subject
    assert crl.is_signature_valid(session_pki.issuing.cert.public_key())
    assert not crl.is_signature_valid(session_pki.root.cert.public_key())
    assert len(crl) == 0
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == builders.CRL_LIFETIME


def test_server_cert(session_pki: Pki) -> None:
    certs = x509.load_pem_x509_certificates(session_pki.layout.server_cert.read_bytes())
    assert [c.subject for c in certs[1:]] == [session_pki.issuing.cert.subject]
    server = certs[0]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert server.not_valid_after_utc - server.not_valid_before_utc <= timedelta(days=397)
    key = serialization.load_pem_private_key(session_pki.layout.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_demo_device_cert_shape(session_pki: Pki) -> None:
    certs = x509.load_pem_x509_certificates(
        session_pki.layout.device_cert("demo-device").read_bytes()
    )
    leaf = certs[0]
    assert certs[1] == session_pki.issuing.cert
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://ztagent.dev/device/demo-device")]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=30)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert 0 < leaf.serial_number < 2**160


def test_init_with_custom_trust_domain(tmp_path: Path) -> None:
    layout = ca_store.init_ca(tmp_path / "ca", "factory.example", demo_device_id="cam-1", now=NOW)
    assert ca_store.trust_domain_of(layout.dir) == "factory.example"
    policy = DevicePolicy("factory.example")
    trust = TrustMaterial.from_pem(layout.bundle.read_bytes(), layout.crl.read_bytes())
    got = explain(layout.device_cert("cam-1").read_bytes(), None, trust, policy, NOW)
    assert got.spiffe_id == "spiffe://factory.example/device/cam-1"
    with pytest.raises(CaError, match="must be lowercase") as info:
        ca_store.init_ca(tmp_path / "bad", "Factory.example", now=NOW)
    assert info.value.code == "trust_domain_invalid"


def test_issue_device_cert_writes_cert_and_key(pki: Pki) -> None:
    out = pki.dir / "issued" / "dev-3.pem"
    cert = ca_store.issue_device_cert(pki.dir, "dev-3", out, days=120, now=NOW)
    assert _mode(out.with_suffix(".key")) == 0o600
    assert x509.load_pem_x509_certificates(out.read_bytes())[0] == cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=120)
    with ca_store.database(pki.dir) as store:
        entry = store.issued(cert.serial_number)
    assert entry is not None and (entry.kind, entry.device_id) == ("device", "dev-3")
    assert entry.not_after == cert.not_valid_after_utc
    with pytest.raises(CaError, match="is not 1-128 characters") as info:
        ca_store.issue_device_cert(pki.dir, "../evil", out, now=NOW)
    assert info.value.code == "device_id_invalid"


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="no CA in") as info:
        ca_store.issue_device_cert(tmp_path, "dev-1", tmp_path / "d.pem", now=NOW)
    assert info.value.code == "ca_missing"


def test_revoke_rewrites_crl_and_is_idempotent(pki: Pki, policy: DevicePolicy) -> None:
    cert = ca_store.issue_device_cert(pki.dir, "dev-4", pki.dir / "d4.pem", now=NOW)
    before = x509.load_pem_x509_crl(pki.layout.crl.read_bytes())
    assert ca_store.revoke(pki.dir, serial=cert.serial_number, now=NOW) == cert.serial_number
    crl = x509.load_pem_x509_crl(pki.layout.crl.read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    old = before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == old + 1
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None and entry.revocation_date_utc == NOW
    assert crl.next_update_utc == NOW + builders.CRL_LIFETIME
    assert crl.is_signature_valid(pki.issuing.cert.public_key())
    # again, by file: same serial and first revocation date; the CRL is re-signed
    later = NOW + timedelta(hours=1)
    assert ca_store.revoke(pki.dir, cert_path=pki.dir / "d4.pem", now=later) == cert.serial_number
    crl2 = x509.load_pem_x509_crl(pki.layout.crl.read_bytes())
    assert len(crl2) == 1
    entry2 = crl2.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry2 is not None and entry2.revocation_date_utc == NOW
    assert crl2.next_update_utc == later + builders.CRL_LIFETIME
    with ca_store.database(pki.dir) as store:
        assert store.revocation(cert.serial_number) == NOW
        assert store.counts()[1] == 1
        latest = store.latest_crl()
    assert latest is not None and latest[1] == pki.layout.crl.read_bytes()  # served from the db
    with pytest.raises(CertError, match="cert_revoked"):
        verify_device_cert(cert, pki.trust(), policy, NOW + timedelta(hours=1))


def test_revoke_refuses_unknown_targets(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(CaError, match="not issued by this CA") as info:
        ca_store.revoke(pki.dir, serial=12345, now=NOW)
    assert info.value.code == "cert_not_found"
    with pytest.raises(CaError, match="exactly one of"):
        ca_store.revoke(pki.dir, now=NOW)
    with pytest.raises(CaError, match="not found"):
        ca_store.revoke(pki.dir, cert_path=tmp_path / "missing.pem", now=NOW)
    other = ca_store.init_ca(tmp_path / "other", now=NOW)
    with pytest.raises(CaError, match="was issued by") as info:
        ca_store.revoke(pki.dir, cert_path=other.device_cert("demo-device"), now=NOW)
    assert info.value.code == "cert_not_from_ca"


def test_write_crl_refreshes_next_update(pki: Pki) -> None:
    later = NOW + timedelta(days=5)
    crl = ca_store.write_crl(pki.dir, now=later)
    assert crl.next_update_utc == later + builders.CRL_LIFETIME
    assert crl.is_signature_valid(pki.issuing.cert.public_key())


@pytest.mark.parametrize(
    ("text", "value"), [("0x1f", 31), ("1F", 31), ("01:ab", 0x1AB), (" ff ", 255)]
)
def test_parse_serial(text: str, value: int) -> None:
    assert builders.parse_serial(text) == value


def test_parse_serial_refuses_junk() -> None:
    with pytest.raises(CaError, match="not hexadecimal"):
        builders.parse_serial("xyz")
