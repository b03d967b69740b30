"""A development "TPM manufacturer": a CA that issues EK certificates and stores them in swtpm.

Real TPMs leave the factory with an EK certificate in NV, signed by their manufacturer; swtpm
has none. For tests and ``make run`` this module plays the manufacturer: ``init`` makes a CA
(``ek-ca.pem`` / ``ek-ca.key`` in a directory), ``issue_ek_certificate`` certifies an EK
public area with the TCG EK Credential Profile's shape (empty subject, critical
subjectAltName naming the TPM, keyUsage keyEncipherment, EKU tcg-kp-EKCertificate), and
``provision`` writes it into a TPM. Never use this CA for real devices.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from ztagent.device.tpm import DeviceTpm
from ztagent.files import KEY_MODE, make_private_dir, write_atomic
from ztagent.posture.quote import p256_public_key

CA_CERT = "ek-ca.pem"
CA_KEY = "ek-ca.key"
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
TCG_AT_TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
TCG_AT_TPM_MODEL = ObjectIdentifier("2.23.133.2.2")
TCG_AT_TPM_VERSION = ObjectIdentifier("2.23.133.2.3")


def _key_usage(**set_flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{name: set_flags.get(name, False) for name in names})


def init(directory: Path, *, name: str = "ztagent dev TPM manufacturer CA") -> Path:
    """Creates the CA if ``directory`` has none; returns the CA certificate's path."""
    cert_path = directory / CA_CERT
    if cert_path.exists() and (directory / CA_KEY).exists():
        return cert_path
    make_private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(directory / CA_KEY, key_pem, KEY_MODE)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue_ek_certificate(
    directory: Path, ek_public: bytes, *, days: int = 3650, now: datetime | None = None
) -> bytes:
    """A DER EK certificate for ``ek_public`` signed by the CA in ``directory``."""
    ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = now or datetime.now(UTC)
    tpm_name = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(TCG_AT_TPM_MANUFACTURER, "id:5A544147"),  # "ZTAG"
                    x509.NameAttribute(TCG_AT_TPM_MODEL, "swtpm"),
                    x509.NameAttribute(TCG_AT_TPM_VERSION, "id:00010000"),
                ]
            )
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(p256_public_key(ek_public, "EK public"))
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_name)]), True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_encipherment=True, key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def provision(tpm: DeviceTpm, directory: Path) -> bytes:
    """Certifies the TPM's EK with the CA in ``directory`` and stores the certificate in it."""
    der = issue_ek_certificate(directory, tpm.ek_public())
    tpm.provision_ek_certificate(der)
    return der
