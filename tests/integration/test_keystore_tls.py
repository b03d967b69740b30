"""mTLS with a device key that never leaves its store (SoftHSM2 PKCS#11, swtpm TPM), for the
HTTPS and MQTT clients: bundle download from a real nginx (``ssl_verify_client on``),
decision-log POSTs to a collector that requires client certificates (Python's ``ssl``
server, i.e. OpenSSL, ``CERT_REQUIRED``), and the MQTT outbox to a real Mosquitto
(``require_certificate true``, TLS 1.3). The handshake is signed by the token or the TPM
through ``ztagent.device.keystore_tls`` (tlslite-ng); each device is a real key made in its
store and certified by the dev CA. The refusals: a server certificate from another CA or
for another name (nothing sent), a server that wants a client certificate from another CA,
a key store that cannot sign.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pkcs11
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from pkcs11 import Attribute, ObjectClass

from tests.fixtures.mosquitto import MosquittoBroker, Subscriber, client_context
from tests.fixtures.nginx import NginxTls, nginx_server
from tests.fixtures.softhsm import SoftHsm, softhsm_fixture  # noqa: F401 (fixture)
from ztagent.ca import store as ca_store
from ztagent.ca.builders import build_leaf, cert_pem, key_pem
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.bundle_fetch import BundleFetcher
from ztagent.device.errors import TlsError
from ztagent.device.keystore_tls import DeviceIdentity, KeystoreTlsClient
from ztagent.device.keystores import KeyStore, Pkcs11KeyStore, TpmKeyStore
from ztagent.device.tpm import DeviceTpm
from ztagent.errors import ConfigError, TransportError
from ztagent.upload.decision_logs import DecisionLogShipper, ShipperSettings
from ztagent.upload.mqtt import OutboxShipper, parse_mqtt_config, tls_context
from ztagent.upload.mqtt_link import MqttError
from ztagent.workloads.storage.store import Store

pytestmark = pytest.mark.integration

BUNDLE = b"\x1f\x8b pretend this is a signed bundle"


# --- the PKI and the devices -----------------------------------------------------------------


@dataclass(frozen=True)
class Cas:
    ca: Path
    other: Path
    """Another CA: its server certificate is not trusted, its client CA refuses ours."""

    @property
    def bundle(self) -> Path:
        return self.ca / "ca-bundle.pem"


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Cas:
    base = tmp_path_factory.mktemp("keystore-tls")
    return Cas(ca_store.init_ca(base / "ca").dir, ca_store.init_ca(base / "other").dir)


def device_dir(cas: Cas, target: Path, device_id: str, store: KeyStore) -> Path:
    """A device directory as ``ztagent enroll`` leaves it, the key made in ``store``."""
    target.mkdir(parents=True)
    cert = ca_store.issue_device_for_key(cas.ca, device_id, store.public_key())
    issuing = (cas.ca / "issuing-ca.pem").read_bytes()
    (target / "device.pem").write_bytes(cert_pem(cert) + issuing)
    shutil.copy(cas.bundle, target / "ca-bundle.pem")
    (target / "keystore.json").write_text(json.dumps(store.record()))
    (target / "enrollment.json").write_text(json.dumps({"version": 1, "device_id": device_id}))
    store.close()
    return target


@dataclass
class Device:
    dir: Path
    kind: str
    swtpm: SwtpmProcess | None = None

    @property
    def cert(self) -> Path:
        return self.dir / "device.pem"

    @property
    def key_store(self) -> Path:
        return self.dir / "keystore.json"


@pytest.fixture(params=["pkcs11", "tpm"])
def device(
    request: pytest.FixtureRequest, cas: Cas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Device]:
    if request.param == "pkcs11":
        hsm: SoftHsm = request.getfixturevalue("softhsm")
        monkeypatch.setenv("ZTAGENT_PKCS11_PIN", hsm.pin)
        store = Pkcs11KeyStore.create(hsm.module, hsm.token_label, hsm.pin, "device")
        yield Device(device_dir(cas, tmp_path / "dev", "hsm-dev", store), "pkcs11")
        return
    proc = start_swtpm(tmp_path / "tpm")
    try:
        tpm_store = TpmKeyStore.create(DeviceTpm(proc.tcti))
        yield Device(device_dir(cas, tmp_path / "dev", "tpm-dev", tpm_store), "tpm", proc)
    finally:
        proc.stop()


def server_pair(ca: Path, out: Path, names: list[str]) -> tuple[Path, Path]:
    """A serverAuth certificate for ``names`` (DNS) from ``ca``'s issuing CA."""
    issuing = ca_store.load_issuing(ca_store.CaLayout(ca))
    now = datetime.now(UTC)
    pair = build_leaf(
        issuing, subject_cn=names[0], uris=[], eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=1), dns=names,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.pem").write_bytes(cert_pem(pair.cert, issuing.cert))
    (out / "server.key").write_bytes(key_pem(pair.key))
    return out / "server.pem", out / "server.key"


# --- an HTTPS collector that requires client certificates (OpenSSL) ---------------------------


@dataclass
class Collector:
    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)


@contextlib.contextmanager
def collector(server_cert: Path, server_key: Path, client_ca: Path) -> Iterator[Collector]:
    state = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            state.peers.append(dict(x[0] for x in peer["subject"])["commonName"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(server_cert, server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_ca)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"https://127.0.0.1:{server.server_address[1]}/logs"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_decisions(path: Path, count: int) -> None:
    from tests.integration.test_upload_decision_logs import _write

    _write(path, 0, count)


# --- bundle download (nginx, ssl_verify_client on) -------------------------------------------


def fetcher(url: str, dest: Path, device: Device, ca_bundle: Path) -> BundleFetcher:
    return BundleFetcher(
        url, dest, lambda _p: "rev-1", ca_bundle=ca_bundle,
        client_cert=(device.cert, device.key_store), timeout_s=10,
    )  # fmt: skip


async def test_bundle_download_with_the_key_in_its_store(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    tls = NginxTls(cas.ca / "server.pem", cas.ca / "server.key", client_ca=cas.bundle)
    with nginx_server(tls=tls) as nginx:
        nginx.publish("bundle.tar.gz", BUNDLE)
        dest = tmp_path / "node" / "bundle.tar.gz"
        f = fetcher(nginx.url("bundle.tar.gz"), dest, device, cas.bundle)
        assert await f.fetch_once(), f.health()
        assert dest.read_bytes() == BUNDLE
        assert not await f.fetch_once()  # 304 over a new connection, signed again
        assert nginx.statuses("/bundle.tar.gz") == [200, 304]
        assert f.health().ok and f.health().revision == "rev-1"


async def test_bundle_server_with_a_certificate_from_another_ca_gets_nothing(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    tls = NginxTls(cas.other / "server.pem", cas.other / "server.key", client_ca=cas.bundle)
    with nginx_server(tls=tls) as nginx:
        nginx.publish("bundle.tar.gz", BUNDLE)
        dest = tmp_path / "bundle.tar.gz"
        f = fetcher(nginx.url("bundle.tar.gz"), dest, device, cas.bundle)
        assert not await f.fetch_once()
        error = f.health().last_error or ""
        assert error.startswith("tls_server_untrusted: the certificate of 127.0.0.1"), error
        assert nginx.statuses("/bundle.tar.gz") == []  # no request reached it
        assert not dest.exists()


async def test_bundle_server_wanting_a_client_certificate_from_another_ca_refuses(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    other_bundle = cas.other / "ca-bundle.pem"
    tls = NginxTls(cas.ca / "server.pem", cas.ca / "server.key", client_ca=other_bundle)
    with nginx_server(tls=tls) as nginx:
        nginx.publish("bundle.tar.gz", BUNDLE)
        f = fetcher(nginx.url("bundle.tar.gz"), tmp_path / "b.tar.gz", device, cas.bundle)
        assert not await f.fetch_once()
        # nginx checks the client certificate after the handshake and answers 400
        assert f.health().last_error == (
            f"bundle_unavailable: GET {nginx.url('bundle.tar.gz')}: HTTP 400 (expected 200 or 304)"
        )
        assert nginx.statuses("/bundle.tar.gz") == [400]


@pytest.mark.parametrize("device", ["pkcs11"], indirect=True)  # a TPM key needs no PIN
def test_a_pkcs11_key_without_a_pin_is_a_configuration_error(
    cas: Cas, device: Device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZTAGENT_PKCS11_PIN")
    with pytest.raises(ConfigError, match="needs a PIN: set ZTAGENT_PKCS11_PIN") as info:
        fetcher("https://127.0.0.1:1/b.tar.gz", tmp_path / "b", device, cas.bundle)
    assert info.value.key == "policy.bundle_client_key"
    with pytest.raises(ConfigError, match="bundle_ca_bundle: is required") as info:
        monkeypatch.setenv("ZTAGENT_PKCS11_PIN", "1234")
        BundleFetcher(
            "https://127.0.0.1:1/b", tmp_path / "b", lambda _p: "r",
            client_cert=(device.cert, device.key_store),
        )  # fmt: skip


# --- decision-log upload (a collector requiring client certificates) -------------------------


def test_decision_logs_posted_with_the_key_in_its_store(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    write_decisions(log, 30)
    with collector(cas.ca / "server.pem", cas.ca / "server.key", cas.bundle) as c:
        settings = ShipperSettings(
            c.url, ca_bundle=cas.bundle, client_cert=(device.cert, device.key_store),
            batch_max_age_s=0, batch_max_bytes=4096,
        )  # fmt: skip
        shipper = DecisionLogShipper(log, settings, version="t")
        while shipper.ship_once(force=True):
            pass
    assert shipper.stats.delivered == len(log.read_text().splitlines())
    assert len(c.bodies) == shipper.stats.batches > 1
    assert set(c.peers) == {"hsm-dev" if device.kind == "pkcs11" else "tpm-dev"}


def test_a_collector_wanting_a_client_certificate_from_another_ca_refuses(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.jsonl"
    write_decisions(log, 3)
    other = cas.other / "ca-bundle.pem"
    with collector(cas.ca / "server.pem", cas.ca / "server.key", other) as c:
        settings = ShipperSettings(
            c.url, ca_bundle=cas.bundle, client_cert=(device.cert, device.key_store),
            batch_max_age_s=0,
        )  # fmt: skip
        shipper = DecisionLogShipper(log, settings, version="t")
        with pytest.raises(TransportError) as info:
            shipper.ship_once(force=True)
    # TLS 1.3: the server checks our certificate after our Finished, so its refusal is an
    # alert where the answer should be (tls_handshake_refused) or, when OpenSSL's reset
    # overtakes the alert, a reset connection (upload_unavailable); never a delivery
    err = info.value
    assert err.code in ("tls_handshake_refused", "upload_unavailable"), err
    if err.code == "tls_handshake_refused":
        assert err.received in ("unknown_ca", "bad_certificate", "certificate_unknown")
    assert c.bodies == [] and shipper.stats.delivered == 0
    assert shipper.pending()[0]  # the spool (the log) is untouched, sent again later


# --- MQTT (mosquitto, require_certificate true) ----------------------------------------------


def put_record(data: Path) -> None:
    store = Store.open(data)
    doc = {"device_id": "cam-1", "decision_id": "d-1", "model": "m"}
    store.put("cam-1", "outbox/m/20261201T000000.000000Z-000001", json.dumps(doc).encode())
    store.close()


def outbox_left(data: Path) -> int:
    store = Store.open(data)
    try:
        return len(store.list_keys("cam-1", "outbox/", 100).keys)
    finally:
        store.close()


def test_mqtt_record_published_with_the_key_in_its_store(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    put_record(tmp_path / "storage")
    broker = MosquittoBroker(tmp_path / "broker", server_dir=cas.ca, client_ca=cas.bundle)
    broker.start()
    sub_cert = tmp_path / "cloud" / "sub.pem"
    ca_store.issue_device_cert(cas.ca, "cloud-sub", sub_cert)
    sub = Subscriber(
        broker.port, client_context(cas.bundle, sub_cert, sub_cert.with_suffix(".key")),
        topic="ztagent/#",
    ).start()  # fmt: skip
    try:
        config = parse_mqtt_config(
            {"mqtt_url": broker.url, "device_dir": str(device.dir),
             "storage_data_dir": str(tmp_path / "storage"), "node_id": "n1"},
            tmp_path,
        )  # fmt: skip
        assert isinstance(tls_context(config), KeystoreTlsClient)
        shipper = OutboxShipper.open(config)
        try:
            assert shipper.ship_once() == 1  # PUBACK received
        finally:
            shipper.close()
        docs = sub.wait_for(1)
        assert [d["id"] for d in docs] == ["cam-1/outbox/m/20261201T000000.000000Z-000001"]
        assert outbox_left(tmp_path / "storage") == 0  # removed after the PUBACK
        device_id = "hsm-dev" if device.kind == "pkcs11" else "tpm-dev"
        assert f"as {device_id}" in broker.log_text() or f"u'{device_id}'" in broker.log_text()
    finally:
        sub.stop()
        broker.stop()


@pytest.mark.parametrize("wrong", ["server_ca", "client_ca"])
def test_mqtt_broker_of_another_ca_or_wanting_another_client_ca_is_refused(
    cas: Cas, device: Device, tmp_path: Path, wrong: str
) -> None:
    put_record(tmp_path / "storage")
    server_dir = cas.other if wrong == "server_ca" else cas.ca
    client_ca = cas.other / "ca-bundle.pem" if wrong == "client_ca" else cas.bundle
    broker = MosquittoBroker(tmp_path / "broker", server_dir=server_dir, client_ca=client_ca)
    broker.start()
    try:
        config = parse_mqtt_config(
            {"mqtt_url": broker.url, "device_dir": str(device.dir),
             "storage_data_dir": str(tmp_path / "storage")},
            tmp_path,
        )  # fmt: skip
        shipper = OutboxShipper.open(config)
        try:
            with pytest.raises(MqttError) as info:
                shipper.ship_once()
        finally:
            shipper.close()
    finally:
        broker.stop()
    err = info.value
    if wrong == "server_ca":  # refused by us, before our certificate is sent
        assert err.code == "broker_tls_failed", err
        assert err.message.startswith(f"{broker.url}: tls_server_untrusted: "), err
    elif err.code == "broker_tls_failed":  # the broker's alert (TLS 1.3: after our Finished)
        assert err.message.startswith(f"{broker.url}: tls_handshake_refused: "), err
    else:  # the broker's reset overtook its alert: at the handshake's end, or before CONNACK
        assert err.code in ("broker_unreachable", "connection_lost"), err
    assert outbox_left(tmp_path / "storage") == 1  # nothing deleted, sent again later


# --- the server's name, a key store that cannot sign -----------------------------------------


@contextlib.contextmanager
def tls_server(cert: Path, key: Path, client_ca: Path) -> Iterator[tuple[int, list[bytes]]]:
    """One-connection TLS 1.3 server (OpenSSL) recording what it received."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_ca)

    def serve() -> None:
        listener.settimeout(10)
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        try:
            with context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(5)
                received.append(conn.recv(100))
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        listener.close()
        thread.join(10)


def test_a_server_certificate_for_another_name_is_refused_before_anything_is_sent(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    cert, key = server_pair(cas.ca, tmp_path / "srv", ["collector.example"])
    client = KeystoreTlsClient(
        cas.bundle.read_bytes(), DeviceIdentity(device.cert, device.key_store, "1234")
    )
    with tls_server(cert, key, cas.bundle) as (port, received), pytest.raises(TlsError) as info:
        client.connect("127.0.0.1", port, 5)
    assert info.value.code == "tls_server_name_mismatch"
    assert info.value.message == (
        "the certificate of 127.0.0.1 (CN=collector.example,O=ztagent) is for "
        "collector.example (expected 127.0.0.1)"
    )
    assert received in ([], [b""])  # no application byte, no client certificate sent


def test_a_key_store_that_cannot_sign_is_a_clear_error(
    cas: Cas, device: Device, tmp_path: Path
) -> None:
    if device.kind == "pkcs11":  # the key removed from the token
        record = json.loads(device.key_store.read_text())
        lib = pkcs11.lib(record["module"])
        with lib.get_token(token_label="ztagent-test").open(rw=True, user_pin="1234") as s:
            for obj in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                obj.destroy()
        why = "keystore_key_missing"
    else:  # the TPM gone
        assert device.swtpm is not None
        device.swtpm.stop()
        why = "keystore_unavailable"
    client = KeystoreTlsClient(
        cas.bundle.read_bytes(), DeviceIdentity(device.cert, device.key_store, "1234")
    )
    server = tls_server(cas.ca / "server.pem", cas.ca / "server.key", cas.bundle)
    with server as (port, got), pytest.raises(TlsError) as info:
        client.connect("127.0.0.1", port, 5)
    assert info.value.code == "tls_signing_failed"
    assert info.value.message.startswith(f"the key store of {device.cert}: {why}: ")
    assert got in ([], [b""])
