"""EK certificate checks against a generated manufacturer PKI and software-built EK publics."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SYM_DEF_OBJECT

from ztagent.errors import ConfigError
from ztagent.posture.ek_cert import (
    EkCertificateInfo,
    EkTrust,
    check_ek_certificate,
)
from ztagent.posture.errors import PostureError

NOW = datetime(2030, 1, 15, 12, 0, 0, tzinfo=UTC)
YEAR = timedelta(days=365)
EK_SERIAL = 0x1234ABCD
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
EK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# --- test material --------------------------------------------------------------------------


def ek_public(key: PrivateKey) -> bytes:
    """A marshalled EK TPM2B_PUBLIC (template EK-ECC256 / EK-RSA2048 attributes) for ``key``."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    return bytes(
        TPM2B_PUBLIC.from_pem(pem, objectAttributes=int(EK_ATTRS), symmetric=sym).marshal()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example TPM Vendor"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def make_ca(
    common_name: str,
    issuer: CA | None = None,
    *,
    ca: bool | None = True,
    path_length: int | None = None,
    key_cert_sign: bool = True,
    not_before: datetime = NOW - YEAR,
    not_after: datetime = NOW + 10 * YEAR,
    issuer_name: x509.Name | None = None,
) -> CA:
    """A CA (root when ``issuer`` is None) with an EC P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or (issuer.cert.subject if issuer else subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length), critical=True
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return CA(key, cert)


def make_ek_cert(
    issuer: CA,
    key: PublicKey,
    *,
    not_before: datetime = NOW - YEAR,
    not_after: datetime = NOW + 10 * YEAR,
    eku: list[ObjectIdentifier] | None = None,
) -> x509.Certificate:
    """An EK certificate shaped like a manufacturer's: empty subject, critical TPM SAN."""
    tpm_attributes = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(ObjectIdentifier("2.23.133.2.1"), "id:4558414D"),
                    x509.NameAttribute(ObjectIdentifier("2.23.133.2.2"), "EXAMPLE-TPM"),
                    x509.NameAttribute(ObjectIdentifier("2.23.133.2.3"), "id:00010002"),
                ]
            )
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key)
        .serial_number(EK_SERIAL)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.DirectoryName(tpm_attributes)]), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(eku if eku is not None else [TCG_KP_EK_CERTIFICATE]),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


@dataclass(frozen=True)
class Pki:
    root: CA
    intermediate: CA
    trust: EkTrust
    ek_key: ec.EllipticCurvePrivateKey
    ek_public: bytes


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = make_ca("Example TPM Root CA")
    intermediate = make_ca("Example TPM EK CA 1", root)
    ek_key = ec.generate_private_key(ec.SECP256R1())
    return Pki(
        root=root,
        intermediate=intermediate,
        trust=EkTrust((root.cert, intermediate.cert)),
        ek_key=ek_key,
        ek_public=ek_public(ek_key),
    )


def check(pki: Pki, cert: x509.Certificate | bytes | None, trust: EkTrust | None = None) -> None:
    data = der(cert) if isinstance(cert, x509.Certificate) else cert
    check_ek_certificate(pki.ek_public, data, trust or pki.trust, NOW)


# --- accepted -------------------------------------------------------------------------------


def test_good_chain_returns_issuer_serial_and_fingerprint(pki: Pki) -> None:
    cert = make_ek_cert(pki.intermediate, pki.ek_key.public_key())
    info = check_ek_certificate(pki.ek_public, der(cert), pki.trust, NOW)
    assert info == EkCertificateInfo(
        issuer="CN=Example TPM EK CA 1,O=Example TPM Vendor",
        serial="1234abcd",
        subject_fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def test_pem_certificate_accepted(pki: Pki) -> None:
    cert = make_ek_cert(pki.intermediate, pki.ek_key.public_key())
    info = check_ek_certificate(pki.ek_public, pem(cert), pki.trust, NOW)
    assert info.serial == "1234abcd"


def test_certificate_directly_under_root_accepted(pki: Pki) -> None:
    cert = make_ek_cert(pki.root, pki.ek_key.public_key())
    check(pki, cert)


def test_rsa_2048_ek_accepted(pki: Pki) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = make_ek_cert(pki.intermediate, key.public_key())
    info = check_ek_certificate(ek_public(key), der(cert), pki.trust, NOW)
    assert info.issuer == "CN=Example TPM EK CA 1,O=Example TPM Vendor"


def test_certificate_without_eku_accepted(pki: Pki) -> None:
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.intermediate.cert.subject)
        .public_key(pki.ek_key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - YEAR)
        .not_valid_after(NOW + YEAR)
        .sign(pki.intermediate.key, hashes.SHA256())
    )
    check(pki, cert)


def test_valid_renewed_intermediate_chosen_over_expired_one(pki: Pki) -> None:
    # Two intermediates share a name and key-less identity; only the renewed one is valid.
    old = make_ca("Example TPM EK CA 2", pki.root, not_after=NOW - timedelta(days=1))
    renewed = CA(
        old.key,
        x509.CertificateBuilder()
        .subject_name(old.cert.subject)
        .issuer_name(pki.root.cert.subject)
        .public_key(old.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - YEAR)
        .not_valid_after(NOW + YEAR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pki.root.key, hashes.SHA256()),
    )
    cert = make_ek_cert(old, pki.ek_key.public_key())
    check(pki, cert, EkTrust((pki.root.cert, old.cert, renewed.cert)))
    with pytest.raises(PostureError, match="ek_cert_expired"):
        check(pki, cert, EkTrust((pki.root.cert, old.cert)))


# --- ek_cert_missing / ek_cert_malformed ----------------------------------------------------


@pytest.mark.parametrize("missing", [None, b""])
def test_missing_certificate_refused(pki: Pki, missing: bytes | None) -> None:
    with pytest.raises(PostureError, match="ek_cert_missing: no EK certificate was sent"):
        check(pki, missing)


@pytest.mark.parametrize(
    "garbage",
    [b"\x30\x82\x01\x00not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n", b"x" * 20000],
)
def test_garbage_refused(pki: Pki, garbage: bytes) -> None:
    with pytest.raises(PostureError, match="ek_cert_malformed") as info:
        check(pki, garbage)
    assert info.value.code == "ek_cert_malformed"


def test_malformed_ek_public_refused(pki: Pki) -> None:
    cert = make_ek_cert(pki.intermediate, pki.ek_key.public_key())
    with pytest.raises(PostureError, match="evidence_malformed: EK public"):
        check_ek_certificate(b"\x00\x05junk!", der(cert), pki.trust, NOW)


# --- ek_cert_mismatch -----------------------------------------------------------------------


def test_certificate_for_another_ec_key_refused(pki: Pki) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    cert = make_ek_cert(pki.intermediate, other.public_key())
    with pytest.raises(
        PostureError,
        match=r"ek_cert_mismatch: EK certificate certifies EC secp256r1 .*expected the presented "
        r"EK EC secp256r1",
    ):
        check(pki, cert)


def test_certificate_for_other_curve_refused(pki: Pki) -> None:
    cert = make_ek_cert(pki.intermediate, ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(
        PostureError, match="ek_cert_mismatch: EK certificate certifies EC secp384r1"
    ):
        check(pki, cert)


def test_rsa_certificate_for_ecc_ek_refused(pki: Pki) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = make_ek_cert(pki.intermediate, rsa_key.public_key())
    with pytest.raises(
        PostureError, match="ek_cert_mismatch: EK certificate certifies RSA-2048 e=65537"
    ):
        check(pki, cert)


def test_certificate_for_another_rsa_key_refused(pki: Pki) -> None:
    ek = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = make_ek_cert(pki.intermediate, other.public_key())
    with pytest.raises(PostureError, match=r"ek_cert_mismatch: .*expected the presented EK RSA"):
        check_ek_certificate(ek_public(ek), der(cert), pki.trust, NOW)


# --- ek_cert_untrusted ----------------------------------------------------------------------


def test_certificate_from_another_manufacturer_refused(pki: Pki) -> None:
    other_root = make_ca("Other Vendor Root")
    other_ca = make_ca("Other Vendor EK CA", other_root)
    cert = make_ek_cert(other_ca, pki.ek_key.public_key())
    with pytest.raises(
        PostureError,
        match=r"ek_cert_untrusted: .*no CA in the bundle has subject "
        r"'CN=Other Vendor EK CA,O=Example TPM Vendor'",
    ):
        check(pki, cert)


def test_impostor_ca_with_trusted_name_refused(pki: Pki) -> None:
    # Same issuer name as the trusted intermediate, but a different key signed the EK cert.
    impostor = make_ca("Example TPM EK CA 1", make_ca("Example TPM Root CA"))
    cert = make_ek_cert(impostor, pki.ek_key.public_key())
    with pytest.raises(
        PostureError, match=r"ek_cert_untrusted: .*is not signed by the key of CA CN=Example TPM EK"
    ):
        check(pki, cert)


@pytest.mark.parametrize(
    ("ca", "reason"),
    [(False, "basicConstraints ca=False, expected ca=True"), (None, "has no basicConstraints")],
)
def test_intermediate_that_is_not_a_ca_refused(pki: Pki, ca: bool | None, reason: str) -> None:
    not_ca = make_ca("Example TPM Leaf Posing As CA", pki.root, ca=ca)
    cert = make_ek_cert(not_ca, pki.ek_key.public_key())
    with pytest.raises(PostureError, match=f"ek_cert_untrusted: .*{reason}"):
        check(pki, cert, EkTrust((pki.root.cert, not_ca.cert)))


def test_intermediate_without_key_cert_sign_refused(pki: Pki) -> None:
    no_sign = make_ca("Example TPM CRL Signer", pki.root, key_cert_sign=False)
    cert = make_ek_cert(no_sign, pki.ek_key.public_key())
    with pytest.raises(PostureError, match=r"ek_cert_untrusted: .*keyUsage lacks keyCertSign"):
        check(pki, cert, EkTrust((pki.root.cert, no_sign.cert)))


def test_path_length_constraint_enforced(pki: Pki) -> None:
    root = make_ca("Constrained Root", path_length=0)
    intermediate = make_ca("Under Constrained Root", root)
    cert = make_ek_cert(intermediate, pki.ek_key.public_key())
    with pytest.raises(PostureError, match=r"ek_cert_untrusted: .*pathLenConstraint 0, 1 CA"):
        check(pki, cert, EkTrust((root.cert, intermediate.cert)))
    check(pki, make_ek_cert(root, pki.ek_key.public_key()), EkTrust((root.cert,)))


def test_bundle_without_the_root_refused(pki: Pki) -> None:
    cert = make_ek_cert(pki.intermediate, pki.ek_key.public_key())
    with pytest.raises(
        PostureError,
        match=r"ek_cert_untrusted: .*no CA in the bundle has subject 'CN=Example TPM Root CA",
    ):
        check(pki, cert, EkTrust((pki.intermediate.cert,)))


def test_chain_longer_than_five_links_refused(pki: Pki) -> None:
    cas = [make_ca("Deep Root")]
    for depth in range(5):
        cas.append(make_ca(f"Deep CA {depth}", cas[-1]))
    trust = EkTrust(tuple(ca.cert for ca in cas))
    with pytest.raises(PostureError, match=r"ek_cert_untrusted: .*no root within 5 links"):
        check(pki, make_ek_cert(cas[-1], pki.ek_key.public_key()), trust)
    # Five links (EK -> 4 intermediates -> root) is the limit and passes.
    check(pki, make_ek_cert(cas[-2], pki.ek_key.public_key()), trust)


def test_issuer_loop_terminates_and_is_refused(pki: Pki) -> None:
    # A and B each certify the other's name and key; neither is self-signed.
    key_a, key_b = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cross(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, by: CA) -> CA:
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - YEAR)
            .not_valid_after(NOW + YEAR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(by.key, hashes.SHA256())
        )
        return CA(key, cert)

    a = cross("Loop A", key_a, "Loop B", CA(key_b, pki.root.cert))
    b = cross("Loop B", key_b, "Loop A", CA(key_a, pki.root.cert))
    cert = make_ek_cert(a, pki.ek_key.public_key())
    with pytest.raises(PostureError, match="ek_cert_untrusted"):
        check(pki, cert, EkTrust((a.cert, b.cert)))


def test_eku_without_tcg_ek_certificate_refused(pki: Pki) -> None:
    cert = make_ek_cert(
        pki.intermediate, pki.ek_key.public_key(), eku=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    with pytest.raises(
        PostureError,
        match=r"ek_cert_untrusted: EK certificate extendedKeyUsage is 1\.3\.6\.1\.5\.5\.7\.3\.2, "
        r"expected tcg-kp-EKCertificate 2\.23\.133\.8\.1",
    ):
        check(pki, cert)


# --- ek_cert_expired ------------------------------------------------------------------------


def test_expired_ek_certificate_refused(pki: Pki) -> None:
    cert = make_ek_cert(
        pki.intermediate, pki.ek_key.public_key(), not_after=NOW - timedelta(seconds=1)
    )
    with pytest.raises(
        PostureError,
        match=r"ek_cert_expired: EK certificate is valid from notBefore .* to notAfter "
        r"2030-01-15T11:59:59\+00:00, now is 2030-01-15T12:00:00\+00:00",
    ):
        check(pki, cert)


def test_not_yet_valid_ek_certificate_refused(pki: Pki) -> None:
    cert = make_ek_cert(
        pki.intermediate, pki.ek_key.public_key(), not_before=NOW + timedelta(days=1)
    )
    with pytest.raises(PostureError, match="ek_cert_expired: EK certificate is valid from"):
        check(pki, cert)


def test_expired_intermediate_refused(pki: Pki) -> None:
    old = make_ca("Example TPM EK CA 0", pki.root, not_after=NOW - timedelta(days=1))
    cert = make_ek_cert(old, pki.ek_key.public_key())
    with pytest.raises(
        PostureError,
        match="ek_cert_expired: CA certificate CN=Example TPM EK CA 0,O=Example TPM Vendor "
        "is valid from notBefore",
    ):
        check(pki, cert, EkTrust((pki.root.cert, old.cert)))


def test_expired_root_refused(pki: Pki) -> None:
    root = make_ca("Old Root", not_after=NOW - timedelta(days=1))
    cert = make_ek_cert(root, pki.ek_key.public_key())
    with pytest.raises(PostureError, match="ek_cert_expired: CA certificate CN=Old Root"):
        check(pki, cert, EkTrust((root.cert,)))


def test_naive_now_is_a_programming_error(pki: Pki) -> None:
    cert = make_ek_cert(pki.intermediate, pki.ek_key.public_key())
    with pytest.raises(ValueError, match="timezone-aware"):
        check_ek_certificate(pki.ek_public, der(cert), pki.trust, NOW.replace(tzinfo=None))


# --- EkTrust --------------------------------------------------------------------------------


def test_trust_loads_pem_bundle(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "ek-ca.pem"
    path.write_bytes(pem(pki.root.cert, pki.intermediate.cert))
    trust = EkTrust.load(path)
    assert trust.certificates == (pki.root.cert, pki.intermediate.cert)
    cert = make_ek_cert(pki.intermediate, pki.ek_key.public_key())
    check(pki, cert, trust)


def test_trust_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"posture\.ek_ca_bundle: cannot read .*absent\.pem"):
        EkTrust.load(tmp_path / "absent.pem")


def test_trust_custom_key_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"devices.ek_roots: cannot read") as info:
        EkTrust.load(tmp_path / "absent.pem", key="devices.ek_roots")
    assert info.value.key == "devices.ek_roots"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is empty, expected PEM CA certificates"),
        (b"  \n", "is empty, expected PEM CA certificates"),
        (b"not a pem file\n", "is not a PEM certificate bundle"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "is not a PEM"),
    ],
)
def test_trust_unusable_file_names_the_key(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "ek-ca.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"posture.ek_ca_bundle: .*{reason}") as info:
        EkTrust.load(path)
    assert info.value.key == "posture.ek_ca_bundle"


def test_trust_der_file_refused(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "ek-ca.der"
    path.write_bytes(der(pki.root.cert))
    with pytest.raises(ConfigError, match=r"posture.ek_ca_bundle: .*is not a PEM"):
        EkTrust.load(path)


def test_trust_without_a_root_refused(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "ek-ca.pem"
    path.write_bytes(pem(pki.intermediate.cert))
    with pytest.raises(ConfigError, match=r"posture.ek_ca_bundle: .*no self-signed root"):
        EkTrust.load(path)


def test_empty_trust_refused() -> None:
    with pytest.raises(ValueError, match="at least one CA certificate"):
        EkTrust(())
