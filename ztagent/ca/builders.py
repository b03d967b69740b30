"""Pure X.509 building blocks of the CA: keys, CA and leaf certificates, CRLs, PEM.

No IO: every function takes what it needs (an issuer ``KeyPair``, the time) and returns
the object; ``ztagent.ca.store`` keeps the CA directory, its state and its lock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from ztagent.pki.errors import CaError
from ztagent.pki.spiffe import device_spiffe_id

DEFAULT_TRUST_DOMAIN = "ztagent.dev"
ROOT_LIFETIME = timedelta(days=3650)
ISSUING_LIFETIME = timedelta(days=1825)
SERVER_LIFETIME = timedelta(days=397)
DEVICE_DAYS = 30
CRL_LIFETIME = timedelta(days=62)
"""Default CRL validity (nextUpdate - thisUpdate). The CA re-signs at half of it, so a sidecar
that synced holds a CRL with at least 31 days left: the CRL's share of the 30-day offline
budget (README, Offline budget). ``ca serve`` / ``ca revoke --crl-validity`` override it."""
BACKDATE = timedelta(minutes=5)
"""notBefore is set this far before ``now`` (clock skew); notAfter = notBefore + lifetime."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


# --- building blocks (no IO) -------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, org: str = "ztagent") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: KeyPair) -> x509.AuthorityKeyIdentifier:
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_ca(
    subject_cn: str,
    *,
    not_before: datetime,
    not_after: datetime,
    parent: KeyPair | None = None,
    path_length: int | None = None,
) -> KeyPair:
    """A CA certificate: self-signed root when ``parent`` is None, else an intermediate."""
    key = new_key()
    subject = _name(subject_cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent.cert.subject if parent else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(_aki(parent), critical=False)
    signer = parent.key if parent else key
    return KeyPair(builder.sign(signer, hashes.SHA256()), key)


def build_leaf(
    issuer: KeyPair,
    *,
    subject_cn: str,
    uris: Sequence[str],
    eku: Sequence[ObjectIdentifier] | None,
    not_before: datetime,
    not_after: datetime,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> KeyPair:
    """An end-entity certificate; ``eku=None`` leaves the EKU extension out.

    Used for the real server and device certs and, by tests, to mint broken ones.
    """
    key = new_key()
    cert = sign_leaf(
        issuer,
        key.public_key(),
        subject_cn=subject_cn,
        uris=uris,
        eku=eku,
        not_before=not_before,
        not_after=not_after,
        dns=dns,
        ips=ips,
    )
    return KeyPair(cert, key)


def sign_leaf(
    issuer: KeyPair,
    public_key: CertificatePublicKeyTypes,
    *,
    subject_cn: str,
    uris: Sequence[str],
    eku: Sequence[ObjectIdentifier] | None,
    not_before: datetime,
    not_after: datetime,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """``build_leaf`` for a public key held elsewhere (a CSR's): returns the certificate only.

    ``extensions`` are added as non-critical extensions (the AK-name extension).
    """
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def build_device(
    issuer: KeyPair, trust_domain: str, device_id: str, *, now: datetime, days: int = DEVICE_DAYS
) -> KeyPair:
    """A device cert: clientAuth EKU only, one URI SAN ``spiffe://<td>/device/<id>``."""
    not_before = _trunc(now) - BACKDATE
    return build_leaf(
        issuer,
        subject_cn=device_id,
        uris=[device_spiffe_id(trust_domain, device_id)],
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=not_before,
        not_after=not_before + timedelta(days=days),
    )


def new_ca(name: str, *, now: datetime) -> tuple[KeyPair, KeyPair]:
    """A root CA and an issuing CA (path length 0) under it, in memory."""
    start = _trunc(now) - BACKDATE
    root = build_ca(f"{name} root CA", not_before=start, not_after=start + ROOT_LIFETIME)
    issuing = build_ca(
        f"{name} issuing CA",
        not_before=start,
        not_after=start + ISSUING_LIFETIME,
        parent=root,
        path_length=0,
    )
    return root, issuing


def build_crl(
    issuer: KeyPair,
    revoked: Mapping[int, datetime],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer`` listing ``revoked`` (serial -> revocation time)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(issuer.key, hashes.SHA256())


# --- serialisation helpers ----------------------------------------------------------------


def _trunc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).replace(microsecond=0)


def _now(now: datetime | None) -> datetime:
    return _trunc(now if now is not None else datetime.now(UTC))


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def serial_hex(serial: int) -> str:
    """Lowercase hex without leading zeros: the form used in logs, ca.json and the CLI."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """Parse a serial given as hex (``0x`` prefix and ``:`` separators allowed)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise CaError("revoke_target", f"serial {text!r} is not hexadecimal") from None
    if value <= 0:
        raise CaError("revoke_target", f"serial {text!r} is not a positive number")
    return value
