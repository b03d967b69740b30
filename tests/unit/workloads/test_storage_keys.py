"""The data key file: created 0600 and fsynced, versioned, refused when loose or malformed."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from ztagent.workloads.storage.errors import KeyFileError
from ztagent.workloads.storage.keys import (
    KEY_BYTES,
    DataKeys,
    check_key_file_mode,
    load_or_create_keys,
    parse_key_file,
)

KEY_A = base64.b64encode(b"a" * KEY_BYTES).decode()
KEY_B = base64.b64encode(b"b" * KEY_BYTES).decode()


def _doc(**doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_created_with_mode_0600_and_versioned_format(tmp_path: Path) -> None:
    path = tmp_path / "storage.key"
    old_umask = os.umask(0)  # creation must not depend on a strict umask
    try:
        keys = load_or_create_keys(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["current"] == 1
    assert base64.b64decode(doc["keys"]["1"]) == keys.current_key
    assert len(keys.current_key) == KEY_BYTES
    assert [p.name for p in tmp_path.iterdir()] == ["storage.key"]  # no temp file left


def test_reload_returns_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "storage.key"
    assert load_or_create_keys(path).keys == load_or_create_keys(path).keys


def test_two_stores_get_different_keys(tmp_path: Path) -> None:
    assert (
        load_or_create_keys(tmp_path / "a").current_key
        != load_or_create_keys(tmp_path / "b").current_key
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "storage.key"
    load_or_create_keys(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=rf"storage\.key: mode is 0{mode:o}, expected 0600"):
        load_or_create_keys(path)


def test_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_keys(real)
    (tmp_path / "storage.key").symlink_to(real)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_or_create_keys(tmp_path / "storage.key")


def test_mode_check_refuses_non_regular_file() -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        check_key_file_mode(stat.S_IFDIR | 0o700, Path("/x"))


def test_old_versions_stay_readable() -> None:
    keys = parse_key_file(_doc(current=2, keys={"1": KEY_A, "2": KEY_B}), Path("k"))
    assert keys.current == 2
    assert keys.keys[1] == b"a" * KEY_BYTES
    assert keys.current_key == b"b" * KEY_BYTES


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply to parse"),
        (b"[]", "got a JSON list, expected an object"),
        (_doc(current=1, keys={"1": KEY_A}, extra=1), "unknown field"),
        (_doc(current="1", keys={"1": KEY_A}), "'current' is '1', expected a positive integer"),
        (_doc(current=0, keys={"1": KEY_A}), "'current' is 0"),
        (_doc(current=1, keys={}), "expected a non-empty object"),
        (_doc(current=1, keys={"x": KEY_A}), "key version 'x' is not a positive integer"),
        (_doc(current=1, keys={"1": 5}), "key version 1 is a int, expected base64"),
        (_doc(current=1, keys={"1": "!!!"}), "key version 1 is not valid base64"),
        (
            _doc(current=1, keys={"1": base64.b64encode(b"x" * 16).decode()}),
            "16 bytes, expected 32",
        ),
        (_doc(current=2, keys={"1": KEY_A}), "'current' is 2 but 'keys' holds only versions"),
    ],
)
def test_refuses_malformed(data: bytes, message: str) -> None:
    with pytest.raises(KeyFileError, match=message) as info:
        parse_key_file(data, Path("/data/storage.key"))
    assert info.value.code == "key_file_invalid"
    assert "/data/storage.key" in info.value.message


def test_malformed_file_on_disk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "storage.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)  # empty file
    with pytest.raises(KeyFileError, match="not valid JSON"):
        load_or_create_keys(path)


def test_repr_hides_key_material() -> None:
    keys = DataKeys(current=1, keys={1: b"s" * KEY_BYTES})
    assert "sss" not in repr(keys)
