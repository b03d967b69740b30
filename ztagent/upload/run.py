"""``ztagent ship --config ztagent.toml``: every shipper ``[upload]`` configures, in one
process beside the sidecar, until SIGTERM.

It reads the node's state the sidecar and the workloads write (the decision log files, the
storage outbox) and never takes part in a request: an unreachable uplink only makes what
waits on disk grow, within its bounds.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
from pathlib import Path

from ztagent.config import Config
from ztagent.policy.decision_log import worker_log_path
from ztagent.signals import wait_for_stop_signal
from ztagent.upload.decision_logs import DecisionLogShipper, ShipperSettings

log = logging.getLogger("ztagent.upload")


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


async def run_ship(config: Config, version: str) -> None:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(shipper.run(stop), name=f"ship {shipper.log_path.name}")
        for shipper in decision_log_shippers(config, version)
    ]
    if config.upload.mqtt.get("mqtt_url"):
        mqtt = importlib.import_module("ztagent.upload.mqtt")
        base = config.source.parent if config.source is not None else Path.cwd()
        mqtt_config = mqtt.parse_mqtt_config(config.upload.mqtt, base)
        tasks.append(asyncio.create_task(mqtt.run_outbox_shipper(mqtt_config, stop=stop)))
    if not tasks:
        log.warning("nothing to ship: set upload.decision_log_url and/or upload.mqtt_url")
        return
    log.info("shipping to the uplink: %d shipper(s)", len(tasks))
    await wait_for_stop_signal()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
