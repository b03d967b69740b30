"""Escalations shipped over MQTT: the inference outbox, published with the node's identity.

``OutboxShipper`` reads the escalation records the inference workload left in each device's
storage namespace (``outbox/<model>/<time>-<id>``, see ``ztagent.upload.spool``) straight from
the storage workload's store on this node, oldest first, and publishes each one to an MQTT
broker (``mqtts://host:port``) with **QoS 1 over TLS 1.3**, authenticated by the node's
enrolled device certificate (``device_dir``: ``device.pem`` and the key wherever its
``keystore.json`` says). A record is
deleted from the outbox only after the broker's PUBACK: a crash between the PUBACK and the
delete sends that record again (at least once), never loses one. The payload is the record's
JSON plus ``id`` (``<namespace>/<key>``, stable across re-sends, so the cloud drops
duplicates), ``namespace`` and ``key``.

The outbox is the spool. Past ``max_spool_records`` (or ``max_spool_bytes``) pending, the
oldest records are dropped and each device's drop becomes a *gap* message, sent before
anything else once the broker is reachable: ``{"gap": {"dropped": N, "from": key, "to":
key}, "id": ..., "namespace": ...}``.

A key file goes to Python's ``ssl``; a key in a PKCS#11 token (PIN from
``ZTAGENT_PKCS11_PIN``) or the TPM signs the handshake where it is kept
(``ztagent.device.keystore_tls``: TLS 1.3 in tlslite-ng, the broker checked against
``mqtt_ca_bundle`` before our certificate is sent). The certificate and key are re-read at
every connection, so a renewal (``ztagent renew --watch``) is picked up at the next reconnect.

``python -m ztagent.upload.mqtt --config FILE`` runs it from the ``[upload]`` table of a TOML
file until SIGTERM; ``ztagent ship`` runs ``run_outbox_shipper`` beside the other shippers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import string
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ztagent import json_input
from ztagent.config import UPLOAD_DECISION_KEYS, UPLOAD_MQTT_KEYS
from ztagent.device.device_dir import (
    CA_BUNDLE,
    DEVICE_CERT,
    DEVICE_KEY,
    KEYSTORE_FILE,
    load_device_dir,
)
from ztagent.device.errors import EnrollClientError
from ztagent.device.keystore_tls import (
    DeviceIdentity,
    KeystoreTlsClient,
    client_key_source,
    keystore_client,
)
from ztagent.device.keystores import resolve_pin
from ztagent.errors import ConfigError, ZtagentError, exit_code_for
from ztagent.failure_log import FailureLog
from ztagent.schedule import Backoff
from ztagent.signals import wait_for_stop_signal
from ztagent.upload.mqtt_link import Broker, MqttError, MqttLink
from ztagent.upload.spool import Entry, Gap, OutboxSpool
from ztagent.workloads.storage.errors import StorageError
from ztagent.workloads.storage.store import KEY_FILE, Store

log = logging.getLogger(__name__)

DEFAULT_PORT = 8883
DEFAULT_TOPIC = "ztagent/{node}/{device_id}/escalations"
TOPIC_FIELDS = frozenset({"node", "device_id"})
DEFAULT_MAX_SPOOL_RECORDS = 10_000
DEFAULT_MAX_SPOOL_BYTES = 64 * 1024 * 1024
BATCH_RECORDS = 100
"""Records read and published per round (at most ``WINDOW`` of them unacknowledged)."""
WINDOW = 32
TIMEOUT_S = 10.0
"""TCP + TLS connect, CONNACK, and the longest wait for the next PUBACK."""
MAX_POLL_INTERVAL_S = 30.0
"""The link is serviced every poll: at most half of the 60 s MQTT keepalive."""
_MY_KEYS = frozenset({*UPLOAD_MQTT_KEYS, "node_id"})


@dataclass(frozen=True)
class MqttShipperConfig:
    """The ``[upload]`` keys of the MQTT shipper (``upload.mqtt_*`` and the outbox's)."""

    broker: Broker
    device_dir: Path
    """The node's identity, as ``ztagent enroll`` wrote it (any key store)."""
    storage_data_dir: Path
    """The storage workload's ``--data`` directory (its ``storage.db`` and ``storage.key``);
    the pending gaps are kept there too (``mqtt-gaps.json``)."""
    ca_bundle: Path
    """Trust anchors for the broker's server certificate (default: the device directory's
    ``ca-bundle.pem``)."""
    topic: str = DEFAULT_TOPIC
    """``{node}`` and ``{device_id}`` (the storage namespace) are filled in."""
    node_id: str = ""
    client_id: str = ""
    max_spool_records: int = DEFAULT_MAX_SPOOL_RECORDS
    max_spool_bytes: int = DEFAULT_MAX_SPOOL_BYTES
    """Stored value bytes pending; not a key of its own yet (the records limit binds first
    for records of a few hundred bytes)."""
    poll_interval_s: float = 2.0
    """How often the outbox is read when it was empty (and the link serviced), seconds."""
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0

    def topic_for(self, device_id: str) -> str:
        return self.topic.format(node=self.node_id, device_id=_topic_level(device_id))


def _topic_level(text: str) -> str:
    return "".join("_" if c in "/+#\x00" else c for c in text)


# --- configuration ------------------------------------------------------------------------


def _name(key: str) -> str:
    return f"upload.{key}"


def _text(table: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(_name(key), "is required")
    if not isinstance(value, str) or not value:
        raise ConfigError(_name(key), f"expected a non-empty string, got {value!r}")
    return value


def _path(table: Mapping[str, Any], key: str, base: Path, default: Path | None = None) -> Path:
    if key not in table and default is not None:
        return default
    path = Path(_text(table, key))
    return path if path.is_absolute() else base / path


def _int(table: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(_name(key), f"expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(_name(key), f"expected >= {minimum}, got {value}")
    return value


def _seconds(
    table: Mapping[str, Any], key: str, default: float, maximum: float = float("inf")
) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(_name(key), f"expected a number of seconds, got {value!r}")
    if not 0 < value <= maximum:
        raise ConfigError(_name(key), f"expected more than 0 and at most {maximum} s, got {value}")
    return float(value)


def parse_broker_url(url: str, key: str = "mqtt_url") -> Broker:
    """``mqtts://host[:port]`` (port 8883 by default); plain ``mqtt://`` is refused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(_name(key), f"{url!r} is not a URL ({exc})") from None
    if parts.scheme != "mqtts":
        raise ConfigError(
            _name(key),
            f"scheme {parts.scheme or '(none)'!r} in {url!r}; expected mqtts://host:port "
            "(MQTT over TLS; plain mqtt:// is refused)",
        )
    if not parts.hostname or parts.username or parts.password:
        raise ConfigError(_name(key), f"{url!r}: expected mqtts://host:port (no user or password)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(_name(key), f"{url!r}: expected mqtts://host:port (no path or query)")
    return Broker(parts.hostname, port if port is not None else DEFAULT_PORT)


def check_topic_template(template: str, key: str = "mqtt_topic") -> str:
    """Placeholders only ``{node}`` and ``{device_id}``; no MQTT wildcards or NUL."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(_name(key), f"{template!r} is not a valid template ({exc})") from None
    for literal, field_name, spec, conversion in fields:
        if any(c in literal for c in "+#\x00"):
            raise ConfigError(
                _name(key), f"{template!r} holds '+', '#' or NUL (a topic to publish cannot)"
            )
        if field_name is not None and (field_name not in TOPIC_FIELDS or spec or conversion):
            raise ConfigError(
                _name(key),
                f"placeholder {{{field_name}}} in {template!r}; expected only {{node}} and "
                "{device_id}",
            )
    if len(template.encode()) > 32_000:
        raise ConfigError(_name(key), "longer than 32000 bytes")
    return template


def _node_id(table: Mapping[str, Any]) -> str:
    node = _text(table, "node_id", socket.gethostname() or "node")
    if any(c in node for c in "/+#\x00"):
        raise ConfigError("upload.node_id", f"{node!r} holds '/', '+', '#' or NUL (a topic level)")
    return node


def parse_mqtt_config(table: Mapping[str, Any], base: Path) -> MqttShipperConfig:
    """The MQTT shipper's keys of an ``[upload]`` table (relative paths against ``base``).
    The decision-log shipper's keys may be in the same table and are left to it."""
    for key in table:
        if key not in _MY_KEYS and key not in UPLOAD_DECISION_KEYS:
            raise ConfigError(
                _name(key), f"unknown key (expected one of: {', '.join(sorted(_MY_KEYS))})"
            )
    broker = parse_broker_url(_text(table, "mqtt_url"))
    device_dir = _path(table, "device_dir", base)
    node = _node_id(table)
    client_id = _text(table, "mqtt_client_id", f"ztagent-outbox-{node}")
    if len(client_id.encode()) > 65535 or "\x00" in client_id:
        raise ConfigError("upload.mqtt_client_id", "expected at most 65535 bytes, no NUL")
    retry_initial = _seconds(table, "retry_initial_s", 1.0)
    retry_max = _seconds(table, "retry_max_s", 300.0)
    if retry_max < retry_initial:
        raise ConfigError(
            "upload.retry_max_s",
            f"got {retry_max} s, expected at least upload.retry_initial_s ({retry_initial} s)",
        )
    return MqttShipperConfig(
        broker=broker,
        device_dir=device_dir,
        storage_data_dir=_path(table, "storage_data_dir", base),
        ca_bundle=_path(table, "mqtt_ca_bundle", base, device_dir / CA_BUNDLE),
        topic=check_topic_template(_text(table, "mqtt_topic", DEFAULT_TOPIC)),
        node_id=node,
        client_id=client_id,
        max_spool_records=_int(table, "max_spool_records", DEFAULT_MAX_SPOOL_RECORDS, 1),
        max_spool_bytes=_int(table, "max_spool_bytes", DEFAULT_MAX_SPOOL_BYTES, 1),
        poll_interval_s=_seconds(table, "poll_interval_s", 2.0, MAX_POLL_INTERVAL_S),
        retry_initial_s=retry_initial,
        retry_max_s=retry_max,
    )


def load_upload_table(path: Path) -> Mapping[str, Any]:
    """The ``[upload]`` table of a TOML file."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path}: {exc}") from None
    table = doc.get("upload")
    if not isinstance(table, dict):
        raise ConfigError("upload", f"{path} has no [upload] table")
    return table


# --- the node's identity ------------------------------------------------------------------


def tls_context(config: MqttShipperConfig) -> ssl.SSLContext | KeystoreTlsClient:
    """TLS 1.3 only, the broker checked against ``ca_bundle`` (chain and host name), the
    device certificate chain from ``device_dir`` as the client certificate: with its key
    file in an ``ssl.SSLContext``, or a ``KeystoreTlsClient`` signing in the PKCS#11 token
    or TPM ``keystore.json`` names."""
    try:
        load_device_dir(config.device_dir)
    except EnrollClientError as exc:
        raise ConfigError("upload.device_dir", exc.message) from None
    cert = config.device_dir / DEVICE_CERT
    source = client_key_source(
        cert,
        config.device_dir / KEYSTORE_FILE,
        key_name="upload.device_dir",
        pin=resolve_pin(None),
    )
    if isinstance(source, DeviceIdentity):
        return keystore_client(config.ca_bundle, source, ca_key="upload.mqtt_ca_bundle")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_verify_locations(cafile=str(config.ca_bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("upload.mqtt_ca_bundle", f"{config.ca_bundle}: {exc}") from None
    key = config.device_dir / DEVICE_KEY
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("upload.device_dir", f"{cert} / {key}: {exc}") from None
    return context


# --- the shipper --------------------------------------------------------------------------


@dataclass
class MqttShipperStats:
    """Counters (since start) and gauges a metrics endpoint can export."""

    delivered: int = 0
    """Records the broker acknowledged (and that were then deleted from the outbox)."""
    retried: int = 0
    """Records published without a PUBACK (connection lost, refused, timeout): sent again."""
    dropped: int = 0
    """Records deleted unsent at the spool limit (reported in gap messages)."""
    gaps_delivered: int = 0
    pending_records: int = 0
    pending_bytes: int = 0
    oldest_pending_s: float = 0.0
    unreadable: int = 0
    """Outbox rows that fail the store's integrity check (kept, never shipped)."""
    connected: bool = False
    last_error: str | None = None
    """The latest failure, None after a successful round."""
    last_success: float | None = None
    """Wall-clock time of the latest successful round."""


@dataclass(frozen=True)
class ShipperHealth:
    ok: bool
    last_error: str | None


def record_payload(entry: Entry, value: bytes) -> bytes:
    """The record's JSON object plus ``id``, ``namespace`` and ``key``; a value that is not
    a JSON object (or one nested deeper than ``json_input.DEFAULT_MAX_DEPTH``) travels as
    ``raw_b64``: a stored value is the device's own bytes and must never stop the outbox."""
    try:
        doc = json_input.loads(value)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError:
        doc = {"raw_b64": base64.b64encode(value).decode("ascii")}
    doc.update(id=entry.record_id, namespace=entry.namespace, key=entry.key)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def gap_payload(gap: Gap) -> bytes:
    return json.dumps(gap.as_payload(), sort_keys=True, separators=(",", ":")).encode("utf-8")


class OutboxShipper:
    """Ships the outbox of ``store`` to the broker of ``config``; see the module docstring."""

    def __init__(
        self,
        config: MqttShipperConfig,
        store: Store | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``store``: the storage workload's, opened from ``config.storage_data_dir`` (a
        second process on the same SQLite file) when not given."""
        tls_context(config)  # the identity and trust files are usable before anything starts
        if store is None:
            if not (config.storage_data_dir / KEY_FILE).exists():
                raise ConfigError(
                    "upload.storage_data_dir",
                    f"{config.storage_data_dir} holds no {KEY_FILE} (expected the storage "
                    "workload's --data directory)",
                )
            store = Store.open(config.storage_data_dir)
        self.config = config
        self.store = store
        self.spool = OutboxSpool(
            store,
            config.storage_data_dir,
            max_records=config.max_spool_records,
            max_bytes=config.max_spool_bytes,
        )
        self.stats = MqttShipperStats()
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._link: MqttLink | None = None
        self._failures = FailureLog(log, f"MQTT outbox upload to {config.broker}")
        self._consecutive = 0

    @classmethod
    def open(cls, config: MqttShipperConfig) -> OutboxShipper:
        return cls(config)

    def snapshot(self) -> MqttShipperStats:
        with self._lock:
            return replace(self.stats)

    def health(self) -> ShipperHealth:
        with self._lock:
            return ShipperHealth(
                self.stats.connected and self.stats.last_error is None, self.stats.last_error
            )

    def close(self) -> None:
        self._disconnect()
        self.store.close()

    # --- one round -----------------------------------------------------------------------

    def _update_pending(self, dropped: int = 0) -> None:
        records, size = self.spool.pending()
        with self._lock:
            self.stats.dropped += dropped
            self.stats.pending_records = records
            self.stats.pending_bytes = size
            self.stats.oldest_pending_s = self.spool.oldest_age_s()
            self.stats.unreadable = len(self.spool.unreadable)

    def _connected_link(self) -> MqttLink:
        if self._link is None or not self._link.connected:
            try:
                context = tls_context(self.config)
            except ConfigError as exc:  # e.g. read mid-renewal: try again later
                raise MqttError("broker_tls_failed", exc.message) from None
            self._link = MqttLink(
                self.config.broker, context, self.config.client_id, timeout_s=TIMEOUT_S
            )
            self._link.connect()
            log.info(
                "connected to %s as %s (client id %s)",
                self.config.broker,
                self.config.device_dir,
                self.config.client_id,
            )
        with self._lock:
            self.stats.connected = True
        return self._link

    def ship_once(self, *, limit: int = BATCH_RECORDS) -> int:
        """One round: read the outbox, apply the spool limit, then (connected) publish the
        pending gaps and up to ``limit`` records, oldest first, deleting each after its
        PUBACK. Returns the records delivered; raises ``MqttError`` when the broker could not
        be used (what was acknowledged before is deleted and counted)."""
        self.spool.refresh()
        self._update_pending(self.spool.enforce_limit())
        try:
            link = self._connected_link()
            delivered = self._publish_gaps(link) if self.spool.gaps else 0
            delivered += self._publish_records(link, limit)
            if not delivered:
                link.service()
        except MqttError as err:
            with self._lock:
                self.stats.connected = False
                self.stats.last_error = str(err)
            raise
        finally:
            self._update_pending()
        with self._lock:
            self.stats.last_error = None
            self.stats.last_success = self._wall_clock()
        return delivered

    def _publish_gaps(self, link: MqttLink) -> int:
        gaps = sorted(self.spool.gaps.values(), key=lambda g: (g.first, g.namespace))
        messages = [(self.config.topic_for(g.namespace), gap_payload(g)) for g in gaps]

        def acked(i: int) -> None:
            self.spool.gap_delivered(gaps[i])
            with self._lock:
                self.stats.gaps_delivered += 1
            log.warning(
                "gap delivered: %d records of %s dropped (%s to %s)",
                gaps[i].dropped,
                gaps[i].namespace,
                gaps[i].first,
                gaps[i].last,
            )

        self._publish(link, messages, acked)
        return 0

    def _publish_records(self, link: MqttLink, limit: int) -> int:
        batch: list[tuple[Entry, bytes]] = []
        for entry in self.spool.entries[:limit]:
            value = self.spool.value(entry)
            if value is not None:
                batch.append((entry, value))
        messages = [
            (self.config.topic_for(entry.namespace), record_payload(entry, value))
            for entry, value in batch
        ]
        delivered = 0

        def acked(i: int) -> None:
            nonlocal delivered
            self.spool.delete(batch[i][0])
            delivered += 1
            with self._lock:
                self.stats.delivered += 1

        try:
            self._publish(link, messages, acked)
        finally:
            with self._lock:
                self.stats.retried += len(batch) - delivered
        return delivered

    @staticmethod
    def _publish(
        link: MqttLink, messages: Sequence[tuple[str, bytes]], acked: Callable[[int], None]
    ) -> None:
        if messages:
            link.publish_acked(messages, acked, window=WINDOW)

    # --- the loop ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until ``stop``: at once while records are left, every ``poll_interval_s``
        when the outbox is empty, with exponential backoff and jitter after failures."""
        try:
            await self._run(stop)
            # a last round on the way out: what arrived since the last poll (a broker that
            # does not answer now is retried at the next start; nothing is deleted unacked)
            with contextlib.suppress(MqttError, StorageError):
                await asyncio.to_thread(self.ship_once)
        finally:
            await asyncio.to_thread(self._disconnect)

    def _disconnect(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        with self._lock:
            self.stats.connected = False

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        while not stop.is_set():
            try:
                delivered = await asyncio.to_thread(self.ship_once)
            except (MqttError, StorageError) as err:
                self._consecutive += 1
                self._failures.failed(f"{err.code}: {err.message}")
                if isinstance(err, StorageError):
                    with self._lock:
                        self.stats.last_error = str(err)
                delay = backoff.delay(self._consecutive)
            except Exception as exc:  # a bug: keep the process shipping, with backoff
                self._consecutive += 1
                log.exception("MQTT outbox round failed")
                with self._lock:
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = backoff.delay(self._consecutive)
            else:
                if self._consecutive:
                    self._failures.succeeded()
                self._consecutive = 0
                more = self.spool.pending()[0] > 0
                delay = 0.0 if delivered and more else self.config.poll_interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


async def run_outbox_shipper(
    config: MqttShipperConfig,
    *,
    stop: asyncio.Event,
    on_start: Callable[[OutboxShipper], None] | None = None,
) -> None:
    """Ships the outbox until ``stop`` is set (``ConfigError`` before anything starts when
    the identity, trust bundle or store cannot be used). ``on_start`` receives the shipper,
    whose ``snapshot()`` and ``health()`` a metrics endpoint can read."""
    shipper = await asyncio.to_thread(OutboxShipper.open, config)
    if on_start is not None:
        on_start(shipper)
    log.info(
        "shipping the outbox of %s to %s, topic %s",
        config.storage_data_dir,
        config.broker,
        config.topic,
    )
    try:
        await shipper.run(stop)
    finally:
        await asyncio.to_thread(shipper.close)


async def _serve(config: MqttShipperConfig) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_outbox_shipper(config, stop=stop))
    waiter = asyncio.create_task(wait_for_stop_signal())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    await task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ztagent.upload.mqtt",
        description="Publish the inference outbox to an MQTT broker until SIGTERM.",
    )
    parser.add_argument("--config", required=True, type=Path, help="TOML file with [upload]")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = parse_mqtt_config(load_upload_table(args.config), args.config.parent)
        asyncio.run(_serve(config))
    except ZtagentError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code_for(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
