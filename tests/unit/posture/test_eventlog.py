"""The crypto-agile event log: round trip, replay, and strict refusals with offsets."""

from __future__ import annotations

import hashlib
import struct

import pytest

from tests.unit.posture._support import SELECTION, boot_events
from ztagent.posture.errors import PostureError
from ztagent.posture.eventlog import (
    COMPONENT_PCRS,
    EV_NO_ACTION,
    EV_POST_CODE,
    SPEC_ID_SIGNATURE,
    Event,
    component_measurement,
    encode_event_log,
    measurement_event,
    parse_event_log,
    replay,
)

HEADER_LEN = 32 + 33  # legacy event header + Spec ID body for one bank


def test_round_trip_one_bank() -> None:
    events = tuple(boot_events())
    raw = encode_event_log(events)
    assert raw[32:48] == SPEC_ID_SIGNATURE
    assert parse_event_log(raw) == events
    assert encode_event_log(parse_event_log(raw)) == raw


def test_round_trip_two_banks() -> None:
    events = (
        measurement_event("firmware", "fw", "1", b"img", banks=("sha1", "sha256")),
        Event(1, EV_POST_CODE, {"sha1": bytes(20), "sha256": bytes(32)}, b""),
    )
    raw = encode_event_log(events, banks=("sha1", "sha256"))
    assert parse_event_log(raw) == events


def test_replay_extends_from_zero_and_skips_no_action() -> None:
    d1, d2 = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    events = [
        Event(0, 0x8, {"sha256": d1}, b""),
        Event(0, EV_NO_ACTION, {"sha256": hashlib.sha256(b"ignored").digest()}, b""),
        Event(0, 0x8, {"sha256": d2}, b""),
        Event(5, 0x8, {"sha256": d2}, b""),
    ]
    expected = hashlib.sha256(hashlib.sha256(bytes(32) + d1).digest() + d2).digest()
    assert replay(events, "sha256", [0, 4]) == {0: expected, 4: bytes(32)}


def test_measurement_event_follows_the_convention() -> None:
    event = measurement_event("kernel", "linux", "6.6", b"kernel image")
    assert event.pcr == COMPONENT_PCRS["kernel"]
    assert event.digests["sha256"] == hashlib.sha256(b"kernel image").digest()
    m = component_measurement(event)
    assert m is not None and (m.component, m.name, m.version) == ("kernel", "linux", "6.6")
    assert set(COMPONENT_PCRS.values()) <= set(SELECTION)


def test_incomplete_component_json_is_malformed() -> None:
    event = Event(4, 0xD, {"sha256": bytes(32)}, b'{"component": "kernel"}')
    with pytest.raises(PostureError, match="eventlog_malformed"):
        component_measurement(event)


def test_deeply_nested_event_data_is_not_a_component_event() -> None:
    """Event data is the device's: nested 1,500 deep it was a RecursionError, now it is data
    that does not describe a component (the digest still counts in the replay)."""
    assert component_measurement(Event(4, 0xD, {"sha256": bytes(32)}, b"{" + b"[" * 1500)) is None


@pytest.mark.parametrize("cut", [1, 4, 10, 40, HEADER_LEN + 3, HEADER_LEN + 20])
def test_truncation_is_malformed_with_offset(cut: int) -> None:
    raw = encode_event_log(boot_events())
    with pytest.raises(PostureError, match=r"eventlog_malformed: at byte \d+") as info:
        parse_event_log(raw[: len(raw) - cut] if cut > 40 else raw[:cut])
    assert info.value.code == "eventlog_malformed"


def test_event_size_overflow() -> None:
    raw = bytearray(encode_event_log([Event(0, 1, {"sha256": bytes(32)}, b"data")]))
    struct.pack_into("<I", raw, HEADER_LEN + 12 + 2 + 32, 0xFFFFFFF0)
    with pytest.raises(PostureError, match=f"at byte {HEADER_LEN + 50}: event data needs"):
        parse_event_log(bytes(raw))


def test_unknown_algorithm_in_header() -> None:
    raw = bytearray(encode_event_log([]))
    struct.pack_into("<H", raw, 32 + 28, 0x0099)
    with pytest.raises(PostureError, match="at byte 60: unknown algorithm 0x0099"):
        parse_event_log(bytes(raw))


def test_digest_of_a_bank_not_in_header() -> None:
    raw = bytearray(encode_event_log([Event(0, 1, {"sha256": bytes(32)}, b"")]))
    struct.pack_into("<H", raw, HEADER_LEN + 12, 0x0004)
    with pytest.raises(PostureError, match="not in the header"):
        parse_event_log(bytes(raw))


def test_wrong_digest_count() -> None:
    raw = bytearray(encode_event_log([Event(0, 1, {"sha256": bytes(32)}, b"")]))
    struct.pack_into("<I", raw, HEADER_LEN + 8, 2)
    with pytest.raises(PostureError, match="2 digests, the header declares 1"):
        parse_event_log(bytes(raw))


def test_first_event_must_be_spec_id() -> None:
    raw = bytearray(encode_event_log([]))
    raw[32:48] = b"Spec ID Event02\x00"
    with pytest.raises(PostureError, match="at byte 32: signature"):
        parse_event_log(bytes(raw))
    with pytest.raises(PostureError, match="expected the Spec ID event"):
        parse_event_log(struct.pack("<II", 0, 1) + bytes(24))


def test_size_limit() -> None:
    raw = encode_event_log([Event(0, 1, {"sha256": bytes(32)}, bytes(2000))])
    with pytest.raises(PostureError, match="limit 1000"):
        parse_event_log(raw, max_bytes=1000)


def test_encoder_refuses_missing_bank() -> None:
    with pytest.raises(ValueError, match="expected"):
        encode_event_log([Event(0, 1, {"sha256": bytes(32)}, b"")], banks=("sha1", "sha256"))
