"""The decision log's writer: records (``policy.decision_record``) to hash-chained files.

``DecisionLog`` is the IO edge. ``submit()`` is cheap and never touches the disk: it puts the
record on a bounded queue; ONE background thread serialises, hashes and appends in batches
(one ``write`` per batch, optional ``fsync``), rotates by size and keeps the chain across
files (the first line of a new file carries the hash of the last line of the rotated one).

Files: ``path`` is the live file, ``path.1`` the newest rotated one ... ``path.<backups>``
the oldest. New files get mode 0640 whatever the umask; parent directories are created
(0750). No file is ever opened, written or rotated through a symbolic link: a symlink at
``path`` stops ``start()`` (``decision_log_unavailable ... is a symbolic link``), and a
symlink planted at a rotated name is replaced by the rename, its target untouched.

Signed checkpoints (``policy.log_checkpoint``): with a ``signer``, the writer thread appends
a checkpoint line after every ``checkpoint_every`` decision lines, as the last line of a file
before it is rotated, and at ``close()`` (``interval``, ``rotate``, ``close``). Checkpoint
lines are chained like decision lines and are not counted in ``LogStats.written`` (they are
in ``LogStats.checkpoints``); the rotation checkpoint can take a file one line (about 500
bytes) past ``max_bytes``. After a restart the positions continue from the last checkpoint
of ``path`` (or of ``path.1``).

Restart and crash recovery: ``start()`` continues the chain from the hash of the last
*complete* line (one ending in a newline) of ``path``, or of ``path.1`` when ``path`` is
empty or missing, or from ``GENESIS_PREV``. A partial trailing line (a crash mid-write) is
truncated away and a warning naming its length and SHA-256 is logged; it was never counted
as written.

Write errors (disk full, a rotated name taken by a directory...) increment
``LogStats.errors``, are logged at most once a minute (logger ``ztagent.decision_log``) and
never stop the writer. A failed write loses the records of the batch being written (the
lines that reached the file whole stay and the chain resumes from them); a failed rotation
keeps appending to the live file and retries at the next batch. A record that is not JSON
serialisable (NaN, bytes...) is counted as an error and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal, Protocol

from ztagent.errors import ConfigError, ZtagentError
from ztagent.files import open_append
from ztagent.policy.decision_record import GENESIS_PREV, DecisionRecord, line_sha256
from ztagent.policy.log_checkpoint import (
    CHECKPOINT_PREFIX,
    DEFAULT_EVERY,
    CheckpointReason,
    CheckpointSigner,
    TailPosition,
    position_after,
    read_tail_position,
    tail_position_of,
)

logger = logging.getLogger("ztagent.decision_log")

FILE_MODE: Final = 0o640
DIR_MODE: Final = 0o750
DEFAULT_MAX_BYTES: Final = 50 * 1024 * 1024
DEFAULT_MAX_INPUT_BYTES: Final = 4096
"""A line's ``input`` above this many bytes of JSON is replaced by its size and digest."""
ERROR_LOG_INTERVAL_S: Final = 60.0
BATCH_MAX: Final = 512
"""At most this many records are written with one ``write`` call."""
LINGER_S: Final = 0.02
"""After a batch of more than one record (the log is busy) the writer sleeps this long before
taking the next: meanwhile ``submit`` wakes no thread (a wake per record, and the GIL handed
over with it, cost the request path more than the write itself under load), and the next
batch is larger. An idle log's writer blocks and takes each record at once. Measured in situ
at ≈ 600 calls/s (bench stack, thread CPU per record): 4 ms gave batches of 2.4 and 114 µs
of writer CPU per record, 20 ms batches of 11 and 54 µs. Records wait at most this long in
memory before their ``write``."""
_TAIL_CHUNK = 64 * 1024

OnFull = Literal["drop", "block"]


def worker_log_path(path: Path, index: int) -> Path:
    """Each sidecar worker keeps its own hash chain: decisions.jsonl -> decisions.worker1.jsonl."""
    return path.with_name(f"{path.stem}.worker{index}{path.suffix}")


class DecisionLogCode(StrEnum):
    """Every ``DecisionLogError`` code."""

    DECISION_LOG_STATE = "decision_log_state"
    DECISION_LOG_UNAVAILABLE = "decision_log_unavailable"


class DecisionLogError(ZtagentError):
    """The decision log cannot be used: ``decision_log_unavailable`` (the file cannot be
    opened or read at start-up), ``decision_log_state`` (started twice)."""

    codes = frozenset(DecisionLogCode)


@dataclass(frozen=True)
class LogStats:
    """Counters since ``start()``. ``written``: lines that reached the file whole;
    ``dropped``: records refused by ``submit`` (queue full in drop mode, or log closed);
    ``rotated``: completed rotations; ``queue_depth``: records waiting; ``errors``: write,
    open, rotation and serialisation failures (events, not records); ``checkpoints``: signed
    checkpoint lines that reached the file; ``lost``: records accepted by ``submit`` that
    never reached the file because a write, open or rotation failed (a full disk)."""

    written: int
    dropped: int
    rotated: int
    queue_depth: int
    errors: int
    checkpoints: int = 0
    lost: int = 0


class DecisionSink(Protocol):
    """What the sidecar calls: ``DecisionLog`` or ``NullDecisionLog``."""

    def start(self) -> None: ...

    def submit(self, record: DecisionRecord) -> bool: ...

    async def asubmit(self, record: DecisionRecord) -> bool: ...

    def hold(self, record: DecisionRecord) -> bool:
        """``submit``, except that the writer may not see the record before ``release()``
        (or the next ``submit``, or ``close``): the caller picks when the writer wakes."""
        ...

    def release(self) -> None:
        """Hands the held records to the writer (cheap when none are held)."""
        ...

    @property
    def stats(self) -> LogStats: ...

    def close(self, timeout_s: float = 5.0) -> bool: ...


class NullDecisionLog:
    """The decision log when ``[decision_log]`` is disabled: accepts and discards."""

    def start(self) -> None:
        return None

    def submit(self, record: DecisionRecord) -> bool:
        return True

    async def asubmit(self, record: DecisionRecord) -> bool:
        return True

    def hold(self, record: DecisionRecord) -> bool:
        return self.submit(record)

    def release(self) -> None:
        return None

    @property
    def stats(self) -> LogStats:
        return LogStats(written=0, dropped=0, rotated=0, queue_depth=0, errors=0)

    def close(self, timeout_s: float = 5.0) -> bool:
        return True


_STOP: Final = object()


class DecisionLog:
    """Hash-chained, size-rotated JSON-lines decision log with one background writer thread.

    ``on_full`` decides what ``submit`` does when ``queue_size`` records are waiting:
    ``"drop"`` (default) refuses the record at once and counts it in ``stats.dropped``;
    ``"block"`` waits for space. Block mode never loses a record to back-pressure but stalls
    the request that submits it while the disk is slow: the choice for audit-critical
    deployments. From the event loop use ``await asubmit()``, which waits in a worker thread
    only when the queue is full.

    ``max_bytes``: the live file is rotated before a line would take it past this size (a
    single longer line gets a file of its own). ``backups``: rotated files kept (0 keeps
    none). ``fsync``: fsync after every batch (and the directory after every rotation).
    ``signer``: signs the checkpoint lines (none: no checkpoints); ``checkpoint_every``:
    decision lines between two checkpoints.

    ``hold()`` queues a record without waking the writer; ``release()`` (or the next
    ``submit``, or ``close``) wakes it. The proxy holds an admitted call's record until it
    has sent the call upstream: the writer's work, which needs the GIL, then runs while the
    event loop waits for the workload instead of delaying the call (at one call in flight it
    took about 70 µs off the assertion's signing, which released the GIL to a freshly woken
    writer). Held records keep their order: a ``submit`` releases them first.

    Call ``close()`` after the server stopped taking requests; the writer thread is a daemon
    so a process that never calls it does not hang at exit, but loses what was queued.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = 5,
        queue_size: int = 10_000,
        on_full: OnFull = "drop",
        fsync: bool = False,
        max_input_bytes: int | None = DEFAULT_MAX_INPUT_BYTES,
        signer: CheckpointSigner | None = None,
        checkpoint_every: int = DEFAULT_EVERY,
    ) -> None:
        self._max_input_bytes = max_input_bytes
        if checkpoint_every < 1:
            raise ConfigError(
                "decision_log.checkpoint_every", f"must be >= 1, got {checkpoint_every}"
            )
        self._signer = signer
        self._every = checkpoint_every
        if max_bytes < 1:
            raise ConfigError("decision_log.max_bytes", f"must be >= 1, got {max_bytes}")
        if backups < 0:
            raise ConfigError("decision_log.backups", f"must be >= 0, got {backups}")
        if queue_size < 1:
            raise ConfigError("decision_log.queue_size", f"must be >= 1, got {queue_size}")
        if on_full not in ("drop", "block"):
            raise ConfigError(
                "decision_log.on_full", f"expected 'drop' or 'block', got {on_full!r}"
            )
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.on_full: OnFull = on_full
        self.queue_size = queue_size
        self.fsync = fsync
        # SimpleQueue (C) and a size check, not queue.Queue(maxsize): Queue's put takes two
        # Python-level locks and a condition per record, on the request path (about 4 µs
        # against 0.2). The bound is checked before the put, so concurrent submitters from
        # several threads may pass it by one record each.
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._held: deque[DecisionRecord] = deque()
        """Records ``hold()`` queued and the writer was not woken for (appended by holders,
        emptied by ``release``; deque's append and popleft are atomic)."""
        self._room = threading.Condition()
        """Block mode: submitters wait here for the writer to take records."""
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._count_lock = threading.Lock()
        # writer-thread state
        self._fd: int | None = None
        self._size = 0
        self._prev = GENESIS_PREV
        # checkpoint positions (writer thread): chain position of the last line, the current
        # file's first position and first prev_sha256, decision lines since the last
        # checkpoint, and the reason of the last line when it is a checkpoint
        self._seq = 0
        self._file_start = 1
        self._file_prev = GENESIS_PREV
        self._since = 0
        self._last_reason: str | None = None
        self._checkpoints = 0
        self._now: Callable[[], datetime] = lambda: datetime.now(UTC)
        # counters: `dropped` is touched by submitters (under _count_lock), the rest by the
        # writer only
        self._written = 0
        self._dropped = 0
        self._rotated = 0
        self._errors = 0
        self._lost = 0
        self._failing = False
        """A write failed and none succeeded since (the next success logs the recovery)."""
        self._clock: Callable[[], float] = time.monotonic
        self._last_error_log: float | None = None
        self._suppressed = 0

    # --- public -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the live file (continuing its chain) and start the writer thread.

        Raises ``DecisionLogError(decision_log_unavailable)`` naming the path and the OS
        error when the file cannot be opened, so a bad path stops start-up.
        """
        if self._thread is not None or self._closed:
            raise DecisionLogError("decision_log_state", "start() called twice or after close()")
        try:
            self._open()
        except OSError as exc:
            raise DecisionLogError(
                "decision_log_unavailable", f"cannot open {self.path}: {exc.strerror or exc}"
            ) from None
        self._thread = threading.Thread(target=self._run, name="ztagent-decision-log", daemon=True)
        self._thread.start()

    def submit(self, record: DecisionRecord) -> bool:
        """Queue ``record``; True if queued. Drop mode never blocks: a full queue (or a
        closed log) counts a drop and returns False. Block mode waits for space."""
        if self._held:
            self.release()
        if self._closed:
            self._count_drop()
            return False
        if self._queue.qsize() >= self.queue_size:
            if self.on_full == "drop":
                self._count_drop()
                return False
            self._wait_for_room()
        self._queue.put(record)
        return True

    def hold(self, record: DecisionRecord) -> bool:
        """Queue ``record`` without waking the writer (see the class doc); True if queued.
        A full queue or a closed log drops it as ``submit`` does; block mode submits."""
        if self.on_full == "block" or self._closed:
            return self.submit(record)
        if self._queue.qsize() + len(self._held) >= self.queue_size:
            self._count_drop()
            return False
        self._held.append(record)
        return True

    def release(self) -> None:
        held = self._held
        while held:
            try:
                record = held.popleft()
            except IndexError:  # another thread released it meanwhile
                return
            self._queue.put(record)

    def _wait_for_room(self) -> None:
        """Block mode: until the queue has room (or the writer is gone)."""
        with self._room:
            self._waiting += 1
            try:
                while self._queue.qsize() >= self.queue_size:
                    thread = self._thread
                    if thread is None or not thread.is_alive():
                        return
                    self._room.wait(0.1)
            finally:
                self._waiting -= 1

    async def asubmit(self, record: DecisionRecord) -> bool:
        """``submit`` for the event loop: in block mode a full queue is waited for in a worker
        thread, never on the loop. (A cancelled wait still queues the record once there is
        space.)"""
        if self.on_full == "drop" or self._closed or self._queue.qsize() < self.queue_size:
            return self.submit(record)
        await asyncio.to_thread(self._wait_for_room)
        self._queue.put(record)
        return True

    @property
    def stats(self) -> LogStats:
        return LogStats(
            written=self._written,
            dropped=self._dropped,
            rotated=self._rotated,
            queue_depth=self._queue.qsize() + len(self._held),
            errors=self._errors,
            checkpoints=self._checkpoints,
            lost=self._lost,
        )

    def close(self, timeout_s: float = 5.0) -> bool:
        """Refuse new records, write what is queued, stop the writer. True if the writer
        finished within ``timeout_s``; False leaves it draining in the background."""
        self._closed = True
        self.release()
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._close_fd()
            return True
        deadline = time.monotonic() + timeout_s
        self._queue.put(_STOP)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning(
                "decision log %s: writer still busy after %.1fs, %d records queued",
                self.path,
                timeout_s,
                self._queue.qsize(),
            )
            return False
        self._close_fd()
        return True

    # --- writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch: list[DecisionRecord] = []
            item = self._queue.get()
            stop = not isinstance(item, DecisionRecord)
            if isinstance(item, DecisionRecord):
                batch.append(item)
            while not stop and len(batch) < BATCH_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, DecisionRecord):
                    batch.append(item)
                else:
                    stop = True
            if self._waiting:
                with self._room:
                    self._room.notify_all()
            if batch:
                try:
                    self._write_batch(batch)
                except Exception as exc:  # the writer must survive anything
                    self._close_fd()  # resync the chain head from the file next time
                    self._error(f"unexpected writer failure: {exc!r}", lost=len(batch))
            if stop or (self._closed and self._queue.empty()):
                try:
                    self._seal()
                except Exception as exc:  # the writer must survive anything
                    self._close_fd()
                    self._error(f"closing checkpoint failed: {exc!r}", lost=0)
                return
            if len(batch) > 1 and not self._closed:
                # outside the try above, a failing sleep would end the writer and every later
                # line would be lost unseen: libfaketime with FAKETIME_DONT_FAKE_MONOTONIC=1
                # (the offline tests' clock) makes every time.sleep fail with EINVAL
                with contextlib.suppress(OSError):
                    time.sleep(LINGER_S)

    def _checkpoint_line(self, reason: CheckpointReason, head: str, seq: int) -> bytes:
        assert self._signer is not None
        checkpoint = self._signer.checkpoint(
            reason,
            lines=seq,
            head=head,
            file_start=self._file_start,
            file_prev=self._file_prev,
            now=self._now(),
        )
        return self._signer.line(checkpoint)

    def _seal(self) -> None:
        """The closing checkpoint (not when the log is empty or already ends with one)."""
        if self._signer is None or self._seq == 0:
            return
        if self._since == 0 and self._last_reason == CheckpointReason.CLOSE:
            return
        if self._fd is None:
            try:
                self._open()
            except OSError as exc:
                self._error(f"cannot open {self.path} for the closing checkpoint: {exc}", lost=0)
                return
        line = self._checkpoint_line(CheckpointReason.CLOSE, self._prev, self._seq)
        self._flush([line], unsent=0, tail_reason=CheckpointReason.CLOSE)

    def _write_batch(self, records: list[DecisionRecord]) -> None:
        if self._fd is None:
            try:
                self._open()
            except OSError as exc:
                self._error(f"cannot open {self.path}: {exc}", lost=len(records))
                return
        pending: list[bytes] = []
        pending_size = 0
        prev, seq, since = self._prev, self._seq, self._since
        tail_reason: CheckpointReason | None = None
        may_rotate = True
        for i, record in enumerate(records):
            try:
                line = record.to_json_bytes(prev, self._max_input_bytes)
            except (TypeError, ValueError) as exc:
                self._error(f"record {record.decision_id} cannot be serialised: {exc}", lost=1)
                continue
            n = len(line) + 1
            used = self._size + pending_size
            if may_rotate and used > 0 and used + n > self.max_bytes:
                unsent = len(records) - i
                if pending and not self._flush(pending, unsent=unsent, tail_reason=tail_reason):
                    return
                pending, pending_size = [], 0
                may_rotate = self._rotate(unsent=unsent)
                if self._fd is None:  # rotated, but the new file could not be opened
                    return
                if self._prev != prev:  # the rotated file got its checkpoint: chain to it
                    prev, seq, since = self._prev, self._seq, self._since
                    line = record.to_json_bytes(prev, self._max_input_bytes)
                    n = len(line) + 1
            pending.append(line)
            pending_size += n
            prev = line_sha256(line)
            seq += 1
            since += 1
            tail_reason = None
            if self._signer is not None and since >= self._every:
                checkpoint = self._checkpoint_line(CheckpointReason.INTERVAL, prev, seq)
                pending.append(checkpoint)
                pending_size += len(checkpoint) + 1
                prev = line_sha256(checkpoint)
                seq += 1
                since = 0
                tail_reason = CheckpointReason.INTERVAL
        if pending:
            self._flush(pending, unsent=0, tail_reason=tail_reason)

    def _flush(
        self, lines: list[bytes], *, unsent: int, tail_reason: CheckpointReason | None = None
    ) -> bool:
        """Append ``lines`` (``tail_reason``: the last one is a checkpoint of that reason); on
        failure count what reached the file and resync the chain and positions from it."""
        assert self._fd is not None
        data = b"\n".join(lines) + b"\n"
        start = self._size
        try:
            self._write(self._fd, data)
            if self.fsync:
                os.fsync(self._fd)
        except Exception as exc:
            self._close_fd()
            whole = 0
            with contextlib.suppress(OSError):
                self._open()  # truncates a partial line, re-reads the chain head
                if self._size >= start:
                    end = start
                    for line in lines:
                        end += len(line) + 1
                        if end > self._size:
                            break
                        whole += 1
            records = sum(1 for line in lines[:whole] if not line.startswith(CHECKPOINT_PREFIX))
            self._written += records
            self._checkpoints += whole - records
            lost = sum(1 for line in lines if not line.startswith(CHECKPOINT_PREFIX)) - records
            lost += unsent
            self._error(f"write to {self.path} failed: {exc}", lost=lost)
            return False
        self._size += len(data)
        if self._failing:
            self._failing = False
            logger.warning(
                "decision log: writing to %s again; %d records lost since start",
                self.path,
                self._lost,
            )
        self._prev = line_sha256(lines[-1])
        for line in lines:
            if line.startswith(CHECKPOINT_PREFIX):
                self._checkpoints += 1
                self._since = 0
            else:
                self._written += 1
                self._since += 1
        self._seq += len(lines)
        self._last_reason = str(tail_reason) if tail_reason is not None else None
        return True

    def _write(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` (the one place bytes go to disk; tests override it)."""
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _rotate(self, *, unsent: int) -> bool:
        """``path`` -> ``path.1`` -> ... -> ``path.<backups>``, then a fresh ``path``; the
        chain head (``_prev``) carries over. False on failure (counted): if a rename failed,
        the live file stays open and keeps growing; if the new file could not be opened,
        ``_fd`` is None and the ``unsent`` records are lost. With a signer, the file being
        rotated first gets its ``rotate`` checkpoint. Renames and unlinks act on the names
        themselves: a symlink at a rotated name is replaced, never followed."""
        if self._signer is not None and self._seq > 0 and self._last_reason is None:
            line = self._checkpoint_line(CheckpointReason.ROTATE, self._prev, self._seq)
            if not self._flush([line], unsent=unsent, tail_reason=CheckpointReason.ROTATE):
                return False
        try:
            if self.backups == 0:
                self.path.unlink()
            else:
                for i in range(self.backups - 1, 0, -1):
                    older = self._backup(i)
                    if os.path.lexists(older):
                        os.replace(older, self._backup(i + 1))
                os.replace(self.path, self._backup(1))
            extra = self.backups + 1
            while _is_file_or_link(self._backup(extra)):  # left over from a larger `backups`
                self._backup(extra).unlink()
                extra += 1
        except OSError as exc:
            self._error(f"rotation of {self.path} failed, appending to it: {exc}", lost=0)
            return False
        self._close_fd()
        self._rotated += 1
        self._file_start = self._seq + 1
        self._file_prev = self._prev
        try:
            self._open_fresh()
        except OSError as exc:
            self._error(f"cannot open {self.path} after rotation: {exc}", lost=unsent)
            return False
        if self.fsync:
            self._fsync_dir()
        return True

    # --- files ----------------------------------------------------------------------------

    def _backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _open_fd(self) -> int:
        """``path`` for reading and appending, never through a symlink (``OSError(ELOOP)``),
        created exactly 0640 whatever the umask."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        return open_append(self.path, FILE_MODE, read=True)

    def _open_fresh(self) -> None:
        fd = self._open_fd()
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _open(self) -> None:
        """Open ``path`` and set the chain head from its last complete line, truncating a
        partial one; from ``path.1`` when ``path`` is empty; else ``GENESIS_PREV``."""
        fd = self._open_fd()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            head, size, partial = _recover_tail(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        if partial is not None:
            logger.warning(
                "decision log %s: removed a partial last line (%d bytes, sha256 %s), "
                "left by an interrupted write; the chain continues from the line before it",
                self.path,
                len(partial),
                line_sha256(partial),
            )
        tail = read_tail_position(fd, size)
        older = tail_position_of(self._backup(1)) if self.backups > 0 else None
        if head is None:
            head = _last_line_hash(self._backup(1)) if self.backups > 0 else None
        self._fd = fd
        self._size = size
        self._prev = head or GENESIS_PREV
        self._set_positions(tail, older)

    def _set_positions(self, tail: TailPosition, older: TailPosition | None) -> None:
        """Checkpoint positions after a (re)open, from the live file's last checkpoint, else
        from ``path.1``'s; a log written before checkpoints counts from its files' lines."""
        self._since = tail.after
        if tail.checkpoint is not None:
            cp = tail.checkpoint
            self._seq = cp.lines + 1 + tail.after
            self._file_start, self._file_prev = cp.file_start, cp.file_prev
            self._last_reason = cp.reason if tail.after == 0 else None
            return
        older_end = 0
        self._last_reason = None
        if older is not None and tail.first_prev != GENESIS_PREV:
            known = position_after(older)
            older_end = known if known is not None else older.after
            self._since += older.after
            if tail.after == 0 and older.after == 0 and older.checkpoint is not None:
                self._last_reason = older.checkpoint.reason
        self._file_start = older_end + 1
        self._file_prev = tail.first_prev if tail.first_prev is not None else self._prev
        self._seq = older_end + tail.after

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _fsync_dir(self) -> None:
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    # --- counters and error reporting -------------------------------------------------

    def _count_drop(self) -> None:
        with self._count_lock:
            self._dropped += 1

    def _error(self, message: str, *, lost: int) -> None:
        """Count one failure and the records it lost; log it, at most once per
        ``ERROR_LOG_INTERVAL_S`` (the recovery line gives the total lost)."""
        self._errors += 1
        self._lost += lost
        self._failing = self._failing or lost > 0
        now = self._clock()
        if self._last_error_log is not None and now - self._last_error_log < ERROR_LOG_INTERVAL_S:
            self._suppressed += 1
            return
        suffix = f"; {lost} records lost" if lost else ""
        if self._suppressed:
            suffix += f" ({self._suppressed} more errors since the last report)"
        logger.error("decision log: %s%s", message, suffix)
        self._last_error_log = now
        self._suppressed = 0


def _rfind_newline(fd: int, end: int) -> int:
    """Offset of the last ``\\n`` in ``[0, end)``, or -1; reads backwards in chunks."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _recover_tail(fd: int, size: int) -> tuple[str | None, int, bytes | None]:
    """(hash of the last complete line or None, size after truncation, removed partial)."""
    if size == 0:
        return None, 0, None
    last_nl = _rfind_newline(fd, size)
    partial: bytes | None = None
    if last_nl != size - 1:
        keep = last_nl + 1
        partial = os.pread(fd, size - keep, keep)
        os.ftruncate(fd, keep)
        size = keep
    if size == 0:
        return None, 0, partial
    before = _rfind_newline(fd, size - 1)
    line = os.pread(fd, size - 1 - (before + 1), before + 1)
    return line_sha256(line), size, partial


def _is_file_or_link(path: Path) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def _last_line_hash(path: Path) -> str | None:
    """Hash of the last complete line of a (rotated) file, read-only, never through a
    symlink; None if none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        last_nl = _rfind_newline(fd, size)
        if last_nl < 0:
            return None
        before = _rfind_newline(fd, last_nl)
        return line_sha256(os.pread(fd, last_nl - (before + 1), before + 1))
    except OSError:
        return None
    finally:
        os.close(fd)
