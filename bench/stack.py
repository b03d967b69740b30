"""Starts the real stack for the benchmark, in a temporary directory.

A dev CA; devices enrolled through the real enrollment service (``start_ca_server`` +
``enroll``, timed: the enrollment rate); the dev token issuer; a firmware vendor key; the
storage workload (``bench.servers workload``); the bare proxy (``bench.servers bare-proxy``);
the sidecar (``ztagent serve`` with the shipped policy, tokens with cert binding, posture,
decision log); and the benchmark device booted on its own swtpm and attested to the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.ca.service import start_ca_server
from ztagent.dev.boot_sim import demo_components, simulate_boot
from ztagent.dev.issuer import DevIssuer, init_dev_issuer, mint_token
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.attest import attest_once
from ztagent.device.enroll import enroll
from ztagent.device.tpm import DeviceTpm
from ztagent.posture.firmware import generate_firmware_key, sign_manifest
from ztagent.tokens.assertion import ensure_signing_key, public_key_path

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
STORAGE = "ztagent.workloads.v1.Storage"
DEVICE_ID = "bench-device"
TRUST_DOMAIN = "ztagent.dev"
PCRS = (0, 4, 7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Enrollment:
    devices: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.devices / self.seconds


@dataclass
class Stack:
    root: Path
    ca_dir: Path
    device_cert: Path
    device_key: Path
    token: str
    config: Path
    decision_log: Path
    workload_tcp: int
    workload_mtls: int
    workload_unix: str
    bare_port: int
    sidecar_port: int
    workers: int
    log_writer: str
    """``decision_log.writer`` of the sidecar: process or thread."""
    assertion_key: Path
    """The direct legs' and the bare proxy's stand-in for the sidecar's assertion key."""
    proxyless_port: int = 0
    """Leg (e): the storage workload serving mTLS itself with in-process admission."""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    swtpm: SwtpmProcess | None = None
    enrollment: Enrollment | None = None
    attestation_ms: list[float] = field(default_factory=list)
    tpm: DeviceTpm | None = None
    evidence_inputs: tuple[bytes, bytes, bytes] | None = None

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "ca-bundle.pem"


async def _enroll_devices(ca_dir: Path, out: Path, count: int) -> tuple[Path, Enrollment]:
    """Enrolls the bench device, then ``count`` more back to back (the enrollment rate)."""
    server = await start_ca_server(ca_dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0")
    address = f"127.0.0.1:{server.enroll_port}"
    renew = f"127.0.0.1:{server.renew_port}"
    bundle = ca_dir / "ca-bundle.pem"
    try:
        token = issue_bootstrap_token(ca_dir, DEVICE_ID, ttl_s=900)
        result = await enroll(
            address, token, bundle, out / DEVICE_ID, "file", force=True, renew_server=renew
        )
        tokens = [issue_bootstrap_token(ca_dir, f"enroll-{i}", ttl_s=900) for i in range(count)]
        started = time.perf_counter()
        for i, tok in enumerate(tokens):
            await enroll(
                address, tok, bundle, out / f"enroll-{i}", "file", force=True, renew_server=renew
            )
        elapsed = time.perf_counter() - started
    finally:
        await server.stop(0)
    return result.dir / "device.pem", Enrollment(count, elapsed)


def _config_text(st: Stack, issuer: DevIssuer, vendor_pub: Path) -> str:
    return f"""
[listen]
address = "127.0.0.1:{st.sidecar_port}"
grace_period_s = 2
{f"workers = {st.workers}" if st.workers != 1 else ""}

[tls]
server_cert = "{st.ca_dir / "server.pem"}"
server_key = "{st.ca_dir / "server.key"}"
client_ca = "{st.bundle}"
crl = "{st.ca_dir / "crl.pem"}"

[identity]
trust_domain = "{TRUST_DOMAIN}"

[[routes]]
service = "{STORAGE}"
upstream = "unix:{st.workload_unix}"
timeout_s = 30

[tokens]
issuer = "{issuer.issuer}"
audience = "{issuer.audience}"
jwks_file = "{issuer.jwks_path}"
algorithms = ["ES256"]
require_cert_binding = true

[policy]
engine = "embedded"
path = "{POLICIES}"

[decision_log]
path = "{st.decision_log}"
writer = "{st.log_writer}"

[posture]
max_age_s = 3600
reference_values = "{POLICIES / "data" / "reference-values.json"}"
firmware_keys = ["{vendor_pub}"]
pcrs = [0, 4, 7]
state_dir = "{st.root / "state"}"
"""


def _spawn(st: Stack, name: str, args: list[str]) -> None:
    log = (st.root / f"{name}.log").open("wb")
    st.procs[name] = subprocess.Popen(
        [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO
    )


def _wait_healthy(st: Stack, name: str, channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc = st.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}); see {st.root / name}.log")
        with contextlib.suppress(grpc.RpcError):
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{name} not SERVING after 30 s; see {st.root / name}.log")


def mtls_channel(
    st: Stack, port: int, options: list[tuple[str, int]] | None = None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=st.bundle.read_bytes(),
        private_key=st.device_key.read_bytes(),
        certificate_chain=st.device_cert.read_bytes(),
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)


def _attest(st: Stack, vendor_key: Path) -> None:
    """The bench device boots on swtpm (measured boot, signed firmware) and attests."""
    st.swtpm = start_swtpm(st.root / "tpm")
    tpm = DeviceTpm(st.swtpm.tcti)
    components = demo_components()
    event_log = simulate_boot(tpm, components)
    manifest, signature = sign_manifest(
        vendor_key,
        components[0].image,
        name=components[0].name,
        version=components[0].version,
        svn=3,
    )
    st.tpm = tpm
    st.evidence_inputs = (event_log, manifest, signature)

    async def rounds() -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=st.bundle.read_bytes(),
            private_key=st.device_key.read_bytes(),
            certificate_chain=st.device_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{st.sidecar_port}", creds) as channel:
            for i in range(6):  # the first one also binds the AK
                t0 = time.perf_counter()
                reply = await attest_once(
                    channel,
                    tpm,
                    state_dir=st.root / "device-state",
                    pcrs=PCRS,
                    event_log=event_log,
                    firmware_manifest=manifest,
                    firmware_signature=signature,
                    host_facts={"os": "bench"},
                )
                if not reply.verified:
                    raise RuntimeError(f"attestation refused: {list(reply.failures)}")
                if i:
                    st.attestation_ms.append((time.perf_counter() - t0) * 1e3)

    asyncio.run(rounds())


@contextlib.contextmanager
def running_stack(
    root: Path, *, enroll_count: int = 20, workers: int = 1, log_writer: str = "thread"
) -> Iterator[Stack]:
    ca_dir = ca_store.init_ca(root / "ca", TRUST_DOMAIN).dir
    issuer = init_dev_issuer(ca_dir, TRUST_DOMAIN, force=True)
    vendor_key, vendor_pub = generate_firmware_key(root / "firmware", "vendor")
    device_cert, enrollment = asyncio.run(_enroll_devices(ca_dir, root / "devices", enroll_count))
    st = Stack(
        root=root,
        ca_dir=ca_dir,
        device_cert=device_cert,
        device_key=device_cert.with_suffix(".key"),
        token=mint_token(ca_dir, sub="alice", roles=["writer"], bind_cert=device_cert, ttl_s=3600),
        config=root / "ztagent.toml",
        decision_log=root / "decisions.jsonl",
        workload_tcp=free_port(),
        workload_mtls=free_port(),
        workload_unix=str(root / "storage.sock"),
        bare_port=free_port(),
        sidecar_port=free_port(),
        workers=workers,
        log_writer=log_writer,
        enrollment=enrollment,
        assertion_key=root / "bench-assertion" / "assertion.key",
    )
    ensure_signing_key(st.assertion_key)
    st.config.write_text(_config_text(st, issuer, vendor_pub))
    st.proxyless_port = free_port()
    proxyless_config = root / "proxyless.toml"
    proxyless_config.write_text(
        _config_text(st, issuer, vendor_pub)
        .replace(
            f'address = "127.0.0.1:{st.sidecar_port}"', f'address = "127.0.0.1:{st.proxyless_port}"'
        )
        .replace(f'path = "{st.decision_log}"', f'path = "{root / "decisions-proxyless.jsonl"}"')
        .replace(
            f'state_dir = "{st.root / "state"}"', f'state_dir = "{st.root / "state-proxyless"}"'
        )
    )
    try:
        _spawn(
            st,
            "workload",
            [
                "-m",
                "bench.servers",
                "workload",
                "--data",
                str(root / "data"),
                "--ca-dir",
                str(ca_dir),
                "--tcp-port",
                str(st.workload_tcp),
                "--mtls-port",
                str(st.workload_mtls),
                "--unix",
                st.workload_unix,
                "--trust-key",  # the sidecar's key, made in its state_dir at its start
                str(st.root / "state" / "assertion.pub"),
                "--trust-key",
                str(public_key_path(st.assertion_key)),
            ],
        )
        with grpc.insecure_channel(f"127.0.0.1:{st.workload_tcp}") as ch:
            _wait_healthy(st, "workload", ch)
        _spawn(
            st,
            "bare-proxy",
            [
                "-m",
                "bench.servers",
                "bare-proxy",
                "--ca-dir",
                str(ca_dir),
                "--port",
                str(st.bare_port),
                "--upstream",
                f"unix:{st.workload_unix}",
                "--device-id",
                DEVICE_ID,
                "--assertion-key",
                str(st.assertion_key),
            ],
        )
        _spawn(st, "sidecar", ["-m", "ztagent", "serve", "--config", str(st.config)])
        _spawn(
            st,
            "proxyless",
            ["-m", "ztagent", "workload", "storage", "--protect", str(proxyless_config),
             "--listen", f"127.0.0.1:{st.proxyless_port}", "--data", str(root / "data-proxyless")],
        )  # fmt: skip
        for name, port in (
            ("bare-proxy", st.bare_port), ("sidecar", st.sidecar_port),
            ("proxyless", st.proxyless_port),
        ):  # fmt: skip
            with mtls_channel(st, port) as ch:
                _wait_healthy(st, name, ch)
        _attest(st, vendor_key)
        yield st
    finally:
        for proc in st.procs.values():
            proc.terminate()
        for proc in st.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if st.swtpm is not None:
            st.swtpm.stop()
