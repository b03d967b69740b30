"""Errors of the PKI domain: certificate verification and the dev CA.

``CertError`` codes (stable, relied on by logs, policies and scripts):

``cert_malformed``, ``cert_expired``, ``cert_not_yet_valid``, ``cert_lifetime_too_long``,
``chain_untrusted``, ``eku_missing_client_auth``, ``spiffe_id_missing``,
``spiffe_id_multiple``, ``spiffe_id_invalid``, ``spiffe_id_wrong_trust_domain``,
``spiffe_id_not_device``, ``cert_revoked``, ``crl_missing``, ``crl_bad_signature``,
``crl_expired``.

``CaError`` codes: ``ca_exists``, ``ca_missing``, ``ca_state_invalid``, ``ca_unavailable``,
``cert_not_found``, ``cert_not_from_ca``, ``device_id_invalid``, ``trust_domain_invalid``,
``days_invalid``, ``revoke_target``.

``DevicePolicyError`` (``device_policy_invalid``): a ``DevicePolicy`` that cannot be used; its
``key`` names the ``[identity]`` setting.
"""

from __future__ import annotations

from enum import StrEnum

from ztagent.errors import VerificationError, ZtagentError


class CertCode(StrEnum):
    """Every ``CertError`` code."""

    CERT_EXPIRED = "cert_expired"
    CERT_LIFETIME_TOO_LONG = "cert_lifetime_too_long"
    CERT_MALFORMED = "cert_malformed"
    CERT_MISSING = "cert_missing"
    CERT_NOT_YET_VALID = "cert_not_yet_valid"
    CERT_REVOKED = "cert_revoked"
    CHAIN_UNTRUSTED = "chain_untrusted"
    CRL_BAD_SIGNATURE = "crl_bad_signature"
    CRL_EXPIRED = "crl_expired"
    CRL_MISSING = "crl_missing"
    CRL_NOT_YET_VALID = "crl_not_yet_valid"
    CRL_ROLLBACK = "crl_rollback"
    CRL_TOO_LARGE = "crl_too_large"
    EKU_MISSING_CLIENT_AUTH = "eku_missing_client_auth"
    SPIFFE_ID_INVALID = "spiffe_id_invalid"
    SPIFFE_ID_MISSING = "spiffe_id_missing"
    SPIFFE_ID_MULTIPLE = "spiffe_id_multiple"
    SPIFFE_ID_NOT_DEVICE = "spiffe_id_not_device"
    SPIFFE_ID_WRONG_TRUST_DOMAIN = "spiffe_id_wrong_trust_domain"


class CaCode(StrEnum):
    """Every ``CaError`` code."""

    CA_EXISTS = "ca_exists"
    CA_MISSING = "ca_missing"
    CA_STATE_INVALID = "ca_state_invalid"
    CA_UNAVAILABLE = "ca_unavailable"
    """The CA database cannot be reached or read (SQLite error, PostgreSQL down)."""
    CERT_NOT_FOUND = "cert_not_found"
    CERT_NOT_FROM_CA = "cert_not_from_ca"
    DAYS_INVALID = "days_invalid"
    DEVICE_ID_INVALID = "device_id_invalid"
    REVOKE_TARGET = "revoke_target"
    TRUST_DOMAIN_INVALID = "trust_domain_invalid"


class CertError(VerificationError):
    """A device certificate (or the CRL that covers it) was checked and refused."""

    codes = frozenset(CertCode)


class CaError(ZtagentError):
    """A dev-CA operation could not be done (missing CA, existing CA, unknown cert...)."""

    codes = frozenset(CaCode)


class DevicePolicyError(ZtagentError):
    """A device policy setting is out of bounds (code ``device_policy_invalid``)."""

    status_name = "FAILED_PRECONDITION"

    def __init__(self, key: str, message: str) -> None:
        super().__init__("device_policy_invalid", f"{key}: {message}")
        self.key = key
        self.reason = message
