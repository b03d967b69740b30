"""The issuance policy: CSR checks (signature, key strength) and what the CA puts in certs."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.ca.issuance import IssuancePolicy, check_csr, issue_for
from ztagent.enrollment import STATUS_BY_CODE, EnrollError
from ztagent.errors import ConfigError
from ztagent.pki.device_check import verify_device_cert
from ztagent.pki.policy import DevicePolicy
from ztagent.pki.trust import TrustMaterial

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
TD = "ztagent.dev"

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@pytest.fixture(scope="module")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(
        tmp_path_factory.mktemp("ca") / "ca", TD, now=NOW - timedelta(days=1)
    ).dir


@pytest.fixture
def ca_dir(session_ca: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ca"
    shutil.copytree(session_ca, target)
    return target


def _csr_der(
    key: PrivateKey, builder: x509.CertificateSigningRequestBuilder | None = None
) -> bytes:
    builder = builder or x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algo = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, algo).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
    ],
    ids=["p256", "p384", "ed25519", "rsa2048"],
)
def test_accepted_keys(key: PrivateKey) -> None:
    csr = check_csr(_csr_der(key))
    assert csr.public_key() == key.public_key()


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (rsa.generate_private_key(65537, 1024), "RSA 1024-bit"),
        (ec.generate_private_key(ec.SECP256K1()), "EC secp256k1"),
        (ec.generate_private_key(ec.SECP521R1()), "EC secp521r1"),
        (ed448.Ed448PrivateKey.generate(), "Ed448"),
    ],
    ids=["rsa1024", "secp256k1", "p521", "ed448"],
)
def test_weak_or_unlisted_keys_are_refused(key: PrivateKey, shown: str) -> None:
    with pytest.raises(EnrollError, match=rf"^csr_weak_key: key is {shown} \(expected EC P-256"):
        check_csr(_csr_der(key))


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()],
    ids=["p256", "ed25519"],
)
def test_csr_with_a_flipped_signature_byte_is_refused(key: PrivateKey) -> None:
    der = bytearray(_csr_der(key))
    der[-1] ^= 0x01  # the last byte belongs to the signature value
    with pytest.raises(EnrollError, match=r"^csr_bad_signature: CSR signature does not verify"):
        check_csr(bytes(der))


def test_malformed_csrs_are_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(EnrollError, match=r"^csr_malformed: not a DER PKCS#10"):
        check_csr(pem)
    with pytest.raises(EnrollError, match=r"^csr_malformed: CSR is empty"):
        check_csr(b"")
    with pytest.raises(EnrollError, match=r"^csr_malformed: CSR is 20000 bytes"):
        check_csr(b"\x30" * 20000)


def test_lifetime_policy_is_capped_at_90_days() -> None:
    assert IssuancePolicy().lifetime_days == 90  # renewal at 2/3 leaves 30 days
    assert IssuancePolicy(90).lifetime_days == 90
    with pytest.raises(ConfigError, match=r"ca.lifetime_days: 365 days \(expected 1 to 90\)"):
        IssuancePolicy(365)
    with pytest.raises(ConfigError, match=r"ca.lifetime_days: 0 days"):
        IssuancePolicy(0)


def test_issued_cert_is_what_the_ca_decides(ca_dir: Path) -> None:
    """The CSR asks for a CA cert with serverAuth, DNS names and a long subject: all ignored."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("evil.example"), x509.RFC822Name("a@evil.example")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    csr = check_csr(_csr_der(key, builder))
    cert = issue_for(ca_dir, "dev-1", csr.public_key(), IssuancePolicy(30), NOW)

    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "ztagent"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/device/dev-1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30)
    assert cert.serial_number.bit_length() > 64  # random (159 bits); < 2^64 has odds 2^-95

    # the sidecar accepts it as device dev-1
    layout = ca_store.CaLayout(ca_dir)
    trust = TrustMaterial.from_pem(layout.bundle.read_bytes(), layout.crl.read_bytes())
    device = verify_device_cert(cert, trust, DevicePolicy(TD), NOW + timedelta(minutes=1))
    assert device.device_id == "dev-1"


def test_issued_cert_never_outlives_90_days(ca_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_for(ca_dir, "dev-1", key.public_key(), IssuancePolicy(90), NOW)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90)
    # even a policy object forced past validation is capped
    forced = IssuancePolicy(30)
    object.__setattr__(forced, "lifetime_days", 365)
    cert = issue_for(ca_dir, "dev-1", key.public_key(), forced, NOW)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=90)


def test_issue_for_rechecks_the_key(ca_dir: Path) -> None:
    weak = rsa.generate_private_key(65537, 1024).public_key()
    with pytest.raises(EnrollError, match=r"^csr_weak_key: key is RSA 1024-bit"):
        issue_for(ca_dir, "dev-1", weak, IssuancePolicy(), NOW)


def test_issuance_is_recorded_so_revoke_finds_it(ca_dir: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_for(ca_dir, "dev-7", key.public_key(), IssuancePolicy(), NOW)
    with ca_store.database(ca_dir) as store:
        entry = store.issued(cert.serial_number)
    assert entry is not None and (entry.kind, entry.device_id) == ("device", "dev-7")
    pem_file = tmp_path / "dev-7.pem"
    pem_file.write_bytes(builders.cert_pem(cert))
    assert ca_store.revoke(ca_dir, cert_path=pem_file, now=NOW) == cert.serial_number
    crl = x509.load_pem_x509_crl(ca_store.CaLayout(ca_dir).crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_missing_ca_is_ca_unavailable(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EnrollError, match=r"^ca_unavailable: cannot issue: ca_missing"):
        issue_for(tmp_path, "dev-1", key.public_key(), IssuancePolicy(), NOW)


def test_every_code_has_a_status_and_unknown_codes_are_refused() -> None:
    assert EnrollError("token_reused", "x").rpc_status() == "UNAUTHENTICATED"
    assert EnrollError("csr_weak_key", "x").rpc_status() == "INVALID_ARGUMENT"
    assert EnrollError("token_device_mismatch", "x").rpc_status() == "PERMISSION_DENIED"
    assert EnrollError("ca_unavailable", "x").details == "ca_unavailable: x"
    assert EnrollError("ek_cert_untrusted", "x").rpc_status() == "PERMISSION_DENIED"
    assert EnrollError("ek_cert_malformed", "x").rpc_status() == "INVALID_ARGUMENT"
    assert len(STATUS_BY_CODE) == 20
    with pytest.raises(ValueError, match="unknown EnrollError code 'nope'"):
        EnrollError("nope", "x")
