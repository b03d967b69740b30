"""DEVELOPMENT ONLY: the MQTT half of ``make run``'s upstream: a Mosquitto broker on
loopback (TLS 1.3, client certificates required, the dev PKI) and a subscriber standing in
for the cloud, so the demo shows an escalation leaving the node through ``ztagent ship``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_installed() -> bool:
    return Path(MOSQUITTO).exists() or shutil.which("mosquitto") is not None


@contextlib.contextmanager
def broker(port: int, ca_dir: Path, log_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto on 127.0.0.1:``port`` with ``ca_dir``'s server certificate, requiring a
    client certificate from ``ca_dir``'s CA bundle; stopped by its PID."""
    base = Path(tempfile.mkdtemp(prefix="ztagent-demo-mqtt-"))
    conf = base / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""{user}per_listener_settings false
allow_anonymous false
persistence false
log_dest file {log_file}
listener {port} 127.0.0.1
cafile {ca_dir / "ca-bundle.pem"}
certfile {ca_dir / "server.pem"}
keyfile {ca_dir / "server.key"}
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
"""
    )
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or MOSQUITTO, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(base, ignore_errors=True)


class Subscriber:
    """The cloud side: a paho client with its own device certificate, QoS 1, collecting
    every message on ``topic``."""

    def __init__(self, port: int, ca_bundle: Path, cert: Path, key: Path, topic: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="ztagent-demo-cloud")
        context = ssl.create_default_context(cafile=str(ca_bundle))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(str(cert), str(key))
        client.tls_set_context(context)

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            c.subscribe(topic, qos=1)
            self._ready.set()

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            with contextlib.suppress(ValueError), self._lock:
                self.messages.append(json.loads(message.payload))

        client.on_connect = on_connect
        client.on_message = on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self._client = client

    def wait_ready(self, limit_s: float = 10.0) -> bool:
        return self._ready.wait(limit_s)

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
