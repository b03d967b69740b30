"""The persisted stores: rollback high-water marks and AK bindings survive a restart."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from ztagent.errors import ConfigError
from ztagent.posture.errors import PostureError
from ztagent.posture.state import AkRegistry, RollbackStore


def test_rollback_store(tmp_path: Path) -> None:
    path = tmp_path / "svn.json"
    store = RollbackStore(path)
    store.check_and_record("dev", 3)
    store.check_and_record("dev", 3)
    store.check_and_record("other", 1)
    reopened = RollbackStore(path)
    assert reopened.highest("dev") == 3
    with pytest.raises(PostureError, match="firmware_rollback: device dev firmware svn 2"):
        reopened.check_and_record("dev", 2)
    reopened.check_and_record("dev", 5)
    assert RollbackStore(path).highest("dev") == 5


def test_ak_registry(tmp_path: Path) -> None:
    path = tmp_path / "ak.json"
    AkRegistry(path).bind("dev", "000B" + "ab" * 32)
    assert AkRegistry(path).bound_ak("dev") == "000b" + "ab" * 32
    assert AkRegistry(path).bound_ak("nobody") is None


def test_corrupt_state_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "svn.json"
    path.write_text('{"version": 1, "devices": {"dev": "three"}}')
    with pytest.raises(ConfigError, match=r"posture.rollback_store: .*bad entry"):
        RollbackStore(path)
    path.write_text("nope")
    with pytest.raises(ConfigError, match=r"posture.ak_registry: .*not JSON"):
        AkRegistry(path)
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match=r"posture.ak_registry: .*nested too deeply"):
        AkRegistry(path)


def test_a_mark_recorded_by_another_process_holds_here(tmp_path: Path) -> None:
    """Two sidecar workers share the files: each re-reads what the other wrote."""
    path = tmp_path / "svn.json"
    mine, theirs = RollbackStore(path), RollbackStore(path)
    mine.check("dev", 1)
    theirs.check_and_record("dev", 5)
    with pytest.raises(PostureError, match="firmware_rollback: device dev firmware svn 4"):
        mine.check("dev", 4)
    mine.check_and_record("other", 2)  # re-reads under the lock: keeps the other's mark
    assert RollbackStore(path).highest("dev") == 5
    assert theirs.highest("other") == 2

    ak = tmp_path / "ak.json"
    first, second = AkRegistry(ak), AkRegistry(ak)
    first.bind("a", "000b" + "aa" * 32)
    second.bind("b", "000b" + "bb" * 32)
    assert first.bound_ak("b") == "000b" + "bb" * 32
    assert AkRegistry(ak).bound_ak("a") == "000b" + "aa" * 32


def _record_many(path: str, prefix: str) -> None:
    store = RollbackStore(Path(path))
    for i in range(40):
        store.check_and_record(f"{prefix}{i}", i)


def test_concurrent_writers_in_two_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "svn.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(str(path), p)) for p in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    store = RollbackStore(path)
    assert all(store.highest(f"{p}{i}") == i for p in "ab" for i in range(40))


def test_a_file_turned_bad_later_keeps_the_last_good_marks(tmp_path: Path) -> None:
    path = tmp_path / "svn.json"
    store = RollbackStore(path)
    store.check_and_record("dev", 5)
    path.write_text("garbage")
    with pytest.raises(PostureError, match="firmware_rollback"):
        store.check("dev", 4)
