"""Errors of the posture domain: evidence from a device's TPM and firmware, checked and refused.

``PostureError`` codes (stable, relied on by the ``Failure`` message of the attestation
service, by logs and by scripts):

``evidence_malformed``, ``quote_bad_signature``, ``ak_not_bound``, ``nonce_mismatch``,
``nonce_reused``, ``nonce_expired``, ``pcr_selection_mismatch``, ``pcr_digest_mismatch``,
``eventlog_malformed``, ``eventlog_replay_mismatch``, ``boot_not_reference``,
``firmware_bad_signature``, ``firmware_untrusted_key``, ``firmware_digest_mismatch``,
``firmware_rollback``, ``ak_binding_failed``; EK certificates (``ztagent.posture.ek_cert``):
``ek_cert_missing``, ``ek_cert_malformed``, ``ek_cert_untrusted``, ``ek_cert_expired``,
``ek_cert_mismatch``.
"""

from __future__ import annotations

from ztagent.errors import VerificationError

POSTURE_CODES = frozenset(
    {
        "evidence_malformed",
        "quote_bad_signature",
        "ak_not_bound",
        "nonce_mismatch",
        "nonce_reused",
        "nonce_expired",
        "pcr_selection_mismatch",
        "pcr_digest_mismatch",
        "eventlog_malformed",
        "eventlog_replay_mismatch",
        "boot_not_reference",
        "firmware_bad_signature",
        "firmware_untrusted_key",
        "firmware_digest_mismatch",
        "firmware_rollback",
        "ak_binding_failed",
        "ek_cert_missing",
        "ek_cert_malformed",
        "ek_cert_untrusted",
        "ek_cert_expired",
        "ek_cert_mismatch",
    }
)


class PostureError(VerificationError):
    """Attestation evidence (quote, event log, firmware manifest, AK binding) was refused."""

    def __init__(self, code: str, message: str) -> None:
        if code not in POSTURE_CODES:
            raise ValueError(f"unknown posture error code {code!r}")
        super().__init__(code, message)


def short_hex(value: bytes | str, chars: int = 16) -> str:
    """Hex of ``value`` cut to ``chars`` characters, for messages (``ab12...``)."""
    text = value.hex() if isinstance(value, bytes) else value
    return text if len(text) <= chars else f"{text[:chars]}..."
