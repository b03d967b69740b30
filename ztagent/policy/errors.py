"""Policy errors. An engine failure is a TransportError (UNAVAILABLE unless failure_mode
says open); a policy that does not compile or load is a PolicyLoadError."""

from __future__ import annotations

from enum import StrEnum

from ztagent.errors import ZtagentError


class PolicyCode(StrEnum):
    """Every ``PolicyError`` code."""

    POLICY_BAD_DECISION = "policy_bad_decision"
    POLICY_ENGINE_ERROR = "policy_engine_error"
    POLICY_TIMEOUT = "policy_timeout"
    POLICY_UNDEFINED = "policy_undefined"


class PolicyLoadCode(StrEnum):
    """Every ``PolicyLoadError`` code."""

    BUNDLE_FILE_MISSING = "bundle_file_missing"
    BUNDLE_FILE_UNLISTED = "bundle_file_unlisted"
    BUNDLE_HASH_MISMATCH = "bundle_hash_mismatch"
    BUNDLE_INVALID = "bundle_invalid"
    BUNDLE_KEY_UNKNOWN = "bundle_key_unknown"
    BUNDLE_SIGNATURE_INVALID = "bundle_signature_invalid"
    BUNDLE_SIGNATURE_MISSING = "bundle_signature_missing"
    POLICY_COMPILE_ERROR = "policy_compile_error"
    POLICY_DATA_INVALID = "policy_data_invalid"
    POLICY_PARSE_ERROR = "policy_parse_error"


class PolicyError(ZtagentError):
    """Evaluation failed: ``policy_engine_error``, ``policy_timeout``, ``policy_undefined``
    (no decision at the decision path) or ``policy_bad_decision`` (wrong shape)."""

    codes = frozenset(PolicyCode)


class PolicyLoadError(ZtagentError):
    """Policies or data could not be loaded/compiled: ``policy_parse_error``,
    ``policy_compile_error``, ``policy_data_invalid``, ``bundle_invalid``; or a bundle's
    signature refused it (``bundle_signature_missing``, ``bundle_signature_invalid``,
    ``bundle_key_unknown``, ``bundle_file_unlisted``, ``bundle_file_missing``,
    ``bundle_hash_mismatch``). The message names the file (and line where known)."""

    codes = frozenset(PolicyLoadCode)
