"""Errors of the enrollment service: one ``EnrollError`` family, a stable code and a status each.

Codes (stable; they start the gRPC status details as ``"<code>: <message>"``):

==========================  ===================  ==============================================
code                        gRPC status          meaning
==========================  ===================  ==============================================
``token_malformed``         UNAUTHENTICATED      not a compact JWS, bad header/claims shape
``token_bad_signature``     UNAUTHENTICATED      alg not exactly ES256, kid not this CA, or the
                                                 signature does not verify with the issuing CA
``token_expired``           UNAUTHENTICATED      past ``exp`` (30 s leeway)
``token_reused``            UNAUTHENTICATED      its ``jti`` was already consumed
``token_device_mismatch``   PERMISSION_DENIED    a genuine token, but the CSR names another
                                                 device (the token authenticates its holder
                                                 only for the device id it carries)
``csr_malformed``           INVALID_ARGUMENT     not a DER PKCS#10 request (or too large)
``csr_bad_signature``       INVALID_ARGUMENT     the CSR is not signed by its own key
``csr_weak_key``            INVALID_ARGUMENT     key other than EC P-256/P-384, Ed25519 or
                                                 RSA 2048-8192 bits
``csr_device_mismatch``     PERMISSION_DENIED    Renew: the CSR names another device than the
                                                 client certificate
``renew_cert_missing``      UNAUTHENTICATED      Renew without a client certificate (e.g. on
                                                 the enrollment port)
``renew_cert_invalid``      UNAUTHENTICATED      the client certificate fails the device check
``renew_cert_revoked``      UNAUTHENTICATED      the client certificate is revoked
``ak_binding_failed``       PERMISSION_DENIED    TPM-bound enrollment: the AK is not a
                                                 restricted signing key fixed to its TPM, the
                                                 EK not a restricted decryption key, the
                                                 returned secret does not match, or the
                                                 enrollment id is unknown or already used;
                                                 also Enroll with TPM fields
``ek_cert_untrusted``       PERMISSION_DENIED    TPM-bound enrollment at a CA run with
                                                 ``--ek-ca-bundle``: the EK certificate is
                                                 missing (``ek_cert_missing``), malformed
                                                 (``ek_cert_malformed``), not from a trusted
                                                 TPM manufacturer, expired
                                                 (``ek_cert_expired``) or for another key
                                                 (``ek_cert_mismatch``)
``tpm_enroll_expired``      UNAUTHENTICATED      CompleteTpmEnroll after the pending
                                                 enrollment's 60 s
``ca_unavailable``          UNAVAILABLE          the CA cannot issue now (files, state, lock)
==========================  ===================  ==============================================

Messages say what was received and what was expected; they never contain a whole token.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

from ztagent.errors import ZtagentError

_UNAUTH = "UNAUTHENTICATED"
_INVALID = "INVALID_ARGUMENT"
_DENIED = "PERMISSION_DENIED"

STATUS_BY_CODE: Final = MappingProxyType(
    {
        "token_malformed": _UNAUTH,
        "token_bad_signature": _UNAUTH,
        "token_expired": _UNAUTH,
        "token_reused": _UNAUTH,
        "token_device_mismatch": _DENIED,
        "csr_malformed": _INVALID,
        "csr_bad_signature": _INVALID,
        "csr_weak_key": _INVALID,
        "csr_device_mismatch": _DENIED,
        "renew_cert_missing": _UNAUTH,
        "renew_cert_invalid": _UNAUTH,
        "renew_cert_revoked": _UNAUTH,
        "ak_binding_failed": _DENIED,
        "ek_cert_missing": _DENIED,
        "ek_cert_malformed": _INVALID,
        "ek_cert_untrusted": _DENIED,
        "ek_cert_expired": _DENIED,
        "ek_cert_mismatch": _DENIED,
        "tpm_enroll_expired": _UNAUTH,
        "ca_unavailable": "UNAVAILABLE",
    }
)
"""Every ``EnrollError`` code and the name of the gRPC status it maps to."""


class EnrollError(ZtagentError):
    """An enrollment or renewal request was refused, or the CA could not serve it."""

    codes = frozenset(STATUS_BY_CODE)

    def rpc_status(self) -> str:
        return STATUS_BY_CODE[self.code]

    @property
    def details(self) -> str:
        """The gRPC status details: ``"<code>: <message>"``."""
        return f"{self.code}: {self.message}"
