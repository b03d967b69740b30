"""The decision log written by a child process: the sidecar's event loop hands over records
and no writer thread runs in the sidecar (``decision_log.writer = "process"``; the default
is the thread, see below).

Why: a writer *thread* shares the sidecar's GIL. Every batch it takes (serialise, hash,
write) and every wake-up hands the GIL back and forth with the event loop; measured under
load, that cost the request path more than the writing itself (bench/results.md). Here the
sidecar only appends each record to a list; every ``FLUSH_S`` the loop pickles the batch and
writes it to a pipe with one non-blocking ``write``. The child (``python -m
ztagent.sidecar.log_writer``) runs the same ``DecisionLog`` — the same lines, chain,
rotation, checkpoints and recovery — so the file is byte for byte what the thread writes.

Semantics kept from ``DecisionLog``:
- ``queue_size`` bounds the records not yet handed to the child; beyond it ``on_full =
  "drop"`` counts a drop and ``"block"`` waits (``asubmit`` on the loop, ``submit`` in place).
- ``start()`` fails with ``decision_log_unavailable`` when the child cannot open the file.
- ``close()`` hands over what is queued, lets the child write it and its closing checkpoint,
  and waits for it to exit.
- ``stats`` adds the child's counters (sent back over its stdout, at most every
  ``STATS_S``) to the records this side dropped or lost.

Measured (``make bench`` and ``python -m bench.run --log-writer process``, bench/results.md):
on the 2-core bench machine, where the load generator, workload and sidecar saturate both
cores, throughput is the same within the noise — the work moves to another process but still
takes the same cores — and the child's interpreter adds about 35 MB of RSS. So the thread
stays the default; the process is for nodes with a spare core and for the guarantee below.

And one thing the thread cannot give: records already in the pipe survive a crash of the
sidecar (the child reads to end of file, writes them and exits). If the child dies, the
records it had not written are counted lost (its last reported queue plus the unsent bytes),
one error is logged and a new child continues the chain from the file, as after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Final

from ztagent.policy.decision_log import DecisionLog, DecisionLogError, LogStats, OnFull
from ztagent.policy.decision_record import DecisionRecord
from ztagent.policy.log_checkpoint import CheckpointSigner

logger = logging.getLogger("ztagent.decision_log")

FLUSH_S: Final = 0.005
"""How long a record may wait on the sidecar side before its batch goes to the child."""
STATS_S: Final = 0.2
START_TIMEOUT_S: Final = 30.0
RESTART_INTERVAL_S: Final = 1.0
PIPE_BYTES: Final = 1024 * 1024
_FRAME = struct.Struct(">I")
_STAT_FIELDS: Final = tuple(f.name for f in fields(LogStats))


class ProcessDecisionLog:
    """``DecisionSink`` whose ``DecisionLog`` runs in a child process (see the module doc).
    ``settings``: ``DecisionLog``'s keyword arguments except ``signer``, passed to the child
    as they are; the checkpoint key comes as PEM bytes (the child loads it)."""

    def __init__(
        self,
        path: Path,
        *,
        signer_pem: bytes | None = None,
        flush_s: float = FLUSH_S,
        **settings: Any,
    ) -> None:
        # the child's own log, built here unstarted: the same checks (ConfigError) now, and
        # the queue bound and full mode this side applies
        probe = DecisionLog(path, **settings)
        if signer_pem is not None:
            CheckpointSigner.from_pem(signer_pem)
        self.path = path
        self.on_full: OnFull = probe.on_full
        self._header = json.dumps(
            {
                "path": str(path),
                "settings": settings,
                "signer_pem": signer_pem.decode() if signer_pem is not None else None,
                "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                "log_json": _logs_json(),
            }
        ).encode()
        self._queue_size = probe.queue_size
        self._flush_s = flush_s
        self._lock = threading.Lock()
        """Guards the pending list, the outgoing bytes and the counts."""
        self._send_lock = threading.Lock()
        """One writer of the pipe at a time (the loop, or ``close`` in another thread)."""
        self._watching = False
        """The loop watches the pipe for room (bytes are waiting in ``_out``)."""
        self._fd: int | None = None
        """The pipe to the child; None once closed."""
        self._pending: list[dict[str, Any]] = []
        self._out = bytearray()
        self._frames: deque[tuple[int, int]] = deque()
        """Frames in ``_out``: (bytes, records), oldest first."""
        self._unsent = 0
        """Records submitted and not yet written whole into the pipe."""
        self._scheduled = False
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self._room: asyncio.Event | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stats_buf = b""
        self._child = dict.fromkeys(_STAT_FIELDS, 0)
        self._base = dict.fromkeys(_STAT_FIELDS, 0)
        """Counters of earlier children (after a restart)."""
        self._dropped = 0
        self._lost = 0
        self._errors = 0
        self._closed = False
        self._last_restart = 0.0

    # --- public -----------------------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None or self._closed:
            raise DecisionLogError("decision_log_state", "start() called twice or after close()")
        self._spawn()

    def submit(self, record: DecisionRecord) -> bool:
        if self._closed:
            self._dropped += 1
            return False
        if self._unsent >= self._queue_size:
            if self.on_full == "drop":
                self._dropped += 1
                return False
            self._drain_blocking(until=self._queue_size - 1)
        self._enqueue(record)
        return True

    def hold(self, record: DecisionRecord) -> bool:
        """``submit``: records already wait on the loop until the next flush, which wakes no
        thread of this process."""
        return self.submit(record)

    def release(self) -> None:
        return None

    async def asubmit(self, record: DecisionRecord) -> bool:
        if self.on_full == "drop" or self._closed:
            return self.submit(record)
        while self._unsent >= self._queue_size and not self._closed:
            room = self._room = self._room or asyncio.Event()
            room.clear()
            self._flush()
            if self._unsent >= self._queue_size:
                await room.wait()
        return self.submit(record)

    @property
    def stats(self) -> LogStats:
        self._read_stats()
        total = {k: self._base[k] + self._child[k] for k in self._base}
        return LogStats(
            written=total["written"],
            dropped=total["dropped"] + self._dropped,
            rotated=total["rotated"],
            queue_depth=self._child["queue_depth"] + self._unsent,
            errors=total["errors"] + self._errors,
            checkpoints=total["checkpoints"],
            lost=total["lost"] + self._lost,
        )

    def close(self, timeout_s: float = 5.0) -> bool:
        """Hand over what is queued, close the pipe and wait for the child to finish (True)
        within ``timeout_s``; False leaves it writing in the background."""
        deadline = time.monotonic() + timeout_s
        if self._proc is None and self._unsent and self._last_restart:
            self._last_restart = 0.0  # the writer died and is not back yet: one more try
            self._restart_if_due()
        self._closed = True
        proc = self._proc
        if proc is None:  # never started, or no writer could be started again
            with self._lock:
                lost, self._unsent = self._unsent, 0
                self._pending.clear()
                self._out.clear()
                self._frames.clear()
            self._lost += lost
            return lost == 0
        if self._fd is None:  # closed before
            return proc.returncode == 0
        self._flush()
        self._drain_blocking(until=0, deadline=deadline)
        self._close_pipe(proc)
        assert proc.stdout is not None
        out = _read_to_end(proc.stdout.fileno(), max(0.1, deadline - time.monotonic()))
        self._parse_stats(out)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning(
                "decision log %s: writer process still busy after %.1fs", self.path, timeout_s
            )
            return False
        proc.stdout.close()
        if self._unsent:
            self._lost += self._unsent
            self._unsent = 0
        return proc.returncode == 0

    # --- the sidecar side -------------------------------------------------------------

    def _enqueue(self, record: DecisionRecord) -> None:
        with self._lock:
            self._pending.append(record.__dict__)
            self._unsent += 1
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._scheduled = True
                self._writer_loop = loop
                loop.call_later(self._flush_s, self._flush)
                return
        self._drain_blocking(until=0)  # no event loop (a tool, a thread): hand over now

    def _flush(self) -> None:
        with self._lock:
            self._scheduled = False
            batch, self._pending = self._pending, []
            if batch:
                frame = _encode_batch(batch)
                if frame is None:  # a record pickle cannot take: find it, keep the rest
                    kept = [r for r in batch if _encode_batch([r]) is not None]
                    self._errors += len(batch) - len(kept)
                    self._lost += len(batch) - len(kept)
                    self._unsent -= len(batch) - len(kept)
                    frame = _encode_batch(kept) if kept else None
                    batch = kept
                if frame is not None:
                    self._out += frame
                    self._frames.append((len(frame), len(batch)))
        self._send()

    def _send(self) -> None:
        """Write as much of ``_out`` as the pipe takes, without blocking."""
        if self._proc is None:
            self._restart_if_due()
        failure: OSError | None = None
        with self._send_lock:
            fd = self._fd
            if fd is None or not self._out:
                return
            try:
                n = os.write(fd, self._out)
            except BlockingIOError:
                n = 0
            except OSError as exc:  # BrokenPipeError: the child is gone
                failure = exc
            else:
                self._sent(n)
        if failure is not None:
            self._child_died(str(failure))
            return
        loop = self._writer_loop
        if loop is None or self._closed or self._watching == bool(self._out):
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # the rest waits for the pipe to take it (never blocks the loop)
            if self._out:
                loop.add_writer(fd, self._send)
            else:
                loop.remove_writer(fd)
            self._watching = bool(self._out)

    def _sent(self, n: int) -> None:
        with self._lock:
            del self._out[:n]
            while self._frames and n >= self._frames[0][0]:
                size, records = self._frames.popleft()
                n -= size
                self._unsent -= records
            if self._frames and n:
                size, records = self._frames[0]
                self._frames[0] = (size - n, records)
        if self._room is not None and self._unsent < self._queue_size:
            self._room.set()

    def _drain_blocking(self, *, until: int, deadline: float | None = None) -> None:
        """Wait (in this thread) until at most ``until`` records are unsent."""
        self._flush()
        while self._unsent > until and (fd := self._fd) is not None:
            if deadline is not None and time.monotonic() >= deadline:
                return
            with contextlib.suppress(OSError, ValueError):
                select.select([], [fd], [], 0.1)
            self._send()
            if not self._out and self._pending:
                self._flush()
            if not self._out and not self._pending:
                return

    def _close_pipe(self, proc: subprocess.Popen[bytes]) -> None:
        """No more writes: the loop stops watching the fd, then it is closed."""
        fd = self._fd
        if fd is not None:
            self._unwatch(fd)
        with self._send_lock:
            self._fd = None
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()

    def _unwatch(self, fd: int) -> None:
        """Stop the loop's writability callback on ``fd`` before the pipe is closed (the fd
        number could otherwise be reused while the loop still watches it)."""
        loop = self._writer_loop
        if loop is None or loop.is_closed():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        self._watching = False
        if running is loop:
            loop.remove_writer(fd)
            return
        done = threading.Event()

        def remove() -> None:
            loop.remove_writer(fd)
            done.set()

        try:
            loop.call_soon_threadsafe(remove)
        except RuntimeError:  # the loop is closed
            return
        done.wait(1.0)

    # --- the child, seen from here -----------------------------------------------------

    def _spawn(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztagent.sidecar.log_writer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the sidecar's group leaves the writer to
            # finish: it stops when the sidecar closes the pipe (or dies)
        )
        assert proc.stdin is not None and proc.stdout is not None
        fd = proc.stdin.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            _write_all(fd, _FRAME.pack(len(self._header)) + self._header)
            status = _read_line(proc.stdout.fileno(), START_TIMEOUT_S)
        except OSError as exc:
            status = json.dumps({"error": f"writer process: {exc}"}).encode()
        try:
            first = json.loads(status) if status else {"error": "writer process exited"}
        except ValueError:
            first = {"error": f"writer process said {status[:200]!r}"}
        if "error" in first:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            raise DecisionLogError("decision_log_unavailable", str(first["error"]))
        os.set_blocking(fd, False)
        os.set_blocking(proc.stdout.fileno(), False)
        self._proc = proc
        self._fd = fd
        self._child = dict.fromkeys(_STAT_FIELDS, 0)

    def _child_died(self, why: str) -> None:
        proc = self._proc
        if proc is None:
            return
        self._drain_stats(proc)
        self._close_pipe(proc)
        with contextlib.suppress(OSError):
            proc.kill()
        code = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        with self._lock:
            lost = self._child["queue_depth"] + sum(n for _, n in self._frames)
            self._out.clear()
            self._unsent -= sum(n for _, n in self._frames)
            self._frames.clear()
        for key in self._base:
            self._base[key] += self._child[key]
        self._base["lost"] += lost
        self._base["queue_depth"] = 0
        self._errors += 1
        self._proc = None
        logger.error(
            "decision log %s: writer process ended (exit %s, %s); %d records lost, restarting",
            self.path,
            code,
            why,
            lost,
        )
        self._restart_if_due()

    def _restart_if_due(self) -> None:
        """A new child, at most once per ``RESTART_INTERVAL_S``; until then records wait
        (bounded by ``queue_size``) and the next hand-over tries again."""
        now = time.monotonic()
        if self._closed or self._proc is not None or now - self._last_restart < RESTART_INTERVAL_S:
            return
        self._last_restart = now
        try:
            self._spawn()
        except DecisionLogError as err:
            logger.error("decision log %s: cannot restart its writer: %s", self.path, err.message)

    def _read_stats(self) -> None:
        """The child's latest counters; notices a child that died."""
        proc = self._proc
        if proc is None:
            return
        self._drain_stats(proc)
        if proc.poll() is not None and not self._closed:
            self._child_died("it exited")

    def _drain_stats(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stdout is None:
            return
        chunks = []
        with contextlib.suppress(BlockingIOError, OSError, ValueError):
            while chunk := os.read(proc.stdout.fileno(), 65536):
                chunks.append(chunk)
        if chunks:
            self._parse_stats(b"".join(chunks))

    def _parse_stats(self, data: bytes) -> None:
        self._stats_buf += data
        *lines, self._stats_buf = self._stats_buf.split(b"\n")
        for line in reversed(lines):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "stats" in doc:
                self._child = {k: int(doc["stats"].get(k, 0)) for k in self._child}
                return


def _encode_batch(batch: list[dict[str, Any]]) -> bytes | None:
    try:
        payload = pickle.dumps(batch, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError):
        return None
    return _FRAME.pack(len(payload)) + payload


def _logs_json() -> bool:
    from ztagent.logs import logs_json

    return logs_json()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_line(fd: int, timeout_s: float) -> bytes:
    """One line from ``fd`` (blocking, bounded by ``timeout_s``); b"" at end of file."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise OSError("no answer from the writer process")
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\n", 1)[0]


def _read_to_end(fd: int, timeout_s: float) -> bytes:
    """What ``fd`` (non-blocking) gives until end of file or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    parts = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)


# --- the child process -------------------------------------------------------------------


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int) -> bytes | None:
    head = _read_exact(fd, _FRAME.size)
    if head is None:
        return None
    return _read_exact(fd, _FRAME.unpack(head)[0])


def _say(fd: int, doc: dict[str, Any]) -> bool:
    """One line to the sidecar; False when the pipe is full or the sidecar is gone (its
    records still in the pipe are written all the same)."""
    data = (json.dumps(doc) + "\n").encode()
    try:
        return os.write(fd, data) == len(data)
    except OSError:  # BlockingIOError, or BrokenPipeError once the sidecar died
        return False


def _stats_doc(log: DecisionLog) -> dict[str, Any]:
    return {"stats": asdict(log.stats)}


def child_main() -> int:
    """Reads the header, then batches of records from stdin until end of file."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the sidecar ends us by closing the pipe
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    header_bytes = _read_frame(inp)
    if header_bytes is None:
        return 1
    header = json.loads(header_bytes)
    from ztagent.logs import configure_logging

    configure_logging(header["log_level"], "json" if header["log_json"] else "text")
    pem = header["signer_pem"]
    signer = CheckpointSigner.from_pem(pem.encode()) if pem is not None else None
    settings = dict(header["settings"], on_full="block")  # back-pressure goes to the pipe
    log = DecisionLog(Path(header["path"]), signer=signer, **settings)
    try:
        log.start()
    except DecisionLogError as err:
        _say(out, {"error": err.message})
        return 1
    _say(out, {"ready": True})
    os.set_blocking(out, False)
    said: dict[str, Any] = {}
    last = 0.0
    while True:
        if select.select([inp], [], [], STATS_S)[0]:
            frame = _read_frame(inp)
            if frame is None:
                break
            # the one writer of this pipe is the sidecar that spawned us (inherited fd)
            for fields in pickle.loads(frame):  # noqa: S301
                log.submit(DecisionRecord(**fields))
        now = time.monotonic()
        if now - last >= STATS_S:
            doc = _stats_doc(log)
            if doc != said and _say(out, doc):
                said, last = doc, now
    finished = log.close(timeout_s=60.0)
    os.set_blocking(out, True)
    _say(out, _stats_doc(log))
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(child_main())
