"""The CA's audit log: ``<ca_dir>/audit.jsonl``, append-only, hash-chained, fsync'd.

One JSON object per line (compact separators, keys in this order)::

    time event <event fields...> prev_sha256

``time`` is RFC 3339 UTC with milliseconds; ``prev_sha256`` is the hex SHA-256 of the
previous line's bytes without its newline, 64 zeros on the first line: the same chain as the
decision log, so ``ztagent.policy.log_verify.verify_log`` checks it (``verify_audit_log``).

Events and their fields:

- ``issued``: ``device_id``, ``serial`` (lowercase hex), ``not_after`` (RFC 3339),
  ``method`` (``enroll`` | ``renew``), ``peer``, then ``jti`` (enroll) or
  ``previous_serial`` (renew);
- ``revoked``: ``serial``, ``device_id`` (from the CA database; null if unknown), ``actor``;
- ``refused``: ``code``, ``device_id`` (null when not known yet), ``method``, ``peer``,
  ``message``.

Appends are synchronous: the line is written with one ``write`` on an ``O_APPEND`` file
under an exclusive ``flock`` (so the CLI and the server can both append), then ``fsync``.
A partial last line (a crash mid-write) is truncated away before the next append.

Signed checkpoints (``ztagent.policy.log_checkpoint``): ``AuditLog.for_ca`` signs with the
CA's issuing key (``CaLayout.issuing_key``), and every event is followed, in the same
``write``, by an ``append`` checkpoint that signs the chain up to it: the log is sealed
after every append, so ``ztagent log verify --key issuing-ca.pem audit.jsonl`` notices an
edited line with recomputed hashes, a dropped head and a cut tail (down to the last event).

The file is created with mode 0640 whatever the umask and is never opened through a
symbolic link (``OSError(ELOOP)`` naming the path).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.files import open_append
from ztagent.pki.errors import CaError
from ztagent.policy.decision_record import GENESIS_PREV, format_time, line_sha256
from ztagent.policy.log_checkpoint import (
    CheckpointError,
    CheckpointReason,
    CheckpointSigner,
    position_after,
    read_tail_position,
)
from ztagent.policy.log_verify import LogVerifyReport, verify_log

AUDIT_FILE: Final = "audit.jsonl"
FILE_MODE: Final = 0o640
_TAIL_CHUNK = 8192
_LOCK = threading.Lock()


def audit_path(ca_dir: Path) -> Path:
    return ca_dir / AUDIT_FILE


def _last_line_hash(fd: int) -> str:
    """The hash of the last complete line; a trailing partial line is truncated away."""
    size = os.fstat(fd).st_size
    buf, pos = b"", size
    last_nl = prev_nl = -1
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        last_nl = buf.rfind(b"\n")
        prev_nl = buf.rfind(b"\n", 0, last_nl) if last_nl > 0 else -1
        if prev_nl >= 0:
            break
    complete = pos + last_nl + 1 if last_nl >= 0 else 0
    if complete < size:
        os.ftruncate(fd, complete)
    if last_nl < 0:
        return GENESIS_PREV
    return line_sha256(buf[prev_nl + 1 : last_nl])


def _open_audit(path: Path) -> int:
    """``path`` for reading and appending, created 0640 whatever the umask, never through a
    symlink."""
    return open_append(path, FILE_MODE, read=True)


def _seal(fd: int, signer: CheckpointSigner, head: str, now: datetime) -> bytes:
    """The ``append`` checkpoint for a line with hash ``head`` about to follow the file's
    (complete) current content."""
    tail = read_tail_position(fd, os.fstat(fd).st_size)
    before = position_after(tail)
    if before is None:  # no checkpoint yet: every line of the file counts
        before = tail.after
    file_start = 1
    file_prev = tail.first_prev or GENESIS_PREV  # none: the event is the file's first line
    if tail.checkpoint is not None:
        file_start, file_prev = tail.checkpoint.file_start, tail.checkpoint.file_prev
    checkpoint = signer.checkpoint(
        CheckpointReason.APPEND,
        lines=before + 1,
        head=head,
        file_start=file_start,
        file_prev=file_prev,
        now=now,
    )
    return signer.line(checkpoint)


class AuditLog:
    """Appends hash-chained events to one file; with a ``signer``, each one sealed by a
    signed checkpoint."""

    def __init__(self, path: Path, signer: CheckpointSigner | None = None) -> None:
        self.path = path
        self.signer = signer

    @classmethod
    def for_ca(cls, ca_dir: Path) -> AuditLog:
        """The CA's audit log, signed with its issuing key, in a file or on a token
        (``CaError`` when it is missing or unreadable)."""
        layout = ca_store.CaLayout(ca_dir)
        key = ca_store.load_issuing(layout).key
        source = (
            str(layout.issuing_key)
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else key.description()  # on a token: it signs each checkpoint's digest
        )
        try:
            signer = CheckpointSigner(key, source)
        except CheckpointError as err:
            raise CaError("ca_state_invalid", err.message) from None
        return cls(audit_path(ca_dir), signer)

    def append(self, event: str, fields: Mapping[str, object], now: datetime) -> str:
        """Append one event (and its checkpoint); return the SHA-256 of the last line written
        (the next line's ``prev``: the event's line, or its checkpoint's when signed)."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        with _LOCK:
            fd = _open_audit(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                prev = _last_line_hash(fd)
                doc: dict[str, object] = {"time": format_time(now), "event": event}
                doc.update(fields)
                doc["prev_sha256"] = prev
                line = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
                out = line + b"\n"
                last = line
                if self.signer is not None:
                    last = _seal(fd, self.signer, line_sha256(line), now)
                    out += last + b"\n"
                data = memoryview(out)
                while data:
                    data = data[os.write(fd, data) :]
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the flock
        return line_sha256(last)

    def issued(
        self,
        cert: x509.Certificate,
        device_id: str,
        *,
        method: str,
        peer: str,
        now: datetime,
        extra: Mapping[str, object] | None = None,
    ) -> str:
        fields: dict[str, object] = {
            "device_id": device_id,
            "serial": builders.serial_hex(cert.serial_number),
            "not_after": format_time(cert.not_valid_after_utc),
            "method": method,
            "peer": peer,
        }
        fields.update(extra or {})
        return self.append("issued", fields, now)

    def refused(
        self,
        code: str,
        device_id: str | None,
        *,
        method: str,
        peer: str,
        message: str,
        now: datetime,
    ) -> str:
        fields = {
            "code": code,
            "device_id": device_id,
            "method": method,
            "peer": peer,
            "message": message,
        }
        return self.append("refused", fields, now)

    def revoked(self, serial: int, device_id: str | None, *, actor: str, now: datetime) -> str:
        fields = {"serial": builders.serial_hex(serial), "device_id": device_id, "actor": actor}
        return self.append("revoked", fields, now)


def audit_revocation(
    ca_dir: Path,
    serial: int,
    *,
    actor: str = "cli",
    now: datetime | None = None,
    db: ca_store.DbArg = None,
) -> str:
    """Log a revocation done by ``ztagent.ca.store.revoke`` (call it right after, with the
    serial ``revoke`` returned). The device id is looked up in the CA database."""
    device_id: str | None = None
    try:
        with ca_store.database(ca_dir, db) as store:
            entry = store.issued(serial)
        device_id = entry.device_id if entry is not None else None
    except CaError:
        pass
    moment = now if now is not None else datetime.now(UTC)
    return AuditLog.for_ca(ca_dir).revoked(serial, device_id, actor=actor, now=moment)


def verify_audit_log(ca_dir: Path) -> LogVerifyReport:
    """Check the chain of ``<ca_dir>/audit.jsonl`` from its first line (64 zeros)."""
    return verify_log(audit_path(ca_dir), expected_first_prev=GENESIS_PREV)
