"""Small persisted stores of the verifier: firmware SVN high-water marks and bound AKs.

Each store is one JSON file, rewritten atomically (temp file, fsync, rename) on every change.
Several sidecar worker processes may share a file (``listen.workers``): a change takes an
exclusive ``flock`` on ``<file>.lock``, re-reads the file and then writes it, and every read
first re-reads the file when its (mtime, size, inode) changed, so a high-water mark one worker
recorded holds in all of them. The in-process lock serialises threads. A missing file is an
empty store; an unreadable or malformed one is a ``ConfigError`` naming the store when opened,
never silently reset (that would forget rollback high-water marks or AK bindings); one that
turns bad later is logged and the last good contents stay in force.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ztagent import json_input
from ztagent.errors import ConfigError
from ztagent.files import file_stamp, make_private_dir, write_atomic
from ztagent.posture.errors import PostureError

log = logging.getLogger("ztagent.posture")

FORMAT_VERSION = 1
ROLLBACK_KEY = "posture.rollback_store"
AK_REGISTRY_KEY = "posture.ak_registry"


class _JsonStore:
    def __init__(self, path: Path, key: str) -> None:
        self._path = Path(path)
        self._key = key
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        self._lock = threading.Lock()
        self._signature = file_stamp(self._path)
        self._devices: dict[str, Any] = self._read()

    def _refresh(self) -> None:
        """Re-reads the file if another process changed it (call with ``_lock`` held)."""
        signature = file_stamp(self._path)
        if signature == self._signature:
            return
        try:
            devices = self._read()
        except ConfigError as err:
            log.error("keeping the last good %s: %s", self._key, err.message)
            return
        self._signature, self._devices = signature, devices

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Thread lock, then the cross-process file lock, then fresh contents."""
        with self._lock:
            make_private_dir(self._path.parent)
            fd = os.open(
                self._lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._refresh()
                yield
            finally:
                os.close(fd)  # releases the flock

    def _read(self) -> dict[str, Any]:
        if self._path.is_symlink():  # planted state (an AK binding, a lower SVN) is refused
            raise ConfigError(
                self._key, f"{self._path} is a symbolic link (refusing to read or write it)"
            )
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(self._key, f"cannot read {self._path}: {exc.strerror}") from exc
        try:
            doc = json_input.loads(raw, max_depth=None)
        except ValueError as exc:  # also not UTF-8, nested too deep to parse
            raise ConfigError(self._key, f"{self._path} is not JSON: {exc}") from exc
        if (
            not isinstance(doc, dict)
            or doc.get("version") != FORMAT_VERSION
            or not isinstance(doc.get("devices"), dict)
        ):
            raise ConfigError(
                self._key, f"{self._path}: expected {{'version': 1, 'devices': {{...}}}}"
            )
        devices: dict[str, Any] = doc["devices"]
        for device_id, value in devices.items():
            if not self._valid(value):
                raise ConfigError(self._key, f"{self._path}: bad entry for {device_id!r}")
        return devices

    def _valid(self, value: Any) -> bool:
        raise NotImplementedError

    def _write(self) -> None:
        doc = {"version": FORMAT_VERSION, "devices": self._devices}
        write_atomic(self._path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        self._signature = file_stamp(self._path)


class RollbackStore(_JsonStore):
    """The highest firmware SVN seen per device; a lower one is a rollback."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, ROLLBACK_KEY)

    def _valid(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def highest(self, device_id: str) -> int | None:
        with self._lock:
            self._refresh()
            value = self._devices.get(device_id)
            return None if value is None else int(value)

    def check(self, device_id: str, svn: int) -> None:
        """``firmware_rollback`` if ``svn`` is below the highest seen (equal is fine)."""
        with self._lock:
            self._refresh()
            self._check(device_id, svn)

    def _check(self, device_id: str, svn: int) -> None:
        highest = self._devices.get(device_id)
        if highest is not None and svn < highest:
            raise PostureError(
                "firmware_rollback",
                f"device {device_id} firmware svn {svn}, expected >= {highest} (highest seen)",
            )

    def check_and_record(self, device_id: str, svn: int) -> None:
        """Check, then persist ``svn`` as the new highest when it is higher."""
        with self._changing():
            self._check(device_id, svn)
            if self._devices.get(device_id) != svn:
                self._devices[device_id] = svn
                self._write()


class AkRegistry(_JsonStore):
    """device id -> hex TPM name of its bound attestation key."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, AK_REGISTRY_KEY)

    def _valid(self, value: Any) -> bool:
        if not isinstance(value, str) or len(value) < 4:
            return False
        try:
            bytes.fromhex(value)
        except ValueError:
            return False
        return True

    def bind(self, device_id: str, ak_name_hex: str) -> None:
        """Record (or replace) the AK of ``device_id``; only after a completed AK binding."""
        if not device_id or not self._valid(ak_name_hex):
            raise ValueError(f"device id and hex AK name expected, got {device_id!r}")
        with self._changing():
            if self._devices.get(device_id) != ak_name_hex.lower():
                self._devices[device_id] = ak_name_hex.lower()
                self._write()

    def bound_ak(self, device_id: str) -> str | None:
        with self._lock:
            self._refresh()
            value = self._devices.get(device_id)
            return None if value is None else str(value)
