"""``python -m ztagent.workloads.storage --listen ADDR --data-dir DIR``: the storage workload.

The same entry point ``ztagent workload storage`` uses; handy for running it alone and for
tests that need a real process to kill.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from ztagent.errors import ZtagentError, exit_code_for
from ztagent.workloads.identity import add_trust_arguments
from ztagent.workloads.storage.server import DEFAULT_LISTEN, run_storage
from ztagent.workloads.storage.store import DEFAULT_MAX_VALUE_BYTES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ztagent.workloads.storage",
        description="Encrypted key-value storage workload behind the ztagent sidecar.",
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="unix:/path or loopback HOST:PORT")
    parser.add_argument("--data-dir", type=Path, required=True, help="created 0700 if missing")
    parser.add_argument("--max-value-bytes", type=int, default=DEFAULT_MAX_VALUE_BYTES)
    add_trust_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(
            run_storage(
                args.listen,
                args.data_dir,
                trust_keys=args.trust_key,
                socket_group=args.socket_group,
                max_value_bytes=args.max_value_bytes,
            )
        )
    except ZtagentError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code_for(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
