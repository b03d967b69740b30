"""CPU per call, per process and per thread, for legs driven alternately on the bench stack.

Throughput ratios on this shared VM move by ±0.1 between rounds; CPU per call (a process's
CPU over the calls it served) moves by tens of microseconds, so it shows what a change to the
sidecar costs or saves. Per-thread figures come from ``/proc/<pid>/task``: the event loop is
the main thread; the others are gRPC core's, the decision-log writer and the executor's.

    python -m bench.cpu [--rounds 3] [--legs c,d] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import psutil

from bench.loadgen import run_load
from bench.run import seed, targets, tree
from bench.stack import running_stack
from ztagent._proto.workloads.v1 import storage_pb2

SERVER = {"c": "bare-proxy", "d": "sidecar", "e": "proxyless"}
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children."""
    total = 0.0
    for proc in tree(pid):
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (a thread that ended meanwhile is left out)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--legs", default="c,d")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    legs = args.legs.split(",")
    unknown = [leg for leg in legs if leg not in SERVER]
    if unknown:
        parser.error(f"--legs: unknown {unknown} (expected some of {sorted(SERVER)})")
    tmp = Path(tempfile.mkdtemp(prefix="ztagent-cpu-"))
    request = storage_pb2.GetRequest(key="bench").SerializeToString()
    per_leg: dict[str, list[tuple[float, float]]] = {leg: [] for leg in legs}
    try:
        with running_stack(tmp, enroll_count=1) as st:
            tg = targets(st, request)
            seed(st, tg)
            pids = {name: proc.pid for name, proc in st.procs.items()}
            for r in range(args.rounds):
                for leg in legs:
                    server = pids[SERVER[leg]]
                    run_load(tg[leg], processes=2, concurrency=16, warmup_s=0, duration_s=0.8)
                    cpu0 = {name: process_cpu_s(pid) for name, pid in pids.items()}
                    threads0 = thread_cpu_s(server)
                    switches0 = psutil.Process(server).num_ctx_switches()
                    out = run_load(
                        tg[leg], processes=2, concurrency=16, warmup_s=0, duration_s=args.seconds
                    )
                    switches1 = psutil.Process(server).num_ctx_switches()
                    threads1 = thread_cpu_s(server)
                    cpu1 = {name: process_cpu_s(pid) for name, pid in pids.items()}
                    calls = max(1, out.calls)
                    us = {name: (cpu1[name] - cpu0[name]) * 1e6 / calls for name in pids}
                    per_thread = sorted(
                        (((threads1[t] - threads0.get(t, 0.0)) * 1e6 / calls, t) for t in threads1),
                        reverse=True,
                    )
                    shown = ", ".join(
                        f"{'loop' if t == server else t} {v:.0f}" for v, t in per_thread if v >= 5
                    )
                    preempted = (switches1.involuntary - switches0.involuntary) / calls
                    per_leg[leg].append((out.rps, us[SERVER[leg]]))
                    print(
                        f"round {r} {leg}: {out.rps:6.0f} calls/s, errors {out.errors}; CPU us "
                        f"per call: {SERVER[leg]} {us[SERVER[leg]]:.0f} (threads: {shown}), "
                        f"workload {us['workload']:.0f}; event loop preempted "
                        f"{preempted:.1f} times per call",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for leg in legs:
        rps = statistics.median(x[0] for x in per_leg[leg])
        cpu = statistics.median(x[1] for x in per_leg[leg])
        print(f"{leg}: median {rps:.0f} calls/s, {SERVER[leg]} {cpu:.0f} us CPU per call")
    if "c" in legs and "d" in legs:
        ratios = [d[0] / c[0] for c, d in zip(per_leg["c"], per_leg["d"], strict=True)]
        extra = [d[1] - c[1] for c, d in zip(per_leg["c"], per_leg["d"], strict=True)]
        print(
            f"d/c throughput {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}); sidecar CPU per call over the bare proxy's "
            f"{statistics.median(extra):+.0f} us"
        )


if __name__ == "__main__":
    main()
