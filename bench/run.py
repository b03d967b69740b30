"""``make bench``: the whole benchmark in one run; prints the tables, writes bench/results.md.

    python -m bench.run [--quick] [--workers N] [--out bench/results.md]

Legs, all calling Storage.Get (a 256-byte value) with the same request bytes:
  (a) direct to the workload, plain gRPC over loopback TCP
  (b) direct to the workload with mTLS (the sidecar's server cert, the device's client cert)
  (c) through a bare pass-through proxy: the sidecar's proxy code with no checks (mTLS in,
      unix socket to the workload)
  (d) through the full sidecar (`ztagent serve`): cert + posture + cert-bound token + shipped
      Rego policy + hash-chained decision log, unix socket to the workload
  (e) proxyless: the storage workload serving mTLS itself with the sidecar's admission in its
      process (`workload storage --protect`)
Each leg is measured in every round, the legs interleaved; ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from bench import micro
from bench.flood import VALID_CALLS, FloodResult, refused_large_calls
from bench.loadgen import LoadResult, Target, run_load
from bench.stack import DEVICE_ID, REPO, STORAGE, Stack, running_stack
from ztagent._proto.workloads.v1 import storage_pb2
from ztagent.sidecar.server import worker_log_path

NOTES_MARKER = "<!-- hand-written notes below this line are kept by bench/run.py -->"


@dataclass
class Plan:
    c1_warmup: float = 1.0
    c1_seconds: float = 3.0
    load_procs: int = 2
    load_per_proc: int = 16
    load_warmup: float = 1.5
    load_seconds: float = 5.0
    handshake_seconds: float = 4.0
    rounds: int = 3
    """Every leg is measured once per round, the legs interleaved (a b c d e, a b c d e, ...):
    on a shared 2-core VM one leg's window can be 20 % slow, so a ratio is taken within a
    round (legs seconds apart) and the median over rounds is reported with its range."""


def median_round(results: list[LoadResult]) -> LoadResult:
    """The round with the median throughput (the one the table shows)."""
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def paired(
    num: list[LoadResult], den: list[LoadResult], f: Callable[[LoadResult, LoadResult], float]
) -> tuple[float, float, float]:
    """``f`` of two legs within each round: (median, min, max) over the rounds."""
    values = sorted(f(n, d) for n, d in zip(num, den, strict=True))
    return values[len(values) // 2], values[0], values[-1]


def ratio(load: Mapping[str, list[LoadResult]], num: str, den: str) -> str:
    mid, low, high = paired(load[num], load[den], lambda n, d: n.rps / d.rps)
    return f"{mid:.2f} ({low:.2f}-{high:.2f})" if len(load[num]) > 1 else f"{mid:.2f}"


def p50_delta(c1: Mapping[str, list[LoadResult]], num: str, den: str) -> str:
    mid, low, high = paired(c1[num], c1[den], lambda n, d: (n.p50_ms - d.p50_ms) * 1e3)
    text = f"{mid:+.0f} us"
    return text + (f" ({low:+.0f} to {high:+.0f})" if len(c1[num]) > 1 else "")


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "CPU": model,
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "regorus": _version("gordon-to-regorus"),
        "cryptography": _version("cryptography"),
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        + (
            "+dirty"
            if subprocess.run(
                ["git", "status", "--porcelain", "ztagent"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout.strip()
            else ""
        ),
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def targets(st: Stack, request: bytes) -> dict[str, Target]:
    asserted = {"assertion_key": st.assertion_key, "assert_as": DEVICE_ID}
    auth = (("authorization", f"Bearer {st.token}"),)
    method = f"/{STORAGE}/Get"
    mtls = {"ca_bundle": st.bundle, "cert": st.device_cert, "key": st.device_key}
    return {
        "a": Target("a direct", f"127.0.0.1:{st.workload_tcp}", method, request, **asserted),  # type: ignore[arg-type]
        "b": Target(
            "b direct mTLS", f"127.0.0.1:{st.workload_mtls}", method, request, **asserted, **mtls
        ),  # type: ignore[arg-type]
        "c": Target("c bare proxy", f"127.0.0.1:{st.bare_port}", method, request, auth, **mtls),  # type: ignore[arg-type]
        "d": Target("d sidecar", f"127.0.0.1:{st.sidecar_port}", method, request, auth, **mtls),  # type: ignore[arg-type]
        "e": Target("e proxyless", f"127.0.0.1:{st.proxyless_port}", method, request, auth, **mtls),  # type: ignore[arg-type]
    }


def seed(st: Stack, tg: dict[str, Target]) -> None:
    """Stores the value through the sidecar, then checks one Get on every leg."""
    from bench.stack import mtls_channel

    put = storage_pb2.PutRequest(key="bench", value=os.urandom(256)).SerializeToString()
    for port, leg in ((st.sidecar_port, "d"), (st.proxyless_port, "e")):  # e: its own store
        with mtls_channel(st, port) as ch:
            ch.unary_unary(f"/{STORAGE}/Put")(put, metadata=tg[leg].metadata, timeout=10)
    for t in tg.values():
        r = run_load(t, processes=1, concurrency=1, warmup_s=0, duration_s=0.3)
        if r.errors or not r.calls:
            raise RuntimeError(f"leg {t.name}: {r.first_error or 'no calls'}")


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def rss_mb(pid: int) -> float:
    return sum(p.memory_info().rss for p in tree(pid)) / 2**20


class Sampler:
    """CPU of the server processes over the measured window; peak sidecar RSS."""

    def __init__(self, st: Stack, warmup: float, seconds: float) -> None:
        self.pids = {name: proc.pid for name, proc in st.procs.items()}
        self.sidecar = st.procs["sidecar"].pid
        self.warmup, self.seconds = warmup, seconds
        self.cpu_pct: dict[str, float] = {}
        self.peak_rss = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            total = 0.0
            for p in tree(pid):
                t = p.cpu_times()
                total += t.user + t.system
            out[name] = total
        return out

    def _run(self) -> None:
        time.sleep(self.warmup + 1.0)  # + spawn time of the load processes
        before = self._cpu()
        end = time.monotonic() + self.seconds - 1.0
        while time.monotonic() < end:
            self.peak_rss = max(self.peak_rss, rss_mb(self.sidecar))
            time.sleep(0.2)
        after = self._cpu()
        span = self.seconds - 1.0
        self.cpu_pct = {k: 100 * (after[k] - before[k]) / span for k in after}

    def join(self) -> None:
        self._thread.join()


def fmt_load(r: LoadResult) -> str:
    return (
        f"{r.target:<16} {r.concurrency:>4} {r.rps:>9,.0f} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} "
        f"{r.p99_ms:>8.3f} {r.loadgen_cpu_pct:>7.0f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--workers", type=int, default=1, help="listen.workers of the sidecar")
    parser.add_argument(
        "--log-writer",
        choices=("thread", "process"),
        default="thread",
        help="decision_log.writer of the sidecar",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    plan = Plan()
    if args.quick:
        plan = Plan(0.5, 1.5, 2, 16, 0.5, 2.0, 1.5, rounds=1)
    started = time.monotonic()
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ztagent-bench-"))
    request = storage_pb2.GetRequest(key="bench").SerializeToString()
    c1: dict[str, list[LoadResult]] = {}
    load: dict[str, list[LoadResult]] = {}
    server_cpu: dict[str, list[dict[str, float]]] = {}
    with running_stack(tmp, workers=args.workers, log_writer=args.log_writer) as st:
        assert st.enrollment is not None
        print(f"stack up in {time.monotonic() - started:.1f} s ({tmp})", flush=True)
        tg = targets(st, request)
        seed(st, tg)
        sidecar_pid = st.procs["sidecar"].pid
        rss_rest = rss_mb(sidecar_pid)
        print(
            f"{'leg':<16} {'conc':>4} {'calls/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'loadgen':>8}"
        )
        for round_ in range(plan.rounds):
            print(f"concurrency 1, round {round_ + 1} of {plan.rounds}", flush=True)
            for key, t in tg.items():
                result = run_load(
                    t,
                    processes=1,
                    concurrency=1,
                    warmup_s=plan.c1_warmup,
                    duration_s=plan.c1_seconds,
                )
                c1.setdefault(key, []).append(result)
                print(fmt_load(result), flush=True)
        peak = 0.0
        for round_ in range(plan.rounds):
            print(f"under load, round {round_ + 1} of {plan.rounds}", flush=True)
            for key, t in tg.items():
                sampler = Sampler(st, plan.load_warmup, plan.load_seconds)
                result = run_load(
                    t,
                    processes=plan.load_procs,
                    concurrency=plan.load_per_proc,
                    warmup_s=plan.load_warmup,
                    duration_s=plan.load_seconds,
                )
                sampler.join()
                load.setdefault(key, []).append(result)
                server_cpu.setdefault(key, []).append(sampler.cpu_pct)
                if key == "d":
                    peak = max(peak, sampler.peak_rss)
                cpu = ", ".join(f"{k} {v:.0f}%" for k, v in sampler.cpu_pct.items())
                print(fmt_load(result) + f"   servers: {cpu}", flush=True)
                if result.errors:
                    print(f"   {result.errors} errors, first: {result.first_error}")
        hs_target = Target(
            "handshakes", tg["d"].address, "", b"", (), st.bundle, st.device_cert, st.device_key
        )
        hs = run_load(
            hs_target,
            processes=2,
            concurrency=4,
            warmup_s=0.5,
            duration_s=plan.handshake_seconds,
            mode="handshakes",
        )
        print(
            f"mTLS handshakes (new connection + Health.Check) to the sidecar: {hs.rps:,.0f}/s, "
            f"p50 {hs.p50_ms:.2f} ms",
            flush=True,
        )
        print("large unary calls refused from their headers ...", flush=True)
        flood = refused_large_calls(st, tg["d"].metadata)
        print("  " + flood.summary() + ("" if flood.met else "  [TARGET MISSED]"), flush=True)
        logs = (
            [st.decision_log]
            if args.workers == 1
            else [worker_log_path(st.decision_log, i) for i in range(args.workers)]
        )
        decisions = [
            line
            for p in logs
            if p.exists()
            for line in p.read_text().splitlines()
            if '"checkpoint"' not in line[:20]  # signed anchors carry no input
        ]
        real_input = json.loads(max(decisions[-50:], key=len))["input"]
        print("micro-benchmarks ...", flush=True)
        rows: list[micro.Row] = []
        rows += micro.cert_rows(st)
        rows += micro.assertion_rows(st)
        rows += micro.token_rows(st)
        policy_rows, vm_note = micro.policy_rows(st, real_input)
        rows += policy_rows
        rows += micro.posture_rows(st, tmp / "posture-bench")
        rows += micro.decision_log_rows(real_input, tmp / "dl-bench")
        for r in rows:
            print(
                f"  {r[0]:<66} p50 {r[1]:>9.1f} us  p99 {r[2]:>9.1f} us  {r[3]:>10,.0f}/s  {r[4]}"
            )
        if vm_note:
            print("  " + vm_note)
        enrollment = st.enrollment
    elapsed = time.monotonic() - started
    report = Report(
        info,
        plan,
        c1,
        load,
        server_cpu,
        rss_rest,
        peak,
        hs,
        flood,
        rows,
        vm_note,
        enrollment.rate,
        enrollment.devices,
        elapsed,
        args.workers,
        args.log_writer,
    )
    text = report.markdown()
    if not args.quick:
        from bench import ca_scale

        print("CA cost against fleet size ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="ztagent-ca-scale-") as scale_tmp:
            scales, crl_s = ca_scale.measure(Path(scale_tmp))
        scale_text = ca_scale.markdown(scales, crl_s)
        print(scale_text)
        text += "\n" + scale_text
    print(
        f"\nenrollment: {enrollment.rate:.1f} devices/s; sidecar RSS {rss_rest:.0f} MB at rest, "
        f"{peak:.0f} MB peak under load; total {elapsed:.0f} s"
    )
    if not args.quick:
        notes = ""
        if args.out.exists():
            old = args.out.read_text()
            if NOTES_MARKER in old:
                notes = old.split(NOTES_MARKER, 1)[1]
        args.out.write_text(text + "\n" + NOTES_MARKER + notes)
        print(f"wrote {args.out}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


@dataclass
class Report:
    info: dict[str, str]
    plan: Plan
    c1: dict[str, list[LoadResult]]
    load: dict[str, list[LoadResult]]
    server_cpu: dict[str, list[dict[str, float]]]
    rss_rest: float
    rss_peak: float
    handshakes: LoadResult
    flood: FloodResult
    rows: list[micro.Row]
    vm_note: str
    enroll_rate: float
    enroll_devices: int
    elapsed: float
    workers: int
    log_writer: str

    def markdown(self) -> str:
        p = self.plan
        out = [
            "# ztagent benchmark results",
            "",
            f"Generated by `make bench` (`python -m bench.run`) in {self.elapsed:.0f} s on "
            f"{time.strftime('%Y-%m-%d')}.",
            "",
            "## Machine",
            "",
        ]
        out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.info.items()]
        out += [
            "",
            "Everything runs on this one machine: workload, proxies, sidecar "
            f"(listen.workers = {self.workers}, decision_log.writer = {self.log_writer}) and "
            "the load generator "
            "(separate processes; its CPU is shown).",
            "",
        ]
        out += [
            "## End to end: Storage.Get, 256-byte value",
            "",
            "| leg | conc. 1: calls/s | p50 ms | p90 ms | p99 ms | "
            f"conc. {p.load_procs * p.load_per_proc}: calls/s | p50 ms | p90 ms | p99 ms | "
            "load-gen CPU | server CPU (under load) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for k in "abcde":
            a, b = median_round(self.c1[k]), median_round(self.load[k])
            cpu_round = self.server_cpu[k][self.load[k].index(b)]
            cpu = ", ".join(f"{n} {v:.0f}%" for n, v in cpu_round.items() if v >= 1)
            out.append(
                f"| {a.target} | {a.rps:,.0f} | {a.p50_ms:.3f} | {a.p90_ms:.3f} | "
                f"{a.p99_ms:.3f} | {b.rps:,.0f} | {b.p50_ms:.3f} | {b.p90_ms:.3f} | "
                f"{b.p99_ms:.3f} | {b.loadgen_cpu_pct:.0f}% | {cpu} |"
            )
        out += [
            "",
            f"Each leg's row is its median round of {p.rounds}. Ratios are taken within a "
            "round and given as the median over rounds (range in brackets).",
            "",
            "| ratio | throughput under load | p50 at conc. 1 | target |",
            "|---|---:|---:|---|",
        ]
        for num, den, label, target in (
            ("d", "a", "sidecar / a direct", ""),
            ("d", "b", "sidecar / b direct mTLS", "p50 <= +1000 us"),
            ("d", "c", "sidecar / c bare proxy", "throughput >= 0.90"),
            ("e", "b", "proxyless / b direct mTLS", "throughput >= 0.80, p50 <= +200 us"),
        ):
            out.append(
                f"| {num}/{den} ({label}) | {ratio(self.load, num, den)} | "
                f"{p50_delta(self.c1, num, den)} | {target} |"
            )
        out += [
            "",
            f"Concurrency 1: one load process, one call in flight, {p.c1_seconds:g} s "
            f"after {p.c1_warmup:g} s warm-up. Under load: {p.load_procs} processes x "
            f"{p.load_per_proc} calls in flight, {p.load_seconds:g} s after "
            f"{p.load_warmup:g} s warm-up. {p.rounds} rounds, legs interleaved. CPU "
            "percentages are of one core (200% = both cores).",
            "",
        ]
        hs = self.handshakes
        out += [
            "## Connections, memory, enrollment",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| mTLS handshakes to the sidecar (new TCP + TLS 1.3 mutual + Health.Check; "
            f"8 in flight) | {hs.rps:,.0f}/s (p50 {hs.p50_ms:.2f} ms, load-gen CPU "
            f"{hs.loadgen_cpu_pct:.0f}%) |",
            f"| sidecar RSS at rest (after start, attestation, first calls) | "
            f"{self.rss_rest:.0f} MB |",
            f"| sidecar RSS peak under load (leg d) | {self.rss_peak:.0f} MB |",
            f"| 16 concurrent 15 MiB `Put`s with no user token (refused from the headers), "
            f"a valid client calling meanwhile: sidecar RSS growth (target < 50 MB) | "
            f"{self.flood.growth_mb:.1f} MB; refused: {self.flood.codes()}; valid "
            f"`Get`s served {self.flood.valid_served} of {VALID_CALLS}, p50 "
            f"{self.flood.valid_p50_ms:.2f} ms |",
            f"| enrollment (CSR + Enroll RPC + issuance + device dir; back to back, "
            f"{self.enroll_devices} devices) | {self.enroll_rate:.1f} devices/s |",
            "",
        ]
        out += [
            "## Per-stage micro-benchmarks (one core, in-process)",
            "",
            "| stage | p50 us | p99 us | ops/s | note |",
            "|---|---:|---:|---:|---|",
        ]
        for name, p50, p99, ops, note in self.rows:
            p99s = "-" if p99 != p99 else f"{p99:,.1f}"
            out.append(f"| {name} | {p50:,.1f} | {p99s} | {ops:,.0f} | {note} |")
        if self.vm_note:
            out += ["", self.vm_note + "."]
        return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
