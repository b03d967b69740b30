"""The request path's JSON: orjson where it agrees with the standard encoder, the standard
encoder for what orjson refuses, and a TypeError for what JSON cannot hold."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from enum import StrEnum

import pytest

from ztagent.canonical_json import dumps

_STANDARD = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
)


def _standard(value: object) -> bytes:
    return _STANDARD.encode(value).encode("utf-8", "backslashreplace")


class Role(StrEnum):
    WRITER = "writer"


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": {"d": [1, 2, {"z": None, "y": True}], "c": "caf\u00e9 \u2028 \x7f \x01"}},
        {"big": 2**70, "neg": -(2**64)},  # beyond 64 bits: the standard encoder's spelling
        {"lone": "\udcff surrogate"},  # orjson refuses it; escaped, valid UTF-8
        {"role": Role.WRITER},  # a str subclass: written as its value
        ['\n\t"\\', "\U0001f600"],
    ],
)
def test_the_standard_encoders_spelling(value: object) -> None:
    out = dumps(value)
    assert out == _standard(value)
    out.decode("utf-8")


@pytest.mark.parametrize(
    "value",
    [
        {"raw": b"bytes"},
        {"when": datetime(2026, 1, 2, tzinfo=UTC)},
        {"s": {1, 2}},
        [object()],
    ],
)
def test_what_json_cannot_hold_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        dumps(value)


def test_a_dataclass_is_not_converted() -> None:
    @dataclasses.dataclass
    class Point:
        x: int

    with pytest.raises(TypeError):
        dumps({"p": Point(1)})


def test_subclasses_of_json_types_stay_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``DeviceId`` (a str subclass) is in every decision's input: it must not send every
    line to the slow encoder."""
    from ztagent import canonical_json
    from ztagent.pki.spiffe import DeviceId

    def no_fallback(value: object) -> str:
        raise AssertionError("fell back to the standard encoder")

    monkeypatch.setattr(canonical_json._STANDARD, "encode", no_fallback)
    value = {"id": DeviceId("dev-1"), "role": Role.WRITER, "n": True}
    assert dumps(value) == b'{"id":"dev-1","n":true,"role":"writer"}'


def test_floats_round_trip_and_nan_is_null() -> None:
    value = {"f": [0.1, 1e16, -2.5e-7, 123456789.125]}
    assert json.loads(dumps(value)) == value
    assert json.loads(dumps({"n": float("nan"), "i": float("inf")})) == {"n": None, "i": None}


@pytest.mark.parametrize("method", ["Get", "G\udcffet"])  # the second: the per-field path
def test_an_object_keeps_its_key_order_and_sorts_inside(method: str) -> None:
    from ztagent.canonical_json import Encoded, dumps_object

    fields = {
        "z": method,
        "a": {"y": 1, "x": [{"b": 2, "a": 1}]},
        "m": ["r2", "r1"],
        "raw": Encoded(b'{"kept":"as is"}'),
        "n": None,
    }
    expected = (
        "{" + f'"z":{_standard(method).decode()},"a":{{"x":[{{"a":1,"b":2}}],"y":1}},'
        '"m":["r2","r1"],"raw":{"kept":"as is"},"n":null}'
    ).encode()
    assert dumps_object(fields) == expected
