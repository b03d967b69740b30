"""The escalation outbox shipped over MQTT to a real Mosquitto (TLS 1.3, client certificates).

Records are written straight into a real storage workload's store (``Store.put`` under
``outbox/<model>/<time>-<id>``, as the inference outbox does through gRPC); the shipper reads
them from the same SQLite file, publishes with QoS 1 as the node's device identity, and
deletes each after its PUBACK. A subscriber with another device certificate collects what the
broker forwards and de-duplicates by ``id``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mosquitto import MosquittoBroker, Subscriber, client_context, free_port
from ztagent.ca import store as ca_store
from ztagent.errors import ConfigError
from ztagent.upload.mqtt import (
    MqttShipperConfig,
    OutboxShipper,
    parse_mqtt_config,
    run_outbox_shipper,
    tls_context,
)
from ztagent.upload.mqtt_link import Broker, MqttError, MqttLink
from ztagent.upload.spool import GAP_FILE
from ztagent.workloads.storage.store import Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE = "edge-node-1"


@dataclass(frozen=True)
class Pki:
    ca: Path
    node_dir: Path
    subscriber_cert: Path
    subscriber_key: Path

    @property
    def bundle(self) -> Path:
        return self.ca / "ca-bundle.pem"

    def subscriber_context(self, server_ca: Path | None = None) -> Any:
        return client_context(server_ca or self.bundle, self.subscriber_cert, self.subscriber_key)


def make_node_dir(ca: Path, target: Path, device_id: str, key_store: str = "file") -> Path:
    """A device directory as ``ztagent enroll`` writes it (file key store)."""
    ca_store.issue_device_cert(ca, device_id, target / "device.pem")
    shutil.copy(ca / "ca-bundle.pem", target / "ca-bundle.pem")
    (target / "keystore.json").write_text(json.dumps({"type": key_store}))
    (target / "enrollment.json").write_text(json.dumps({"version": 1, "device_id": device_id}))
    return target


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("mqtt-pki")
    ca = ca_store.init_ca(base / "ca").dir
    node = make_node_dir(ca, base / "node", NODE)
    sub = base / "cloud" / "cloud-sub.pem"
    ca_store.issue_device_cert(ca, "cloud-sub", sub)
    return Pki(ca, node, sub, sub.with_suffix(".key"))


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", server_dir=pki.ca, client_ca=pki.bundle)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def subscriber(pki: Pki, broker: MosquittoBroker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.port, pki.subscriber_context(), topic="ztagent/#").start()
    try:
        yield sub
    finally:
        sub.stop()


def shipper_config(pki: Pki, tmp_path: Path, url: str, **table: Any) -> MqttShipperConfig:
    raw = {
        "mqtt_url": url,
        "device_dir": str(pki.node_dir),
        "storage_data_dir": str(tmp_path / "storage"),
        "node_id": "node-7",
        "poll_interval_s": 0.2,
        "retry_initial_s": 0.1,
        "retry_max_s": 0.5,
        **table,
    }
    return parse_mqtt_config(raw, tmp_path)


def key_at(model: str, second: int, suffix: str) -> str:
    minute, sec = divmod(second, 60)
    return f"outbox/{model}/20261201T00{minute:02d}{sec:02d}.000000Z-{suffix}"


def put_records(store: Store, namespace: str, model: str, seconds: range) -> list[str]:
    items = []
    for s in seconds:
        key = key_at(model, s, f"{s:06x}")
        doc = {"device_id": namespace, "decision_id": f"d-{namespace}-{s}", "model": model}
        items.append((key, json.dumps(doc).encode()))
    store.put_many(namespace, items)
    return [f"{namespace}/{k}" for k, _ in items]


def outbox_left(data_dir: Path) -> int:
    store = Store.open(data_dir)
    try:
        return sum(
            len(store.list_keys(ns, "outbox/", 1000).keys) for ns in store.namespaces("outbox/")
        )
    finally:
        store.close()


def first_seen(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def stamp_of(record_id: str) -> str:
    return record_id.rpartition("/")[2].partition("-")[0]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "match"),
    [
        ({"mqtt_url": "mqtt://127.0.0.1:1883"}, "upload.mqtt_url", "plain mqtt:// is refused"),
        ({"mqtt_url": "mqtts://u:p@host:8883"}, "upload.mqtt_url", "no user or password"),
        ({"mqtt_url": "mqtts://host:99999"}, "upload.mqtt_url", "is not a URL"),
        ({"mqtt_topic": "a/{model}/b"}, "upload.mqtt_topic", "placeholder"),
        ({"mqtt_topic": "a/+/{node}"}, "upload.mqtt_topic", "'\\+', '#'"),
        ({"max_spool_records": 0}, "upload.max_spool_records", "expected >= 1"),
        ({"max_spool_records": True}, "upload.max_spool_records", "expected an integer"),
        ({"max_spool_bytes": 0}, "upload.max_spool_bytes", "expected >= 1"),
        ({"poll_interval_s": 60}, "upload.poll_interval_s", "at most 30"),
        ({"retry_max_s": 0.05}, "upload.retry_max_s", "at least upload.retry_initial_s"),
        ({"node_id": "a/b"}, "upload.node_id", "topic level"),
        ({"mqtt_hots": "x"}, "upload.mqtt_hots", "unknown key"),
        ({"device_dir": ""}, "upload.device_dir", "non-empty string"),
    ],
)
def test_bad_values_name_the_key(
    pki: Pki, tmp_path: Path, change: dict[str, Any], key: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        shipper_config(pki, tmp_path, "mqtts://127.0.0.1:8883", **change)
    assert info.value.key == key


def test_defaults_and_decision_log_keys_left_alone(pki: Pki, tmp_path: Path) -> None:
    config = parse_mqtt_config(
        {
            "mqtt_url": "mqtts://broker.example",
            "device_dir": "node",
            "storage_data_dir": "/var/lib/ztagent/storage",
            "decision_log_url": "https://collector.example/logs",
        },
        tmp_path,
    )
    assert config.broker == Broker("broker.example", 8883)
    assert config.device_dir == tmp_path / "node"
    assert config.ca_bundle == tmp_path / "node" / "ca-bundle.pem"
    assert config.topic_for("dev-a") == f"ztagent/{config.node_id}/dev-a/escalations"
    assert config.client_id == f"ztagent-outbox-{config.node_id}"


def test_a_pkcs11_identity_needs_a_pin(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PKCS#11 and TPM keys work (tests/integration/test_keystore_tls.py); a token without
    a PIN to open it is a configuration error at start."""
    monkeypatch.delenv("ZTAGENT_PKCS11_PIN", raising=False)
    node = make_node_dir(pki.ca, tmp_path / "hsm-node", "hsm-node", key_store="pkcs11")
    config = replace(shipper_config(pki, tmp_path, "mqtts://127.0.0.1:1"), device_dir=node)
    with pytest.raises(ConfigError, match="PKCS#11 token, which needs a PIN") as info:
        tls_context(config)
    assert info.value.key == "upload.device_dir"


# --- delivery -------------------------------------------------------------------------------


def test_records_arrive_oldest_first_and_leave_the_outbox_after_puback(
    pki: Pki, tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    store = Store.open(tmp_path / "storage")
    ids = put_records(store, "dev-a", "vibration", range(0, 40, 2))  # even seconds
    ids += put_records(store, "dev-b", "audio", range(1, 40, 2))  # odd seconds
    store.put("dev-a", "profile/name", b"not an escalation")
    store.close()
    expected = sorted(ids, key=stamp_of)

    shipper = OutboxShipper.open(shipper_config(pki, tmp_path, broker.url))
    try:
        assert shipper.snapshot().pending_records == 0  # nothing read before the first round
        delivered = shipper.ship_once()
        stats, health = shipper.snapshot(), shipper.health()
    finally:
        shipper.close()

    assert delivered == 40
    docs = subscriber.wait_for(40)
    assert [d["id"] for d in docs] == expected  # across devices and models, by time
    first = docs[0]
    assert first["namespace"] == "dev-a" and first["key"] == expected[0].partition("/")[2]
    assert first["decision_id"] == "d-dev-a-0" and first["device_id"] == "dev-a"
    topics = {topic for topic, _ in subscriber.messages}
    assert topics == {"ztagent/node-7/dev-a/escalations", "ztagent/node-7/dev-b/escalations"}
    assert outbox_left(tmp_path / "storage") == 0
    store = Store.open(tmp_path / "storage")
    assert store.get("dev-a", "profile/name").value == b"not an escalation"  # only the outbox
    store.close()
    assert (stats.delivered, stats.retried, stats.dropped, stats.pending_records) == (40, 0, 0, 0)
    assert stats.connected and health.ok and health.last_error is None
    # the broker saw the node's device certificate, TLS 1.3, QoS 1
    log = broker.log_text()
    assert f"as {NODE}" in log or f"u'{NODE}'" in log, log[-2000:]
    assert "q1" in log


def test_a_value_nested_too_deep_ships_as_raw_bytes_and_blocks_nothing(
    pki: Pki, tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    """An outbox value is the device's own bytes: one nested 1,500 deep made the standard
    parser raise RecursionError in every round, so it and every record after it stayed in the
    outbox forever. It is delivered as ``raw_b64``, byte for byte, and the rest follows."""
    store = Store.open(tmp_path / "storage")
    deep = b"[" * 1500 + b"]" * 1500
    store.put("dev-a", key_at("vibration", 0, "deep"), deep)
    ids = put_records(store, "dev-a", "vibration", range(1, 4))
    store.close()

    shipper = OutboxShipper.open(shipper_config(pki, tmp_path, broker.url))
    try:
        delivered = shipper.ship_once()
    finally:
        shipper.close()

    assert delivered == 4
    docs = subscriber.wait_for(4)
    assert base64.b64decode(docs[0]["raw_b64"]) == deep
    assert [d["id"] for d in docs[1:]] == ids
    assert outbox_left(tmp_path / "storage") == 0


async def test_broker_down_then_back_delivers_everything_in_order(
    pki: Pki, tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    config = shipper_config(pki, tmp_path, broker.url)
    store = Store.open(tmp_path / "storage")
    stop = asyncio.Event()
    shippers: list[OutboxShipper] = []
    task = asyncio.create_task(run_outbox_shipper(config, stop=stop, on_start=shippers.append))
    try:
        ids = put_records(store, "dev-a", "m", range(0, 5))
        await asyncio.to_thread(subscriber.wait_for, 5)
        assert set(subscriber.ids()) == set(ids)

        await asyncio.to_thread(broker.stop)
        for second in range(5, 25):  # records keep coming while the broker is away
            ids += put_records(store, "dev-a", "m", range(second, second + 1))
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        shipper = shippers[0]
        stats = shipper.snapshot()
        assert not stats.connected and stats.pending_records == 20
        assert not shipper.health().ok and "broker_unreachable" in str(shipper.health())

        await asyncio.to_thread(broker.start)
        await asyncio.to_thread(subscriber.wait_for, 25, 30.0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        store.close()
    seen = first_seen(subscriber.ids())
    assert seen == ids  # every record, in order, none lost
    assert outbox_left(tmp_path / "storage") == 0
    assert shippers[0].stats.delivered == 25


def test_shipper_killed_mid_batch_loses_nothing(
    pki: Pki, tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber
) -> None:
    store = Store.open(tmp_path / "storage")
    ids = put_records(store, "dev-a", "m", range(0, 1500))
    store.close()
    config_file = tmp_path / "ship.toml"
    config_file.write_text(
        "[upload]\n"
        f'mqtt_url = "{broker.url}"\n'
        f'device_dir = "{pki.node_dir}"\n'
        'storage_data_dir = "storage"\n'
        'node_id = "node-7"\n'
        "poll_interval_s = 0.2\n"
        'decision_log_url = "https://collector.example/v1/logs"\n'  # another shipper's key
    )

    log_file = (tmp_path / "shipper.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "ztagent.upload.mqtt", "--config", str(config_file)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,  # a file, not a pipe nobody reads
        )

    proc = start()
    try:
        subscriber.wait_for(100, 30.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        left = outbox_left(tmp_path / "storage")
        assert 0 < left < 1500, f"not mid-batch: {left} records left"
        proc = start()
        subscriber.wait_for(1500, 60.0)
        wait_until(lambda: outbox_left(tmp_path / "storage") == 0, 20, "the outbox to empty")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log_file.close()
    assert "connected to" in (tmp_path / "shipper.log").read_text()
    received = subscriber.ids()
    assert set(received) == set(ids)  # nothing lost
    assert first_seen(received) == ids  # in order; re-sends only repeat ids
    assert len(received) - len(ids) <= 32 + 1  # at most one window in flight was repeated


def test_spool_limit_drops_the_oldest_and_ships_a_gap_first(
    pki: Pki, tmp_path: Path, broker: MosquittoBroker, subscriber: Subscriber, caplog: Any
) -> None:
    store = Store.open(tmp_path / "storage")
    ids = put_records(store, "dev-a", "m", range(0, 12))
    store.close()
    dead = shipper_config(pki, tmp_path, f"mqtts://127.0.0.1:{free_port()}", max_spool_records=5)
    shipper = OutboxShipper.open(dead)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(MqttError, match="unreachable"):
            shipper.ship_once()
        stats = shipper.snapshot()
    finally:
        shipper.close()
    assert (stats.dropped, stats.pending_records, stats.delivered) == (7, 5, 0)
    assert "dropped the 7 oldest" in caplog.text
    assert (tmp_path / "storage" / GAP_FILE).exists()  # survives a restart until shipped

    shipper = OutboxShipper.open(replace(dead, broker=Broker("127.0.0.1", broker.port)))
    try:
        assert shipper.ship_once() == 5
    finally:
        shipper.close()
    docs = subscriber.wait_for(6)
    assert docs[0]["gap"] == {
        "dropped": 7,
        "from": ids[0].partition("/")[2],
        "to": ids[6].partition("/")[2],
    }
    assert docs[0]["namespace"] == "dev-a"
    assert [d["id"] for d in docs[1:]] == ids[7:]
    assert not (tmp_path / "storage" / GAP_FILE).exists()
    assert outbox_left(tmp_path / "storage") == 0


# --- refusals -------------------------------------------------------------------------------


async def test_broker_with_a_wrong_server_certificate_is_refused(
    pki: Pki, tmp_path: Path, caplog: Any
) -> None:
    other_ca = ca_store.init_ca(tmp_path / "other-ca").dir
    impostor = MosquittoBroker(tmp_path / "impostor", server_dir=other_ca, client_ca=pki.bundle)
    impostor.start()
    sub = Subscriber(
        impostor.port, pki.subscriber_context(server_ca=other_ca / "ca-bundle.pem")
    ).start()
    store = Store.open(tmp_path / "storage")
    put_records(store, "dev-a", "m", range(0, 3))
    stop = asyncio.Event()
    shippers: list[OutboxShipper] = []
    config = shipper_config(pki, tmp_path, impostor.url)
    try:
        with caplog.at_level(logging.WARNING):
            task = asyncio.create_task(
                run_outbox_shipper(config, stop=stop, on_start=shippers.append)
            )
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.wait_for(task, 20)
    finally:
        sub.stop()
        impostor.stop()
        store.close()
    health = shippers[0].health()
    assert not health.ok and health.last_error is not None
    assert "broker_tls_failed" in health.last_error
    assert "server certificate refused: unable to get local issuer" in health.last_error
    assert sub.payloads() == []  # nothing sent
    assert outbox_left(tmp_path / "storage") == 3
    failing = [r for r in caplog.records if "failing" in r.getMessage()]
    assert len(failing) == 1 and "broker_tls_failed" in failing[0].getMessage()  # logged once


def test_a_client_without_a_certificate_is_refused_by_the_broker(
    pki: Pki, broker: MosquittoBroker
) -> None:
    target = Broker("127.0.0.1", broker.port)
    anonymous = MqttLink(target, client_context(pki.bundle), "anonymous", timeout_s=5)
    with pytest.raises(MqttError) as info:
        anonymous.connect()
    assert info.value.code in ("connection_lost", "broker_tls_failed", "broker_refused")
    assert not anonymous.connected
    # the same link with the node's certificate gets in: the refusal is the missing certificate
    config = replace(
        parse_mqtt_config(
            {"mqtt_url": broker.url, "device_dir": str(pki.node_dir), "storage_data_dir": "s"},
            pki.node_dir,
        )
    )
    identified = MqttLink(target, tls_context(config), "identified", timeout_s=5)
    identified.connect()
    assert identified.connected
    identified.close()


def test_spool_limit_in_bytes_drops_the_oldest(pki: Pki, tmp_path: Path, caplog: Any) -> None:
    """``upload.max_spool_bytes`` bounds the stored values too: with room for five records'
    values and none for a sixth, the seven oldest of twelve go (and are counted)."""
    store = Store.open(tmp_path / "storage")
    put_records(store, "dev-a", "m", range(0, 12))
    store.close()
    size = len(json.dumps({"device_id": "dev-a", "decision_id": "d-dev-a-10", "model": "m"}))
    dead = shipper_config(
        pki, tmp_path, f"mqtts://127.0.0.1:{free_port()}", max_spool_bytes=5 * size + 2
    )
    assert dead.max_spool_bytes == 5 * size + 2
    shipper = OutboxShipper.open(dead)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(MqttError, match="unreachable"):
            shipper.ship_once()
        stats = shipper.snapshot()
    finally:
        shipper.close()
    assert (stats.dropped, stats.pending_records) == (7, 5)
    assert "dropped the 7 oldest" in caplog.text
