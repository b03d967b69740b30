"""Thirty days offline, with real processes and a real clock jump (libfaketime).

The CA (``ztagent ca serve``) and a JWKS issuer (HTTPS on loopback) run at the real time T0;
two devices enroll over the network and one of them is revoked. The sidecar (``ztagent
serve``, a separate process) first runs with its clock at T0 + 30 d — the last sync with the
uplink happens late in the CRL's life, one day before the CA would re-sign it at half of its
62-day validity, close to the worst case the README's budget formula assumes — and fetches
the CRL and the key set. Then the CA and the issuer go away for good, and the sidecar is
restarted with its clock 1, 15 and 29 days past that sync: the valid device with a
long-lived token is allowed, the revoked one refused, and health and metrics say how stale
each source is. One day past the 30-day budget (the JWKS staleness bound runs out first),
calls with a token are refused ``jwks_unavailable`` and the overall health is NOT_SERVING;
once the CRL's nextUpdate + grace has passed too, every device is refused ``crl_expired``.

Only the sidecar's wall clock moves (``FAKETIME``; its monotonic clock is left alone), so
TLS certificate checks, CRL and token times, and the staleness bounds all see the jump.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.ci import skip_unless_ci
from tests.integration.conftest import ALLOW_ALL, TRUST_DOMAIN
from tests.integration.echo_upstream import SERVICE, EchoUpstream

pytestmark = pytest.mark.integration

ZTAGENT = [sys.executable, "-m", "ztagent"]
DAY = 86400
SYNC_DAY = 30
"""The sidecar's last sync with the uplink: T0 + 30 days."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        skip_unless_ci("libfaketime is not installed (Debian package faketime)")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(*args: str) -> str:
    done = subprocess.run([*ZTAGENT, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"ztagent {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


class Process:
    """A child process, stopped by its PID (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            args, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


class JwksIssuer:
    """The user-token issuer's JWKS over HTTPS on loopback (the CA's server certificate)."""

    def __init__(self, jwks: bytes, cert: Path, key: Path) -> None:
        body = jwks

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))
        self._thread.start()
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/jwks.json"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclass
class Node:
    """One edge node: its config and ports, the enrolled devices, a user token, and the
    uplink (the CA process and the issuer) until ``cut_uplink``."""

    root: Path
    config: Path
    port: int
    health_port: int
    metrics_port: int
    devices: dict[str, Path]
    token: str
    ca_proc: Process
    issuer: JwksIssuer

    def credentials(self, device: str) -> grpc.ChannelCredentials:
        d = self.devices[device]
        return grpc.ssl_channel_credentials(
            root_certificates=(d / "ca-bundle.pem").read_bytes(),
            private_key=(d / "device.key").read_bytes(),
            certificate_chain=(d / "device.pem").read_bytes(),
        )

    def cut_uplink(self) -> None:
        self.issuer.stop()
        self.ca_proc.stop()


CONFIG = """
[listen]
address = "127.0.0.1:{port}"
grace_period_s = 1

[tls]
server_cert = "{ca}/server.pem"
server_key = "{ca}/server.key"
client_ca = "{ca}/ca-bundle.pem"
crl = "state/crl.pem"
crl_source = "ca://127.0.0.1:{ca_port}"
crl_refresh_interval_s = 0.5
reload_interval_s = 0.5

[identity]
trust_domain = "{trust_domain}"
crl_failure_mode = "closed"
crl_grace_s = 86400

[[routes]]
service = "{service}"
upstream = "{upstream}"

[tokens]
issuer = "https://ztagent.dev/dev-issuer"
audience = "ztagent"
jwks_url = "{jwks_url}"
jwks_ca_bundle = "{ca}/ca-bundle.pem"
jwks_cache_file = "state/jwks-cache.json"

[policy]
path = "{policy}"

[decision_log]
path = "log/decisions.jsonl"

[posture]
enabled = false
state_dir = "state"

[metrics]
enabled = true
address = "127.0.0.1:{metrics_port}"

[health]
address = "127.0.0.1:{health_port}"
"""
"""The example config's offline settings (CRL grace 1 d, fail closed, JWKS staleness bound
30 d by default), with every file and port of its own."""


@pytest.fixture
def faketime() -> str:
    """The libfaketime library to preload into the sidecar."""
    return _libfaketime()


@pytest.fixture
async def node(tmp_path: Path, upstream: EchoUpstream) -> AsyncIterator[Node]:
    """T0, online: the CA and the issuer up, two devices enrolled, cam-b revoked."""
    ca = tmp_path / "ca"
    _run("ca", "init", "--dir", str(ca), "--trust-domain", TRUST_DOMAIN)
    ca_port, renew_port = _free_port(), _free_port()
    issuer = JwksIssuer((ca / "jwks.json").read_bytes(), ca / "server.pem", ca / "server.key")
    ca_proc = Process(
        [*ZTAGENT, "ca", "serve", "--dir", str(ca), "--listen", f"127.0.0.1:{ca_port}",
         "--renew-listen", f"127.0.0.1:{renew_port}"],
        tmp_path / "ca.log",
    )  # fmt: skip
    try:
        await _wait_for_port(ca_port, ca_proc)
        devices = {}
        for device in ("cam-a", "cam-b"):
            token = _run("ca", "token", "--dir", str(ca), "--device-id", device).strip()
            devices[device] = tmp_path / device
            _run(
                "enroll", "--server", f"127.0.0.1:{ca_port}", "--token", token,
                "--ca-bundle", str(ca / "ca-bundle.pem"), "--out", str(devices[device]),
                "--renew-server", f"127.0.0.1:{renew_port}",
            )  # fmt: skip
        _run("ca", "revoke", "--dir", str(ca), "--cert", str(devices["cam-b"] / "device.pem"))
        user_token = _run("token", "mint", "--dir", str(ca), "--sub", "alice", "--ttl", "120d")
        root = tmp_path / "node"
        root.mkdir()
        ports = {"port": _free_port(), "health_port": _free_port(), "metrics_port": _free_port()}
        config = root / "ztagent.toml"
        config.write_text(
            CONFIG.format(
                ca=ca, ca_port=ca_port, trust_domain=TRUST_DOMAIN, service=SERVICE,
                upstream=upstream.address, jwks_url=issuer.url, policy=ALLOW_ALL, **ports,
            )
        )  # fmt: skip
        yield Node(
            root=root, config=config, devices=devices, token=user_token.strip(),
            ca_proc=ca_proc, issuer=issuer, **ports,
        )  # fmt: skip
    finally:
        issuer.stop()
        ca_proc.stop()


async def _wait_for_port(port: int, proc: Process, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, f"exited early:\n{proc.output()}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            await asyncio.sleep(0.1)
    pytest.fail(f"nothing listens on {port} after {timeout_s} s:\n{proc.output()}")


@asynccontextmanager
async def sidecar_at(node: Node, day: float, faketime: str) -> AsyncIterator[Process]:
    """``ztagent serve`` with its wall clock ``day`` days ahead of the real one."""
    proc = Process(
        [*ZTAGENT, "serve", "--config", str(node.config)],
        node.root / f"sidecar-day{day:g}.log",
        env={
            "LD_PRELOAD": faketime,
            "FAKETIME": f"+{day * DAY:.0f}",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    try:
        await _wait_for_port(node.health_port, proc)
        await _wait_for_port(node.port, proc)
        yield proc
    finally:
        proc.stop()


async def call(node: Node, device: str, *, token: bool) -> str:
    """``ok``, or the refusal as ``STATUS code``."""
    metadata = (("authorization", f"Bearer {node.token}"),) if token else ()
    async with grpc.aio.secure_channel(f"127.0.0.1:{node.port}", node.credentials(device)) as ch:
        try:
            reply = await ch.unary_unary(f"/{SERVICE}/Unary")(b"hi", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name} {(err.details() or '').split(':', 1)[0]}"
    assert reply == b"hi"
    return "ok"


async def health(node: Node) -> dict[str, str]:
    """The plain health listener's status of each service the sidecar reports."""
    out = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "ztagent.tokens", "ztagent.revocation"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return out


def metrics(node: Node) -> dict[tuple[str, str], float]:
    """(name, source or code label) -> value of the trust and refusal samples."""
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("ztagent_trust_", "ztagent_refused_total")):
                label = sample.labels.get("source") or sample.labels.get("code", "")
                out[(sample.name, label)] = sample.value
    return out


def refusals_logged(node: Node) -> list[str]:
    path = node.root / "log" / "decisions.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [line["refusal"]["code"] for line in lines if line.get("refusal")]


async def test_thirty_days_offline_then_explicit_refusals(node: Node, faketime: str) -> None:
    t0 = time.time()
    # the last sync: at T0 + 30 d, online; CRL (with cam-b revoked) and keys fetched
    async with sidecar_at(node, SYNC_DAY, faketime):
        assert await call(node, "cam-a", token=True) == "ok"
        assert await call(node, "cam-b", token=True) == "UNAUTHENTICATED cert_revoked"
        assert (await health(node))[""] == "SERVING"
    assert (node.root / "state" / "crl.pem").exists()
    assert (node.root / "state" / "jwks-cache.json").exists()
    node.cut_uplink()

    crl_until = t0 + 63 * DAY  # the CRL signed at T0: nextUpdate T0 + 62 d, + 1 d grace
    jwks_until = t0 + (SYNC_DAY + 30) * DAY  # the keys fetched at the sync, + 30 d
    for offline_days in (1, 15, 29):
        async with sidecar_at(node, SYNC_DAY + offline_days, faketime) as proc:
            assert await call(node, "cam-a", token=True) == "ok", proc.output()
            assert await call(node, "cam-b", token=True) == "UNAUTHENTICATED cert_revoked"
            # behind (fetches failing) but within every bound: ready, and saying so per part
            assert await health(node) == {
                "": "SERVING", "ztagent.tokens": "NOT_SERVING", "ztagent.revocation": "NOT_SERVING"
            }  # fmt: skip
            m = await asyncio.to_thread(metrics, node)
        expiry = "ztagent_trust_expiry_timestamp_seconds"
        synced = "ztagent_trust_last_sync_timestamp_seconds"
        assert abs(m[(expiry, "crl")] - crl_until) < 600
        assert abs(m[(expiry, "jwks")] - jwks_until) < 600
        assert abs(m[(synced, "jwks")] - (t0 + SYNC_DAY * DAY)) < 600
        assert m[("ztagent_trust_fetch_failures_total", "crl")] >= 1
        assert m[("ztagent_trust_fetch_failures_total", "jwks")] >= 1
        budget_left_days = (min(m[(expiry, "crl")], m[(expiry, "jwks")]) - t0) / DAY - (
            SYNC_DAY + offline_days
        )
        assert 0 < budget_left_days <= 30 - offline_days + 0.1

    # the budget (30 d: the JWKS staleness bound runs out first) plus one day
    async with sidecar_at(node, SYNC_DAY + 31, faketime) as proc:
        assert await call(node, "cam-a", token=True) == "UNAVAILABLE jwks_unavailable"
        assert await call(node, "cam-a", token=False) == "ok"  # the CRL still holds
        assert await call(node, "cam-b", token=False) == "UNAUTHENTICATED cert_revoked"
        assert (await health(node))[""] == "NOT_SERVING"
        m = await asyncio.to_thread(metrics, node)
        assert m[("ztagent_refused_total", "jwks_unavailable")] == 1
        assert "NOT_SERVING: jwks_unavailable" in proc.output()
    assert "jwks_unavailable" in refusals_logged(node)

    # past the CRL's nextUpdate + grace as well (T0 + 63 d): every device, explicitly
    async with sidecar_at(node, 64, faketime) as proc:
        assert await call(node, "cam-a", token=False) == "UNAUTHENTICATED crl_expired"
        assert await call(node, "cam-b", token=False) == "UNAUTHENTICATED crl_expired"
        assert (await health(node))[""] == "NOT_SERVING"
        m = await asyncio.to_thread(metrics, node)
        assert m[("ztagent_refused_total", "crl_expired")] == 2
        assert "NOT_SERVING: crl_expired" in proc.output()
    assert refusals_logged(node).count("crl_expired") == 2
