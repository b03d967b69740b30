"""Pure parts of the inference workload: manifests, tensor checks, request binding, options."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from ztagent._proto.workloads.v1 import inference_pb2
from ztagent.errors import VerificationError
from ztagent.rpc_status import grpc_status_for
from ztagent.workloads.inference.errors import (
    InferenceBusyError,
    InvalidInputError,
    ModelHeaderRequiredError,
    ModelLoadError,
    ModelNotFoundError,
)
from ztagent.workloads.inference.manifest import (
    MAX_INPUT_ELEMENTS,
    ModelManifest,
    parse_manifest,
    validate_model_name,
)
from ztagent.workloads.inference.outbox import EscalatedResult, outbox_key, record_json
from ztagent.workloads.inference.tensors import MAX_TENSOR_BYTES, check_tensor

PATH = Path("/models/m.manifest.json")
FLOAT32 = inference_pb2.Tensor.FLOAT32


def manifest_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "manifest_version": 1,
        "name": "vibration-anomaly",
        "version": "1.0.0",
        "file": "vibration-anomaly.pt",
        "sha256": "ab" * 32,
        "input_shape": [3, 64],
        "labels": ["normal", "imbalance"],
        "critical": True,
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def parse(doc: dict[str, Any]) -> ModelManifest:
    return parse_manifest(json.dumps(doc).encode(), PATH)


def test_parse_manifest_round_trip() -> None:
    manifest = parse(manifest_doc(description="d", metrics={"heldout_accuracy": 0.98}))
    assert manifest.input_shape == (3, 64)
    assert manifest.input_elements == 192
    assert manifest.labels == ("normal", "imbalance")
    assert manifest.critical is True
    assert parse_manifest(manifest.to_json(), PATH) == manifest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"extra": 1}, "unknown field(s) ['extra']"),
        ({"sha256": None}, "missing field(s) ['sha256']"),
        ({"manifest_version": 2}, "manifest_version is 2, expected 1"),
        ({"name": "Bad Name"}, "model name 'Bad Name' is not 1-64 characters"),
        ({"name": "../x"}, "model name '../x'"),
        ({"version": ""}, "'version' is '', expected 1-64 printable"),
        ({"file": "../other.pt"}, "expected a bare file name"),
        ({"file": "/etc/passwd"}, "expected a bare file name"),
        ({"file": ".."}, "expected a bare file name"),
        ({"sha256": "AB" * 32}, "expected 64 lowercase hex digits"),
        ({"sha256": "ab" * 31}, "expected 64 lowercase hex digits"),
        ({"input_shape": []}, "expected a list of 1-8 sizes"),
        ({"input_shape": [3, 0]}, "holds 0, expected positive integers"),
        ({"input_shape": [3, True]}, "holds True"),
        ({"input_shape": [1 << 11, 1 << 11]}, f"maximum is {MAX_INPUT_ELEMENTS}"),
        ({"labels": ["only"]}, "expected a list of 2-1024 class names"),
        ({"labels": ["a", "a"]}, "has duplicates"),
        ({"labels": ["a", ""]}, "label '' is not a string of 1-64"),
        ({"critical": "yes"}, "'critical' is 'yes', expected true or false"),
        ({"metrics": []}, "'metrics' is a list, expected an object"),
    ],
)
def test_parse_manifest_refuses(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=f"^manifest_invalid: {PATH}: ") as info:
        parse(manifest_doc(**changes))
    assert message in info.value.message


@pytest.mark.parametrize("data", [b"", b"[]", b"\xff", b"{"])
def test_parse_manifest_refuses_non_objects(data: bytes) -> None:
    with pytest.raises(ModelLoadError, match="manifest_invalid"):
        parse_manifest(data, PATH)


def test_validate_model_name() -> None:
    validate_model_name("vibration-anomaly-int8")
    for bad in ("", "-x", "A", "x/y", "x" * 65, "x\x00"):
        with pytest.raises(InvalidInputError, match="invalid_model_name"):
            validate_model_name(bad)


# -- tensor checks: from the declared fields only ------------------------------------------


def test_check_tensor_accepts_exact() -> None:
    check_tensor(FLOAT32, [3, 64], 768, (3, 64))


@pytest.mark.parametrize(
    ("dtype", "shape", "data_len", "code", "message"),
    [
        (
            inference_pb2.Tensor.FLOAT64,
            [3, 64],
            1536,
            "invalid_dtype",
            "tensor dtype is FLOAT64, expected FLOAT32 of shape [3, 64]",
        ),
        (0, [3, 64], 768, "invalid_dtype", "tensor dtype is DTYPE_UNSPECIFIED"),
        (42, [3, 64], 768, "invalid_dtype", "tensor dtype is unknown dtype 42"),
        (FLOAT32, [64, 3], 768, "invalid_shape", "tensor shape is [64, 3], expected FLOAT32"),
        (FLOAT32, [1, 3, 64], 768, "invalid_shape", "tensor shape is [1, 3, 64]"),
        (FLOAT32, [], 0, "invalid_shape", "tensor shape is [], expected"),
        (FLOAT32, [3, -64], 768, "invalid_shape", "has a dimension below 1"),
        (FLOAT32, [1] * 9, 4, "invalid_shape", "tensor has 9 dimensions (maximum 8)"),
        # declared sizes far beyond memory: refused by arithmetic, nothing is allocated
        (FLOAT32, [1 << 40, 1 << 40], 768, "tensor_too_large", "exceeds the limit of"),
        (FLOAT32, [3, 64], MAX_TENSOR_BYTES + 1, "tensor_too_large", "exceeds the limit of"),
        (
            FLOAT32,
            [3, 64],
            767,
            "invalid_byte_length",
            "tensor data is 767 bytes, expected 768 (192 little-endian float32 values",
        ),
        (FLOAT32, [3, 64], 0, "invalid_byte_length", "tensor data is 0 bytes, expected 768"),
    ],
)
def test_check_tensor_refuses(
    dtype: int, shape: list[int], data_len: int, code: str, message: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        check_tensor(dtype, shape, data_len, (3, 64))
    assert info.value.code == code
    assert message in info.value.message


# -- errors, outbox records ----------------------------------------------------------------


def test_status_mapping() -> None:
    assert (
        grpc_status_for(InvalidInputError("invalid_shape", "m")) is grpc.StatusCode.INVALID_ARGUMENT
    )
    assert grpc_status_for(ModelNotFoundError("x", ["a"])) is grpc.StatusCode.NOT_FOUND
    header = ModelHeaderRequiredError("model_header", "m")
    assert grpc_status_for(header) is grpc.StatusCode.PERMISSION_DENIED
    assert grpc_status_for(InferenceBusyError("overloaded", "m")) is grpc.StatusCode.UNAVAILABLE
    assert grpc_status_for(VerificationError("c", "m")) is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(ValueError, match="unknown InvalidInputError code 'c'"):
        InvalidInputError("c", "m")  # codes are data: a made-up one is a programming error


def test_model_not_found_names_served_models() -> None:
    err = ModelNotFoundError("nope", ["b", "a"])
    assert err.message == "model 'nope' is not served; serving ['a', 'b']"


def test_outbox_key_and_record() -> None:
    when = datetime(2026, 11, 26, 19, 0, 1, 250000, tzinfo=UTC)
    assert outbox_key("m", when, "abc") == "outbox/m/20261126T190001.250000Z-abc"
    record = EscalatedResult(
        device_id="cam-1",
        spiffe_id="spiffe://ztagent.dev/device/cam-1",
        decision_id="d-1",
        model="m",
        model_version="1.0.0",
        label="normal",
        confidence=0.5,
        scores=[("normal", 0.5), ("imbalance", 0.25)],
        threshold=0.8,
        request_id="r1",
        time=when,
    )
    assert json.loads(record_json(record)) == {
        "device_id": "cam-1",
        "decision_id": "d-1",
        "model": "m",
        "model_version": "1.0.0",
        "label": "normal",
        "confidence": 0.5,
        "scores": {"normal": 0.5, "imbalance": 0.25},
        "threshold": 0.8,
        "request_id": "r1",
        "time": "2026-11-26T19:00:01.250000Z",
    }
