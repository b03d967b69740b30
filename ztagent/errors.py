"""The root error type and its families.

Every error ztagent raises on purpose is a ``ZtagentError`` with a stable short ``code``
(``cert_expired``, ``config_invalid``...) and a message that says what was received and what
was expected. Domain modules define their own subclasses in their own ``errors.py``; each
family names the gRPC status it stands for as data (``status_name``, e.g.
``"UNAUTHENTICATED"``), so the checks never import grpc: ``ztagent.rpc_status`` is the one
place that turns it into a ``grpc.StatusCode``. ``exit_code_for`` is the CLI's mapping.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2


class ZtagentError(Exception):
    """Root of every ztagent error: a stable code plus a human message."""

    default_code = "error"
    status_name: ClassVar[str] = "INTERNAL"
    """The gRPC status (``grpc.StatusCode`` member name) a server answers this family with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def rpc_status(self) -> str:
        """The gRPC status name for this error (a family may decide per code)."""
        return self.status_name


class ConfigError(ZtagentError):
    """Configuration that cannot be used: bad key, bad value, missing file. Exit 2."""

    status_name = "FAILED_PRECONDITION"

    def __init__(self, key: str, message: str) -> None:
        super().__init__("config_invalid", f"{key}: {message}")
        self.key = key


class VerificationError(ZtagentError):
    """A credential was checked and refused (certificate, token, attestation)."""

    status_name = "UNAUTHENTICATED"


class TransportError(ZtagentError):
    """A dependency could not be reached or answered badly (upstream, engine, issuer)."""

    status_name = "UNAVAILABLE"


class DeniedError(ZtagentError):
    """The policy decided no. Maps to PERMISSION_DENIED with the policy's reasons."""

    status_name = "PERMISSION_DENIED"


def exit_code_for(err: ZtagentError) -> int:
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    return EXIT_REJECTED
