"""The real soak, short: `python -m soak.run` for 45 s with one compressed fault cycle (a step
every 2 s: victims enrolled and revoked, also while the CA is down, policies good and broken,
JWKS rotation, issuer clock steps, worker SIGKILL, server cert rotation, CRL re-sign, disk
full for the decision log, storage restart, renewals of file, PKCS#11 and TPM keys). The
oracle must find no wrong decision and nothing lost; the report must show every fault made.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.ci import skip_unless_ci

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_short_soak_has_no_wrong_decision_and_loses_nothing(tmp_path: Path) -> None:
    if shutil.which("swtpm") is None:
        skip_unless_ci("swtpm is not installed (make installs it)")
    pytest.importorskip("torch")
    state = tmp_path / "soak"
    done = subprocess.run(
        [sys.executable, "-m", "soak.run", "--seconds", "45", "--gap", "2", "--keep", str(state)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = done.stdout
    assert done.returncode == 0, report + done.stderr[-3000:]
    assert "wrong decisions: 0" in report
    assert "violations: 0" in report
    for fault in (
        "revoke 2", "policy_broken 1", "worker_kill 1", "ca_down 1", "disk_full 1",
        "jwks_rotate 1", "server_rotate 1", "workload_restart 2", "clock_step",
    ):  # fmt: skip
        assert fault in report, report
    written = re.search(r"writes acknowledged (\d+), read back and decrypted (\d+)", report)
    assert written is not None and 0 < int(written[1]) == int(written[2]), report
    lines = {line.split(":")[0]: line for line in report.splitlines() if ":" in line}
    assert "hash chain intact" in lines["log verify decisions.worker0.jsonl"]
    assert "hash chain intact" in lines["log verify decisions.worker1.jsonl"]
    # the stack is gone: nothing the soak started outlives it
    alive = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
    assert alive.stdout.strip() == "", alive.stdout
