"""Errors of the device side: what the enroll / renew client refuses, and an unreachable CA."""

from __future__ import annotations

from ztagent.errors import TransportError, ZtagentError


class EnrollClientError(ZtagentError):
    """The device side refused to go on (directory state, token, the CA's answer)."""


class CaUnreachable(TransportError):
    """The CA could not be reached or could not serve now (UNAVAILABLE, DEADLINE_EXCEEDED)."""

    def __init__(self, method: str, status: str, details: str) -> None:
        super().__init__("ca_unreachable", f"{method}: {status}: {details}")
        self.method = method
        self.status = status
