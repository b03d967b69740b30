"""Errors of the PKI domain: certificate verification and the dev CA.

``CertError`` codes (stable, relied on by logs, policies and scripts):

``cert_malformed``, ``cert_expired``, ``cert_not_yet_valid``, ``cert_lifetime_too_long``,
``chain_untrusted``, ``eku_missing_client_auth``, ``spiffe_id_missing``,
``spiffe_id_multiple``, ``spiffe_id_invalid``, ``spiffe_id_wrong_trust_domain``,
``spiffe_id_not_device``, ``cert_revoked``, ``crl_missing``, ``crl_bad_signature``,
``crl_expired``.

``CaError`` codes: ``ca_exists``, ``ca_missing``, ``ca_state_invalid``, ``cert_not_found``,
``cert_not_from_ca``, ``device_id_invalid``, ``trust_domain_invalid``, ``days_invalid``,
``revoke_target``.

``DevicePolicyError`` (``device_policy_invalid``): a ``DevicePolicy`` that cannot be used; its
``key`` names the ``[identity]`` setting.
"""

from __future__ import annotations

from ztagent.errors import VerificationError, ZtagentError


class CertError(VerificationError):
    """A device certificate (or the CRL that covers it) was checked and refused."""


class CaError(ZtagentError):
    """A dev-CA operation could not be done (missing CA, existing CA, unknown cert...)."""


class DevicePolicyError(ZtagentError):
    """A device policy setting is out of bounds (code ``device_policy_invalid``)."""

    status_name = "FAILED_PRECONDITION"

    def __init__(self, key: str, message: str) -> None:
        super().__init__("device_policy_invalid", f"{key}: {message}")
        self.key = key
        self.reason = message
