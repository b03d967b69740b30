"""TPM Endorsement Key certificates, verifier side: is this EK from a genuine, trusted TPM?

The AK binding (``ak_binding``) proves that the attestation key lives in the same TPM as the
presented EK; it says nothing about that TPM. This module closes the gap: the EK certificate
that the TPM manufacturer wrote into NV (index ``0x01C0000A`` for the ECC P-256 EK,
``0x01C00002`` for RSA-2048) must chain to a configured manufacturer CA and must certify
exactly the presented EK. Together they show the AK is held by a real TPM of a trusted vendor.

``check_ek_certificate`` checks, in this order:

1. a certificate was sent (``ek_cert_missing``) and is one X.509 certificate in DER or PEM
   (``ek_cert_malformed``);
2. its public key is the presented EK: same EC curve and point, or same RSA modulus and
   exponent (``ek_cert_mismatch``);
3. if it has an extendedKeyUsage, that includes tcg-kp-EKCertificate ``2.23.133.8.1``
   (``ek_cert_untrusted``); no other extension is required, because EK certificates are
   unusual X.509 (empty subject, critical SubjectAltName with TPM manufacturer attributes,
   keyUsage keyEncipherment only);
4. it chains, issuer name to subject name and signature by signature
   (``Certificate.verify_directly_issued_by``), through CA certificates of the trust bundle
   to a self-signed root of the bundle, in at most ``MAX_CHAIN_LINKS`` links and without
   loops; each CA has basicConstraints ``ca=True``, keyCertSign if it has a keyUsage, and a
   pathLenConstraint that allows the CAs below it (``ek_cert_untrusted``);
5. the EK certificate and every CA on that path are within their validity period at ``now``
   (``ek_cert_expired``).

``cryptography.x509.verification`` is deliberately not used: its web PKI profile refuses EK
certificates. Nothing here does IO except ``EkTrust.load``, which reads the configured bundle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ObjectIdentifier
from tpm2_pytss.constants import (  # type: ignore[import-untyped, unused-ignore]
    TPM2_ALG,
    TPM2_ECC,
)

from ztagent.errors import ConfigError
from ztagent.posture.errors import PostureError, short_hex
from ztagent.posture.quote import parse_public

CONFIG_KEY = "posture.ek_ca_bundle"
MAX_CERT_BYTES = 16 * 1024  # one EK certificate, DER or PEM; real ones are 1-2 KiB
MAX_BUNDLE_BYTES = 1024 * 1024  # the manufacturer CA bundle file
MAX_CHAIN_LINKS = 5  # issuer links from the EK certificate up to and including the root
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
DEFAULT_RSA_EXPONENT = 65537  # TPMS_RSA_PARMS.exponent 0 means 2^16 + 1

# TPM_ECC_CURVE -> the name ``cryptography`` gives the same curve.
_TPM_CURVES = {
    int(TPM2_ECC.NIST_P192): "secp192r1",
    int(TPM2_ECC.NIST_P224): "secp224r1",
    int(TPM2_ECC.NIST_P256): "secp256r1",
    int(TPM2_ECC.NIST_P384): "secp384r1",
    int(TPM2_ECC.NIST_P521): "secp521r1",
}


@dataclass(frozen=True)
class EkTrust:
    """TPM-manufacturer CA certificates (roots and intermediates) EK certificates must chain to."""

    certificates: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("EkTrust needs at least one CA certificate")

    @classmethod
    def load(cls, path: Path, key: str = CONFIG_KEY) -> EkTrust:
        """Read a PEM bundle; ``ConfigError(key, ...)`` if it is unreadable, empty or not PEM."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
        if len(raw) > MAX_BUNDLE_BYTES:
            raise ConfigError(key, f"{path} is {len(raw)} bytes, limit {MAX_BUNDLE_BYTES}")
        if not raw.strip():
            raise ConfigError(key, f"{path} is empty, expected PEM CA certificates")
        try:
            certificates = tuple(x509.load_pem_x509_certificates(raw))
        except ValueError as exc:
            raise ConfigError(
                key, f"{path} is not a PEM certificate bundle ({exc}), expected PEM CA certificates"
            ) from exc
        if not any(_self_issued(cert) for cert in certificates):
            raise ConfigError(
                key,
                f"{path} has {len(certificates)} certificates and no self-signed root, "
                f"expected at least one manufacturer root CA",
            )
        return cls(certificates)


@dataclass(frozen=True)
class EkCertificateInfo:
    """An EK certificate that passed ``check_ek_certificate``."""

    issuer: str  # RFC 4514 issuer of the EK certificate
    serial: str  # serial number, hex
    subject_fingerprint: str  # hex SHA-256 of the EK certificate's DER


def check_ek_certificate(
    ek_public: bytes, certificate: bytes | None, trust: EkTrust, now: datetime
) -> EkCertificateInfo:
    """Check that ``certificate`` is a trusted manufacturer's certificate for ``ek_public``.

    ``ek_public`` is the marshalled ``TPM2B_PUBLIC`` of the EK (``evidence_malformed`` if it
    does not unmarshal); ``certificate`` the DER (or PEM) read from the TPM's EK certificate NV
    index; ``now`` an aware datetime. Raises ``PostureError`` with an ``ek_cert_*`` code.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not certificate:
        raise PostureError(
            "ek_cert_missing", "no EK certificate was sent, expected the EK certificate DER"
        )
    cert = _parse_certificate(certificate)
    _check_key(ek_public, cert)
    _check_eku(cert)
    _check_chain(cert, trust, now)
    return EkCertificateInfo(
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        subject_fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def _parse_certificate(data: bytes) -> x509.Certificate:
    if len(data) > MAX_CERT_BYTES:
        raise PostureError(
            "ek_cert_malformed",
            f"EK certificate is {len(data)} bytes, limit {MAX_CERT_BYTES}",
        )
    raw = bytes(data)
    is_pem = raw.lstrip().startswith(b"-----BEGIN")
    try:
        if is_pem:
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise PostureError(
            "ek_cert_malformed",
            f"EK certificate ({len(raw)} bytes, starting {short_hex(raw[:8])}) does not parse: "
            f"{exc}; expected one X.509 certificate in DER or PEM",
        ) from exc


# --- the certified key is the presented EK ----------------------------------------------------


def _int_hex(value: int) -> str:
    return short_hex(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _ek_key(ek_public: bytes) -> tuple[str, str]:
    """(comparable identity, description) of the EK public area's key."""
    area = parse_public(ek_public, "EK public").publicArea
    kind = int(area.type)
    if kind == int(TPM2_ALG.ECC):
        curve_id = int(area.parameters.eccDetail.curveID)
        curve = _TPM_CURVES.get(curve_id, f"TPM curve {curve_id:#06x}")
        x = int.from_bytes(bytes(area.unique.ecc.x.buffer), "big")
        y = int.from_bytes(bytes(area.unique.ecc.y.buffer), "big")
        return f"ec:{curve}:{x:x}:{y:x}", f"EC {curve} x={_int_hex(x)}"
    if kind == int(TPM2_ALG.RSA):
        n = int.from_bytes(bytes(area.unique.rsa.buffer), "big")
        e = int(area.parameters.rsaDetail.exponent) or DEFAULT_RSA_EXPONENT
        return f"rsa:{e:x}:{n:x}", f"RSA-{n.bit_length()} e={e} n={_int_hex(n)}"
    return f"tpm:{kind}", f"TPM key type {kind:#06x}"


def _cert_key(cert: x509.Certificate) -> tuple[str, str]:
    try:
        key: Any = cert.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        oid = cert.public_key_algorithm_oid.dotted_string
        return f"other:{oid}", f"unsupported key algorithm {oid} ({exc})"
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        curve = key.curve.name
        return (
            f"ec:{curve}:{numbers.x:x}:{numbers.y:x}",
            f"EC {curve} x={_int_hex(numbers.x)}",
        )
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        n, e = rsa_numbers.n, rsa_numbers.e
        return f"rsa:{e:x}:{n:x}", f"RSA-{n.bit_length()} e={e} n={_int_hex(n)}"
    return f"other:{type(key).__name__}", f"{type(key).__name__} key"


def _check_key(ek_public: bytes, cert: x509.Certificate) -> None:
    ek_id, ek_text = _ek_key(ek_public)
    cert_id, cert_text = _cert_key(cert)
    if cert_id != ek_id:
        raise PostureError(
            "ek_cert_mismatch",
            f"EK certificate certifies {cert_text}, expected the presented EK {ek_text}",
        )


def _check_eku(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    except ValueError as exc:  # a duplicate or undecodable extension
        raise PostureError(
            "ek_cert_malformed", f"EK certificate extensions do not parse: {exc}"
        ) from exc
    if TCG_KP_EK_CERTIFICATE not in eku:
        usages = ", ".join(oid.dotted_string for oid in eku) or "none"
        raise PostureError(
            "ek_cert_untrusted",
            f"EK certificate extendedKeyUsage is {usages}, expected tcg-kp-EKCertificate "
            f"{TCG_KP_EK_CERTIFICATE.dotted_string}",
        )


# --- the chain to a manufacturer root -------------------------------------------------------


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"<empty subject, serial {cert.serial_number:x}>"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _ca_problem(ca: x509.Certificate, cas_below: int) -> str | None:
    """Why ``ca`` may not issue here (``cas_below`` CA certificates between it and the EK)."""
    try:
        extensions = ca.extensions
    except ValueError as exc:
        return f"CA {_name(ca)} has extensions that do not parse ({exc})"
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"CA {_name(ca)} has no basicConstraints, expected ca=True"
    if not constraints.ca:
        return f"CA {_name(ca)} has basicConstraints ca=False, expected ca=True"
    if constraints.path_length is not None and cas_below > constraints.path_length:
        return (
            f"CA {_name(ca)} has pathLenConstraint {constraints.path_length}, "
            f"{cas_below} CA certificates below it"
        )
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return f"CA {_name(ca)} keyUsage lacks keyCertSign"
    return None


def _paths(
    chain: tuple[x509.Certificate, ...], trust: EkTrust, problems: list[str]
) -> Iterator[tuple[x509.Certificate, ...]]:
    """Every chain from ``chain`` (leaf first) to a self-signed root of ``trust``."""
    current = chain[-1]
    candidates = [ca for ca in trust.certificates if ca.subject == current.issuer]
    if not candidates:
        problems.append(f"no CA in the bundle has subject {current.issuer.rfc4514_string()!r}")
    for ca in candidates:
        if ca in chain:
            continue  # a loop
        if not _signed_by(current, ca):
            problems.append(f"{_name(current)} is not signed by the key of CA {_name(ca)}")
            continue
        problem = _ca_problem(ca, cas_below=len(chain) - 1)
        if problem is not None:
            problems.append(problem)
            continue
        path = (*chain, ca)
        if _self_issued(ca) and _signed_by(ca, ca):
            yield path
        elif len(path) > MAX_CHAIN_LINKS:
            problems.append(f"no root within {MAX_CHAIN_LINKS} links above {_name(ca)}")
        else:
            yield from _paths(path, trust, problems)


def _validity_problem(cert: x509.Certificate, what: str, now: datetime) -> str | None:
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if before <= now <= after:
        return None
    return (
        f"{what} is valid from notBefore {before.isoformat()} to notAfter {after.isoformat()}, "
        f"now is {now.isoformat()}"
    )


def _check_chain(cert: x509.Certificate, trust: EkTrust, now: datetime) -> None:
    problems: list[str] = []
    expired: str | None = None
    found = False
    for path in _paths((cert,), trust, problems):
        found = True
        for index, link in enumerate(path):
            what = "EK certificate" if index == 0 else f"CA certificate {_name(link)}"
            expired = _validity_problem(link, what, now)
            if expired is not None:
                break
        else:
            return  # a trusted path on which every certificate is valid now
    if found and expired is not None:
        raise PostureError("ek_cert_expired", expired)
    reasons = "; ".join(dict.fromkeys(problems)) or "no path"
    raise PostureError(
        "ek_cert_untrusted",
        f"EK certificate issued by {cert.issuer.rfc4514_string()!r} does not chain to a "
        f"manufacturer root in the trust bundle ({reasons}), expected a path of at most "
        f"{MAX_CHAIN_LINKS} links to a self-signed root",
    )
