"""DEVELOPMENT: the swtpm software TPM on loopback, for the demo, the bench and the tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tpm2_pytss import ESAPI, ESYS_TR, TPM2_SU

from ztagent.device.tpm import TpmError
from ztagent.files import make_private_dir


@dataclass
class SwtpmProcess:
    """A running ``swtpm socket`` on loopback; ``stop()`` terminates it and waits."""

    state_dir: Path
    port: int
    ctrl_port: int
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            # An orderly TPM2_Shutdown first: a TPM restarted without one counts it as a
            # failed authorization, and after a few demo runs the dictionary-attack lockout
            # would refuse every use of the AK (TPM_RC_LOCKOUT).
            self._tpm_call(lambda esapi: esapi.shutdown(TPM2_SU.CLEAR))
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def _tpm_call(self, fn: Callable[[Any], object]) -> None:
        """Best effort: a TPM command on a fresh connection, errors ignored."""
        try:
            esapi = ESAPI(self.tcti)
        except Exception:
            return
        try:
            with contextlib.suppress(Exception):
                fn(esapi)
        finally:
            esapi.close()

    def __enter__(self) -> SwtpmProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise TpmError("tpm_unavailable", "no two consecutive free loopback ports for swtpm")


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_swtpm(
    state_dir: Path, *, attempts: int = 5, startup_timeout: float = 5.0
) -> SwtpmProcess:
    """Start a software TPM 2.0 keeping its state in ``state_dir``, on free loopback ports.

    It runs TPM2_Startup(CLEAR) itself, so PCRs start at zero on every start; persistent
    objects (the AK) survive restarts with the same ``state_dir``. swtpm's log goes to
    ``state_dir/swtpm.log``. Raise ``TpmError("tpm_unavailable")`` when it cannot start.
    """
    binary = shutil.which("swtpm")
    if binary is None:
        raise TpmError("tpm_unavailable", "swtpm not found on PATH (Debian package 'swtpm')")
    make_private_dir(state_dir)
    log = state_dir / "swtpm.log"
    last = "no attempt made"
    for _ in range(attempts):
        port = _free_port_pair()
        argv = [
            binary,
            "socket",
            "--tpmstate",
            f"dir={state_dir}",
            "--tpm2",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            f"file={log}",
        ]
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        swtpm = SwtpmProcess(state_dir, port, port + 1, process)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                last = f"swtpm exited with status {process.returncode} (see {log})"
                break
            if _accepting(port + 1) and _accepting(port):
                # A simulator stopped uncleanly earlier (kill -9, a crash) may be in
                # dictionary-attack lockout: clear it with the (empty) lockout auth.
                swtpm._tpm_call(lambda esapi: esapi.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT))
                return swtpm
            time.sleep(0.02)
        else:
            last = f"swtpm did not accept connections on port {port} in {startup_timeout}s"
        swtpm.stop()
    raise TpmError("tpm_unavailable", f"could not start swtpm in {state_dir}: {last}")
