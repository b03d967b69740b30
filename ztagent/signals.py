"""The one way ztagent's long-running commands wait for SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def wait_for_stop_signal() -> None:
    """Returns once SIGTERM or SIGINT arrives; the handlers are removed again afterwards."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
