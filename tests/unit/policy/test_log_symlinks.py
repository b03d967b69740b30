"""The decision log is never opened, written or rotated through a symbolic link, and its files
get mode 0640 whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.unit.policy.test_decision_log import line_len, record
from ztagent.policy.decision_log import DecisionLog, DecisionLogError


def test_a_symlink_at_the_log_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_bytes(b"precious\n")
    path = tmp_path / "decisions.jsonl"
    path.symlink_to(target)
    log = DecisionLog(path)
    with pytest.raises(
        DecisionLogError,
        match=r"decision_log_unavailable: cannot open .*decisions\.jsonl: is a symbolic link",
    ):
        log.start()
    assert target.read_bytes() == b"precious\n"
    assert path.is_symlink()


def test_a_dangling_symlink_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    target = tmp_path / "created-through-the-link"
    path = tmp_path / "decisions.jsonl"
    path.symlink_to(target)
    with pytest.raises(DecisionLogError, match="is a symbolic link"):
        DecisionLog(path).start()
    assert not target.exists()


def test_rotation_replaces_a_planted_symlink_and_never_writes_its_target(tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_bytes(b"precious\n")
    path = tmp_path / "decisions.jsonl"
    path.with_name("decisions.jsonl.1").symlink_to(target)
    path.with_name("decisions.jsonl.2").symlink_to(target)
    log = DecisionLog(path, max_bytes=2 * line_len(), backups=2)
    log.start()
    for i in range(7):
        log.submit(record(i))
    assert log.close()
    assert log.stats.rotated >= 2 and log.stats.errors == 0
    assert target.read_bytes() == b"precious\n"
    assert not path.with_name("decisions.jsonl.1").is_symlink()


def test_new_files_are_0640_with_umask_0(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    old = os.umask(0)
    try:
        log = DecisionLog(path, max_bytes=2 * line_len(), backups=2)
        log.start()
        for i in range(5):
            log.submit(record(i))
        assert log.close()
    finally:
        os.umask(old)
    for p in (path, path.with_name("decisions.jsonl.1")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
