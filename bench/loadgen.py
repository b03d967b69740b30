"""The load generator: separate processes (multiprocessing, spawn), each with its own grpc.aio
channel and ``concurrency`` calls in flight. Each process reports its latencies and its own
CPU time for the measured window, so the reader sees who used the cores.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    method: str
    request: bytes
    metadata: tuple[tuple[str, str], ...] = ()
    ca_bundle: Path | None = None
    """None: plain (insecure) channel."""
    cert: Path | None = None
    key: Path | None = None
    assertion_key: Path | None = None
    """Direct legs: each call carries a fresh identity assertion for ``assert_as`` signed with
    this key, minted by the load generator as the sidecar would (the workload verifies one on
    every call and refuses a replay)."""
    assert_as: str = ""


@dataclass
class WorkerResult:
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    latencies_ns: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0


def _credentials(target: Target) -> grpc.ChannelCredentials:
    assert target.ca_bundle is not None
    return grpc.ssl_channel_credentials(
        root_certificates=target.ca_bundle.read_bytes(),
        private_key=target.key.read_bytes() if target.key else None,
        certificate_chain=target.cert.read_bytes() if target.cert else None,
    )


def _channel(target: Target, *, private: bool = False) -> grpc.aio.Channel:
    options = [("grpc.use_local_subchannel_pool", 1)] if private else []
    if target.ca_bundle is None:
        return grpc.aio.insecure_channel(target.address, options=options)
    return grpc.aio.secure_channel(target.address, _credentials(target), options=options)


def _minter(target: Target) -> Callable[[], tuple[str, str]] | None:
    if target.assertion_key is None:
        return None
    from ztagent.tokens.assertion import ASSERTION_HEADER, AssertionSigner

    signer = AssertionSigner.from_file(target.assertion_key)
    device = target.assert_as

    def mint() -> tuple[str, str]:
        token = signer.mint(
            device_id=device,
            spiffe_id=f"spiffe://ztagent.dev/device/{device}",
            method=target.method,
            decision_id="bench",
        )
        return (ASSERTION_HEADER, token)

    return mint


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _calls(
    target: Target, concurrency: int, warmup_s: float, duration_s: float
) -> WorkerResult:
    result = WorkerResult()
    async with _channel(target) as channel:
        call = channel.unary_unary(target.method)
        metadata = target.metadata or None
        mint = _minter(target)
        start = time.monotonic()
        measure_from = start + warmup_s
        end = measure_from + duration_s
        cpu0: list[float] = []

        async def worker() -> None:
            lat = result.latencies_ns
            perf = time.perf_counter_ns
            while True:
                t0 = perf()
                if t0 >= end_ns:
                    return
                try:
                    md = metadata if mint is None else (*(metadata or ()), mint())
                    await call(target.request, metadata=md, timeout=10)
                except grpc.aio.AioRpcError as err:
                    if t0 >= from_ns:
                        result.errors += 1
                        result.first_error = (
                            result.first_error or f"{err.code().name}: {err.details()}"
                        )
                    continue
                t1 = perf()
                if t0 >= from_ns:
                    lat.append(t1 - t0)

        now_ns = time.perf_counter_ns()
        from_ns = now_ns + int(warmup_s * 1e9)
        end_ns = from_ns + int(duration_s * 1e9)

        async def mark() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
            cpu0.append(_cpu())

        marker = asyncio.create_task(mark())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await marker
        result.cpu_s = _cpu() - cpu0[0]
        result.wall_s = max(duration_s, time.monotonic() - measure_from)
        result.calls = len(result.latencies_ns)
        del end
    return result


async def _handshakes(
    target: Target, concurrency: int, warmup_s: float, duration_s: float
) -> WorkerResult:
    """New connection (TCP + TLS 1.3 mutual handshake) plus one Health.Check, repeatedly."""
    from grpc_health.v1 import health_pb2

    result = WorkerResult()
    request = health_pb2.HealthCheckRequest().SerializeToString()
    t_start = time.perf_counter_ns()
    from_ns = t_start + int(warmup_s * 1e9)
    end_ns = from_ns + int(duration_s * 1e9)
    cpu0: list[float] = []

    async def worker() -> None:
        while True:
            t0 = time.perf_counter_ns()
            if t0 >= end_ns:
                return
            if t0 >= from_ns and not cpu0:
                cpu0.append(_cpu())
            try:
                async with _channel(target, private=True) as channel:
                    await channel.unary_unary("/grpc.health.v1.Health/Check")(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                result.errors += 1
                result.first_error = result.first_error or f"{err.code().name}: {err.details()}"
                continue
            if t0 >= from_ns:
                result.latencies_ns.append(time.perf_counter_ns() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.cpu_s = _cpu() - (cpu0[0] if cpu0 else _cpu())
    result.wall_s = duration_s
    result.calls = len(result.latencies_ns)
    return result


def _run(
    mode: str, target: Target, concurrency: int, warmup_s: float, duration_s: float
) -> WorkerResult:
    fn = _calls if mode == "calls" else _handshakes
    return asyncio.run(fn(target, concurrency, warmup_s, duration_s))


@dataclass
class LoadResult:
    target: str
    processes: int
    concurrency: int
    calls: int
    errors: int
    first_error: str
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    loadgen_cpu_pct: float
    """CPU used by all load-generator processes, % of one core."""


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index] / 1e6


def run_load(
    target: Target,
    *,
    processes: int,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    mode: str = "calls",
) -> LoadResult:
    """``processes`` load processes, each with ``concurrency`` calls in flight."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts = pool.starmap(_run, [(mode, target, concurrency, warmup_s, duration_s)] * processes)
    latencies = sorted(x for p in parts for x in p.latencies_ns)
    wall = max(p.wall_s for p in parts)
    calls = sum(p.calls for p in parts)
    return LoadResult(
        target=target.name,
        processes=processes,
        concurrency=processes * concurrency,
        calls=calls,
        errors=sum(p.errors for p in parts),
        first_error=next((p.first_error for p in parts if p.first_error), ""),
        rps=calls / wall if wall else 0.0,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        loadgen_cpu_pct=100.0 * sum(p.cpu_s for p in parts) / wall if wall else 0.0,
    )
