"""``listen.workers = N``: N sidecar processes on one port, and the supervisor that runs them.

Python serves one request at a time per process; on a multi-core node N worker processes
bind the same address with SO_REUSEPORT and the kernel spreads incoming connections over
them. The supervisor (this module, the process ``ztagent serve`` starts as):

1. refuses an address someone already listens on (grpc would otherwise silently share the
   port with a stale server that also set SO_REUSEPORT), and resolves port 0 to one port that
   it holds until every worker has bound it;
2. empties the shared posture cache and nonces (postures never outlive the run that verified
   them);
3. starts the workers (``ztagent serve --worker-index i``) and waits until each reports that it
   serves; a worker that fails at start stops the whole sidecar with its exit code;
4. restarts a worker that dies later (1 s backoff, doubling to 30 s while it keeps dying);
5. on SIGTERM/SIGINT sends SIGTERM to every worker, which drains like a single sidecar, and
   kills what is left after the grace period.

Workers share attested posture and the posture state files through ``posture.state_dir``;
each writes its own decision log (``decisions.worker<i>.jsonl``, its own hash chain) and its
metrics into a directory from which the supervisor serves their sum at ``metrics.address``. Only
worker 0 fetches CRLs; the others pick the written file up by their file watch. Challenge
nonces are shared too (``ztagent.sidecar.shared_nonces``), so a device may answer a challenge
on another connection than the one that asked for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from ztagent.addresses import parse_host_port
from ztagent.config import Config
from ztagent.errors import ConfigError

log = logging.getLogger("ztagent.sidecar")

READY_TIMEOUT_S = 60.0
"""How long a starting worker may take to report that it serves."""
RESTART_BACKOFF_S = (1.0, 30.0)
"""First and largest delay before a dead worker is started again."""
STABLE_AFTER_S = 60.0
"""A worker that served this long resets its restart backoff."""
KILL_AFTER_GRACE_S = 10.0
"""Workers still running this long after the grace period are killed."""


# -- the address ------------------------------------------------------------------------------


def _family_and_sockaddr(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def reserve_address(address: str) -> tuple[socket.socket, str, int]:
    """A socket holding ``address`` for the workers; returns it with the host and the port.

    The probe binds without SO_REUSEPORT, so it fails while anything listens on the address,
    with or without that option; the holder then binds with it, as the workers will.
    """
    host, port = parse_host_port(address, "listen.address")
    try:
        family, sockaddr = _family_and_sockaddr(host, port)
    except OSError as exc:
        raise ConfigError("listen.address", f"cannot resolve {host!r}: {exc}") from exc
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise ConfigError(
                "listen.address", f"cannot bind {address}: {exc.strerror} (is a sidecar running?)"
            ) from exc
        port = int(probe.getsockname()[1])
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((sockaddr[0], port))
    except OSError as exc:
        holder.close()
        raise ConfigError("listen.address", f"cannot bind {address}: {exc.strerror}") from exc
    return holder, host, port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the workers ------------------------------------------------------------------------------


SUPERVISOR_PID_ENV = "ZTAGENT_SUPERVISOR_PID"


def die_with_supervisor() -> None:
    """Called first thing in a worker: SIGTERM when the supervisor dies (Linux
    PR_SET_PDEATHSIG), and exit at once if it already died before that was set. Done in the
    worker rather than between fork and exec, which is unsafe in the supervisor (it has a
    metrics thread)."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if expected is not None and os.getppid() != int(expected):
        log.error("supervisor %s is gone; worker exits", expected)
        raise SystemExit(1)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    ready_at: float | None = None
    restart_at: float = 0.0
    backoff: float = RESTART_BACKOFF_S[0]
    buffer: bytes = field(default=b"")

    def close_ready(self) -> None:
        """Closes the readiness pipe, if still open."""
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None


@dataclass
class Supervisor:
    """Starts, watches and stops the worker processes of one ``ztagent serve``."""

    config_path: Path
    config: Config
    workers: list[_Worker] = field(default_factory=list)
    address: str = ""
    stopping: bool = False
    env: dict[str, str] | None = None
    """The workers' environment (None: inherited)."""
    log_level: str | None = None
    log_format: str | None = None
    """The supervisor's own ``--log-level`` / ``--log-format``, passed to every worker."""

    def command(self, worker: _Worker, ready_w: int) -> list[str]:
        level = ["--log-level", self.log_level] if self.log_level else []
        fmt = ["--log-format", self.log_format] if self.log_format else []
        return [
            sys.executable, "-m", "ztagent", *level, "serve", "--config", str(self.config_path),
            "--listen", self.address, "--worker-index", str(worker.index),
            "--worker-count", str(len(self.workers)), "--ready-fd", str(ready_w), *fmt,
        ]  # fmt: skip

    def spawn(self, worker: _Worker) -> None:
        ready_r, ready_w = os.pipe()
        try:
            worker.proc = subprocess.Popen(
                self.command(worker, ready_w),
                pass_fds=(ready_w,),
                env={**(self.env or os.environ), SUPERVISOR_PID_ENV: str(os.getpid())},
            )
        finally:
            os.close(ready_w)
        worker.ready_fd, worker.ready_at, worker.buffer = ready_r, None, b""
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _read_ready(self, worker: _Worker) -> None:
        assert worker.ready_fd is not None
        chunk = os.read(worker.ready_fd, 256)
        worker.buffer += chunk
        if b"\n" in worker.buffer or not chunk:
            worker.close_ready()
            if worker.buffer.startswith(b"ready "):
                worker.ready_at = time.monotonic()
                log.info("worker %d (pid %d) serving", worker.index, _pid(worker))

    def poll_ready(self, timeout: float) -> None:
        """Waits up to ``timeout`` for readiness lines from starting workers."""
        fds = {w.ready_fd: w for w in self.workers if w.ready_fd is not None}
        if not fds:
            time.sleep(timeout)
            return
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(list(fds), [], [], timeout)
            for fd in readable:
                self._read_ready(fds[fd])

    def start_all(self) -> int:
        """Starts every worker and waits until all serve; a nonzero exit code if one fails."""
        for worker in self.workers:
            self.spawn(worker)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(w.ready_at is None for w in self.workers):
            if self.stopping:
                return 0
            for worker in self.workers:
                assert worker.proc is not None
                code = worker.proc.poll()
                if code is not None and worker.ready_at is None:
                    log.error("worker %d exited with code %d before serving", worker.index, code)
                    return code or 1
            if time.monotonic() > deadline:
                log.error("workers not serving after %.0f s", READY_TIMEOUT_S)
                return 1
            self.poll_ready(0.1)
        return 0

    def watch(self) -> None:
        """Until a stop signal: restarts workers that die, with backoff."""
        low, high = RESTART_BACKOFF_S
        while not self.stopping:
            self.poll_ready(0.2)
            now = time.monotonic()
            for worker in self.workers:
                if self.stopping:
                    break
                if worker.proc is None:
                    if now >= worker.restart_at:
                        self.spawn(worker)
                    continue
                code = worker.proc.poll()
                if code is None:
                    if worker.ready_at is not None and now - worker.ready_at > STABLE_AFTER_S:
                        worker.backoff = low
                    continue
                worker.close_ready()
                log.error(
                    "worker %d (pid %d) exited with code %d; restarting in %.0f s",
                    worker.index, worker.proc.pid, code, worker.backoff,
                )  # fmt: skip
                worker.proc = None
                worker.restart_at = now + worker.backoff
                worker.backoff = min(high, worker.backoff * 2)

    def stop_all(self) -> None:
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        log.info("stopping %d workers (grace %.1f s)", len(live), self.config.listen.grace_period_s)
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.listen.grace_period_s + KILL_AFTER_GRACE_S
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        for worker in self.workers:
            worker.close_ready()


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _SharedMetrics:
    """The workers' metrics summed and served at ``metrics.address`` by the supervisor.

    Each worker writes its values to files in a fresh directory (prometheus_client's
    multiprocess mode, chosen by ``PROMETHEUS_MULTIPROC_DIR`` in the workers' environment);
    counters of a worker that died stay in the sum, so they never go backwards.
    """

    def __init__(self, address: str) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from ztagent.sidecar.metrics import MetricsEndpoint

        self.directory = Path(tempfile.mkdtemp(prefix="ztagent-metrics-"))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        try:
            self.endpoint = MetricsEndpoint(address, registry)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def close(self) -> None:
        self.endpoint.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _pid(worker: _Worker) -> int:
    return worker.proc.pid if worker.proc is not None else -1


def supervise(
    config_path: Path,
    config: Config,
    *,
    log_level: str | None = None,
    log_format: str | None = None,
) -> int:
    """Runs ``config.listen.workers`` sidecar workers until SIGTERM/SIGINT; the exit code."""
    count = config.listen.workers
    # One assertion key for every worker: made here, before any worker could race to make it.
    from ztagent.sidecar.server import assertion_signer

    assertion_signer(config)
    holder, host, port = reserve_address(config.listen.address)
    supervisor = Supervisor(config_path, config, [_Worker(i) for i in range(count)])
    supervisor.address = _join(host, port)
    supervisor.log_level, supervisor.log_format = log_level, log_format

    def on_signal(signum: int, frame: FrameType | None) -> None:
        supervisor.stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    metrics: _SharedMetrics | None = None
    try:
        if config.metrics.enabled:
            metrics = _SharedMetrics(config.metrics.address)
            supervisor.env = {**os.environ, MULTIPROC_ENV: str(metrics.directory)}
        if config.posture.enabled:
            from ztagent.sidecar.shared_cache import clear_shared_cache
            from ztagent.sidecar.shared_nonces import clear_shared_nonces

            clear_shared_cache(config.posture.state_dir)
            clear_shared_nonces(config.posture.state_dir)
        try:
            code = supervisor.start_all()
        finally:
            holder.close()
        if code != 0:
            return code
        if not supervisor.stopping:
            log.info(
                "sidecar listening on %s (port %d) with %d workers (pids %s)",
                supervisor.address, port, count,
                ", ".join(str(_pid(w)) for w in supervisor.workers),
            )  # fmt: skip
            supervisor.watch()
        return 0
    finally:
        supervisor.stop_all()
        if metrics is not None:
            metrics.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("stopped")
