"""The CA audit log is never written through a symbolic link; it is created 0640 whatever
the umask."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ztagent.ca.audit import AuditLog

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def _refuse(log: AuditLog) -> None:
    log.refused("csr_malformed", None, method="enroll", peer="p", message="m", now=NOW)


def test_a_symlink_at_the_audit_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_bytes(b"precious\n")
    path = tmp_path / "audit.jsonl"
    path.symlink_to(target)
    with pytest.raises(
        OSError, match=r"is a symbolic link \(refusing to write through it\)"
    ) as exc:
        _refuse(AuditLog(path))
    assert exc.value.filename == str(path)
    assert target.read_bytes() == b"precious\n"


def test_the_audit_log_is_0640_with_umask_0(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = os.umask(0)
    try:
        _refuse(AuditLog(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
