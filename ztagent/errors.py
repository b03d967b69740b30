"""The root error type, its families, and the one place that maps errors to statuses.

Every error ztagent raises on purpose is a ``ZtagentError`` with a stable short ``code``
(``cert_expired``, ``config_invalid``...) and a message that says what was received and what
was expected. Domain modules define their own subclasses in their own ``errors.py``; this
module maps the families to gRPC status codes and CLI exit codes.
"""

from __future__ import annotations

import grpc

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2


class ZtagentError(Exception):
    """Root of every ztagent error: a stable code plus a human message."""

    default_code = "error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(ZtagentError):
    """Configuration that cannot be used: bad key, bad value, missing file. Exit 2."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__("config_invalid", f"{key}: {message}")
        self.key = key


class VerificationError(ZtagentError):
    """A credential was checked and refused (certificate, token, attestation)."""


class TransportError(ZtagentError):
    """A dependency could not be reached or answered badly (upstream, engine, issuer)."""


class DeniedError(ZtagentError):
    """The policy decided no. Maps to PERMISSION_DENIED with the policy's reasons."""


def grpc_status_for(err: ZtagentError) -> grpc.StatusCode:
    own: grpc.StatusCode | None = getattr(err, "grpc_status", None)
    if own is not None:  # families that carry their own status per code (enrollment)
        return own
    if isinstance(err, VerificationError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(err, TransportError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(err, DeniedError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def exit_code_for(err: ZtagentError) -> int:
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    return EXIT_REJECTED
