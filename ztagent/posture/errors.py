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

from enum import StrEnum

from ztagent.errors import VerificationError


class PostureCode(StrEnum):
    """Every ``PostureError`` code."""

    EVIDENCE_MALFORMED = "evidence_malformed"
    QUOTE_BAD_SIGNATURE = "quote_bad_signature"
    AK_NOT_BOUND = "ak_not_bound"
    NONCE_MISMATCH = "nonce_mismatch"
    NONCE_REUSED = "nonce_reused"
    NONCE_EXPIRED = "nonce_expired"
    PCR_SELECTION_MISMATCH = "pcr_selection_mismatch"
    PCR_DIGEST_MISMATCH = "pcr_digest_mismatch"
    EVENTLOG_MALFORMED = "eventlog_malformed"
    EVENTLOG_REPLAY_MISMATCH = "eventlog_replay_mismatch"
    BOOT_NOT_REFERENCE = "boot_not_reference"
    FIRMWARE_BAD_SIGNATURE = "firmware_bad_signature"
    FIRMWARE_UNTRUSTED_KEY = "firmware_untrusted_key"
    FIRMWARE_DIGEST_MISMATCH = "firmware_digest_mismatch"
    FIRMWARE_ROLLBACK = "firmware_rollback"
    AK_BINDING_FAILED = "ak_binding_failed"
    EK_CERT_MISSING = "ek_cert_missing"
    EK_CERT_MALFORMED = "ek_cert_malformed"
    EK_CERT_UNTRUSTED = "ek_cert_untrusted"
    EK_CERT_EXPIRED = "ek_cert_expired"
    EK_CERT_MISMATCH = "ek_cert_mismatch"


POSTURE_CODES = frozenset(PostureCode)


class PostureError(VerificationError):
    """Attestation evidence (quote, event log, firmware manifest, AK binding) was refused."""

    codes = POSTURE_CODES


def short_hex(value: bytes | str, chars: int = 16) -> str:
    """Hex of ``value`` cut to ``chars`` characters, for messages (``ab12...``)."""
    text = value.hex() if isinstance(value, bytes) else value
    return text if len(text) <= chars else f"{text[:chars]}..."
