"""The bench's memory row (issue 12, point 2): large unary calls refused from their headers.

A valid device sends 16 concurrent 15 MiB ``Storage/Put`` calls with no user token, the
sidecar's shipped configuration refuses each one, and meanwhile the same device, with its
token, keeps calling ``Storage/Get``. Measured: the sidecar's RSS growth over its RSS just
before (sampled every 20 ms), the refusals' status codes, and how many of the valid calls were
served and how fast. A sidecar that buffered a unary body before deciding grew by 370-515 MiB
here (``tests/integration/test_sidecar_limits.py`` holds the same bound as a test).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import psutil

from bench.stack import STORAGE, Stack, mtls_channel
from ztagent._proto.workloads.v1 import storage_pb2

MiB = 1024 * 1024
BODY_BYTES = 15 * MiB
CALLS = 16
VALID_CALLS = 200
RSS_BUDGET_MB = 50.0


@dataclass(frozen=True)
class FloodResult:
    rss_before_mb: float
    rss_peak_mb: float
    refusals: Counter[str]
    """status code name and the details' stable code, e.g. ``UNAUTHENTICATED user_...``"""
    valid_served: int
    valid_p50_ms: float

    @property
    def growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_before_mb

    @property
    def met(self) -> bool:
        return (
            self.growth_mb < RSS_BUDGET_MB
            and sum(self.refusals.values()) == CALLS
            and "OK" not in self.refusals
            and self.valid_served == VALID_CALLS
        )

    def codes(self) -> str:
        return ", ".join(f"{code} x{n}" for code, n in sorted(self.refusals.items()))

    def summary(self) -> str:
        return (
            f"{CALLS} concurrent {BODY_BYTES // MiB} MiB Puts without a user token: "
            f"{self.codes()}; "
            f"sidecar RSS +{self.growth_mb:.1f} MB ({self.rss_before_mb:.0f} -> "
            f"{self.rss_peak_mb:.0f}); meanwhile {self.valid_served} of {VALID_CALLS} valid "
            f"Gets served, p50 {self.valid_p50_ms:.2f} ms"
        )


def _rss_mb(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in (p, *p.children(recursive=True))) / MiB


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return f"{err.code().name} {(err.details() or '').split(':', 1)[0]}"
    return "OK"


def refused_large_calls(st: Stack, token_metadata: tuple[tuple[str, str], ...]) -> FloodResult:
    """Runs the flood against the sidecar of ``st``; its Gets carry ``token_metadata``."""
    sidecar = st.procs["sidecar"].pid
    options = [("grpc.max_send_message_length", BODY_BYTES + MiB)]
    body = storage_pb2.PutRequest(key="flood", value=os.urandom(BODY_BYTES)).SerializeToString()
    get_request = storage_pb2.GetRequest(key="bench").SerializeToString()
    refusals: Counter[str] = Counter()
    served_ms: list[float] = []
    with (
        mtls_channel(st, st.sidecar_port, options) as flood,
        mtls_channel(st, st.sidecar_port) as valid,
    ):
        put = flood.unary_unary(f"/{STORAGE}/Put")
        get = valid.unary_unary(f"/{STORAGE}/Get")
        get(get_request, metadata=token_metadata, timeout=10)  # both connections up first
        _outcome(lambda: put(b"", timeout=10))
        before = peak = _rss_mb(sidecar)
        lock = threading.Lock()

        def refused() -> None:
            outcome = _outcome(lambda: put(body, timeout=60))
            with lock:
                refusals[outcome] += 1

        def valid_calls() -> None:
            for _ in range(VALID_CALLS):
                start = time.perf_counter()
                if _outcome(lambda: get(get_request, metadata=token_metadata, timeout=10)) == "OK":
                    served_ms.append((time.perf_counter() - start) * 1000)

        threads = [threading.Thread(target=refused) for _ in range(CALLS)]
        threads.append(threading.Thread(target=valid_calls))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak = max(peak, _rss_mb(sidecar))
            time.sleep(0.02)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    return FloodResult(
        before,
        peak,
        refusals,
        len(served_ms),
        statistics.median(served_ms) if served_ms else float("nan"),
    )
