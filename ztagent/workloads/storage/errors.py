"""Errors of the storage workload, each class with the gRPC status it stands for.

Every error names what was received and what was expected. The servicer turns them into
statuses with :func:`ztagent.rpc_status.grpc_status_for` (``status_name`` per class).
"""

from __future__ import annotations

from enum import StrEnum

from ztagent.errors import ZtagentError


class StorageCode(StrEnum):
    """Every storage workload error code."""

    BULK_TOO_LARGE = "bulk_too_large"
    INVALID_KEY = "invalid_key"
    INVALID_NAMESPACE = "invalid_namespace"
    INVALID_PAGE_SIZE = "invalid_page_size"
    INVALID_PAGE_TOKEN = "invalid_page_token"
    KEY_FILE_INSECURE = "key_file_insecure"
    KEY_FILE_INVALID = "key_file_invalid"
    NOT_FOUND = "not_found"
    SHUTTING_DOWN = "shutting_down"
    STORAGE_BACKEND = "storage_backend"
    STORAGE_INTEGRITY = "storage_integrity"
    VALUE_TOO_LARGE = "value_too_large"
    WATCH_OVERFLOW = "watch_overflow"


class StorageError(ZtagentError):
    """Root of the storage workload's errors."""

    codes = frozenset(StorageCode)


class InvalidRequestError(StorageError):
    """A request the store refuses as malformed: bad key, oversized value, bad page token.

    Codes: ``invalid_key``, ``invalid_prefix``, ``value_too_large``, ``invalid_page_size``,
    ``invalid_page_token``, ``bulk_too_large``.
    """

    status_name = "INVALID_ARGUMENT"


class RecordNotFoundError(StorageError):
    """The key has no value in the caller's namespace (code ``not_found``)."""

    status_name = "NOT_FOUND"

    def __init__(self, key: str) -> None:
        super().__init__("not_found", f"key {key!r} not found")
        self.key = key


class StorageIntegrityError(StorageError):
    """A stored row failed authenticated decryption; its bytes are never returned.

    Raised when the ciphertext, nonce or key version was altered, when a row was copied to
    another key or namespace, or when the row names a data-key version the key file lacks.
    """

    status_name = "DATA_LOSS"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(
            "storage_integrity",
            f"stored value for key {key!r} failed its integrity check ({reason}); "
            "refusing to return it",
        )
        self.key = key


class WatchOverflowError(StorageError):
    """A Watch fell behind and was dropped so writers never wait (code ``watch_overflow``)."""

    status_name = "RESOURCE_EXHAUSTED"


class KeyFileError(StorageError):
    """The data key file cannot be used (codes ``key_file_insecure``, ``key_file_invalid``)."""

    status_name = "FAILED_PRECONDITION"


class BackendError(StorageError):
    """SQLite failed underneath the store (code ``storage_backend``)."""

    status_name = "INTERNAL"
