"""`make run`: the whole stack on the embedded defaults, with allowed and refused calls.

Starts the storage workload and the sidecar as child processes (logs in var/log/), then a
demo client shows (a) the demo device storing and reading a value through the sidecar,
(b) a revoked device refused, (c) a client without a certificate refused. Everything it starts
is stopped before it returns; exit 0 only when every outcome is the expected one.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ztagent.config import Config, load_config
from ztagent.pki import ca
from ztagent.workloads.storage.server import parse_listen

STORAGE = "ztagent.workloads.v1.Storage"
DEMO_DEVICE = "demo-device"
REVOKED_DEVICE = "demo-revoked"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    line: str


def _ensure_device(ca_dir: Path, device_id: str) -> Path:
    """The device's cert path; (re)issued when missing or expiring within a day."""
    cert_path = ca_dir / "devices" / f"{device_id}.pem"
    if cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc - datetime.now(UTC) > timedelta(days=1):
            return cert_path
    ca.issue_device_cert(ca_dir, device_id, cert_path)
    return cert_path


def _channel(config: Config, ca_dir: Path, device_cert: Path | None) -> grpc.Channel:
    roots = config.tls.client_ca.read_bytes()
    if device_cert is None:
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=device_cert.with_suffix(".key").read_bytes(),
            certificate_chain=device_cert.read_bytes(),
        )
    return grpc.secure_channel(config.listen.address, creds)


def _wait_healthy(channel: grpc.Channel, what: str, proc: subprocess.Popen[bytes]) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not report SERVING within 30 s")


@contextlib.contextmanager
def _process(args: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztagent", *args], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _storage_call(channel: grpc.Channel, method: str, request: bytes) -> bytes:
    call = channel.unary_unary(f"/{STORAGE}/{method}")
    reply: bytes = call(request, timeout=10)
    return reply


def _scenario_allowed(config: Config, ca_dir: Path, device_cert: Path) -> Outcome:
    from ztagent._proto.workloads.v1 import storage_pb2

    value = b"hello from the edge"
    with _channel(config, ca_dir, device_cert) as channel:
        put = storage_pb2.PutRequest(key="greeting", value=value).SerializeToString()
        storage_pb2.PutResponse.FromString(_storage_call(channel, "Put", put))
        got = storage_pb2.GetResponse.FromString(
            _storage_call(
                channel, "Get", storage_pb2.GetRequest(key="greeting").SerializeToString()
            )
        )
    ok = got.value == value
    return Outcome(
        ok,
        f"(a) device {DEMO_DEVICE!r} stored 'greeting' and read it back through the sidecar: "
        f"{got.value!r} (revision {got.revision})",
    )


def _scenario_refused(
    config: Config, ca_dir: Path, device_cert: Path | None, label: str, expect: grpc.StatusCode
) -> Outcome:
    from ztagent._proto.workloads.v1 import storage_pb2

    with _channel(config, ca_dir, device_cert) as channel:
        try:
            _storage_call(
                channel, "Get", storage_pb2.GetRequest(key="greeting").SerializeToString()
            )
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
            first_line = (details or "").splitlines()[0] if details else ""
            return Outcome(code == expect, f"{label} refused: {code.name} {first_line}")
    return Outcome(False, f"{label} was NOT refused (expected {expect.name})")


def run_demo(config_path: Path, ca_dir: Path) -> int:
    config = load_config(config_path)
    route = config.route_for(STORAGE)
    if route is None:
        print(f"demo: {config_path} has no [[routes]] entry for {STORAGE}", file=sys.stderr)
        return 2
    root = config_path.resolve().parent
    device_cert = _ensure_device(ca_dir, DEMO_DEVICE)
    revoked_cert = _ensure_device(ca_dir, REVOKED_DEVICE)
    ca.revoke(ca_dir, cert_path=revoked_cert)  # idempotent; also refreshes the CRL's nextUpdate
    logs = root / "var" / "log"
    storage_args = ["workload", "storage", "--listen", parse_listen(route.upstream)]
    storage_args += ["--data", str(root / "var" / "storage")]
    print(f"starting storage workload on {route.upstream} and sidecar on {config.listen.address}")
    with (
        _process(storage_args, logs / "storage.log") as storage,
        _process(["serve", "--config", str(config_path)], logs / "sidecar.log") as sidecar,
    ):
        try:
            with grpc.insecure_channel(route.upstream) as upstream:
                _wait_healthy(upstream, "storage workload", storage)
            with _channel(config, ca_dir, device_cert) as channel:
                _wait_healthy(channel, "sidecar", sidecar)
        except RuntimeError as err:
            print(f"demo: {err}; see {logs}/", file=sys.stderr)
            return 1
        outcomes = [
            _scenario_allowed(config, ca_dir, device_cert),
            _scenario_refused(
                config,
                ca_dir,
                revoked_cert,
                f"(b) revoked device {REVOKED_DEVICE!r}",
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            _scenario_refused(
                config,
                ca_dir,
                None,
                "(c) client without a certificate",
                grpc.StatusCode.UNAVAILABLE,
            ),
        ]
    for outcome in outcomes:
        print(("[ok]   " if outcome.ok else "[FAIL] ") + outcome.line)
    failed = [o for o in outcomes if not o.ok]
    print(f"demo finished: {len(outcomes) - len(failed)}/{len(outcomes)} outcomes as expected")
    return 1 if failed else 0
