"""One MQTT v5 connection over TLS 1.3 with a client certificate (paho-mqtt, no threads).

The TLS is Python's ``ssl`` (an ``SSLContext``: a key file) or a ``KeystoreTlsClient`` (a
PKCS#11 or TPM key signing where it is kept; paho then drives a ``PahoTlsSocket``). A TLS
failure of the latter is ``broker_tls_failed`` whose message starts with its ``tls_*`` code.

``MqttLink`` drives a paho ``Client`` from the caller's thread (``loop()``, never
``loop_start()``): ``connect()`` waits for the CONNACK, ``publish_acked()`` sends QoS 1
messages with a window in flight and reports each one only when its PUBACK arrived with a
success reason code. Anything else — no TCP connection, a refused certificate on either
side, a CONNACK or PUBACK with a failure reason, silence past the timeout, a dropped
connection — raises ``MqttError`` and leaves the link closed; the caller decides when to
connect again. Every link is a new paho client with a clean start, so nothing from an
earlier connection is silently re-sent.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from ztagent.device.errors import TlsError
from ztagent.device.keystore_tls import KeystoreTlsClient, PahoTlsSocket
from ztagent.errors import TransportError

KEEPALIVE_S = 60
"""MQTT keepalive; the shipper services the link at least every ``poll_interval_s``."""
LOOP_STEP_S = 0.05


class MqttCode(StrEnum):
    BROKER_UNREACHABLE = "broker_unreachable"
    BROKER_TLS_FAILED = "broker_tls_failed"
    BROKER_REFUSED = "broker_refused"
    CONNECTION_LOST = "connection_lost"
    PUBLISH_REFUSED = "publish_refused"
    PUBLISH_TIMEOUT = "publish_timeout"


class MqttError(TransportError):
    """The broker could not be reached, refused us, or did not acknowledge in time."""

    codes: ClassVar[frozenset[str] | None] = frozenset(MqttCode)


@dataclass(frozen=True)
class Broker:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtts://{host}:{self.port}"


class _KeystoreClient(paho.Client):
    """A paho client whose socket is a TLS 1.3 connection made by a ``KeystoreTlsClient``
    (paho's own TLS is not used)."""

    def __init__(self, tls: KeystoreTlsClient, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ztagent_tls = tls

    def _create_socket(self) -> Any:
        conn = self._ztagent_tls.connect(self._host, self._port, self._connect_timeout)
        return PahoTlsSocket(conn, self._connect_timeout)


class MqttLink:
    """A connection to ``broker`` as ``client_id`` with the TLS settings of ``context``."""

    def __init__(
        self,
        broker: Broker,
        context: ssl.SSLContext | KeystoreTlsClient,
        client_id: str,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self._context = context
        self._client_id = client_id
        self._timeout_s = timeout_s
        self._clock = clock
        self._client: paho.Client | None = None
        self._connack: ReasonCode | None = None
        self._lost: str | None = None
        self._acks: list[tuple[int, ReasonCode]] = []

    @property
    def connected(self) -> bool:
        return self._client is not None and self._lost is None

    def _fail(self, code: MqttCode, message: str) -> MqttError:
        self.close()
        return MqttError(code, f"{self.broker}: {message}")

    # --- callbacks (run inside loop(), on the caller's thread) ---------------------------

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connack = reason

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._lost = str(reason)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self._acks.append((mid, reason))

    # --- connecting ----------------------------------------------------------------------

    def connect(self) -> None:
        """Opens the connection and waits for a successful CONNACK."""
        self.close()
        client: paho.Client
        if isinstance(self._context, KeystoreTlsClient):
            client = _KeystoreClient(
                self._context,
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
            )
            client.tls_set_context(self._context)
        client.connect_timeout = self._timeout_s
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._connack, self._lost, self._acks = None, None, []
        try:
            client.connect(self.broker.host, self.broker.port, KEEPALIVE_S, clean_start=True)
        except TlsError as err:
            _release(client)
            raise MqttError(MqttCode.BROKER_TLS_FAILED, f"{self.broker}: {err}") from None
        except ssl.SSLCertVerificationError as exc:
            _release(client)
            raise MqttError(
                MqttCode.BROKER_TLS_FAILED,
                f"{self.broker}: server certificate refused: {exc.verify_message}",
            ) from None
        except ssl.SSLError as exc:
            _release(client)
            raise MqttError(
                MqttCode.BROKER_TLS_FAILED, f"{self.broker}: TLS handshake failed: {exc}"
            ) from None
        except (OSError, ValueError) as exc:
            sock = client.socket()
            _release(client)
            if isinstance(sock, PahoTlsSocket) and sock.refusal is not None:
                raise MqttError(
                    MqttCode.BROKER_TLS_FAILED, f"{self.broker}: {sock.refusal}"
                ) from None
            raise MqttError(
                MqttCode.BROKER_UNREACHABLE, f"{self.broker}: {type(exc).__name__}: {exc}"
            ) from None
        self._client = client
        sock = client.socket()
        deadline = self._clock() + self._timeout_s
        while self._connack is None:
            try:
                self._step("waiting for CONNACK")
            except MqttError:
                if isinstance(sock, PahoTlsSocket) and sock.refusal is not None:
                    raise MqttError(
                        MqttCode.BROKER_TLS_FAILED, f"{self.broker}: {sock.refusal}"
                    ) from None
                raise
            if self._clock() > deadline:
                raise self._fail(
                    MqttCode.BROKER_REFUSED, f"no CONNACK within {self._timeout_s:.0f} s"
                )
        if self._connack.is_failure:
            raise self._fail(MqttCode.BROKER_REFUSED, f"CONNACK refused: {self._connack}")

    def _step(self, doing: str, timeout: float = LOOP_STEP_S) -> None:
        client = self._client
        if client is None:
            raise MqttError(MqttCode.CONNECTION_LOST, f"{self.broker}: not connected")
        rc = client.loop(timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._lost is not None:
            why = self._lost or paho.error_string(rc)
            raise self._fail(MqttCode.CONNECTION_LOST, f"connection lost {doing}: {why}")

    def service(self) -> None:
        """Handles pending network traffic (keepalive pings) without waiting."""
        self._step("while idle", 0.0)

    # --- publishing ----------------------------------------------------------------------

    def publish_acked(
        self,
        messages: Sequence[tuple[str, bytes]],
        on_acked: Callable[[int], None],
        *,
        window: int = 32,
    ) -> None:
        """Publishes ``messages`` (topic, payload) with QoS 1 in order, at most ``window``
        unacknowledged, and calls ``on_acked(i)`` for message ``i`` once its PUBACK arrived.
        Raises ``MqttError`` (after reporting what was acknowledged) on a failure reason,
        a lost connection or ``timeout_s`` without progress."""
        client = self._client
        if client is None:
            raise MqttError(MqttCode.CONNECTION_LOST, f"{self.broker}: not connected")
        by_mid: dict[int, int] = {}
        sent = done = 0
        last_progress = self._clock()
        while done < len(messages):
            while sent < len(messages) and sent - done < window:
                topic, payload = messages[sent]
                info = client.publish(topic, payload, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    raise self._fail(
                        MqttCode.CONNECTION_LOST, f"publish failed: {paho.error_string(info.rc)}"
                    )
                by_mid[info.mid] = sent
                sent += 1
            self._step("waiting for PUBACK")
            acks, self._acks = self._acks, []
            for mid, reason in acks:
                index = by_mid.pop(mid, None)
                if index is None:
                    continue
                if reason.is_failure:
                    topic = messages[index][0]
                    raise self._fail(
                        MqttCode.PUBLISH_REFUSED, f"PUBACK for {topic!r} refused: {reason}"
                    )
                on_acked(index)
                done += 1
                last_progress = self._clock()
            if self._clock() - last_progress > self._timeout_s:
                raise self._fail(
                    MqttCode.PUBLISH_TIMEOUT,
                    f"{len(by_mid)} PUBACKs missing after {self._timeout_s:.0f} s",
                )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._lost is None:
                client.disconnect()
                client.loop(0.0)
        except (OSError, ValueError):
            pass
        finally:
            _release(client)


def _release(client: paho.Client) -> None:
    """Closes the client's socket and its wake-up socket pair (paho keeps them otherwise)."""
    client._reset_sockets()
