"""``ztagent ship --config ztagent.toml``: every shipper ``[upload]`` configures, in one
process beside the sidecar, until SIGTERM.

Every ``STATUS_INTERVAL_S`` it writes ``<posture.state_dir>/upload-status.json`` (what is
pending, delivered, retried, dropped, whether the uplink answers); the sidecar exports it as
``ztagent_upload_*`` metrics and the health service ``ztagent.upload``.

It reads the node's state the sidecar and the workloads write (the decision log files, the
storage outbox) and never takes part in a request: an unreachable uplink only makes what
waits on disk grow, within its bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

from ztagent.config import Config
from ztagent.errors import ZtagentError
from ztagent.failure_log import FailureLog
from ztagent.files import write_atomic
from ztagent.policy.decision_log import worker_log_path
from ztagent.signals import wait_for_stop_signal
from ztagent.upload.decision_logs import DecisionLogShipper, ShipperSettings

log = logging.getLogger("ztagent.upload")

STATUS_FILE = "upload-status.json"
STATUS_INTERVAL_S = 2.0
STATUS_STALE_S = 30.0
"""A status older than this means the shipper is not running."""


def status_path(config: Config) -> Path:
    return config.posture.state_dir / STATUS_FILE


def upload_configured(config: Config) -> bool:
    return config.upload.decision_log_url is not None or bool(config.upload.mqtt.get("mqtt_url"))


def decision_log_paths(config: Config) -> list[Path]:
    """The sidecar's log file, or each worker's with ``listen.workers > 1``."""
    path = config.decision_log.path
    if config.listen.workers == 1:
        return [path]
    return [worker_log_path(path, i) for i in range(config.listen.workers)]


def decision_log_shippers(config: Config, version: str) -> list[DecisionLogShipper]:
    upload = config.upload
    if upload.decision_log_url is None or not config.decision_log.enabled:
        return []
    client = (
        (upload.client_cert, upload.client_key)
        if upload.client_cert is not None and upload.client_key is not None
        else None
    )
    settings = ShipperSettings(
        upload.decision_log_url,
        decision_path=config.policy.decision_path,
        ca_bundle=upload.decision_log_ca_bundle,
        token_file=upload.decision_log_token_file,
        client_cert=client,
        batch_max_bytes=upload.batch_max_bytes,
        batch_max_age_s=upload.batch_max_age_s,
        timeout_s=upload.timeout_s,
        node_id=upload.node_id or socket.gethostname(),
    )
    return [DecisionLogShipper(p, settings, version=version) for p in decision_log_paths(config)]


def _stats(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return {k: v for k, v in vars(obj).items() if isinstance(v, int | float | bool | str)}


def write_status(config: Config, entries: list[dict[str, Any]]) -> None:
    doc = {"time": time.time(), "shippers": entries}
    write_atomic(status_path(config), json.dumps(doc, sort_keys=True).encode())


async def run_ship(config: Config, version: str) -> None:
    stop = asyncio.Event()
    shippers = decision_log_shippers(config, version)
    tasks = [
        asyncio.create_task(shipper.run(stop), name=f"ship {shipper.log_path.name}")
        for shipper in shippers
    ]
    outbox: Any = None
    if config.upload.mqtt.get("mqtt_url"):
        from ztagent.upload.mqtt import OutboxShipper, parse_mqtt_config

        base = config.source.parent if config.source is not None else Path.cwd()
        table = dict(config.upload.mqtt)
        if config.upload.node_id is not None:
            table["node_id"] = config.upload.node_id
        mqtt_config = parse_mqtt_config(table, base)  # a bad setting: exit now, naming it

        async def ship_outbox() -> None:
            """The outbox's store or the node identity may not exist yet (the storage
            workload or the enrollment comes later): wait for them, never exit."""
            nonlocal outbox
            waiting = FailureLog(log, "MQTT outbox shipper start")
            while outbox is None and not stop.is_set():
                try:
                    outbox = await asyncio.to_thread(OutboxShipper, mqtt_config)
                except ZtagentError as err:
                    waiting.failed(f"{err.code}: {err.message}")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 2.0)
            if outbox is not None:
                waiting.succeeded()
                await outbox.run(stop)

        tasks.append(asyncio.create_task(ship_outbox(), name="ship outbox"))
    if not tasks:
        log.warning("nothing to ship: set upload.decision_log_url and/or upload.mqtt_url")
        return
    log.info("shipping to the uplink: %d shipper(s)", len(tasks))

    def status() -> list[dict[str, Any]]:
        entries = [
            {"kind": "decision_log", "name": s.log_path.name, **_stats(s.stats)} for s in shippers
        ]
        if outbox is not None:
            entries.append({"kind": "mqtt", "name": "outbox", **_stats(outbox.snapshot())})
        return entries

    async def report() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                await asyncio.to_thread(write_status, config, status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_INTERVAL_S)

    reporter = asyncio.create_task(report())
    await wait_for_stop_signal()
    stop.set()
    await asyncio.gather(*tasks, reporter, return_exceptions=True)
    with contextlib.suppress(OSError):
        write_status(config, status())
    if outbox is not None:
        outbox.close()
