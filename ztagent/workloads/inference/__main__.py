"""``python -m ztagent.workloads.inference --listen ADDR --models DIR``: the inference workload.

The same entry point ``ztagent workload inference`` uses; handy for running it alone and for
tests that need a real process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from ztagent.errors import ZtagentError, exit_code_for
from ztagent.workloads.identity import add_trust_arguments
from ztagent.workloads.inference import require_torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ztagent.workloads.inference",
        description="TorchScript inference workload behind the ztagent sidecar.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's flags; ``ztagent workload inference`` adds the same ones."""
    parser.add_argument(
        "--listen", default="127.0.0.1:50062", help="unix:/path or loopback HOST:PORT"
    )
    parser.add_argument(
        "--models", type=Path, default=Path("var/models"), help="directory of *.manifest.json"
    )
    parser.add_argument(
        "--storage", default=None, help="storage workload address for the escalation outbox"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.8,
        help="below this class probability (0-1) a result is escalated",
    )
    parser.add_argument(
        "--max-batch", type=int, default=16, help="most windows in one forward pass"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="longest a request waits for a batch to fill, in milliseconds",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--model-keys",
        type=Path,
        nargs="+",
        default=[],
        help="PEM public keys of trusted model signers: serve only signed manifests",
    )
    add_trust_arguments(parser)
    parser.add_argument(
        "--assertion-key",
        type=Path,
        default=None,
        help="PEM P-256 key this workload signs its outbox writes to storage with, on the "
        "device's behalf (made if missing, public key beside it as .pub: give that to the "
        "storage workload's --trust-key); required with --storage",
    )
    parser.add_argument(
        "--protect",
        type=Path,
        metavar="CONFIG",
        help="proxyless: serve mTLS on --listen (in place of CONFIG's [listen] address) with "
        "the sidecar's own admission in this process (device cert + CRL, posture, token, "
        "policy, decision log); --trust-key and --socket-group are then unused",
    )


def run(args: argparse.Namespace) -> None:
    """Runs the workload from parsed flags until SIGTERM/SIGINT (raises ZtagentError)."""
    require_torch()
    from ztagent.workloads.inference.server import run_inference, run_inference_protected

    served: dict[str, Any] = {
        "storage_target": args.storage,
        "confidence_threshold": args.confidence_threshold,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
        "model_keys": args.model_keys,
        "assertion_key": args.assertion_key,
    }
    if args.protect is not None:  # proxyless: its own mTLS port and admission
        protected = run_inference_protected(args.protect, args.models, listen=args.listen, **served)
        asyncio.run(protected)
        return
    asyncio.run(
        run_inference(
            args.listen,
            args.models,
            trust_keys=args.trust_key,
            socket_group=args.socket_group,
            **served,
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        run(args)
    except ZtagentError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code_for(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
