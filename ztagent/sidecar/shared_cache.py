"""``SharedPostureCache``: attested postures seen by every sidecar worker process.

With ``listen.workers > 1`` the kernel spreads a device's connections over several
processes, so the worker that verified an attestation is often not the one serving the
device's next call. Each verified posture is therefore written to
``<state_dir>/posture-cache/<cert fingerprint>.json`` (atomically, 0600) and read back by the
other workers. A lookup costs one ``stat``: the parsed posture is kept in memory and re-read
only when the file's (mtime, size, inode) changes. A refused re-attestation deletes the file,
so every worker drops the posture at its next lookup.

The directory is the sidecar's own state (0700, like the AK registry): its files are trusted
as the verifier's output, not re-verified. The supervisor empties it when it starts, so a
posture never outlives the sidecar run (and the reference values) that verified it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from ztagent.files import (
    KEY_MODE,
    FileStamp,
    empty_private_dir,
    file_stamp,
    make_private_dir,
    write_atomic,
)
from ztagent.posture.verifier import AttestedPosture

log = logging.getLogger("ztagent.posture")

CACHE_DIR = "posture-cache"
FORMAT_VERSION = 1
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def cache_dir(state_dir: Path) -> Path:
    return state_dir / CACHE_DIR


def clear_shared_cache(state_dir: Path) -> None:
    """Forget every shared posture (at supervisor start); leaves an empty directory."""
    empty_private_dir(cache_dir(state_dir))


def posture_to_json(posture: AttestedPosture) -> bytes:
    doc = {
        "version": FORMAT_VERSION,
        "attestation_id": posture.attestation_id,
        "device_id": posture.device_id,
        "cert_fingerprint": posture.cert_fingerprint,
        "ak_name": posture.ak_name,
        "verified_at": posture.verified_at.isoformat(),
        "expires_at": posture.expires_at.isoformat(),
        "firmware": dict(posture.firmware),
        "boot": dict(posture.boot),
        "host": dict(posture.host),
        "firmware_svn": posture.firmware_svn,
        "quote_clock": posture.quote_clock,
        "quote_reset_count": posture.quote_reset_count,
    }
    return json.dumps(doc, sort_keys=True).encode()


def posture_from_json(raw: bytes) -> AttestedPosture:
    """The posture a worker wrote; ``ValueError`` for anything else."""
    doc: Any = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise ValueError(f"expected a version {FORMAT_VERSION} posture record")
    try:
        posture = AttestedPosture(
            attestation_id=str(doc["attestation_id"]),
            device_id=str(doc["device_id"]),
            cert_fingerprint=str(doc["cert_fingerprint"]),
            ak_name=str(doc["ak_name"]),
            verified_at=datetime.fromisoformat(doc["verified_at"]),
            expires_at=datetime.fromisoformat(doc["expires_at"]),
            firmware=dict(doc["firmware"]),
            boot=dict(doc["boot"]),
            host=dict(doc["host"]),
            firmware_svn=int(doc["firmware_svn"]),
            quote_clock=int(doc["quote_clock"]),
            quote_reset_count=int(doc["quote_reset_count"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"posture record lacks or mistypes {exc}") from exc
    if posture.verified_at.tzinfo is None or posture.expires_at.tzinfo is None:
        raise ValueError("posture record times must carry a UTC offset")
    return posture


class SharedPostureCache:
    """cert fingerprint -> latest ``AttestedPosture``, shared through files; see module doc."""

    def __init__(self, state_dir: Path, max_entries: int = 10_000) -> None:
        self._dir = cache_dir(state_dir)
        make_private_dir(self._dir)
        self.max_entries = max_entries
        self._entries: dict[str, tuple[FileStamp, AttestedPosture]] = {}
        self._lock = threading.Lock()

    def _path(self, cert_fingerprint: str) -> Path:
        if not _FINGERPRINT.match(cert_fingerprint):
            raise ValueError(f"expected a hex SHA-256 fingerprint, got {cert_fingerprint!r}")
        return self._dir / f"{cert_fingerprint}.json"

    def put(self, posture: AttestedPosture) -> None:
        """Writes the posture file (0600, never through a symlink: ``OSError(ELOOP)``)."""
        path = self._path(posture.cert_fingerprint)
        write_atomic(path, posture_to_json(posture), KEY_MODE)
        with self._lock:
            self._entries.pop(posture.cert_fingerprint, None)
            self._remember(posture.cert_fingerprint, file_stamp(path), posture)

    def get(self, cert_fingerprint: str, now: datetime) -> AttestedPosture | None:
        path = self._path(cert_fingerprint)
        signature = file_stamp(path)
        with self._lock:
            known = self._entries.get(cert_fingerprint)
            if signature is None:
                self._entries.pop(cert_fingerprint, None)
                return None
            if known is not None and known[0] == signature:
                posture: AttestedPosture | None = known[1]
            else:
                posture = self._read(path, cert_fingerprint)
                self._entries.pop(cert_fingerprint, None)
                if posture is not None:
                    self._remember(cert_fingerprint, signature, posture)
        if posture is None or now >= posture.expires_at:
            return None
        return posture

    def drop(self, cert_fingerprint: str) -> None:
        with self._lock:
            self._entries.pop(cert_fingerprint, None)
            with contextlib.suppress(FileNotFoundError):
                self._path(cert_fingerprint).unlink()

    def __len__(self) -> int:
        return sum(1 for _ in self._dir.glob("*.json"))

    def _remember(self, key: str, signature: FileStamp | None, posture: AttestedPosture) -> None:
        if signature is None:
            return
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (signature, posture)

    def _read(self, path: Path, cert_fingerprint: str) -> AttestedPosture | None:
        try:
            posture = posture_from_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable shared posture %s: %s", path, exc)
            return None
        if posture.cert_fingerprint != cert_fingerprint:
            log.error("ignoring shared posture %s: it names another certificate", path)
            return None
        return posture
