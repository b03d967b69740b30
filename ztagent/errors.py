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
    """Root of every ztagent error: a stable code plus a human message, and optionally what
    was ``received`` and what was ``expected`` as values (the CLI's ``--json`` and the
    decision log carry them; the message says the same in words)."""

    default_code = "error"
    status_name: ClassVar[str] = "INTERNAL"
    """The gRPC status (``grpc.StatusCode`` member name) a server answers this family with."""
    codes: ClassVar[frozenset[str] | None] = None
    """The family's registry (a ``StrEnum`` of its codes): a code outside it is a programming
    error, caught at construction. ``None`` for the generic families above the domains."""

    def __init__(
        self, code: str, message: str, *, received: object = None, expected: object = None
    ) -> None:
        if self.codes is not None and code not in self.codes:
            raise ValueError(
                f"unknown {type(self).__name__} code {code!r} (expected one of its registry)"
            )
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.received = received
        self.expected = expected

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "message": self.message}
        if self.received is not None:
            out["received"] = self.received
        if self.expected is not None:
            out["expected"] = self.expected
        return out

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


def raised_at(exc: BaseException) -> str:
    """``file:line`` where ``exc`` was raised (its innermost frame): what a server logs for
    an unexpected exception instead of a traceback, which could carry the client's data."""
    where = exc.__traceback__
    while where is not None and where.tb_next is not None:
        where = where.tb_next
    return f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}" if where else "?"


def exit_code_for(err: ZtagentError) -> int:
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    return EXIT_REJECTED
