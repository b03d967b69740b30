"""``make soak``: the whole stack under mixed traffic and a fault schedule, checked by the
oracle; prints the report, writes it (and the history) to ``--out``; exit 0 only when there is
no wrong decision, nothing lost and no resource growth beyond the bounds.

    python -m soak.run [--seconds N] [--gap S] [--warmup S] [--out bench/soak.md] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soak.faults import Faults, Policies
from soak.history import History, Sample
from soak.oracle import Bounds, LogCheck, OracleReport, Replay, check, percentiles
from soak.stack import REFRESH_S, WORKERS, Stack, running_stack
from soak.traffic import Tokens, Traffic
from ztagent.policy.authoring import replay
from ztagent.policy.decision_log import worker_log_path
from ztagent.policy.log_checkpoint import CHECKPOINT_PREFIX

BOUNDS = Bounds(revocation_s=3 * REFRESH_S + 2.0, policy_s=2 * REFRESH_S + 2.0)
"""Revocation: CRL poll + worker 0 writes the file + the other worker's reload + slack;
policy: one reload interval + load + slack."""
RSS_GROWTH = (0.5, 48 << 20)
"""After warm-up, a process may grow its RSS by 50 % or 48 MiB, whichever is more."""
FD_GROWTH, THREAD_GROWTH = 64, 32
WARMUP_S = 120.0
"""A process's first two minutes are warm-up (caches filling, the model loading): a run or a
process life shorter than that plus two samples is reported, not judged."""
SAMPLE_EVERY_S = 30.0


class Sampler:
    """RSS, open fds and threads of every process the soak started (workers included)."""

    def __init__(self, stack: Stack, history: History, every_s: float) -> None:
        self.stack, self.history, self.every_s = stack, history, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil  # type: ignore[import-untyped]

        procs: dict[str, int] = {n: p.pid for n, p in self.stack.procs.items()}
        for i, pid in self.stack.workers().items():
            procs[f"sidecar-worker{i}"] = pid
        procs["soak-driver"] = os.getpid()
        now = time.time()
        for name, pid in procs.items():
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    sample = Sample(
                        now, name, p.memory_info().rss, p.num_fds(), p.num_threads(), pid
                    )
            except psutil.Error:
                continue
            self.history.samples.append(sample)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


def _resources(history: History, warmup_s: float) -> tuple[list[str], list[str], list[str]]:
    """(report rows, growth violations, names judged). One row per process name (a restarted
    worker or workload continues its name's row); growth is judged per process lifetime
    (name + pid): from its first sample at least ``warmup_s`` into its life to its last."""
    rows, growth, judged = [], [], []
    names = sorted({s.process for s in history.samples})
    for name in names:
        samples = [s for s in history.samples if s.process == name]
        start, end = samples[0], samples[-1]
        rows.append(
            f"| {name} | {start.rss_bytes >> 20} / {max(s.rss_bytes for s in samples) >> 20} / "
            f"{end.rss_bytes >> 20} | {start.fds} / {max(s.fds for s in samples)} / {end.fds} | "
            f"{start.threads} / {max(s.threads for s in samples)} / {end.threads} | "
            f"{len({s.pid for s in samples})} |"
        )
        for pid in sorted({s.pid for s in samples}):
            life = [s for s in samples if s.pid == pid]
            warm = [s for s in life if s.t >= life[0].t + warmup_s]
            if len(warm) < 2:
                continue  # too short a life to tell warm-up from growth
            base, last = warm[0], warm[-1]
            judged.append(name)
            limit = max(base.rss_bytes * (1 + RSS_GROWTH[0]), base.rss_bytes + RSS_GROWTH[1])
            if last.rss_bytes > limit:
                growth.append(
                    f"{name} (pid {pid}): RSS {base.rss_bytes >> 20} MiB after warm-up -> "
                    f"{last.rss_bytes >> 20} MiB"
                )
            if last.fds > base.fds + FD_GROWTH:
                growth.append(f"{name} (pid {pid}): fds {base.fds} -> {last.fds}")
            if last.threads > base.threads + THREAD_GROWTH:
                growth.append(f"{name} (pid {pid}): threads {base.threads} -> {last.threads}")
    return rows, growth, sorted(set(judged))


def _log_lines(stack: Stack) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for index in range(WORKERS):
        head = worker_log_path(stack.decision_log, index)
        rotated = sorted(head.parent.glob(head.name + ".*"), key=lambda p: -int(p.suffix[1:]))
        for path in [*rotated, head]:
            if not path.exists():
                continue
            with path.open("rb") as handle:
                for raw in handle:
                    if raw.strip() and not raw.startswith(CHECKPOINT_PREFIX):
                        lines.append(json.loads(raw))
    return lines


def _verify_logs(stack: Stack, keys: Sequence[Path]) -> list[LogCheck]:
    """``ztagent log verify --rotated --key ...`` on each worker's chain (its exit status and
    its summary line)."""
    checks = []
    for index in range(WORKERS):
        head = worker_log_path(stack.decision_log, index)
        args = [sys.executable, "-m", "ztagent", "log", "verify", "--rotated", str(head)]
        for key in keys:
            args += ["--key", str(key)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        text = (done.stdout + done.stderr).strip().replace("\n", " / ")
        text = re.sub(r" \((/[^)]*)\)", lambda m: f" ({m[1].count(',') + 1} files)", text)
        checks.append(LogCheck(head.name, done.returncode == 0, re.sub(r"\s+", " ", text)[:600]))
    return checks


def _metric_total(text: str, name: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _counted_lost(stack: Stack, metrics: str) -> tuple[int, str]:
    """Decision-log lines the sidecar counted as not written: queue-full drops and lines lost
    to failed writes (``ztagent_decision_log_*_total``; a SIGKILLed worker's counts die with
    it, so its log's ``... records lost since start`` lines are read too)."""
    dropped = _metric_total(metrics, "ztagent_decision_log_dropped_total")
    lost = _metric_total(metrics, "ztagent_decision_log_lost_total")
    text = (stack.root / "logs" / "sidecar.log").read_text(errors="replace")
    logged = 0
    last: dict[str, int] = {}
    for path, n in re.findall(r"writing to (\S+) again; (\d+) records lost since start", text):
        if int(n) < last.get(path, 0):  # a restarted worker counts from 0 again
            logged += last[path]
        last[path] = int(n)
    logged += sum(last.values())
    counted = dropped + max(lost, logged)
    return counted, f"{dropped} dropped, {lost} lost to failed writes ({logged} in its log)"


def _replayer(faults: Faults, work: Path) -> Replay:
    def run(revision: str, lines: Sequence[Mapping[str, Any]]) -> list[str]:
        path = work / f"replay-{revision}.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for line in lines:
                out.write(json.dumps(line) + "\n")
        result = replay(path, faults.policies.bundle_of(revision))
        wrong = [str(c.decision_id) for c in result.changed]
        return wrong + [str(e.decision_id) for e in result.errors]

    return run


def _fmt(values: Sequence[float]) -> str:
    p = percentiles(values)
    if p is None:
        return "none observed"
    return f"p50 {p[0]:.2f} s, p99 {p[1]:.2f} s, max {p[2]:.2f} s ({len(values)} samples)"


def render(
    report: OracleReport,
    *,
    seconds: float,
    history: History,
    resources: list[str],
    growth: list[str],
    judged: list[str],
    warmup_s: float,
    fault_errors: list[str],
    lost_note: str,
) -> str:
    faults: dict[str, int] = {}
    for event in history.faults:
        faults[event.kind] = faults.get(event.kind, 0) + 1
    kinds: dict[str, int] = {}
    for call in history.calls:
        kinds[call.kind] = kinds.get(call.kind, 0) + 1
    out = [
        f"Soak: {seconds:.0f} s, {report.calls} calls ({report.allowed} allowed; by kind: "
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + ")",
        f"wrong decisions: {len(report.wrong_decisions)}",
        "refusals by code: "
        + ", ".join(f"{c} {n}" for c, n in report.refusals_by_code.most_common()),
        f"revocation -> first refusal: {_fmt(report.revocation_propagation_s)} "
        f"(bound {BOUNDS.revocation_s:.1f} s)",
        f"policy publish -> first decision by it: {_fmt(report.policy_propagation_s)} "
        f"(bound {BOUNDS.policy_s:.1f} s)",
        f"decisions replayed against their revision: {report.replayed_lines}",
        f"writes acknowledged {report.writes}, read back and decrypted {report.writes_read_back}",
        f"allowed calls without a log line: {report.unlogged_allowed} "
        f"(counted by the sidecar: {lost_note})",
        "faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())),
    ]
    for log in report.log_checks:
        out.append(f"log verify {log.files}: {'ok' if log.ok else 'FAILED'}: {log.message}")
    if fault_errors:
        out.append("faults that could not be made: " + "; ".join(fault_errors))
    out += [
        "",
        "| process | RSS MiB start / max / end | fds | threads | processes |",
        "|---|---|---|---|---|",
        *resources,
        "",
        f"resource growth judged after {warmup_s:.0f} s of each life: "
        + (", ".join(judged) or "none"),
    ]
    problems = [f"{v.kind}: {v.message}" for v in report.violations] + growth
    out.append("")
    out.append(f"violations: {len(problems)}")
    out += [f"  {p}" for p in problems[:50]]
    return "\n".join(out)


def run(
    seconds: float, gap_s: float | None, root: Path, warmup_s: float = WARMUP_S
) -> tuple[int, str]:
    history = History()
    holder: dict[str, Policies] = {}

    def first_policy(stack: Stack) -> None:
        holder["policies"] = Policies(stack)
        history.faults.append(holder["policies"].publish([]))

    with running_stack(root, first_policy) as stack:
        tokens = Tokens(stack)
        traffic = Traffic(stack, history, tokens)
        gap = gap_s if gap_s is not None else max(2.0, min(10.0, seconds / 60))
        faults = Faults(stack, history, traffic, tokens, gap, holder["policies"])
        sampler = Sampler(stack, history, every_s=SAMPLE_EVERY_S if seconds >= 600 else 5)
        history.started = time.time()
        sampler.start()
        traffic.start()
        faults.start(until=history.started + seconds)
        try:
            try:
                time.sleep(seconds)
            finally:
                faults.stop()
                traffic.stop()
            time.sleep(BOUNDS.revocation_s)  # the last revocation and policy have propagated
            traffic.read_back()
        finally:
            traffic.close()  # its grpc channels' threads would otherwise keep a SIGTERM'd run
        history.ended = time.time()
        sampler.stop()
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5
            ) as reply:
                metrics = reply.read().decode()
        except OSError:
            metrics = ""
        stack.stop("sidecar")  # a clean stop: every worker writes its closing checkpoint
        history.dump(root / "history.jsonl")
        counted, lost_note = _counted_lost(stack, metrics)
        report = check(
            history,
            _log_lines(stack),
            _replayer(faults, root),
            BOUNDS,
            counted_lost=counted,
            log_checks=_verify_logs(stack, faults.server_certs),
        )
        rows, growth, judged = _resources(history, warmup_s)
        text = render(
            report,
            seconds=history.ended - history.started,
            history=history,
            resources=rows,
            growth=growth,
            judged=judged,
            warmup_s=warmup_s,
            fault_errors=faults.errors,
            lost_note=lost_note,
        )
    ok = report.ok and not growth and not faults.errors
    return (0 if ok else 1), text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_S", 3600)))
    parser.add_argument("--gap", type=float, default=None, help="seconds between fault steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--keep", type=Path, default=None, help="state dir to keep (default tmp)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=WARMUP_S,
        help="seconds of a process's life before its growth is judged",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the stack's processes (sessions of their own) are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
        code, text = run(args.seconds, args.gap, args.keep, args.warmup)
    else:
        with tempfile.TemporaryDirectory(prefix="ztagent-soak-") as tmp:
            code, text = run(args.seconds, args.gap, Path(tmp), args.warmup)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
