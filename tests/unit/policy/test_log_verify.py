"""verify_log / verify_files: every kind of tampering breaks the chain at a named line.

Chains are written here directly with ``DecisionRecord.to_json_bytes`` (the same function the
writer thread uses), so these tests need no thread.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ztagent.policy.decision_record import GENESIS_PREV, DecisionRecord, line_sha256
from ztagent.policy.log_verify import log_files, verify_files, verify_log

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def record(i: int) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"{i:032x}",
        time=NOW + timedelta(seconds=i),
        device_id=f"dev-{i}",
        user_sub="alice",
        service="workloads.v1.Inference",
        method="Predict",
        allow=False,
        enforced=False,
        dry_run=False,
        reasons=("denied",),
        failure=None,
        policy_revision="rev-1",
        latency_us=i,
        input={"device": {"id": f"dev-{i}"}},
    )


def chain(n: int, prev: str = GENESIS_PREV, start: int = 0) -> list[bytes]:
    lines = []
    for i in range(start, start + n):
        line = record(i).to_json_bytes(prev)
        lines.append(line)
        prev = line_sha256(line)
    return lines


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "decisions.jsonl"


def test_intact_chain_verifies(log: Path) -> None:
    lines = chain(10)
    report = verify_log(write(log, lines), expected_first_prev=GENESIS_PREV)
    assert report.ok and report.lines == 10 and report.first_bad_line is None
    assert report.reason is None and report.code is None and report.chain_continues_from is None
    assert report.last_sha256 == line_sha256(lines[-1])


def test_empty_file_verifies(log: Path) -> None:
    report = verify_log(write(log, []))
    assert report.ok and report.lines == 0 and report.last_sha256 is None


def test_edited_middle_line_names_the_line(log: Path) -> None:
    lines = chain(10)
    assert b'"allow":false' in lines[6]
    lines[6] = lines[6].replace(b'"allow":false', b'"allow":true')  # line 7, one field flipped
    report = verify_log(write(log, lines))
    assert not report.ok
    assert report.code == "chain_broken" and report.first_bad_line == 8 and report.file == log
    assert report.reason is not None
    expected = line_sha256(lines[6])[:12]
    assert f"line 8: prev_sha256 is {line_sha256(chain(10)[6])[:12]}…" in report.reason
    assert f"expected {expected}…" in report.reason
    assert "(line 7 was changed, removed or reordered)" in report.reason


def test_deleted_line_is_found(log: Path) -> None:
    lines = chain(10)
    del lines[3]
    report = verify_log(write(log, lines))
    assert not report.ok and report.code == "chain_broken" and report.first_bad_line == 4
    assert report.lines == 4


def test_swapped_lines_are_found(log: Path) -> None:
    lines = chain(10)
    lines[4], lines[5] = lines[5], lines[4]
    report = verify_log(write(log, lines))
    assert not report.ok and report.first_bad_line == 5


def test_inserted_line_is_found(log: Path) -> None:
    lines = chain(10)
    lines.insert(2, lines[8])  # a replayed copy of a real line
    report = verify_log(write(log, lines))
    assert not report.ok and report.first_bad_line == 3


def test_first_line_start_rules(log: Path) -> None:
    lines = chain(3, prev="ab" * 32)  # a rotated file: continues an earlier chain
    write(log, lines)
    alone = verify_log(log)
    assert alone.ok and alone.chain_continues_from == "ab" * 32
    assert verify_log(log, expected_first_prev="ab" * 32).ok
    fresh = verify_log(log, expected_first_prev=GENESIS_PREV)
    assert not fresh.ok and fresh.code == "chain_start" and fresh.first_bad_line == 1
    assert fresh.reason is not None and f"expected {GENESIS_PREV[:12]}…" in fresh.reason
    with pytest.raises(ValueError, match="64 lowercase hex"):
        verify_log(log, expected_first_prev="xyz")


def test_last_line_edit_is_only_visible_through_last_sha256(log: Path) -> None:
    """The limit of a chain: nothing follows the last line; an external anchor catches it."""
    lines = chain(5)
    anchor = verify_log(write(log, lines)).last_sha256
    lines[-1] = lines[-1].replace(b'"allow":false', b'"allow":true')
    report = verify_log(write(log, lines))
    assert report.ok
    assert report.last_sha256 != anchor


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"", "not valid JSON"),
        (b'{"allow":tru', "not valid JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"prev_sha256":"abc"}', "prev_sha256 is 'abc', expected 64 lowercase hex"),
        (b'{"allow":true}', "prev_sha256 is None"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON (JSON nested too deeply"),  # edited
    ],
)
def test_invalid_line_is_named(log: Path, bad: bytes, reason: str) -> None:
    lines = chain(4)
    lines[2] = bad
    report = verify_log(write(log, lines))
    assert not report.ok and report.code == "line_invalid" and report.first_bad_line == 3
    assert report.reason is not None and f"line 3: {reason}" in report.reason


def test_incomplete_last_line(log: Path) -> None:
    lines = chain(3)
    log.write_bytes(b"".join(line + b"\n" for line in lines) + lines[0][:20])
    report = verify_log(log)
    assert not report.ok and report.code == "line_incomplete" and report.first_bad_line == 4


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    report = verify_log(tmp_path / "nope.jsonl")
    assert not report.ok and report.code == "unreadable" and report.first_bad_line is None
    assert report.reason is not None and "nope.jsonl: cannot read" in report.reason


# --- rotated sets -------------------------------------------------------------------------


def rotated_set(log: Path, sizes: list[int]) -> list[Path]:
    """Writes files oldest first as log.N ... log.1, log; returns them in that order."""
    paths = [log.with_name(f"{log.name}.{n}") for n in range(len(sizes) - 1, 0, -1)] + [log]
    prev, start = GENESIS_PREV, 0
    for path, size in zip(paths, sizes, strict=True):
        lines = chain(size, prev=prev, start=start)
        write(path, lines)
        if lines:
            prev = line_sha256(lines[-1])
        start += size
    return paths


def test_log_files_lists_oldest_first(log: Path) -> None:
    paths = rotated_set(log, [2, 2, 2])
    assert log_files(log) == paths
    assert [p.name for p in paths] == ["decisions.jsonl.2", "decisions.jsonl.1", "decisions.jsonl"]


def test_verify_files_checks_links_across_files(log: Path) -> None:
    paths = rotated_set(log, [3, 0, 4, 2])  # an empty file in the middle is fine
    report = verify_files(paths)
    assert report.ok and report.lines == 9 and report.chain_continues_from is None
    assert report.last_sha256 == line_sha256(log.read_bytes().splitlines()[-1])
    # each newer file alone only says where it continues from
    assert verify_log(paths[2]).chain_continues_from is not None


def test_verify_files_finds_an_edited_last_line_of_an_older_file(log: Path) -> None:
    paths = rotated_set(log, [3, 3, 3])
    middle = paths[1]
    lines = middle.read_bytes().splitlines()
    lines[-1] = lines[-1].replace(b'"allow":false', b'"allow":true')
    write(middle, lines)
    assert verify_log(middle).ok  # alone, the edit is invisible
    report = verify_files(paths)
    assert not report.ok and report.code == "chain_start"
    assert report.file == log and report.first_bad_line == 1 and report.lines == 7
    assert report.reason is not None and f"the last line of {middle} was changed" in report.reason


def test_verify_files_finds_a_missing_file(log: Path) -> None:
    paths = rotated_set(log, [3, 3, 3])
    report = verify_files([paths[0], paths[2]])
    assert not report.ok and report.code == "chain_start" and report.file == log


def test_verify_files_finds_a_bad_line_inside_an_older_file(log: Path) -> None:
    paths = rotated_set(log, [3, 3, 3])
    lines = paths[0].read_bytes().splitlines()
    del lines[1]
    write(paths[0], lines)
    report = verify_files(paths)
    assert not report.ok and report.file == paths[0] and report.first_bad_line == 2


def test_verify_files_needs_paths() -> None:
    with pytest.raises(ValueError, match="at least one path"):
        verify_files([])
