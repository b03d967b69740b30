"""Errors of the storage workload, and the one place that maps them to gRPC status codes.

Every error names what was received and what was expected. The servicer turns them into
statuses with :func:`grpc_status_for`; anything that is not a storage error falls back to
:func:`ztagent.errors.grpc_status_for`.
"""

from __future__ import annotations

import grpc

from ztagent import errors as _root
from ztagent.errors import ZtagentError


class StorageError(ZtagentError):
    """Root of the storage workload's errors."""


class InvalidRequestError(StorageError):
    """A request the store refuses as malformed: bad key, oversized value, bad page token.

    Codes: ``invalid_key``, ``invalid_prefix``, ``value_too_large``, ``invalid_page_size``,
    ``invalid_page_token``, ``bulk_too_large``.
    """


class RecordNotFoundError(StorageError):
    """The key has no value in the caller's namespace (code ``not_found``)."""

    def __init__(self, key: str) -> None:
        super().__init__("not_found", f"key {key!r} not found")
        self.key = key


class StorageIntegrityError(StorageError):
    """A stored row failed authenticated decryption; its bytes are never returned.

    Raised when the ciphertext, nonce or key version was altered, when a row was copied to
    another key or namespace, or when the row names a data-key version the key file lacks.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(
            "storage_integrity",
            f"stored value for key {key!r} failed its integrity check ({reason}); "
            "refusing to return it",
        )
        self.key = key


class WatchOverflowError(StorageError):
    """A Watch fell behind and was dropped so writers never wait (code ``watch_overflow``)."""


class KeyFileError(StorageError):
    """The data key file cannot be used (codes ``key_file_insecure``, ``key_file_invalid``)."""


class BackendError(StorageError):
    """SQLite failed underneath the store (code ``storage_backend``)."""


def grpc_status_for(err: ZtagentError) -> grpc.StatusCode:
    """The gRPC status for an error raised while serving a storage call."""
    if isinstance(err, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, RecordNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, StorageIntegrityError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(err, WatchOverflowError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, KeyFileError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, BackendError):
        return grpc.StatusCode.INTERNAL
    return _root.grpc_status_for(err)
