"""The CA's issuance policy: which CSRs it accepts and what it puts in the certificate.

Only a CSR's public key and its self-signature matter. The CA decides everything else:
subject CN = the device id, exactly one URI SAN ``spiffe://<td>/device/<id>``, EKU clientAuth
only, keyUsage digitalSignature, a random serial (``x509.random_serial_number``: 159 bits),
and a lifetime of ``min(policy.lifetime_days, 90)`` days whatever the CSR asks. After a
TPM-bound enrollment (and on renewal of such a certificate) it also carries the AK's TPM name
in the non-critical AK-name extension.

Accepted keys: EC P-256 and P-384, Ed25519, RSA 2048 to 8192 bits. Refused as
``csr_weak_key``: RSA under 2048 bits (and over 8192: a verification cost, not a strength,
problem), EC on any other curve (P-521, secp256k1, P-192, ...), Ed448, DSA.

Device-id binding (``check_csr_names``): the CSR carries no trusted identity. Its names are
never copied, but a CSR that names *another* device is refused, because it shows the token
(or certificate) is being used for a device it was not issued for: every subject CN must
equal the device id, and every URI SAN in its extensionRequest must be the device's SPIFFE ID.
An empty subject and no SAN is fine; DNS/IP/email SANs are ignored (never copied).

``check_csr`` and ``check_csr_names`` are pure; ``issue_for`` signs and records the certificate
in the CA database (through ``ztagent.ca.store.issue_device_for_key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from ztagent.ca import store as ca_store
from ztagent.enrollment import EnrollError
from ztagent.errors import ConfigError
from ztagent.pki.device_check import ak_name_extension
from ztagent.pki.errors import CaError
from ztagent.pki.spiffe import device_spiffe_id

MAX_LIFETIME_DAYS: Final = 90
"""Hard cap on a device certificate's lifetime (the sidecar's default maximum)."""
DEFAULT_LIFETIME_DAYS: Final = 90
"""With renewal at 2/3 of the lifetime, a device renewed on time always has >= 30 days left."""
MAX_CSR_BYTES: Final = 16 * 1024
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
EC_CURVES: Final = frozenset({"secp256r1", "secp384r1"})
_ACCEPTED = "EC P-256/P-384, Ed25519, or RSA 2048-8192 bits"


@dataclass(frozen=True)
class IssuancePolicy:
    """What the CA puts in the certificates it issues on enrollment and renewal."""

    lifetime_days: int = DEFAULT_LIFETIME_DAYS
    """Certificate lifetime in days: 1 to ``MAX_LIFETIME_DAYS``."""

    def __post_init__(self) -> None:
        days = self.lifetime_days
        if isinstance(days, bool) or not isinstance(days, int):
            raise ConfigError("ca.lifetime_days", f"{days!r} (expected an integer number of days)")
        if not 1 <= days <= MAX_LIFETIME_DAYS:
            raise ConfigError(
                "ca.lifetime_days", f"{days} days (expected 1 to {MAX_LIFETIME_DAYS})"
            )


def describe_key(key: object) -> str:
    """``'EC secp256k1'``, ``'RSA 1024-bit'``, ``'Ed448'``...: for messages."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__.removesuffix("PublicKey").lstrip("_") or "unknown"


def check_public_key(key: object) -> None:
    """Refuse any key other than EC P-256/P-384, Ed25519, RSA 2048-8192 (``csr_weak_key``)."""
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_CURVES:
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey) and MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        return
    raise EnrollError("csr_weak_key", f"key is {describe_key(key)} (expected {_ACCEPTED})")


def check_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER PKCS#10 request and check its key and self-signature; ``EnrollError``."""
    if not csr_der:
        raise EnrollError("csr_malformed", "CSR is empty (expected a DER PKCS#10 request)")
    if len(csr_der) > MAX_CSR_BYTES:
        raise EnrollError(
            "csr_malformed", f"CSR is {len(csr_der)} bytes (expected at most {MAX_CSR_BYTES})"
        )
    try:
        csr = x509.load_der_x509_csr(csr_der)
        key = csr.public_key()
    except (ValueError, TypeError) as exc:  # TypeError: unsupported key type
        raise EnrollError(
            "csr_malformed", f"not a DER PKCS#10 request ({exc}); PEM is not accepted"
        ) from None
    except Exception as exc:
        raise EnrollError(
            "csr_weak_key", f"unsupported key ({exc}) (expected {_ACCEPTED})"
        ) from None
    check_public_key(key)  # before the signature: no expensive verification of refused keys
    try:
        valid = csr.is_signature_valid
    except Exception as exc:
        raise EnrollError("csr_bad_signature", f"signature cannot be checked: {exc}") from None
    if not valid:
        raise EnrollError(
            "csr_bad_signature",
            f"CSR signature does not verify with its own {describe_key(key)} key "
            "(expected a request signed by the key it carries)",
        )
    return csr


def check_csr_names(
    csr: x509.CertificateSigningRequest, device_id: str, trust_domain: str, code: str
) -> None:
    """Refuse (``code``) a CSR whose subject CN or URI SAN names another device.

    ``code`` is ``token_device_mismatch`` on Enroll and ``csr_device_mismatch`` on Renew.
    """
    expected_uri = device_spiffe_id(trust_domain, device_id)
    for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        cn = attr.value if isinstance(attr.value, str) else attr.value.decode(errors="replace")
        if cn != device_id:
            raise EnrollError(
                code, f"CSR subject CN is {cn[:130]!r} (expected the device id {device_id!r})"
            )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:
        raise EnrollError("csr_malformed", f"CSR extensions do not parse: {exc}") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri != expected_uri:
            raise EnrollError(
                code, f"CSR asks for URI SAN {uri[:200]!r} (expected only {expected_uri!r})"
            )


def lifetime_days(policy: IssuancePolicy) -> int:
    """The lifetime actually issued: ``min(policy.lifetime_days, MAX_LIFETIME_DAYS)``."""
    return min(policy.lifetime_days, MAX_LIFETIME_DAYS)


def issue_for(
    ca_dir: Path,
    device_id: str,
    public_key: CertificatePublicKeyTypes,
    policy: IssuancePolicy,
    now: datetime,
    *,
    ak_name: str | None = None,
    db: ca_store.DbArg = None,
    token: tuple[str, int] | None = None,
) -> x509.Certificate:
    """Issue a device certificate for ``public_key`` and record it in the CA database.

    ``ak_name`` (hex TPM name of an AK proven to live in the device's TPM) goes into the
    non-critical AK-name extension (``ztagent.pki.device_check.AK_NAME_OID``). The key is
    checked again (``csr_weak_key``); CA problems (missing files, unreadable state) become
    ``ca_unavailable``.
    """
    check_public_key(public_key)
    extensions = [ak_name_extension(ak_name)] if ak_name is not None else []
    try:
        return ca_store.issue_device_for_key(
            ca_dir,
            device_id,
            public_key,
            days=lifetime_days(policy),
            now=now,
            extensions=extensions,
            ak_name=ak_name,
            db=db,
            token=token,
        )
    except CaError as exc:
        raise EnrollError("ca_unavailable", f"cannot issue: {exc.code}: {exc.message}") from None
    except OSError as exc:
        raise EnrollError("ca_unavailable", f"cannot issue: {exc}") from None
