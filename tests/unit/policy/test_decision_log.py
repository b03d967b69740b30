"""DecisionLog: record format, the writer thread, the chain across restarts and rotations,
back-pressure (drop / block) and write errors.

Slow or failing disks are simulated by overriding ``DecisionLog._write`` (the one place bytes
go to disk) with a hook the test controls through Events; nothing here depends on timing
except two short negative waits ("has not returned yet").
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztagent.errors import ConfigError
from ztagent.policy import decision_log
from ztagent.policy.decision_log import DecisionLog, DecisionLogError, LogStats, NullDecisionLog
from ztagent.policy.decision_record import (
    GENESIS_PREV,
    DecisionRecord,
    format_time,
    line_sha256,
    new_decision_id,
)
from ztagent.policy.log_verify import log_files, verify_files, verify_log

NOW = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
KEYS = [
    "decision_id",
    "time",
    "device_id",
    "user_sub",
    "service",
    "method",
    "allow",
    "enforced",
    "dry_run",
    "reasons",
    "failure",
    "refusal",
    "cached",
    "policy_revision",
    "latency_us",
    "attestation",
    "input",
    "prev_sha256",
]


def record(
    i: int = 0, *, allow: bool = False, input_doc: dict[str, Any] | None = None
) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"{i:032x}",
        time=NOW + timedelta(milliseconds=i),
        device_id=f"dev-{i}",
        user_sub=None,
        service="workloads.v1.Storage",
        method="Get",
        allow=allow,
        enforced=allow,
        dry_run=False,
        reasons=("posture_stale",) if not allow else (),
        failure=None,
        policy_revision="rev-1",
        latency_us=120 + i,
        input=input_doc
        if input_doc is not None
        else {"device": {"id": f"dev-{i}"}, "request": {"method": "Get"}},
    )


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


class HookedLog(DecisionLog):
    """A DecisionLog whose disk write first calls ``hook(fd, data)`` (which may block or raise)."""

    def __init__(self, path: Path, hook: Callable[[int, bytes], None], **kw: Any) -> None:
        super().__init__(path, **kw)
        self.hook = hook

    def _write(self, fd: int, data: bytes) -> None:
        self.hook(fd, data)
        super()._write(fd, data)


class Gate:
    """Stalls the writer inside its write until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, fd: int, data: bytes) -> None:
        self.entered.set()
        assert self.open.wait(10), "the test never opened the gate"


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "log" / "decisions.jsonl"


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open.set()  # never leave a writer thread stuck


# --- record format ----------------------------------------------------------------------


def test_to_json_bytes_is_deterministic_compact_and_ordered() -> None:
    rec = record(3)
    line = rec.to_json_bytes(GENESIS_PREV)
    assert line == rec.to_json_bytes(GENESIS_PREV)
    assert b"\n" not in line and b", " not in line and b": " not in line
    doc = json.loads(line)
    assert list(doc) == KEYS
    assert doc["time"] == "2025-03-04T05:06:07.894Z"
    assert doc["reasons"] == ["posture_stale"]
    assert doc["attestation"] is None and doc["prev_sha256"] == GENESIS_PREV
    # equal records with differently ordered input dicts give the same bytes
    a = record(1, input_doc={"b": 1, "a": {"y": 2, "x": 3}})
    b = record(1, input_doc={"a": {"x": 3, "y": 2}, "b": 1})
    assert a.to_json_bytes(GENESIS_PREV) == b.to_json_bytes(GENESIS_PREV)
    assert a.to_json_bytes(GENESIS_PREV) != a.to_json_bytes("f" * 64)


_FLOAT_FREE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    device=st.none() | st.text(),
    allow=st.booleans(),
    latency=st.integers(min_value=0, max_value=2**70),
    refusal=st.none() | st.dictionaries(st.text(), _FLOAT_FREE, max_size=3),
    input_doc=st.dictionaries(st.text(), _FLOAT_FREE, max_size=5),
    max_input=st.none() | st.integers(min_value=1, max_value=400),
)
def test_the_line_is_the_json_encoders_spelling_of_every_field(
    device: str | None,
    allow: bool,
    latency: int,
    refusal: dict[str, Any] | None,
    input_doc: dict[str, Any],
    max_input: int | None,
) -> None:
    """The line's fast path (orjson, fixed keys, scalars spelt without an encoder) gives the
    bytes the standard library's encoder gives, field by field, for every value without a
    float: big integers, lone surrogates and control characters included."""
    rec = DecisionRecord(
        **{**record(2).__dict__, "device_id": device, "allow": allow, "latency_us": latency,
           "refusal": refusal, "input": input_doc}
    )  # fmt: skip
    assert rec.to_json_bytes("ab" * 32, max_input) == _reference_line(rec, "ab" * 32, max_input)


@settings(max_examples=200, deadline=None)
@given(input_doc=st.dictionaries(st.text(), _JSON_VALUES, max_size=5))
def test_a_line_with_floats_parses_back_to_the_record(input_doc: dict[str, Any]) -> None:
    """Floats may be spelt differently from the standard encoder (``1e16``, not ``1e+16``)
    but parse back to the same values, and the same record always gives the same bytes."""
    rec = record(2, input_doc=input_doc)
    line = rec.to_json_bytes(GENESIS_PREV)
    assert line == rec.to_json_bytes(GENESIS_PREV)
    assert json.loads(line)["input"] == json.loads(json.dumps(input_doc))


def _reference_line(rec: DecisionRecord, prev: str, max_input: int | None) -> bytes:
    """The line as the plain encoder writes it, one call per key and per value."""
    enc = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    )
    input_value: object = rec.input
    raw = enc.encode(rec.input).encode("utf-8", "backslashreplace")
    if max_input is not None and len(raw) > max_input:
        digest = hashlib.sha256(raw).hexdigest()
        input_value = {"truncated": True, "bytes": len(raw), "sha256": digest}
    special = {
        "time": format_time(rec.time),
        "reasons": list(rec.reasons),
        "input": input_value,
        "prev_sha256": prev,
    }
    body = ",".join(
        f"{enc.encode(k)}:{enc.encode(special[k] if k in special else getattr(rec, k))}"
        for k in KEYS
    )
    return ("{" + body + "}").encode("utf-8", "backslashreplace")


def test_time_is_written_in_utc_and_naive_time_is_refused() -> None:
    east = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    rec = DecisionRecord(**{**record(0).__dict__, "time": east})
    assert json.loads(rec.to_json_bytes(GENESIS_PREV))["time"] == "2025-03-04T05:06:07.891Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        DecisionRecord(**{**record(0).__dict__, "time": NOW.replace(tzinfo=None)})


def test_non_utf8_safe_text_and_non_json_values() -> None:
    rec = record(0, input_doc={"request": {"metadata": {"x-name": "caf\u00e9 \udcff"}}})
    line = rec.to_json_bytes(GENESIS_PREV)
    line.decode("utf-8")  # valid UTF-8 even with a lone surrogate
    assert json.loads(line)["input"]["request"]["metadata"]["x-name"] == "caf\u00e9 \udcff"
    # NaN and the infinities are not JSON: written as null (never the bare NaN token)
    nan = record(0, input_doc={"n": float("nan"), "i": [float("-inf")]}).to_json_bytes(GENESIS_PREV)
    assert json.loads(nan)["input"] == {"n": None, "i": [None]}
    with pytest.raises(TypeError):
        record(0, input_doc={"b": b"raw"}).to_json_bytes(GENESIS_PREV)
    with pytest.raises(ValueError, match="64 hex"):
        record(0).to_json_bytes("abc")


def test_new_decision_id_sorts_by_time() -> None:
    a, b = new_decision_id(NOW), new_decision_id(NOW + timedelta(milliseconds=1))
    assert len(a) == 32 and int(a, 16) >= 0
    assert a < b
    assert new_decision_id(NOW) != new_decision_id(NOW)


# --- writing through the thread ---------------------------------------------------------


def test_thousand_lines_through_the_writer_thread_verify(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    for i in range(1000):
        assert log.submit(record(i, allow=i % 3 == 0))
    assert log.close()
    assert log.stats == LogStats(written=1000, dropped=0, rotated=0, queue_depth=0, errors=0)
    lines = lines_of(log_path)
    assert len(lines) == 1000
    assert json.loads(lines[0])["prev_sha256"] == GENESIS_PREV
    assert json.loads(lines[999])["decision_id"] == f"{999:032x}"  # order kept
    report = verify_log(log_path, expected_first_prev=GENESIS_PREV)
    assert report.ok and report.lines == 1000 and report.chain_continues_from is None
    assert report.last_sha256 == line_sha256(lines[-1])


def test_edited_line_in_a_written_log_is_found(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    for i in range(10):
        log.submit(record(i, allow=False))
    log.close()
    lines = lines_of(log_path)
    assert b'"allow":false' in lines[4]
    lines[4] = lines[4].replace(b'"allow":false', b'"allow":true')
    log_path.write_bytes(b"\n".join(lines) + b"\n")
    report = verify_log(log_path)
    assert not report.ok and report.first_bad_line == 6 and report.code == "chain_broken"
    assert report.reason is not None and "line 5 was changed" in report.reason


def test_file_mode_is_0640_and_parents_are_created(log_path: Path) -> None:
    old = os.umask(0o077)  # a narrow umask must not narrow the log below 0640
    try:
        log = DecisionLog(log_path)
        log.start()
    finally:
        os.umask(old)
    log.submit(record())
    log.close()
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o640


def test_restart_continues_the_chain(log_path: Path) -> None:
    first = DecisionLog(log_path)
    first.start()
    for i in range(3):
        first.submit(record(i))
    first.close()
    second = DecisionLog(log_path)
    second.start()
    for i in range(3, 5):
        second.submit(record(i))
    second.close()
    lines = lines_of(log_path)
    assert len(lines) == 5
    assert json.loads(lines[3])["prev_sha256"] == line_sha256(lines[2])
    report = verify_log(log_path, expected_first_prev=GENESIS_PREV)
    assert report.ok and report.lines == 5


def test_truncated_last_line_is_removed_and_the_chain_continues(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = DecisionLog(log_path)
    log.start()
    for i in range(3):
        log.submit(record(i))
    log.close()
    partial = b'{"decision_id":"00000000000000000000000000000003","time":"2025-'
    with log_path.open("ab") as f:  # a crash in the middle of a write
        f.write(partial)
    assert verify_log(log_path).code == "line_incomplete"

    with caplog.at_level(logging.WARNING, logger="ztagent.decision_log"):
        restarted = DecisionLog(log_path)
        restarted.start()
    assert f"removed a partial last line ({len(partial)} bytes, sha256 {line_sha256(partial)}" in (
        caplog.text
    )
    assert not log_path.read_bytes().endswith(partial)
    restarted.submit(record(3))
    restarted.close()
    lines = lines_of(log_path)
    assert len(lines) == 4
    assert json.loads(lines[3])["prev_sha256"] == line_sha256(lines[2])
    assert verify_log(log_path, expected_first_prev=GENESIS_PREV).ok


def test_partial_only_file_starts_a_fresh_chain(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b'{"decision_id":')
    log = DecisionLog(log_path)
    log.start()
    log.submit(record(0))
    log.close()
    lines = lines_of(log_path)
    assert len(lines) == 1 and json.loads(lines[0])["prev_sha256"] == GENESIS_PREV


# --- rotation -----------------------------------------------------------------------------


def line_len() -> int:
    return len(record(0).to_json_bytes(GENESIS_PREV)) + 1


def test_rotation_keeps_backups_and_the_chain_spans_files(log_path: Path) -> None:
    log = DecisionLog(log_path, max_bytes=3 * line_len() + 10, backups=2)  # 3 lines a file
    log.start()
    for i in range(20):
        log.submit(record(i))
    assert log.close()
    stats = log.stats
    assert stats.written == 20 and stats.errors == 0 and stats.rotated == 6
    files = log_files(log_path)
    assert [p.name for p in files] == [
        "decisions.jsonl.2",
        "decisions.jsonl.1",
        "decisions.jsonl",
    ]
    assert not log_path.with_name("decisions.jsonl.3").exists()
    assert all(p.stat().st_size <= log.max_bytes for p in files)
    # the first line of each file carries the hash of the last line of the one before
    for older, newer in itertools.pairwise(files):
        assert json.loads(lines_of(newer)[0])["prev_sha256"] == line_sha256(lines_of(older)[-1])
    report = verify_files(files)
    assert report.ok and report.lines == 2 + 3 + 3
    assert report.chain_continues_from is not None  # older backups were deleted
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o640


def test_rotation_with_every_file_kept_verifies_from_genesis(log_path: Path) -> None:
    log = DecisionLog(log_path, max_bytes=2 * line_len(), backups=10, fsync=True)
    log.start()
    for i in range(9):
        log.submit(record(i))
    log.close()
    files = log_files(log_path)
    assert len(files) == 5
    report = verify_files(files)
    assert report.ok and report.lines == 9 and report.chain_continues_from is None


def test_restart_right_after_a_rotation_continues_from_the_rotated_file(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    for i in range(3):
        log.submit(record(i))
    log.close()
    os.replace(log_path, log_path.with_name("decisions.jsonl.1"))  # crash after the rename
    log = DecisionLog(log_path)
    log.start()
    log.submit(record(3))
    log.close()
    report = verify_files(log_files(log_path))
    assert report.ok and report.lines == 4 and report.chain_continues_from is None


def test_failed_rotation_is_counted_and_lines_stay_in_the_live_file(log_path: Path) -> None:
    log_path.with_name("decisions.jsonl.1").mkdir(parents=True)  # the rename target is taken
    log = DecisionLog(log_path, max_bytes=2 * line_len(), backups=1)
    log.start()
    for i in range(6):
        log.submit(record(i))
    log.close()
    stats = log.stats
    assert stats.written == 6 and stats.rotated == 0 and stats.errors >= 1
    report = verify_log(log_path, expected_first_prev=GENESIS_PREV)
    assert report.ok and report.lines == 6


# --- back-pressure ------------------------------------------------------------------------


@pytest.mark.parametrize("queue_by", ["submit", "hold"])
def test_drop_mode_counts_drops_and_never_blocks(log_path: Path, gate: Gate, queue_by: str) -> None:
    """``hold`` counts against the same bound: a held record takes a place in the queue."""
    log = HookedLog(log_path, gate, queue_size=2, on_full="drop")
    log.start()
    put = getattr(log, queue_by)
    assert log.submit(record(0))
    assert gate.entered.wait(5)  # the writer holds record 0 and is stuck in its write
    assert log.submit(record(1)) and put(record(2))
    # the queue is full: these return at once (a block would hang the test until its timeout)
    assert not log.submit(record(3))
    assert not put(record(4))
    assert log.stats.dropped == 2 and log.stats.queue_depth == 2
    gate.open.set()
    assert log.close()
    assert log.stats.written == 3 and log.stats.dropped == 2
    ids = [json.loads(line)["decision_id"] for line in lines_of(log_path)]
    assert ids == [f"{i:032x}" for i in range(3)]
    assert verify_log(log_path).ok


def test_block_mode_blocks_until_there_is_space(log_path: Path, gate: Gate) -> None:
    log = HookedLog(log_path, gate, queue_size=1, on_full="block")
    log.start()
    log.submit(record(0))
    assert gate.entered.wait(5)
    assert log.submit(record(1))  # fills the queue
    returned = threading.Event()

    def submitter() -> None:
        log.submit(record(2))
        returned.set()

    t = threading.Thread(target=submitter)
    t.start()
    assert not returned.wait(0.2)  # still blocked: the writer is stalled and the queue full
    assert log.stats.dropped == 0
    gate.open.set()
    assert returned.wait(5)
    t.join()
    assert log.close()
    assert log.stats.written == 3 and log.stats.dropped == 0
    assert verify_log(log_path).lines == 3


async def test_asubmit_waits_off_the_event_loop(log_path: Path, gate: Gate) -> None:
    log = HookedLog(log_path, gate, queue_size=1, on_full="block")
    log.start()
    assert await log.asubmit(record(0))  # space: no thread hop
    assert await asyncio.to_thread(gate.entered.wait, 5)
    assert await log.asubmit(record(1))
    pending = asyncio.create_task(log.asubmit(record(2)))
    for _ in range(5):  # the loop keeps running while the submit waits
        await asyncio.sleep(0)
    assert not pending.done()
    gate.open.set()
    assert await asyncio.wait_for(pending, 5) is True
    assert await asyncio.to_thread(log.close)
    assert log.stats.written == 3


def test_a_held_record_waits_for_release_and_keeps_its_place(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    assert log.hold(record(0)) and log.hold(record(1))
    time.sleep(0.1)  # negative wait: nothing woke the writer, so nothing may be written
    assert log.stats.written == 0 and log.stats.queue_depth == 2
    assert not log_path.read_bytes()
    log.release()
    log.release()  # nothing held: a no-op
    assert log.hold(record(2))
    assert log.submit(record(3))  # a submit hands the held record over first
    assert log.close()
    ids = [json.loads(line)["decision_id"] for line in lines_of(log_path)]
    assert ids == [f"{i:032x}" for i in range(4)]
    assert log.stats.written == 4 and verify_log(log_path).ok


def test_close_writes_what_is_held(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    assert log.hold(record(0))
    assert log.close()
    assert [json.loads(line)["decision_id"] for line in lines_of(log_path)] == [f"{0:032x}"]
    assert not log.hold(record(1))  # closed: dropped like a submit
    assert log.stats.dropped == 1


def test_hold_in_block_mode_submits_at_once(log_path: Path) -> None:
    log = DecisionLog(log_path, on_full="block")
    log.start()
    assert log.hold(record(0))
    assert log.stats.queue_depth <= 1
    deadline = time.monotonic() + 5
    while log.stats.written < 1 and time.monotonic() < deadline:  # no release() needed
        time.sleep(0.01)
    assert log.stats.written == 1
    assert log.close()


def test_submit_after_close_is_refused(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    log.close()
    assert not log.submit(record())
    assert log.stats.dropped == 1


# --- errors -------------------------------------------------------------------------------


class Failing:
    """Raises ENOSPC for the first ``n`` writes, after an optional partial write; reports
    every call on ``calls`` so the test can sequence batches."""

    def __init__(
        self, n: int, partial: bool = False, on_call: Callable[[int], None] | None = None
    ) -> None:
        self.n = n
        self.partial = partial
        self.on_call = on_call
        self.calls: queue.Queue[int] = queue.Queue()
        self.count = 0

    def __call__(self, fd: int, data: bytes) -> None:
        self.count += 1
        if self.on_call is not None:
            self.on_call(self.count)  # runs on the writer thread, before this write's outcome
        self.calls.put(len(data))
        if self.n > 0:
            self.n -= 1
            if self.partial:
                os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")


def test_write_errors_are_counted_logged_once_a_minute_and_the_writer_goes_on(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]

    def clock_step(call: int) -> None:
        if call == 3:  # errors 1 and 2 fall in one minute, error 3 a minute later
            now[0] += 61

    fail = Failing(3, on_call=clock_step)
    log = HookedLog(log_path, fail)
    log._clock = lambda: now[0]
    for i in range(3):  # queued before start: the first batch is exactly these three
        log.submit(record(i))
    with caplog.at_level(logging.ERROR, logger="ztagent.decision_log"):
        log.start()
        fail.calls.get(timeout=5)
        log.submit(record(3))
        fail.calls.get(timeout=5)  # second failure, same minute: counted, not logged
        log.submit(record(4))
        fail.calls.get(timeout=5)  # a minute later: logged again, with the suppressed count
        log.submit(record(5))
        log.submit(record(6))
        assert log.close()
    assert log.stats.errors == 3
    assert log.stats.written == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "No space left on device" in messages[0] and "3 records lost" in messages[0]
    assert "(1 more errors since the last report)" in messages[1]
    report = verify_log(log_path, expected_first_prev=GENESIS_PREV)
    assert report.ok and report.lines == 2


def test_records_lost_to_failed_writes_are_counted_and_the_recovery_gives_the_total(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The error line is rate-limited (once a minute), so the total lost is in the stats (the
    # sidecar's ztagent_decision_log_lost_total) and in the line logged when writes succeed
    # again: the soak found lines missing from the log that nothing had counted.
    fail = Failing(2)
    log = HookedLog(log_path, fail)
    for i in range(3):
        log.submit(record(i))
    with caplog.at_level(logging.WARNING, logger="ztagent.decision_log"):
        log.start()
        fail.calls.get(timeout=5)
        log.submit(record(3))
        fail.calls.get(timeout=5)  # second failure within the minute: not logged
        log.submit(record(4))
        fail.calls.get(timeout=5)  # this one is written
        assert log.close()
    assert log.stats.lost == 4 and log.stats.written == 1 and log.stats.dropped == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "3 records lost" in messages[0]
    assert "again; 4 records lost since start" in messages[-1]
    assert DecisionLog(log_path).stats.lost == 0


def test_a_failing_linger_sleep_does_not_end_the_writer(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what libfaketime (FAKETIME_DONT_FAKE_MONOTONIC=1) does to every time.sleep
    def sleep(seconds: float) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(decision_log.time, "sleep", sleep)
    log = DecisionLog(log_path)
    log.submit(record(0))
    log.submit(record(1))  # a batch of two: the writer lingers after it
    log.start()
    deadline = time.monotonic() + 5
    while log.stats.written < 2 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    log.submit(record(2))
    assert log.close()
    assert log.stats.written == 3
    assert len(lines_of(log_path)) == 3


def test_partial_write_keeps_whole_lines_and_the_chain(log_path: Path) -> None:
    fail = Failing(1, partial=True)
    log = HookedLog(log_path, fail)
    for i in range(3):
        log.submit(record(i))
    log.start()
    fail.calls.get(timeout=5)
    log.submit(record(3))
    log.close()
    assert log.stats.errors == 1
    assert log.stats.written == 2  # line 0 reached the file whole before the failure
    ids = [json.loads(line)["decision_id"] for line in lines_of(log_path)]
    assert ids == [f"{0:032x}", f"{3:032x}"]
    assert verify_log(log_path, expected_first_prev=GENESIS_PREV).ok


def test_unserialisable_record_is_an_error_not_a_broken_chain(log_path: Path) -> None:
    log = DecisionLog(log_path)
    for rec in (record(0), record(1, input_doc={"x": b"bytes"}), record(2)):
        log.submit(rec)
    log.start()
    log.close()
    assert log.stats.errors == 1 and log.stats.written == 2
    assert verify_log(log_path).ok


def test_start_on_a_directory_fails_naming_the_path(log_path: Path) -> None:
    log_path.mkdir(parents=True)
    log = DecisionLog(log_path)
    with pytest.raises(
        DecisionLogError, match=r"decision_log_unavailable: cannot open .*decisions\.jsonl"
    ):
        log.start()


def test_start_twice_is_refused(log_path: Path) -> None:
    log = DecisionLog(log_path)
    log.start()
    with pytest.raises(DecisionLogError, match="decision_log_state"):
        log.start()
    log.close()


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"max_bytes": 0}, "decision_log.max_bytes"),
        ({"backups": -1}, "decision_log.backups"),
        ({"queue_size": 0}, "decision_log.queue_size"),
        ({"on_full": "wait"}, "decision_log.on_full"),
    ],
)
def test_bad_settings_name_the_key(log_path: Path, kw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DecisionLog(log_path, **kw)


async def test_null_log_has_the_same_interface() -> None:
    null = NullDecisionLog()
    null.start()
    assert null.submit(record())
    assert await null.asubmit(record())
    assert null.hold(record())
    null.release()
    assert null.stats == LogStats(0, 0, 0, 0, 0)
    assert null.close()


def test_an_oversized_input_is_replaced_by_its_size_and_digest(tmp_path: Path) -> None:
    import hashlib

    big = {"request": {"metadata": {"x-junk": "j" * 10_000}}}
    record = DecisionRecord(
        decision_id="d1",
        time=NOW,
        device_id="dev",
        user_sub=None,
        service="s",
        method="m",
        allow=False,
        enforced=False,
        dry_run=False,
        reasons=("policy_denied",),
        failure=None,
        policy_revision="r",
        latency_us=1,
        input=big,
    )
    whole = json.loads(record.to_json_bytes(GENESIS_PREV))
    assert whole["input"] == big
    line = record.to_json_bytes(GENESIS_PREV, max_input_bytes=4096)
    assert len(line) < 1024
    cut = json.loads(line)["input"]
    encoded = json.dumps(big, separators=(",", ":"), sort_keys=True).encode()
    assert cut == {
        "truncated": True,
        "bytes": len(encoded),
        "sha256": hashlib.sha256(encoded).hexdigest(),
    }
    small = dataclasses.replace(record, input={"request": {}})
    assert json.loads(small.to_json_bytes(GENESIS_PREV, max_input_bytes=4096))["input"] == {
        "request": {}
    }


def test_decision_ids_are_unique_across_pool_refills_and_forks() -> None:
    """Ids come from a pool of urandom bytes: distinct across many refills, and a forked
    child does not repeat its parent's next ids."""
    import multiprocessing

    ids = {new_decision_id(NOW) for _ in range(2_000)}  # 20,000 random bytes: 5 refills
    assert len(ids) == 2_000
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    new_decision_id(NOW)  # the pool is filled before the fork
    child = ctx.Process(target=lambda: child_conn.send(new_decision_id(NOW)))
    child.start()
    child.join(10)
    assert parent_conn.poll(5)
    assert parent_conn.recv() != new_decision_id(NOW)
