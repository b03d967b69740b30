"""Decision logs shipped upstream in OPA's decision-log format, across outages.

``DecisionLogShipper`` reads a sidecar's hash-chained decision log (``decisions.jsonl`` and
its rotated files; with ``listen.workers > 1`` one shipper per worker's file) and POSTs its
lines to ``[upload] decision_log_url`` as OPA's decision-log service API expects: a
gzip-compressed JSON array of events (``Content-Encoding: gzip``), batched by size and age.
Each event has OPA's fields — ``decision_id``, ``path`` (the decision rule), ``input``,
``result``, ``timestamp``, ``labels`` (node id, ztagent version), ``bundles`` (the policy
revision), ``requested_by`` — so an existing collector accepts it, plus ``ztagent``: the
exact log line (``line``) and its ``prev_sha256``, so the collector can check the chain and
the signed checkpoints (which travel as events too, with ``ztagent.checkpoint``).

Store and forward: the log files themselves are the spool (nothing is copied), bounded by
the decision log's own rotation (``decision_log.max_bytes`` times (``backups`` + 1)). The
position shipped so far is a cursor file beside the log (the SHA-256 of the last line the
collector acknowledged), written only after a 2xx: after a crash at most the in-flight batch
is sent again (the collector de-duplicates by ``decision_id``), and nothing unacknowledged is
lost. If rotation deleted lines before they were shipped (the uplink was down longer than
the log's retention), the next batch starts with a ``gap`` event saying so, and the gap is
logged and counted. Failures back off with jitter (``ztagent.schedule.Backoff``); shipping
never touches the request path (a separate task or process reading the files).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ztagent import json_input
from ztagent.addresses import check_bundle_url
from ztagent.device.keystore_tls import (
    DeviceIdentity,
    KeystoreHTTPSHandler,
    KeystoreTlsClient,
    client_key_source,
    keystore_client,
)
from ztagent.device.keystores import resolve_pin
from ztagent.errors import ConfigError, TransportError
from ztagent.failure_log import FailureLog
from ztagent.files import write_atomic
from ztagent.policy.decision_record import GENESIS_PREV, line_sha256
from ztagent.policy.log_verify import log_files
from ztagent.schedule import Backoff

log = logging.getLogger("ztagent.upload")

CURSOR_SUFFIX = ".shipped"
BACKOFF = Backoff(initial_s=1.0, cap_s=300.0)


@dataclass(frozen=True)
class ShipperSettings:
    url: str
    decision_path: str = "data.ztagent.authz.decision"
    ca_bundle: Path | None = None
    token_file: Path | None = None
    client_cert: tuple[Path, Path] | None = None
    batch_max_bytes: int = 256 * 1024
    """Raw line bytes per POST (before gzip)."""
    batch_max_age_s: float = 5.0
    """A partial batch is sent once its oldest line is this old."""
    timeout_s: float = 10.0
    node_id: str = field(default_factory=socket.gethostname)


@dataclass
class ShipperStats:
    delivered: int = 0
    """Lines the collector acknowledged."""
    batches: int = 0
    retried: int = 0
    """POSTs that failed and will be retried."""
    dropped: int = 0
    """Lines rotated away before they could be shipped (reported in gap events)."""
    pending_lines: int = 0
    pending_bytes: int = 0
    oldest_pending_s: float = 0.0
    connected: bool = False


def _cursor_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + CURSOR_SUFFIX)


@dataclass(frozen=True)
class _Line:
    data: bytes
    """Without its newline."""
    inode: int
    end: int
    """The file offset just after its newline."""


@dataclass(frozen=True)
class _Position:
    """Where the acknowledged line (the cursor) is: its file and byte range, so the next
    batch is read from there instead of scanning and hashing the whole retained log."""

    inode: int
    start: int
    end: int
    sha256: str

    @classmethod
    def of(cls, line: _Line, sha256: str) -> _Position:
        return cls(line.inode, line.end - len(line.data) - 1, line.end, sha256)


def _lines(path: Path, offset: int = 0) -> Iterator[_Line]:
    try:
        with path.open("rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            f.seek(offset)
            end = offset
            for raw in f:
                if not raw.endswith(b"\n"):  # a partial last line is still being written
                    return
                end += len(raw)
                yield _Line(raw[:-1], inode, end)
    except FileNotFoundError:
        return


def _line_at(path: Path, position: _Position) -> bool:
    """Whether ``path`` is the file of ``position`` and holds the acknowledged line there
    (an inode can be reused by a later file: the bytes are checked too)."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_ino != position.inode:
                return False
            f.seek(position.start)
            raw = f.read(position.end - position.start)
    except FileNotFoundError:
        return False
    return raw.endswith(b"\n") and line_sha256(raw[:-1]) == position.sha256


def _timestamp(doc: dict[str, Any]) -> str:
    when = doc.get("time")
    return when if isinstance(when, str) else ""


def _document(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """A line's JSON object, or None and why it is not one (a tampered or damaged line)."""
    try:
        doc = json_input.loads(line, max_depth=None)
    except ValueError as exc:  # also not UTF-8, nested too deep to parse
        return None, str(exc)[:200]
    if not isinstance(doc, dict):
        return None, f"a JSON {type(doc).__name__}, expected an object"
    return doc, ""


def _prev_sha256(line: bytes) -> object:
    doc, _ = _document(line)
    return doc.get("prev_sha256") if doc is not None else None


def to_event(line: bytes, settings: ShipperSettings, version: str) -> dict[str, Any]:
    """One decision-log line as an OPA decision-log event (plus ``ztagent``).

    A line that is not a JSON object (edited or damaged on disk) is shipped all the same, as
    an ``unreadable-…`` event carrying the line and the reason: the collector sees the chain
    break where it is, and the lines after it are not held back."""
    labels = {"id": settings.node_id, "app": "ztagent", "version": version}
    doc, problem = _document(line)
    if doc is None:
        ztagent: dict[str, Any] = {
            "line": line.decode("utf-8", "replace"),
            "prev_sha256": None,
            "unreadable": problem,
        }
        if ztagent["line"].encode() != line:  # not UTF-8: the exact bytes too
            ztagent["line_base64"] = base64.b64encode(line).decode()
        return {"labels": labels, "decision_id": f"unreadable-{line_sha256(line)[:32]}",
                "timestamp": "", "ztagent": ztagent}  # fmt: skip
    ztagent = {"line": line.decode("utf-8"), "prev_sha256": doc.get("prev_sha256")}
    if "checkpoint" in doc:
        ztagent["checkpoint"] = True
        checkpoint = doc["checkpoint"]
        when = checkpoint.get("time") if isinstance(checkpoint, dict) else None
        return {"labels": labels, "decision_id": f"checkpoint-{line_sha256(line)[:32]}",
                "timestamp": when if isinstance(when, str) else "", "ztagent": ztagent}  # fmt: skip
    input_doc = doc.get("input")
    request = input_doc.get("request") if isinstance(input_doc, dict) else None
    peer = request.get("peer") if isinstance(request, dict) else None
    event: dict[str, Any] = {
        "labels": labels,
        "decision_id": doc.get("decision_id"),
        "path": settings.decision_path.removeprefix("data.").replace(".", "/"),
        "input": input_doc,
        "result": {"allow": doc.get("allow"), "reasons": doc.get("reasons"),
                   "enforced": doc.get("enforced"), "dry_run": doc.get("dry_run")},
        "timestamp": _timestamp(doc),
        "requested_by": peer if isinstance(peer, str) else "",
        "ztagent": ztagent,
    }  # fmt: skip
    revision = doc.get("policy_revision")
    if revision:
        event["bundles"] = {"ztagent": {"revision": revision}}
    return event


class DecisionLogShipper:
    """Ships one decision log (``log_path`` and its rotated files) to the collector."""

    def __init__(
        self,
        log_path: Path,
        settings: ShipperSettings,
        *,
        version: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_bundle_url(settings.url, "upload.decision_log_url")
        self.log_path = log_path
        self.settings = settings
        self.stats = ShipperStats()
        self._version = version
        self._clock = clock
        self._cursor_file = _cursor_path(log_path)
        self._failures = FailureLog(log, f"decision-log upload to {settings.url}")
        self._context: ssl.SSLContext | None = None
        self._keystore: KeystoreTlsClient | None = None
        if settings.url.startswith("https://"):
            self._tls_setup(settings)
        self._first_pending: float | None = None
        self._position: _Position | None = None

    def _tls_setup(self, settings: ShipperSettings) -> None:
        """Python's ``ssl`` for a key file; a PKCS#11 or TPM key (``upload.client_key`` is
        the device directory's ``keystore.json``) signs in its store (``keystore_tls``)."""
        source: Path | DeviceIdentity | None = None
        if settings.client_cert is not None:
            cert, key = settings.client_cert
            source = client_key_source(
                cert, key, key_name="upload.client_key", pin=resolve_pin(None)
            )
        if isinstance(source, DeviceIdentity):
            self._keystore = keystore_client(
                settings.ca_bundle, source, ca_key="upload.decision_log_ca_bundle"
            )
            return
        try:
            self._context = ssl.create_default_context(
                cafile=str(settings.ca_bundle) if settings.ca_bundle else None
            )
            if settings.client_cert is not None and source is not None:
                self._context.load_cert_chain(str(settings.client_cert[0]), str(source))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("upload.decision_log_ca_bundle", str(exc)) from None

    # --- the cursor ----------------------------------------------------------------------

    def cursor(self) -> str:
        """The chain hash of the last acknowledged line (``GENESIS_PREV``: none yet)."""
        try:
            doc = json.loads(self._cursor_file.read_text(encoding="utf-8"))
            value = doc.get("last_sha256")
            return value if isinstance(value, str) else GENESIS_PREV
        except (OSError, ValueError, AttributeError):
            return GENESIS_PREV

    def _save_cursor(self, last: str) -> None:
        doc = {"last_sha256": last, "log": str(self.log_path)}
        write_atomic(self._cursor_file, json.dumps(doc).encode())

    def pending(self) -> tuple[list[bytes], int]:
        """Lines after the cursor, oldest first, and how many were lost before them
        (-1: the cursor's line is gone and the count is unknown; 0: none lost)."""
        lines, lost = self._pending()
        return [line.data for line in lines], lost

    def _pending(self) -> tuple[list[_Line], int]:
        cursor = self.cursor()
        files = log_files(self.log_path)
        position = self._position
        if position is not None and position.sha256 == cursor:
            # the common case: read on from the acknowledged line, O(new lines)
            for i, path in enumerate(files):
                if _line_at(path, position):
                    after = list(_lines(path, position.end))
                    return after + [line for later in files[i + 1 :] for line in _lines(later)], 0
        lines = [line for path in files for line in _lines(path)]
        if cursor == GENESIS_PREV:
            first_prev = _prev_sha256(lines[0].data) if lines else GENESIS_PREV
            return lines, 0 if first_prev == GENESIS_PREV else -1
        for i, line in enumerate(lines):  # a first batch after a start: find the cursor once
            if line_sha256(line.data) == cursor:
                self._position = _Position.of(line, cursor)
                return lines[i + 1 :], 0
        # the acknowledged line was rotated away, and possibly more after it
        return lines, -1

    # --- sending -------------------------------------------------------------------------

    def _post(self, events: list[dict[str, Any]]) -> None:
        body = gzip.compress(json.dumps(events, separators=(",", ":")).encode(), mtime=0)
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": f"ztagent/{self._version}",
        }
        if self.settings.token_file is not None:
            try:
                token = self.settings.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise TransportError(
                    "upload_unavailable", f"cannot read {self.settings.token_file}: {exc.strerror}"
                ) from None
            headers["Authorization"] = f"Bearer {token}"
        handlers: list[Any] = []
        if self._context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._context))
        if self._keystore is not None:
            handlers.append(KeystoreHTTPSHandler(self._keystore))  # TlsError passes through
        opener = urllib.request.build_opener(*handlers)
        request = urllib.request.Request(  # noqa: S310 (scheme checked)
            self.settings.url, data=body, headers=headers, method="POST"
        )
        try:
            with opener.open(request, timeout=self.settings.timeout_s) as response:
                response.read(1024)
        except urllib.error.HTTPError as exc:
            raise TransportError(
                "upload_refused", f"POST {self.settings.url}: HTTP {exc.code} (expected 2xx)"
            ) from None
        except urllib.error.URLError as exc:
            raise TransportError(
                "upload_unavailable", f"POST {self.settings.url}: {exc.reason}"
            ) from None
        except (OSError, ValueError) as exc:
            raise TransportError(
                "upload_unavailable", f"POST {self.settings.url}: {type(exc).__name__}: {exc}"
            ) from None

    def ship_once(self, *, force: bool = False) -> int:
        """Send one batch if one is due (full, or its oldest line older than
        ``batch_max_age_s``, or ``force``); return the lines acknowledged (0: nothing due or
        the POST failed — then ``TransportError`` is raised)."""
        entries, lost = self._pending()
        lines = [entry.data for entry in entries]
        self.stats.pending_lines = len(lines)
        self.stats.pending_bytes = sum(len(line) + 1 for line in lines)
        if not lines and lost == 0:
            self._first_pending = None
            self.stats.oldest_pending_s = 0.0
            return 0
        now = self._clock()
        if self._first_pending is None:
            self._first_pending = now
        self.stats.oldest_pending_s = now - self._first_pending
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > self.settings.batch_max_bytes:
                break
            batch.append(line)
            size += len(line) + 1
        full = len(batch) < len(lines) or size >= self.settings.batch_max_bytes
        if not (
            force or full or lost or now - self._first_pending >= self.settings.batch_max_age_s
        ):
            return 0
        events = [to_event(line, self.settings, self._version) for line in batch]
        if lost:
            resume = line_sha256(batch[0])[:16] if batch else "end"
            gap = {
                "labels": {"id": self.settings.node_id, "app": "ztagent", "version": self._version},
                "decision_id": f"gap-{self.cursor()[:16]}-{resume}",
                "ztagent": {"gap": {"reason": "rotated away before upload",
                                    "after_sha256": self.cursor(),
                                    "resumes_at_prev": _prev_sha256(batch[0])
                                    if batch else None}},
            }  # fmt: skip
            events.insert(0, gap)
        self._post(events)
        if lost:
            self.stats.dropped += 1  # lines of unknown count: one gap
            log.warning("decision-log upload: lines were rotated away before upload (gap sent)")
        last = line_sha256(batch[-1]) if batch else self.cursor()
        self._save_cursor(last)
        if batch:
            self._position = _Position.of(entries[len(batch) - 1], last)
        self.stats.delivered += len(batch)
        self.stats.batches += 1
        self._first_pending = None if len(batch) == len(lines) else now
        return len(batch)

    async def run(self, stop: asyncio.Event, poll_s: float = 1.0) -> None:
        """Ship until ``stop`` is set: every ``poll_s`` while healthy, with backoff and
        jitter after failures. The final partial batch is flushed on stop."""
        failures = 0
        while not stop.is_set():
            try:
                sent = await asyncio.to_thread(self.ship_once)
            except TransportError as err:
                failures += 1
                self.stats.retried += 1
                self.stats.connected = False
                self._failures.failed(f"{err.code}: {err.message}")
                delay = BACKOFF.delay(failures)
            else:
                if failures:
                    self._failures.succeeded()
                failures = 0
                self.stats.connected = True
                delay = 0.0 if sent else poll_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        with contextlib.suppress(TransportError):
            while await asyncio.to_thread(self.ship_once, force=True):
                pass
