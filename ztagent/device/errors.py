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
