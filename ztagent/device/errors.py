"""Errors of the device side: what the enroll / renew client refuses, and an unreachable CA."""

from __future__ import annotations

from enum import StrEnum

from ztagent.errors import TransportError, ZtagentError


class DeviceCode(StrEnum):
    """Every ``EnrollClientError`` code."""

    ALREADY_ENROLLED = "already_enrolled"
    CERT_EXPIRED = "cert_expired"
    DEVICE_DIR_INVALID = "device_dir_invalid"
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    ENROLL_REFUSED = "enroll_refused"
    ENROLL_RESPONSE_INVALID = "enroll_response_invalid"
    TOKEN_UNREADABLE = "token_unreadable"


class EnrollClientError(ZtagentError):
    """The device side refused to go on (directory state, token, the CA's answer)."""

    codes = frozenset(DeviceCode)


class CaUnreachable(TransportError):
    """The CA could not be reached or could not serve now (UNAVAILABLE, DEADLINE_EXCEEDED)."""

    def __init__(self, method: str, status: str, details: str) -> None:
        super().__init__("ca_unreachable", f"{method}: {status}: {details}")
        self.method = method
        self.status = status


class TlsCode(StrEnum):
    """Every ``TlsError`` code (TLS 1.3 with a key that stays in its store,
    ``ztagent.device.keystore_tls``)."""

    TLS_HANDSHAKE_REFUSED = "tls_handshake_refused"
    """The server ended the handshake (an alert: e.g. our certificate is not from its CA) or
    it could not be completed (no TLS 1.3, a protocol error)."""
    TLS_SERVER_UNTRUSTED = "tls_server_untrusted"
    """The server's chain does not verify to the configured CA bundle."""
    TLS_SERVER_NAME_MISMATCH = "tls_server_name_mismatch"
    """The server's certificate is valid but not for the host we dialled."""
    TLS_SIGNING_FAILED = "tls_signing_failed"
    """The key store could not sign the handshake (token removed, TPM gone, wrong PIN)."""


class TlsError(TransportError):
    """A TLS connection made with a key-store key failed before any application byte was
    sent; retried like any unreachable upstream (nothing spooled is lost)."""

    codes = frozenset(TlsCode)
