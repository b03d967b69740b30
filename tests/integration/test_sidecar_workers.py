"""``listen.workers = 2``: a real ``ztagent serve`` supervisor with two worker processes on one
port: connections reach both, each worker keeps its own decision-log chain, posture attested
through one worker holds in the other, a killed worker is restarted, SIGTERM stops them all,
and a port already served is refused."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from tests.integration.conftest import SHIPPED_POLICIES, Pki, _load_pair, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent._proto.v1 import attestation_pb2 as apb
from ztagent._proto.v1 import attestation_pb2_grpc as apb_grpc
from ztagent.ca import store as ca_store
from ztagent.cli import main
from ztagent.dev.swtpm import start_swtpm
from ztagent.device.tpm import DeviceTpm
from ztagent.sidecar.server import worker_log_path

pytestmark = pytest.mark.integration

SERVE = [sys.executable, "-m", "ztagent", "serve"]

POSTURE_POLICY = """package ztagent.authz

default decision := {"allow": false, "reasons": ["posture_required"], "headers": {}}

decision := {"allow": true, "reasons": ["posture_ok"], "headers": {}} if {
	input.posture.verified == true
}
"""


class Served:
    """A running supervisor; its output is collected by a thread."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [*SERVE, "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in output:\n{''.join(self.lines)}")

    def port(self) -> int:
        line = self.wait_for("with 2 workers")
        return int(line.split("(port ")[1].split(")")[0])

    def worker_pids(self) -> set[int]:
        return {c.pid for c in psutil.Process(self.proc.pid).children()}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._reader.join(5)


def _config(pki: Pki, routes: dict[str, str], **kwargs: object) -> Path:
    config = write_config(pki, routes, **kwargs)  # type: ignore[arg-type]
    config.write_text(
        config.read_text().replace("grace_period_s = 5", "grace_period_s = 5\nworkers = 2")
    )
    return config


@pytest.fixture
def served(pki: Pki, upstream: EchoUpstream) -> Iterator[Served]:
    run = Served(_config(pki, {SERVICE: upstream.address}))
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


async def _calls_on_fresh_connections(pki: Pki, port: int, n: int, method: str = "Unary") -> None:
    """``n`` calls, each on a new connection. wait_for_ready: a connection that lands on a
    worker in the instant it dies or starts is reset, and a client reconnects, as real ones do
    (the kernel then hashes the new connection again)."""
    pair = pki.mint("dev-workers")
    for i in range(n):
        async with channel(pki, port, pair) as ch:
            call = ch.unary_unary(f"/{SERVICE}/{method}")
            reply = await call(f"{i}".encode(), timeout=20, wait_for_ready=True)
            assert reply == f"{i}".encode()


async def test_connections_reach_both_workers_each_with_its_own_log_chain(
    pki: Pki, served: Served
) -> None:
    port = await asyncio.to_thread(served.port)  # the config says port 0: one port for both
    assert len(served.worker_pids()) == 2
    await _calls_on_fresh_connections(pki, port, 24)
    assert await asyncio.to_thread(served.stop) == 0
    assert "stopping 2 workers" in "".join(served.lines)

    configured = pki.layout.dir.parent / "decisions.jsonl"
    assert not configured.exists()
    counts = []
    for index in (0, 1):
        log = worker_log_path(configured, index)
        lines = log.read_text().splitlines()
        counts.append(sum(1 for line in lines if not line.startswith('{"checkpoint":')))
        assert lines[-1].startswith('{"checkpoint":{"v":1,"reason":"close"')  # each sealed its own
        assert main(["log", "verify", "--key", str(pki.layout.server_cert), str(log)]) == 0
    # 24 connections, hashed over two sockets: both got some (all in one: p = 2^-23)
    assert sum(counts) == 24 and min(counts) > 0, counts


async def test_a_killed_worker_is_restarted_and_the_others_keep_serving(
    pki: Pki, served: Served
) -> None:
    port = await asyncio.to_thread(served.port)
    before = served.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(_wait_gone, victim)  # its socket leaves the port's group
    await _calls_on_fresh_connections(pki, port, 6)  # the surviving worker answers meanwhile
    await asyncio.to_thread(served.wait_for, f"pid {victim}) exited with code -9")
    deadline = time.monotonic() + 30
    while served.worker_pids() == before - {victim} or len(served.worker_pids()) < 2:
        assert time.monotonic() < deadline, "worker not restarted"
        await asyncio.sleep(0.1)
    after = served.worker_pids()
    assert victim not in after and len(after) == 2
    await _calls_on_fresh_connections(pki, port, 12)
    assert await asyncio.to_thread(served.stop) == 0
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in after
    )


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still running")


async def test_sigterm_drains_every_worker(
    pki: Pki, upstream: EchoUpstream, served: Served
) -> None:
    port = await asyncio.to_thread(served.port)
    async with channel(pki, port, pki.mint("dev-drain")) as ch:
        call = ch.unary_unary(f"/{SERVICE}/Sleep")(b"1.0", timeout=20)
        while not upstream.seen or upstream.seen[-1].method != "Sleep":
            await asyncio.sleep(0.02)
        served.proc.send_signal(signal.SIGTERM)
        assert await call == b"1.0"  # finished although SIGTERM arrived mid-call
    assert await asyncio.to_thread(served.proc.wait, 30) == 0


async def test_a_served_port_is_refused(pki: Pki, upstream: EchoUpstream, served: Served) -> None:
    port = await asyncio.to_thread(served.port)
    config = _config(pki, {SERVICE: upstream.address})
    second = await asyncio.to_thread(
        subprocess.run,
        [*SERVE, "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "listen.address: cannot bind" in second.stderr
    # the running sidecar kept its port and still serves
    await _calls_on_fresh_connections(pki, port, 2)


def test_bad_workers_value_names_the_key(pki: Pki) -> None:
    config = write_config(pki, {})
    config.write_text(config.read_text().replace("grace_period_s = 5", "workers = 0"))
    proc = subprocess.run(
        [*SERVE, "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "listen.workers" in proc.stderr and "expected >= 1, got 0" in proc.stderr


async def test_posture_attested_through_one_worker_holds_in_all(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    # Vendor key, firmware, and reference values from a known-good boot.
    assert main(["firmware", "keygen", "--out", str(tmp_path / "vendor")]) == 0
    from ztagent.dev.boot_sim import demo_image

    firmware = tmp_path / "edge-fw.bin"
    firmware.write_bytes(demo_image("edge-fw", "1.3.0"))
    sign = ["firmware", "sign", str(firmware), "--key", str(tmp_path / "vendor" / "vendor.key")]
    assert main([*sign, "--name", "edge-fw", "--version", "1.3.0", "--svn", "1"]) == 0
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "authz.rego").write_text(POSTURE_POLICY)
    cert = tmp_path / "device.pem"
    ca_store.issue_device_cert(pki.layout.dir, "cam-1", cert)
    pair = _load_pair(cert, cert.with_suffix(".key"))
    shared = pki.layout.dir.parent / "state" / "posture-cache"

    tpm = start_swtpm(tmp_path / "device" / "tpm")
    try:
        log = tmp_path / "device" / "event-log.bin"
        boot = ["posture", "simulate-boot", "--tpm", tpm.tcti, "--out", str(log)]
        assert main([*boot, "--firmware-image", str(firmware)]) == 0
        refs = tmp_path / "refs.json"
        assert main(["posture", "reference", "--eventlog", str(log), "--out", str(refs)]) == 0
        config = _config(
            pki,
            {SERVICE: upstream.address},
            policy=policy,
            posture_extra=f'firmware_keys = ["{tmp_path / "vendor" / "vendor.pub"}"]\n',
        )
        default_refs = str(SHIPPED_POLICIES / "data" / "reference-values.json")
        config.write_text(config.read_text().replace(default_refs, str(refs)))

        run = Served(config)
        try:
            port = await asyncio.to_thread(run.port)

            async def allowed_on_fresh_connections(n: int) -> list[bool]:
                out = []
                for _ in range(n):
                    async with channel(pki, port, pair) as ch:
                        try:
                            await ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
                            out.append(True)
                        except grpc.aio.AioRpcError as err:
                            assert err.code() is grpc.StatusCode.PERMISSION_DENIED
                            out.append(False)
                return out

            assert await allowed_on_fresh_connections(6) == [False] * 6  # not attested yet
            attest = [
                "attest", "--server", f"127.0.0.1:{port}", "--dir", str(tmp_path / "device"),
                "--tpm", tpm.tcti, "--cert", str(cert), "--ca-bundle", str(pki.layout.bundle),
                "--firmware", str(tmp_path / "edge-fw.manifest.json"),
                "--firmware-sig", str(tmp_path / "edge-fw.manifest.sig"),
            ]  # fmt: skip
            assert await asyncio.to_thread(main, attest) == 0
            # 16 fresh connections land on both workers; every one sees the posture
            assert await allowed_on_fresh_connections(16) == [True] * 16
            assert len(list(shared.glob("*.json"))) == 1

            # Challenge on one connection, Attest on another: with two workers most of these
            # pairs cross workers, and the nonce is still accepted once (shared nonces).
            device_tpm = DeviceTpm(tpm.tcti)
            evidence_files = (
                log.read_bytes(),
                (tmp_path / "edge-fw.manifest.json").read_bytes(),
                (tmp_path / "edge-fw.manifest.sig").read_bytes(),
            )
            for _ in range(6):
                async with channel(pki, port, pair) as ch:
                    challenge = await apb_grpc.AttestationStub(ch).Challenge(
                        apb.ChallengeRequest(), timeout=10
                    )
                evidence = _evidence(device_tpm, challenge.nonce, *evidence_files)
                for expected in (True, False):  # the second use of the nonce is a replay
                    async with channel(pki, port, pair) as ch:
                        reply = await apb_grpc.AttestationStub(ch).Attest(
                            apb.AttestRequest(evidence=evidence), timeout=10
                        )
                    assert reply.verified is expected, [f.code for f in reply.failures]
                    if not expected:
                        assert [f.code for f in reply.failures] == ["nonce_reused"]
        finally:
            assert await asyncio.to_thread(run.stop) == 0
    finally:
        tpm.stop()

    # A new supervisor starts with no posture: it never outlives the run that verified it.
    again = Served(config)
    try:
        await asyncio.to_thread(again.port)
        assert list(shared.glob("*.json")) == []
    finally:
        assert await asyncio.to_thread(again.stop) == 0


def _evidence(
    tpm: DeviceTpm, nonce: bytes, event_log: bytes, manifest: bytes, signature: bytes
) -> apb.Evidence:
    pcrs = [0, 4, 7]
    quote = tpm.quote(nonce, pcrs)
    return apb.Evidence(
        quote=quote.attest,
        quote_signature=quote.signature,
        pcr_bank="sha256",
        pcr_values=tpm.read_pcrs(pcrs),
        event_log=event_log,
        ak_public=tpm.ak_public(),
        firmware_manifest=manifest,
        firmware_signature=signature,
        host_facts=b"{}",
    )


def test_worker_log_path() -> None:
    assert worker_log_path(Path("/v/decisions.jsonl"), 1) == Path("/v/decisions.worker1.jsonl")


async def test_workers_do_not_outlive_a_killed_supervisor(served: Served) -> None:
    await asyncio.to_thread(served.port)
    workers = served.worker_pids()
    assert len(workers) == 2
    served.proc.kill()  # SIGKILL: the supervisor cannot forward anything
    await asyncio.to_thread(served.proc.wait, 10)
    for pid in workers:  # PR_SET_PDEATHSIG: each gets SIGTERM and drains (grace 5 s)
        await asyncio.to_thread(_wait_gone, pid, 20)
