"""Errors of the inference workload, and the one place that maps them to gRPC status codes.

Every error names what was received and what was expected. The servicer turns them into
statuses with :func:`grpc_status_for`; anything that is not an inference error falls back to
:func:`ztagent.errors.grpc_status_for`.
"""

from __future__ import annotations

import grpc

from ztagent import errors as _root
from ztagent.errors import ZtagentError


class InferenceError(ZtagentError):
    """Root of the inference workload's errors."""


class InvalidInputError(InferenceError):
    """A request the workload refuses as malformed, before any tensor is allocated.

    Codes: ``missing_input``, ``invalid_dtype``, ``invalid_shape``, ``tensor_too_large``,
    ``invalid_byte_length``, ``non_finite``, ``invalid_model_name``, ``model_mismatch``.
    """


class ModelNotFoundError(InferenceError):
    """The requested model is not served (code ``model_not_found``)."""

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


class ModelLoadError(InferenceError):
    """A model or its manifest cannot be served.

    Codes: ``manifest_invalid``, ``model_digest_mismatch``, ``model_file_missing``,
    ``model_invalid``, ``duplicate_model``, ``model_signature_missing``,
    ``model_bad_signature`` (also a key that is not trusted).
    """


class InferenceBusyError(InferenceError):
    """The workload is shutting down or its queue is full (code ``overloaded``)."""


def grpc_status_for(err: ZtagentError) -> grpc.StatusCode:
    """The gRPC status for an error raised while serving an inference call."""
    if isinstance(err, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, ModelHeaderRequiredError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, ModelLoadError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, InferenceBusyError):
        return grpc.StatusCode.UNAVAILABLE
    return _root.grpc_status_for(err)
