"""Pure X.509 building blocks of the CA: keys, CA and leaf certificates, CRLs, PEM.

No IO: every function takes what it needs (an issuer ``KeyPair``, the time) and returns
the object; ``ztagent.ca.store`` keeps the CA directory, its state and its lock.

An issuer's key is a ``SigningKey`` (``ztagent.ca.ca_keys``): a ``cryptography`` private key,
which signs as ever, or a ``CaKey`` held on a token, whose certificates and CRLs are assembled
around a signature made on the token and verified before they are returned. ``_sign_cert`` and
``_sign_crl`` are the one place that tells the two apart.
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

from ztagent.ca import ca_keys
from ztagent.ca.ca_keys import SigningKey
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
    """A certificate with its private key (in memory, or a ``CaKey`` on a token)."""

    cert: x509.Certificate
    key: SigningKey


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


def _sign_cert(
    builder: x509.CertificateBuilder, key: SigningKey, verify_with: object
) -> x509.Certificate:
    """``builder`` signed with ``key`` (ECDSA with SHA-256); a token key's result is checked
    with ``verify_with``, the issuer's public key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return builder.sign(key, hashes.SHA256())
    return ca_keys.sign_certificate(builder, key, verify_with)


def _sign_crl(
    builder: x509.CertificateRevocationListBuilder, issuer: KeyPair
) -> x509.CertificateRevocationList:
    if isinstance(issuer.key, ec.EllipticCurvePrivateKey):
        return builder.sign(issuer.key, hashes.SHA256())
    return ca_keys.sign_crl(builder, issuer.key, issuer.cert.public_key())


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
    key: SigningKey | None = None,
) -> KeyPair:
    """A CA certificate: self-signed root when ``parent`` is None, else an intermediate.

    ``key``: the CA's key (a fresh P-256 key by default; a ``CaKey`` for a key on a token)."""
    key = key if key is not None else new_key()
    public = key.public_key()
    subject = _name(subject_cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(parent.cert.subject if parent else subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(_aki(parent), critical=False)
        return KeyPair(_sign_cert(builder, parent.key, parent.cert.public_key()), key)
    return KeyPair(_sign_cert(builder, key, public), key)


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
    return _sign_cert(builder, issuer.key, issuer.cert.public_key())


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


def new_ca(
    name: str, *, now: datetime, issuing_key: SigningKey | None = None
) -> tuple[KeyPair, KeyPair]:
    """A root CA and an issuing CA (path length 0) under it, in memory; ``issuing_key`` is
    the issuing CA's key when it is not a fresh one (a ``CaKey`` on a token)."""
    start = _trunc(now) - BACKDATE
    root = build_ca(f"{name} root CA", not_before=start, not_after=start + ROOT_LIFETIME)
    issuing = build_ca(
        f"{name} issuing CA",
        not_before=start,
        not_after=start + ISSUING_LIFETIME,
        parent=root,
        path_length=0,
        key=issuing_key,
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
    return _sign_crl(builder, issuer)


# --- serialisation helpers ----------------------------------------------------------------


def _trunc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).replace(microsecond=0)


def _now(now: datetime | None) -> datetime:
    return _trunc(now if now is not None else datetime.now(UTC))


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: SigningKey) -> bytes:
    """PKCS#8 PEM of a key in memory (``ca_state_invalid`` for a key held on a token)."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError("ca_state_invalid", f"the {key.description()} cannot be written to a file")
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
