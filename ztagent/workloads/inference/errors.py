"""Errors of the inference workload, each class with the gRPC status it stands for.

Every error names what was received and what was expected. The servicer turns them into
statuses with :func:`ztagent.rpc_status.grpc_status_for` (``status_name`` per class).
"""

from __future__ import annotations

from ztagent.errors import ZtagentError


class InferenceError(ZtagentError):
    """Root of the inference workload's errors."""


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
