"""Benchmark-only servers, each run as its own process (``python -m bench.servers ...``).

``workload``: the real storage workload (its own servicer and store) served on three ports at
once, so legs (a), (b) and the proxies' upstream hit the very same process: plain TCP on
loopback (a), mTLS with the sidecar's server certificate (b), and a unix socket (the upstream
of the bare proxy and of the sidecar).

``bare-proxy``: leg (c), the sidecar's own proxy code (``ProxyHandler`` + ``Upstreams``) on an
mTLS port with the same server options, but an admission that checks nothing: it adds a fixed
identity assertion for a fixed device (the workload needs one) and lets every call through.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ztagent._proto.workloads.v1 import storage_pb2_grpc
from ztagent.config import ListenConfig, Route
from ztagent.sidecar.heap import settle_heap
from ztagent.sidecar.proxy import ProxyHandler
from ztagent.sidecar.server import server_options
from ztagent.sidecar.upstreams import Upstreams
from ztagent.tokens.assertion import ASSERTION_HEADER, AssertionSigner
from ztagent.workloads.identity import trust_verifier
from ztagent.workloads.storage.server import ChangeHub, StorageServicer
from ztagent.workloads.storage.store import Store

STORAGE = "ztagent.workloads.v1.Storage"
MAX_MESSAGE = 16 * 1024 * 1024


def _mtls(ca_dir: Path) -> grpc.ServerCredentials:
    key = (ca_dir / "server.key").read_bytes()
    chain = (ca_dir / "server.pem").read_bytes()
    bundle = (ca_dir / "ca-bundle.pem").read_bytes()
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=bundle, require_client_auth=True
    )


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_workload(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztagent-storage")
    hub = ChangeHub(loop, max_events=1024, max_bytes=64 * 1024 * 1024)
    store = await loop.run_in_executor(
        executor, lambda: Store.open(args.data, on_change=hub.publish_threadsafe)
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    verifier = trust_verifier(args.trust_key)
    storage_pb2_grpc.add_StorageServicer_to_server(
        StorageServicer(store, hub, executor, verifier), server
    )
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.tcp_port}")
    server.add_secure_port(f"127.0.0.1:{args.mtls_port}", _mtls(args.ca_dir))
    server.add_insecure_port(f"unix:{args.unix}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await _until_signalled()
    hub.close()
    await server.stop(1)
    await loop.run_in_executor(executor, store.close)


class NoChecks:
    """Admits every call: the bare pass-through proxy of leg (c). It only signs the identity
    assertion the workload requires (what any proxy in front of it must do now), for a fixed
    device."""

    def __init__(self, device_id: str, assertion_key: Path) -> None:
        self._device = device_id
        self._signer = AssertionSigner.from_file(assertion_key)

    async def admit(
        self, context: grpc.aio.ServicerContext, full_method: str, *, hold_log: bool = False
    ) -> tuple[tuple[str, str], ...]:
        token = self._signer.mint(
            device_id=self._device,
            spiffe_id=f"spiffe://ztagent.dev/device/{self._device}",
            method=full_method,
            decision_id="bench",
        )
        return ((ASSERTION_HEADER, token),)

    def release_log(self) -> None:
        return None  # no decision log

    async def recheck_call(self, context: grpc.aio.ServicerContext, full_method: str) -> None:
        return None  # nothing to check again


async def run_bare_proxy(args: argparse.Namespace) -> None:
    route = Route(service=STORAGE, upstream=args.upstream, timeout_s=30.0)
    upstreams = Upstreams((route,), MAX_MESSAGE)
    # the sidecar's own server options (stream window, stream limit, connection age)
    server = grpc.aio.server(
        options=server_options(ListenConfig(max_message_bytes=MAX_MESSAGE), reuseport=False)
    )
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (ProxyHandler(NoChecks(args.device_id, args.assertion_key), upstreams),)
    )
    server.add_secure_port(f"127.0.0.1:{args.port}", _mtls(args.ca_dir))
    await server.start()
    settle_heap()  # the sidecar's collector settings, so the legs differ only in the checks
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await _until_signalled()
    await server.stop(1)
    await upstreams.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("workload")
    w.add_argument("--data", type=Path, required=True)
    w.add_argument("--ca-dir", type=Path, required=True)
    w.add_argument("--tcp-port", type=int, required=True)
    w.add_argument("--mtls-port", type=int, required=True)
    w.add_argument("--unix", required=True)
    w.add_argument("--trust-key", type=Path, action="append", required=True)
    p = sub.add_parser("bare-proxy")
    p.add_argument("--ca-dir", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--assertion-key", type=Path, required=True)
    p.add_argument("--device-id", required=True)
    args = parser.parse_args()
    asyncio.run(run_workload(args) if args.cmd == "workload" else run_bare_proxy(args))


if __name__ == "__main__":
    main()
