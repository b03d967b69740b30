"""Errors of the inference workload, each class with the gRPC status it stands for.

Every error names what was received and what was expected. The servicer turns them into
statuses with :func:`ztagent.rpc_status.grpc_status_for` (``status_name`` per class).
"""

from __future__ import annotations

from enum import StrEnum

from ztagent.errors import ZtagentError


class InferenceCode(StrEnum):
    """Every inference workload error code."""

    DUPLICATE_MODEL = "duplicate_model"
    INFERENCE_FAILED = "inference_failed"
    INVALID_BYTE_LENGTH = "invalid_byte_length"
    INVALID_DTYPE = "invalid_dtype"
    INVALID_MODEL_NAME = "invalid_model_name"
    INVALID_SHAPE = "invalid_shape"
    MANIFEST_INVALID = "manifest_invalid"
    MISSING_INPUT = "missing_input"
    MODEL_BAD_SIGNATURE = "model_bad_signature"
    MODEL_DIGEST_MISMATCH = "model_digest_mismatch"
    MODEL_FILE_MISSING = "model_file_missing"
    MODEL_HEADER = "model_header"
    MODEL_INVALID = "model_invalid"
    MODEL_MISMATCH = "model_mismatch"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_SIGNATURE_MISSING = "model_signature_missing"
    NON_FINITE = "non_finite"
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    TENSOR_TOO_LARGE = "tensor_too_large"


class InferenceError(ZtagentError):
    """Root of the inference workload's errors."""

    codes = frozenset(InferenceCode)


class InvalidInputError(InferenceError):
    """A request the workload refuses as malformed, before any tensor is allocated.

    Codes: ``missing_input``, ``invalid_dtype``, ``invalid_shape``, ``tensor_too_large``,
    ``invalid_byte_length``, ``non_finite``, ``invalid_model_name``, ``model_mismatch``.
    """

    status_name = "INVALID_ARGUMENT"


class ModelNotFoundError(InferenceError):
    """The requested model is not served (code ``model_not_found``)."""

    status_name = "NOT_FOUND"

    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(
            "model_not_found", f"model {name[:128]!r} is not served; serving {sorted(served)}"
        )
        self.name = name


class ModelHeaderRequiredError(InferenceError):
    """A critical model was called without naming it in ``x-model`` (code ``model_header``).

    The policy decides posture on ``x-model``; serving a critical model that the policy never
    saw named would let a caller skip the posture requirement.
    """

    status_name = "PERMISSION_DENIED"


class ModelLoadError(InferenceError):
    """A model or its manifest cannot be served.

    Codes: ``manifest_invalid``, ``model_digest_mismatch``, ``model_file_missing``,
    ``model_invalid``, ``duplicate_model``, ``model_signature_missing``,
    ``model_bad_signature`` (also a key that is not trusted).
    """

    status_name = "FAILED_PRECONDITION"


class InferenceBusyError(InferenceError):
    """The workload is shutting down or its queue is full (code ``overloaded``)."""

    status_name = "UNAVAILABLE"
