"""Checks a request's tensor against a model's input before anything is allocated for it.

:func:`check_tensor` looks only at the declared dtype, the declared shape and the length of
the payload: it refuses a tensor that is the wrong kind, too large, the wrong shape, or whose
bytes do not match its shape, using integer arithmetic on the request's own fields. Only a
tensor that passes is decoded (``models.decode_tensor``), and only then are its values read
for NaN and infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ztagent._proto.workloads.v1 import inference_pb2
from ztagent.workloads.inference.errors import InvalidInputError
from ztagent.workloads.inference.manifest import MAX_INPUT_ELEMENTS, MAX_INPUT_RANK

FLOAT32 = inference_pb2.Tensor.FLOAT32
FLOAT32_BYTES = 4
MAX_TENSOR_BYTES = MAX_INPUT_ELEMENTS * FLOAT32_BYTES
"""Largest payload any request may carry (4 MiB), whatever the model."""


def dtype_name(dtype: int) -> str:
    try:
        return inference_pb2.Tensor.DType.Name(dtype)  # type: ignore[arg-type]
    except ValueError:
        return f"unknown dtype {dtype}"


def check_tensor(dtype: int, shape: Sequence[int], data_len: int, expected: Sequence[int]) -> None:
    """Raises InvalidInputError unless the tensor is float32 of shape ``expected``, exactly."""
    expected_text = f"FLOAT32 of shape {list(expected)}"
    if dtype != FLOAT32:
        raise InvalidInputError(
            "invalid_dtype", f"tensor dtype is {dtype_name(dtype)}, expected {expected_text}"
        )
    if len(shape) > MAX_INPUT_RANK:
        raise InvalidInputError(
            "invalid_shape",
            f"tensor has {len(shape)} dimensions (maximum {MAX_INPUT_RANK}), "
            f"expected {expected_text}",
        )
    shown = list(shape)
    if any(dim < 1 for dim in shape):
        raise InvalidInputError(
            "invalid_shape",
            f"tensor shape {shown} has a dimension below 1, expected {expected_text}",
        )
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS or data_len > MAX_TENSOR_BYTES:
        raise InvalidInputError(
            "tensor_too_large",
            f"tensor shape {shown} with {data_len} bytes exceeds the limit of "
            f"{MAX_INPUT_ELEMENTS} elements ({MAX_TENSOR_BYTES} bytes); expected {expected_text}",
        )
    if tuple(shape) != tuple(expected):
        raise InvalidInputError(
            "invalid_shape", f"tensor shape is {shown}, expected {expected_text}"
        )
    want = elements * FLOAT32_BYTES
    if data_len != want:
        raise InvalidInputError(
            "invalid_byte_length",
            f"tensor data is {data_len} bytes, expected {want} "
            f"({elements} little-endian float32 values for shape {shown})",
        )
