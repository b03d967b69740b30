"""Checks the hash chain of decision-log files (see ``decision_log`` for the format).

Streaming: one line in memory at a time. Checks stop at the first bad line. Report codes
(stable): ``line_invalid`` (not a JSON object, or ``prev_sha256`` missing or not 64 lowercase
hex), ``chain_broken`` (``prev_sha256`` differs from the hash of the previous line),
``chain_start`` (the first line does not continue the expected chain: the previous file was
changed, or a file is missing), ``line_incomplete`` (the last line has no newline: an
interrupted write, or the writer was mid-line), ``unreadable`` (the file cannot be read).

What a chain cannot show: an edit to the very last line (it has no successor) or the
removal of whole lines at the end. Compare ``last_sha256`` with a copy kept elsewhere for that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ztagent import json_input
from ztagent.policy.decision_record import GENESIS_PREV, line_sha256

_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LogVerifyReport:
    ok: bool
    lines: int
    """Lines checked: every line when ``ok``, else up to and including the first bad one
    (summed over files for ``verify_files``)."""
    first_bad_line: int | None
    """1-based line number within ``file``."""
    reason: str | None
    """``"<file> line 7: prev_sha256 is 3fa1…, expected 9b2c… (...)"``."""
    code: str | None = None
    file: Path | None = None
    """The file the first bad line (or the read error) is in."""
    chain_continues_from: str | None = None
    """The first line's ``prev_sha256`` when it is neither 64 zeros nor checked against an
    expected value: the file continues a chain whose earlier part was not checked (a rotated
    file checked alone, or the oldest file left after older backups were deleted)."""
    last_sha256: str | None = None
    """Hash of the last line checked: what a following file's first line must carry."""


def _short(h: str) -> str:
    return f"{h[:12]}…"


def _fail(path: Path, lines: int, line_no: int, code: str, what: str) -> LogVerifyReport:
    return LogVerifyReport(
        ok=False,
        lines=lines,
        first_bad_line=line_no,
        reason=f"{path} line {line_no}: {what}",
        code=code,
        file=path,
    )


def _prev_of(raw: bytes) -> str:
    """``prev_sha256`` of one line; ValueError saying what is wrong."""
    try:  # a tampered line may nest a thousand deep: still a ValueError
        doc = json_input.loads(raw, max_depth=None)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not a JSON object (got {type(doc).__name__})")
    prev = doc.get("prev_sha256")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise ValueError(f"prev_sha256 is {prev!r}, expected 64 lowercase hex characters")
    return prev


def _verify(path: Path, expected_first_prev: str | None, start_hint: str) -> LogVerifyReport:
    lines = 0
    last: str | None = None
    continues_from: str | None = None
    try:
        with path.open("rb") as f:
            for raw in f:
                lines += 1
                if not raw.endswith(b"\n"):
                    return _fail(
                        path,
                        lines,
                        lines,
                        "line_incomplete",
                        f"no newline at the end ({len(raw)} bytes): an interrupted write, "
                        "or the writer is mid-line",
                    )
                line = raw[:-1]
                try:
                    prev = _prev_of(line)
                except ValueError as exc:
                    return _fail(path, lines, lines, "line_invalid", str(exc))
                if last is not None:
                    if prev != last:
                        return _fail(
                            path,
                            lines,
                            lines,
                            "chain_broken",
                            f"prev_sha256 is {_short(prev)}, expected {_short(last)} "
                            f"(line {lines - 1} was changed, removed or reordered)",
                        )
                elif expected_first_prev is not None:
                    if prev != expected_first_prev:
                        return _fail(
                            path,
                            lines,
                            lines,
                            "chain_start",
                            f"prev_sha256 is {_short(prev)}, expected "
                            f"{_short(expected_first_prev)} {start_hint}",
                        )
                elif prev != GENESIS_PREV:
                    continues_from = prev
                last = line_sha256(line)
    except OSError as exc:
        return LogVerifyReport(
            ok=False,
            lines=lines,
            first_bad_line=None,
            reason=f"{path}: cannot read: {exc.strerror or exc}",
            code="unreadable",
            file=path,
        )
    return LogVerifyReport(
        ok=True,
        lines=lines,
        first_bad_line=None,
        reason=None,
        chain_continues_from=continues_from,
        last_sha256=last,
    )


def verify_log(path: Path, *, expected_first_prev: str | None = None) -> LogVerifyReport:
    """Check one file. The first line's ``prev_sha256`` must equal ``expected_first_prev``
    when given; otherwise 64 zeros (a fresh log) or any hash, which is then reported as
    ``chain_continues_from``."""
    if expected_first_prev is not None and not _HEX64.fullmatch(expected_first_prev):
        raise ValueError(
            f"expected_first_prev must be 64 lowercase hex characters, got {expected_first_prev!r}"
        )
    return _verify(path, expected_first_prev, "(expected_first_prev)")


def verify_files(paths: Sequence[Path]) -> LogVerifyReport:
    """Check a rotated set, oldest first (``log_files()`` gives that order), including the
    link from each file's last line to the next file's first line. Empty files are
    allowed (the link skips them). ``lines`` is summed over the files."""
    if not paths:
        raise ValueError("verify_files needs at least one path")
    total = 0
    expected: str | None = None
    continues_from: str | None = None
    previous: Path | None = None
    for path in paths:
        hint = f"(the last line of {previous} was changed, or a file between them is missing)"
        report = _verify(path, expected, hint)
        total += report.lines
        if not report.ok:
            return replace(report, lines=total)
        if expected is None:  # the first file with lines says where the chain starts
            continues_from = report.chain_continues_from
        if report.last_sha256 is not None:
            expected = report.last_sha256
            previous = path
    return LogVerifyReport(
        ok=True,
        lines=total,
        first_bad_line=None,
        reason=None,
        chain_continues_from=continues_from,
        last_sha256=expected,
    )


def log_files(path: Path) -> list[Path]:
    """The existing files of a rotated log, oldest first: ``path.N`` ... ``path.1``, ``path``.

    Numbers are followed from 1 upwards until one is missing.
    """
    rotated: list[Path] = []
    n = 1
    while (candidate := path.with_name(f"{path.name}.{n}")).exists():
        rotated.append(candidate)
        n += 1
    files = rotated[::-1]
    if path.exists():
        files.append(path)
    return files
