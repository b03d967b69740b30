"""Memory is bounded for refused calls: a refused unary call's body is never read.

The sidecar runs as its own process (``ztagent serve``) so its RSS is its own; the storage
workload and the clients run in the test process. ``Storage/Put`` is a method the sidecar
knows to be unary (its descriptor is ztagent's own), so it takes the unary path, the one
that used to read the whole body first. Before the fix, 16 concurrent 15 MiB calls with a
bearer token the sidecar cannot accept grew its RSS by 370-515 MiB (each body buffered whole
before any check, and BDP probing let each stream's window grow); now they are refused from
their headers and the window per call is fixed (5-8 MiB measured here).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from tests.integration.conftest import Pki, sidecar_assertion_pub, write_config
from ztagent._proto.workloads.v1 import storage_pb2
from ztagent.workloads.storage.server import start_storage_server, stop_storage_server

STORAGE = "ztagent.workloads.v1.Storage"

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BIG = 15 * MiB
CALLS = 16
RSS_BUDGET = 50 * MiB


def _credentials(pki: Pki, tmp_path: Path) -> grpc.ChannelCredentials:
    from cryptography.hazmat.primitives import serialization

    pair = pki.mint("big-sender")
    key = pair.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = pair.cert.public_bytes(serialization.Encoding.PEM) + pki.issuing.cert.public_bytes(
        serialization.Encoding.PEM
    )
    return grpc.ssl_channel_credentials(pki.layout.bundle.read_bytes(), key, chain)


def _port(proc: subprocess.Popen[str], lines: list[str], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if "listening on" in line and "(port " in line:
                return int(line.split("(port ")[1].split(")")[0])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("sidecar did not start:\n" + "".join(lines))


def _load(
    port: int, creds: grpc.ChannelCredentials, sidecar: psutil.Process
) -> tuple[int, int, list[str], list[bytes]]:
    options = [("grpc.max_send_message_length", 16 * MiB)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        put = ch.unary_unary(f"/{STORAGE}/Put")
        get = ch.unary_unary(f"/{STORAGE}/Get")
        small = storage_pb2.PutRequest(key="k", value=b"still here").SerializeToString()
        put(small, timeout=10)
        before = peak = sidecar.memory_info().rss
        body = storage_pb2.PutRequest(key="big", value=os.urandom(BIG)).SerializeToString()
        results: list[str] = []
        served: list[bytes] = []

        def refused_call() -> None:
            try:
                put(body, timeout=60, metadata=(("authorization", "Bearer x.y.z"),))
                results.append("OK")
            except grpc.RpcError as err:
                results.append(f"{err.code().name} {(err.details() or '')[:40]}")

        def valid_calls() -> None:  # a well-behaved client keeps being served
            request = storage_pb2.GetRequest(key="k").SerializeToString()
            for _ in range(20):
                served.append(storage_pb2.GetResponse.FromString(get(request, timeout=10)).value)

        threads = [threading.Thread(target=refused_call) for _ in range(CALLS)]
        threads.append(threading.Thread(target=valid_calls))
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, sidecar.memory_info().rss)
            time.sleep(0.02)
        for t in threads:
            t.join()
    return before, peak, results, served


async def test_refused_large_unary_calls_are_not_buffered(pki: Pki, tmp_path: Path) -> None:
    storage, storage_port = await start_storage_server(
        "127.0.0.1:0", tmp_path / "storage", trust_keys=[sidecar_assertion_pub(pki)]
    )
    config = write_config(pki, {STORAGE: f"127.0.0.1:{storage_port}"})
    config.write_text(
        config.read_text().replace(
            "grace_period_s = 5", "grace_period_s = 5\nmax_message_bytes = 16777216"
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztagent", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        port = await asyncio.to_thread(_port, proc, lines)
        creds = _credentials(pki, tmp_path)
        # The clients block: they run in threads, so the upstream (this event loop) answers.
        before, peak, results, served = await asyncio.to_thread(
            _load, port, creds, psutil.Process(proc.pid)
        )
        assert results == ["UNAUTHENTICATED token_unverifiable: a bearer token was s"] * CALLS
        assert served == [b"still here"] * 20
        assert peak - before < RSS_BUDGET, f"sidecar RSS grew {(peak - before) / MiB:.0f} MiB"
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(5)
        await stop_storage_server(storage, 0)
