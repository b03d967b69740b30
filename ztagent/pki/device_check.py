"""The device identity check: pure, no IO, validation time injected.

``verify_device_cert`` runs the checks in a fixed order so the most specific reason is
reported: validity window, lifetime, EKU, SPIFFE SAN, chain, revocation. The chain is built
by ``cryptography.x509.verification`` (client verifier, web PKI profile); it has no
revocation checking, so CRLs are checked here. What that verifier demands, found by
experiment (cryptography 50): a subjectAltName on the leaf (critical if the subject is
empty), an authorityKeyIdentifier on the leaf, keyUsage on every CA, and clientAuth in the
leaf's EKU *if* the EKU is present; a leaf with no EKU passes it, so the EKU is checked here.

**TPM-bound certificates.** A certificate issued by TPM-bound enrollment carries the TPM name
of the device's attestation key (AK) in a non-critical extension, ``AK_NAME_OID``
(``2.25.212853220384175939582526127345612545943``), whose value is a DER OCTET STRING
holding the name (``nameAlg`` u16 big-endian || digest). The OID is derived from a UUID
generated for ztagent (ITU-T X.667 ``2.25`` arc: unique without registration), so it collides
with no one's extension. ``VerifiedDevice.ak_name`` is that name (lowercase hex) or None; the
sidecar's posture check treats it as the device's bound AK. A malformed value fails the check
(``cert_malformed``): only this CA writes the extension, so a bad one is never ignored.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from cryptography.x509.verification import PolicyBuilder
from cryptography.x509.verification import VerificationError as X509VerificationError

from ztagent.pki.errors import CertError
from ztagent.pki.policy import DevicePolicy
from ztagent.pki.spiffe import SpiffeId, parse_device_id
from ztagent.pki.trust import TrustMaterial
from ztagent.timefmt import rfc3339

_SIGNING_KEYS = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


AK_NAME_OID = ObjectIdentifier("2.25.212853220384175939582526127345612545943")
"""The AK-name extension: 2.25 + UUID a0220a01-c893-4018-bd6b-e7ecb712df97 (ITU-T X.667)."""
_AK_NAME_DIGEST_SIZES = {0x000B: 32, 0x000C: 48, 0x000D: 64}
"""TPM nameAlg -> digest size: SHA-256, SHA-384, SHA-512 (names of SHA-1 keys are refused)."""


def ak_name_extension(ak_name_hex: str) -> x509.UnrecognizedExtension:
    """The non-critical AK-name extension for a certificate (value: DER OCTET STRING)."""
    name = bytes.fromhex(ak_name_hex)
    _check_ak_name(name)
    return x509.UnrecognizedExtension(AK_NAME_OID, b"\x04" + bytes([len(name)]) + name)


def _check_ak_name(name: bytes) -> None:
    alg = int.from_bytes(name[:2], "big") if len(name) >= 2 else -1
    size = _AK_NAME_DIGEST_SIZES.get(alg)
    if size is None or len(name) != 2 + size:
        raise ValueError(
            f"AK name {name.hex()[:24]!r} ({len(name)} bytes) is not a TPM name "
            "(expected nameAlg SHA-256/384/512 followed by its digest)"
        )


def cert_ak_name(cert: x509.Certificate) -> str | None:
    """The AK name (lowercase hex) in ``cert``'s AK-name extension, None without one.

    ``CertError("cert_malformed")`` when the extension is critical or its value is not a
    DER OCTET STRING holding a TPM name.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(AK_NAME_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    # short-form length only: a TPM name is at most 66 bytes
    if ext.critical or len(raw) < 2 or raw[0] != 0x04 or raw[1] != len(raw) - 2:
        raise CertError(
            "cert_malformed",
            f"AK-name extension {AK_NAME_OID.dotted_string} is "
            f"{'critical' if ext.critical else raw[:8].hex() + '...'} (expected a non-critical "
            "DER OCTET STRING holding a TPM name)",
        )
    try:
        _check_ak_name(raw[2:])
    except ValueError as exc:
        raise CertError("cert_malformed", f"AK-name extension: {exc}") from None
    return raw[2:].hex()


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("validation time must be timezone-aware")
    return now.astimezone(UTC)


@dataclass(frozen=True)
class VerifiedDevice:
    """A device whose certificate passed every check."""

    device_id: str
    spiffe_id: str
    serial: str
    """Lowercase hex, no leading zeros."""
    fingerprint_sha256: str
    """Lowercase hex of SHA-256 over the DER certificate."""
    issuer: str
    """RFC 4514 string of the leaf's issuer."""
    not_before: datetime
    not_after: datetime
    ak_name: str | None = None
    """Hex TPM name of the AK the certificate binds (TPM-bound enrollment), else None. Not
    part of the policy input."""

    def as_input(self) -> dict[str, object]:
        """The policy input's ``device`` document."""
        return {
            "id": self.device_id,
            "spiffe_id": self.spiffe_id,
            "serial": self.serial,
            "fingerprint_sha256": self.fingerprint_sha256,
            "issuer": self.issuer,
            "not_before": rfc3339(self.not_before),
            "not_after": rfc3339(self.not_after),
        }


def verify_device_cert(
    leaf: x509.Certificate, trust: TrustMaterial, policy: DevicePolicy, now: datetime
) -> VerifiedDevice:
    """Check a device cert against trust material and policy at ``now``; raise ``CertError``."""
    return verify_with_expiry(leaf, trust, policy, now)[0]


def verify_with_expiry(
    leaf: x509.Certificate, trust: TrustMaterial, policy: DevicePolicy, now: datetime
) -> tuple[VerifiedDevice, datetime]:
    """``verify_device_cert`` plus the time until which the result holds (for caches).

    That is the earliest notAfter in the chain and, unless CRLs are fail-open, the
    earliest nextUpdate of the CRLs used.
    """
    now = _utc(now)
    try:
        return _verify(leaf, trust, policy, now)
    except (ValueError, TypeError) as exc:  # an extension or field that does not parse
        raise CertError("cert_malformed", f"certificate does not parse: {exc}") from None


def _verify(
    leaf: x509.Certificate, trust: TrustMaterial, policy: DevicePolicy, now: datetime
) -> tuple[VerifiedDevice, datetime]:
    _check_validity(leaf, now)
    _check_lifetime(leaf, policy)
    _check_eku(leaf)
    spiffe, device_id = _check_spiffe(leaf, policy)
    chain = _check_chain(leaf, trust, now)
    valid_until = min(c.not_valid_after_utc for c in chain)
    for cert, issuer in itertools.pairwise(chain):
        is_leaf = cert is chain[0]
        next_update = _check_revocation(cert, issuer, trust, policy, now, is_leaf=is_leaf)
        if next_update is not None and not policy.crl_fail_open:
            valid_until = min(valid_until, next_update)
    device = VerifiedDevice(
        device_id=device_id,
        spiffe_id=str(spiffe),
        serial=format(leaf.serial_number, "x"),
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        ak_name=cert_ak_name(leaf),
    )
    return device, valid_until


def _check_validity(leaf: x509.Certificate, now: datetime) -> None:
    if now < leaf.not_valid_before_utc:
        raise CertError(
            "cert_not_yet_valid",
            f"certificate is valid from {rfc3339(leaf.not_valid_before_utc)} "
            f"(validation time {rfc3339(now)})",
            received=rfc3339(now),
            expected=f">= {rfc3339(leaf.not_valid_before_utc)}",
        )
    if now > leaf.not_valid_after_utc:
        raise CertError(
            "cert_expired",
            f"certificate expired at {rfc3339(leaf.not_valid_after_utc)} "
            f"(validation time {rfc3339(now)})",
            received=rfc3339(now),
            expected=f"<= {rfc3339(leaf.not_valid_after_utc)}",
        )


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:g}"


def _check_lifetime(leaf: x509.Certificate, policy: DevicePolicy) -> None:
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    if lifetime > policy.max_lifetime:
        raise CertError(
            "cert_lifetime_too_long",
            f"certificate lifetime is {_days(lifetime)} days "
            f"(expected at most {_days(policy.max_lifetime)} days)",
            received=f"{_days(lifetime)} days",
            expected=f"<= {_days(policy.max_lifetime)} days",
        )


def _check_eku(leaf: x509.Certificate) -> None:
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertError(
            "eku_missing_client_auth",
            "certificate has no extendedKeyUsage (expected one containing clientAuth)",
        ) from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        got = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku)
        raise CertError(
            "eku_missing_client_auth",
            f"extendedKeyUsage is [{got}] (expected clientAuth)",
        )


def _check_spiffe(leaf: x509.Certificate, policy: DevicePolicy) -> tuple[SpiffeId, str]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise CertError(
            "spiffe_id_missing",
            "certificate has no URI subjectAltName (expected one 'spiffe://"
            f"{policy.trust_domain}/device/<id>')",
        )
    if len(uris) > 1:
        raise CertError(
            "spiffe_id_multiple",
            f"certificate has {len(uris)} URI subjectAltNames {uris} (expected exactly one)",
        )
    spiffe = SpiffeId.parse(uris[0])
    if spiffe.trust_domain != policy.trust_domain:
        raise CertError(
            "spiffe_id_wrong_trust_domain",
            f"SPIFFE ID {str(spiffe)!r} is in trust domain {spiffe.trust_domain!r} "
            f"(expected {policy.trust_domain!r})",
            received=spiffe.trust_domain,
            expected=policy.trust_domain,
        )
    return spiffe, parse_device_id(spiffe)


def _check_chain(
    leaf: x509.Certificate, trust: TrustMaterial, now: datetime
) -> list[x509.Certificate]:
    verifier = PolicyBuilder().store(trust.store).time(now).build_client_verifier()
    try:
        verified = verifier.verify(leaf, list(trust.intermediates))
    except X509VerificationError as exc:
        raise CertError(
            "chain_untrusted",
            f"no valid chain from issuer {leaf.issuer.rfc4514_string()!r} to a trusted root "
            f"(trusted roots: {[r.subject.rfc4514_string() for r in trust.roots]}): {exc}",
        ) from None
    return list(verified.chain)


def _check_revocation(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    trust: TrustMaterial,
    policy: DevicePolicy,
    now: datetime,
    *,
    is_leaf: bool,
) -> datetime | None:
    """Check ``cert`` against its issuer's CRL; return that CRL's nextUpdate (None: no CRL).

    A CRL is required for the leaf when ``policy.check_crl``; for a CA cert it is optional.
    """
    required = is_leaf and policy.check_crl
    what = "certificate" if is_leaf else "CA certificate"
    candidates = [c for c in trust.crls if c.issuer == cert.issuer]
    if not candidates:
        if required:
            raise CertError(
                "crl_missing",
                f"no CRL from issuer {cert.issuer.rfc4514_string()!r} "
                f"(CRL issuers loaded: {[c.issuer.rfc4514_string() for c in trust.crls]})",
            )
        return None
    key = issuer.public_key()
    signed = (
        [c for c in candidates if c.is_signature_valid(key)]
        if isinstance(key, _SIGNING_KEYS)
        else []
    )
    if not signed:
        raise CertError(
            "crl_bad_signature",
            f"CRL from issuer {cert.issuer.rfc4514_string()!r} is not signed by that issuer's key",
        )
    crl = max(signed, key=lambda c: c.last_update_utc)
    next_update = crl.next_update_utc
    usable_until = None if next_update is None else next_update + policy.crl_grace
    if (usable_until is None or usable_until < now) and not policy.crl_fail_open:
        shown = rfc3339(next_update) if next_update else "(none)"
        raise CertError(
            "crl_expired",
            f"CRL from issuer {cert.issuer.rfc4514_string()!r} has nextUpdate {shown}, "
            f"grace {policy.crl_grace.total_seconds():.0f} s (validation time {rfc3339(now)})",
        )
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is not None:
        raise CertError(
            "cert_revoked",
            f"{what} serial {cert.serial_number:x} was revoked at "
            f"{rfc3339(entry.revocation_date_utc)} (CRL from {cert.issuer.rfc4514_string()!r})",
        )
    return usable_until


def explain(
    leaf_pem_or_der: bytes,
    chain_pem: bytes | None,
    trust: TrustMaterial,
    policy: DevicePolicy,
    now: datetime,
) -> VerifiedDevice:
    """``verify_device_cert`` for ``ztagent cert verify``: parses the inputs first.

    ``leaf_pem_or_der`` may be a PEM file with the leaf first and CA certs after it; those
    and the certs of ``chain_pem`` are added as intermediates, never as roots.
    """
    extra: list[x509.Certificate] = []
    try:
        if b"-----BEGIN" in leaf_pem_or_der:
            certs = x509.load_pem_x509_certificates(leaf_pem_or_der)
            leaf, extra = certs[0], certs[1:]
        else:
            leaf = x509.load_der_x509_certificate(leaf_pem_or_der)
    except ValueError as exc:
        raise CertError("cert_malformed", f"not a PEM or DER certificate: {exc}") from None
    if chain_pem is not None:
        try:
            extra += x509.load_pem_x509_certificates(chain_pem)
        except ValueError as exc:
            raise CertError("cert_malformed", f"chain is not PEM certificates: {exc}") from None
    if extra:
        trust = trust.with_intermediates(tuple(extra))
    return verify_device_cert(leaf, trust, policy, now)
