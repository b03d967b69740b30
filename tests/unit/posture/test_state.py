"""The persisted stores: rollback high-water marks and AK bindings survive a restart."""

from __future__ import annotations

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
