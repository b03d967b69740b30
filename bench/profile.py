"""Profiles the full sidecar under load with py-spy (needs root: ``sudo``), printing the
functions with the most samples (self and inclusive) in the sidecar process.

    python -m bench.profile [--seconds 15] [--concurrency 1|32] [--native]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from bench.loadgen import run_load
from bench.run import seed, targets
from bench.stack import running_stack
from ztagent._proto.workloads.v1 import storage_pb2


def summarize(raw: Path, top: int = 35) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_count[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{total} samples", "", "self %  function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in self_count.most_common(top)]
    out += ["", "incl % function"]
    out += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--leg", default="d")
    parser.add_argument("--out", type=Path, default=Path("var/profile/ztagent-sidecar.raw"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="ztagent-profile-"))
    request = storage_pb2.GetRequest(key="bench").SerializeToString()
    with running_stack(tmp, enroll_count=1) as st:
        tg = targets(st, request)
        seed(st, tg)
        name = {"d": "sidecar", "c": "bare-proxy", "e": "proxyless"}[args.leg]
        pid = st.procs[name].pid
        procs, per = (1, 1) if args.concurrency == 1 else (2, args.concurrency // 2)
        load = threading.Thread(
            target=run_load,
            args=(tg[args.leg],),
            kwargs={
                "processes": procs,
                "concurrency": per,
                "warmup_s": 1.0,
                "duration_s": args.seconds + 2,
            },
        )
        load.start()
        cmd = [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(args.seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(args.out),
            "--nonblocking",
        ]
        if args.native:
            cmd.append("--native")
        import time

        time.sleep(2.5)
        subprocess.run(cmd, check=True, capture_output=True)
        load.join()
    print(summarize(args.out))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
