"""The real soak, short: what `make soak SOAK_S=120` runs, with a compressed fault schedule (a
step every 2 s, so the cycle repeats: victims enrolled and revoked, also while the CA is down,
policies good and broken, JWKS rotation, issuer clock steps, worker SIGKILL, server cert
rotation, CRL re-sign, disk full for the decision log, storage restart, renewals of file,
PKCS#11 and TPM keys). The oracle must find no wrong decision and nothing lost, the report
must show every fault made, and growth is judged after 50 s of a process's life (not the long
run's two minutes, which would leave nothing to judge)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.ci import skip_unless_ci

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHORT = ("--seconds", "120", "--gap", "2", "--warmup", "50", "--keep")  # fmt: skip


def _stop_leftovers(state: Path) -> list[str]:
    """Every process whose command line names the soak's state dir, killed by its PID (the
    stack's processes run in sessions of their own, so a driver killed by a timeout leaves
    them behind); returns what was found."""
    found = subprocess.run(["pgrep", "-af", str(state)], capture_output=True, text=True)
    lines = found.stdout.splitlines()
    for line in lines:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    return lines


@pytest.mark.timeout(600)
def test_short_soak_has_no_wrong_decision_and_loses_nothing(tmp_path: Path) -> None:
    if shutil.which("swtpm") is None:
        skip_unless_ci("swtpm is not installed (make installs it)")
    if importlib.util.find_spec("torch") is None:
        skip_unless_ci("torch is not installed (the inference workload needs it)")
    state = tmp_path / "soak"
    driver = subprocess.Popen(
        [sys.executable, "-m", "soak.run", *SHORT, str(state)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        report, errors = driver.communicate(timeout=540)
    finally:
        if driver.poll() is None:
            driver.terminate()  # the driver stops its stack on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                driver.wait(timeout=30)
            driver.kill()
        left = _stop_leftovers(state)
    assert driver.returncode == 0, report + errors[-3000:]
    assert left == [], left  # the stack is gone: nothing the soak started outlives it
    assert "wrong decisions: 0" in report
    assert "violations: 0" in report
    made = re.search(r"^faults: (.*)$", report, re.MULTILINE)
    assert made is not None, report
    counts = {k: int(n) for k, n in (item.rsplit(" ", 1) for item in made[1].split(", "))}
    for fault, least in {
        "revoke": 2, "policy_broken": 1, "worker_kill": 1, "ca_down": 1, "disk_full": 1,
        "jwks_rotate": 1, "server_rotate": 1, "workload_restart": 2, "clock_step": 1,
        "renew": 3, "crl_resign": 1, "policy_publish": 2,
    }.items():  # fmt: skip
        assert counts.get(fault, 0) >= least, (fault, report)
    judged = re.search(r"^resource growth judged after 50 s of each life: (.*)$", report, re.M)
    assert judged is not None, report
    names = set(judged[1].split(", "))
    assert {"inference", "sidecar", "soak-driver"} <= names, report  # ca, storage: restarted
    assert names & {"sidecar-worker0", "sidecar-worker1"}, report
    written = re.search(r"writes acknowledged (\d+), read back and decrypted (\d+)", report)
    assert written is not None and 0 < int(written[1]) == int(written[2]), report
    lines = {line.split(":")[0]: line for line in report.splitlines() if ":" in line}
    assert "hash chain intact" in lines["log verify decisions.worker0.jsonl"]
    assert "hash chain intact" in lines["log verify decisions.worker1.jsonl"]
