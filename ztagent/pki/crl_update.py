"""Whether a downloaded CRL may replace the stored one: signature, rollback, time. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ztagent.pki.errors import CertError
from ztagent.pki.trust import TrustMaterial, load_crls

MAX_CRL_BYTES = 8 * 1024 * 1024
CLOCK_SKEW = timedelta(minutes=5)
"""A CRL whose thisUpdate is this far ahead of the node's clock is still accepted: the CA's
and the edge node's clocks never agree exactly (a node whose clock runs a little late would
otherwise refuse every fresh CRL)."""


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _signed_by_one_of(crl: x509.CertificateRevocationList, cas: list[x509.Certificate]) -> bool:
    return any(
        crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        for ca in cas
        if ca.subject == crl.issuer
    )


def accept_crl_update(
    new_data: bytes, bundle_pem: bytes, current_pem: bytes | None, now: datetime
) -> bytes | None:
    """The PEM to store, or None when ``new_data`` holds nothing newer than ``current_pem``.

    Every CRL must be signed by a CA in the bundle (``crl_bad_signature``), must not be a
    step back from the stored one of the same issuer (lower CRL number or older thisUpdate:
    ``crl_rollback``, a replayed old CRL could un-revoke a device), and must not be issued in
    the future (``crl_not_yet_valid``).
    """
    trust = TrustMaterial.from_pem(bundle_pem, None)
    cas = [*trust.roots, *trust.intermediates]
    new = load_crls(new_data)
    if not new:
        raise CertError("crl_missing", "the CRL source returned no CRL")
    # Only a stored CRL that the current bundle still vouches for is a floor: after the CA's
    # key changes (a re-created PKI, a rotated issuing CA under the same name), the stored one
    # no longer verifies and must not block the new CA's first CRL as a "rollback".
    current = (
        {c.issuer: c for c in load_crls(current_pem) if _signed_by_one_of(c, cas)}
        if current_pem
        else {}
    )
    changed = False
    for crl in new:
        if not _signed_by_one_of(crl, cas):
            raise CertError(
                "crl_bad_signature",
                f"CRL from {crl.issuer.rfc4514_string()!r} is not signed by a CA in the bundle",
            )
        if crl.last_update_utc > now + CLOCK_SKEW:
            raise CertError(
                "crl_not_yet_valid",
                f"CRL thisUpdate {crl.last_update_utc.isoformat()} is more than "
                f"{CLOCK_SKEW.total_seconds():.0f} s after {now.isoformat()}",
            )
        old = current.get(crl.issuer)
        if old is None:
            changed = True
            continue
        old_n, new_n = _crl_number(old), _crl_number(crl)
        if (old_n is not None and new_n is not None and new_n < old_n) or (
            crl.last_update_utc < old.last_update_utc
        ):
            raise CertError(
                "crl_rollback",
                f"CRL from {crl.issuer.rfc4514_string()!r} number {new_n} / thisUpdate "
                f"{crl.last_update_utc.isoformat()} is older than the stored number {old_n} / "
                f"{old.last_update_utc.isoformat()}",
            )
        if crl.public_bytes(Encoding.DER) != old.public_bytes(Encoding.DER):
            changed = True
    if not changed:
        return None
    return b"".join(c.public_bytes(Encoding.PEM) for c in new)
