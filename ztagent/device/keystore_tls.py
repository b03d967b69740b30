"""TLS 1.3 client connections whose handshake is signed by the device's key store, for the
HTTPS and MQTT clients (bundle download, decision-log upload, the MQTT outbox).

Python's ``ssl`` needs the private key as a file; a PKCS#11 or TPM key never leaves its
store. Here the TLS 1.3 client is tlslite-ng (pure Python, pinned): its ``CertificateVerify``
is signed by ``KeyStore.sign_digest_ecdsa`` (tlslite hands ECDSA keys the SHA-256 digest of
the 130-byte TLS 1.3 signature context and expects the DER ``ECDSA-Sig-Value``, which is
what every store returns). tlslite does not check the server's chain, so this module does,
with ``cryptography.x509.verification`` (chain to the CA bundle, validity, serverAuth EKU,
the dialled host name or IP address in the SAN), as soon as the server's ``Certificate``
message arrives: before our certificate or any application byte is sent. Only TLS 1.3;
no session resumption (every connection is a full handshake).

Errors (``TlsError``): ``tls_server_untrusted``, ``tls_server_name_mismatch``,
``tls_handshake_refused`` (an alert from the server, e.g. our certificate is not from its
CA, or no TLS 1.3), ``tls_signing_failed`` (the store could not sign). A TCP failure or a
timeout stays an ``OSError``, as with ``ssl``, so each client reports it as unreachable.

``DeviceIdentity`` is the node's certificate chain and the store its ``keystore.json``
names, re-read at every connection (a renewal, with or without a new key, applies at the next
one). ``KeystoreHTTPSHandler`` plugs a client into ``urllib``; ``PahoTlsSocket`` is the
socket paho-mqtt drives (non-blocking reads, as paho expects).
"""

from __future__ import annotations

import errno
import functools
import http.client
import ipaddress
import logging
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from tlslite import HandshakeSettings, TLSConnection, X509CertChain
from tlslite.constants import AlertDescription, CipherSuite
from tlslite.errors import TLSAbruptCloseError, TLSError, TLSLocalAlert, TLSRemoteAlert
from tlslite.utils.ecdsakey import ECDSAKey

from ztagent import json_input
from ztagent.device.errors import TlsError
from ztagent.device.keystores import PIN_ENV, KeyStore, KeyStoreError, open_key_store
from ztagent.errors import ConfigError, ZtagentError

log = logging.getLogger("ztagent.device.tls")

TLS13 = (3, 4)
READ_MAX = 1 << 20
"""Plaintext bytes one read may return (a TLS record holds at most 16 KiB)."""
ALERT_WAIT_S = 0.5
"""After a failed write, how long to look for the server's alert saying why."""


# --- the identity ----------------------------------------------------------------------------


def read_key_store_record(path: Path) -> dict[str, Any]:
    """A ``keystore.json`` (what ``ztagent enroll`` wrote: which store holds the key)."""
    try:
        doc = json_input.loads(path.read_bytes(), max_depth=None)
    except (OSError, ValueError) as exc:
        raise KeyStoreError("keystore_failed", f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise KeyStoreError("keystore_failed", f"{path}: expected an object with a type")
    return doc


def client_key_source(
    cert: Path, key: Path, *, key_name: str, pin: str | None = None
) -> Path | DeviceIdentity:
    """Where the client key of ``cert`` is: ``key`` is a PEM key file (returned as is, for
    Python's ``ssl``) or a device directory's ``keystore.json`` (``*.json``): a file store
    there gives its ``.key`` file beside ``cert``; a PKCS#11 or TPM store a
    ``DeviceIdentity`` that signs there. ``ConfigError`` naming ``key_name`` when the record
    cannot be read."""
    if key.suffix != ".json":
        return key
    try:
        kind = read_key_store_record(key)["type"]
    except KeyStoreError as err:
        raise ConfigError(key_name, err.message) from None
    if kind == "file":
        return cert.with_suffix(".key")
    if kind == "pkcs11" and not pin:
        raise ConfigError(
            key_name, f"{key} names a PKCS#11 token, which needs a PIN: set {PIN_ENV}"
        )
    return DeviceIdentity(cert, key, pin)


class DeviceIdentity:
    """``cert`` (PEM chain, leaf first) with the key the ``keystore.json`` at ``record``
    names; both re-read at every ``current()`` (a renewal applies at the next connection),
    the store reopened only when the record changes. ``pin``: the PKCS#11 user PIN."""

    def __init__(self, cert: Path, record: Path, pin: str | None = None) -> None:
        self.cert = cert
        self.record_path = record
        self._pin = pin
        self._lock = threading.Lock()
        self._record: dict[str, Any] | None = None
        self._store: KeyStore | None = None

    def current(self) -> tuple[bytes, KeyStore]:
        record = read_key_store_record(self.record_path)
        try:
            chain = self.cert.read_bytes()
        except OSError as exc:
            raise KeyStoreError(
                "keystore_failed", f"cannot read {self.cert}: {exc.strerror}"
            ) from None
        with self._lock:
            if self._store is None or record != self._record:
                if self._store is not None:
                    self._store.close()
                self._store = open_key_store(record, self.cert.with_suffix(".key"), self._pin)
                self._record = record
            return chain, self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
            self._store, self._record = None, None


class _StoreKey(ECDSAKey):  # type: ignore[misc]
    """The tlslite view of a key store's P-256 key: signs through the store, verifies (its
    own signature, as tlslite checks) with the public key."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._public = store.public_key()
        self.curve_name = "NIST256p"
        self.key_type = "ecdsa"
        self.failure: ZtagentError | None = None

    def __len__(self) -> int:
        return 256

    def hasPrivateKey(self) -> bool:
        return True

    def _sign(self, data: bytearray, hash_alg: str) -> bytearray:
        if hash_alg != "sha256" or len(data) != 32:
            raise TlsError(
                "tls_signing_failed",
                f"the handshake asked for {hash_alg} over {len(data)} bytes (expected a "
                "SHA-256 digest: ecdsa_secp256r1_sha256)",
            )
        try:
            return bytearray(self._store.sign_digest_ecdsa(bytes(data)))
        except ZtagentError as err:
            self.failure = TlsError(
                "tls_signing_failed", f"{self._store.description()} could not sign: {err}"
            )
            raise self.failure from None

    def _verify(self, signature: bytearray, hash_bytes: bytearray) -> bool:
        try:
            self._public.verify(
                bytes(signature), bytes(hash_bytes), ec.ECDSA(Prehashed(hashes.SHA256()))
            )
        except InvalidSignature:
            return False
        return True


# --- the server's certificate ----------------------------------------------------------------


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _own_name(leaf: x509.Certificate) -> x509.DNSName | x509.IPAddress | None:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san:
        if isinstance(name, x509.DNSName | x509.IPAddress):
            return name
    return None


def verify_server_chain(
    host: str, chain_der: list[bytes], roots: list[x509.Certificate], now: datetime
) -> None:
    """The server's chain (leaf first) verifies to ``roots`` for ``host`` at ``now``:
    ``tls_server_untrusted`` or ``tls_server_name_mismatch`` (a chain that verifies for a
    name of its own but not for ``host``)."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        raise TlsError("tls_server_untrusted", f"{host}: unreadable certificate: {exc}") from None
    if not certs:
        raise TlsError("tls_server_untrusted", f"{host}: the server sent no certificate")
    leaf, intermediates = certs[0], certs[1:]
    builder = PolicyBuilder().store(Store(roots)).time(now)
    try:
        builder.build_server_verifier(_subject(host)).verify(leaf, intermediates)
        return
    except VerificationError as exc:
        reason = str(exc)
    subject = leaf.subject.rfc4514_string()
    own = _own_name(leaf)
    if own is not None:
        try:
            builder.build_server_verifier(own).verify(leaf, intermediates)
        except VerificationError:
            pass
        else:
            names = _san_names(leaf)
            raise TlsError(
                "tls_server_name_mismatch",
                f"the certificate of {host} ({subject}) is for {', '.join(names)} "
                f"(expected {host})",
                received=names,
                expected=host,
            )
    raise TlsError(
        "tls_server_untrusted",
        f"the certificate of {host} ({subject}, issued by {leaf.issuer.rfc4514_string()}) "
        f"does not verify to the CA bundle: {reason}",
    )


def _san_names(leaf: x509.Certificate) -> list[str]:
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress)]


# --- record encryption ------------------------------------------------------------------------


class _Aead:
    """tlslite's AEAD interface (``seal`` / ``open``, None on a bad tag) over
    ``cryptography``'s AES-GCM or ChaCha20-Poly1305 (OpenSSL): tlslite's own are pure
    Python (about 2.9 s per MiB here) unless M2Crypto or pycryptodome is installed, and even
    then GHASH stays in Python."""

    isBlockCipher = False
    isAEAD = True
    nonceLength = 12
    tagLength = 16
    implementation = "openssl"

    def __init__(self, name: str, cipher: AESGCM | ChaCha20Poly1305, key: bytearray) -> None:
        self.name = name
        self.key = key
        self._cipher = cipher

    def seal(self, nonce: bytearray, plaintext: bytearray, data: bytearray) -> bytearray:
        return bytearray(self._cipher.encrypt(bytes(nonce), bytes(plaintext), bytes(data)))

    def open(self, nonce: bytearray, ciphertext: bytearray, data: bytearray) -> bytearray | None:
        try:
            return bytearray(self._cipher.decrypt(bytes(nonce), bytes(ciphertext), bytes(data)))
        except InvalidTag:
            return None


def _aes_gcm(key: bytearray, _implementations: object) -> _Aead:
    return _Aead("aes256gcm" if len(key) == 32 else "aes128gcm", AESGCM(bytes(key)), key)


def _chacha20(key: bytearray, _implementations: object) -> _Aead:
    return _Aead("chacha20-poly1305", ChaCha20Poly1305(bytes(key)), key)


def _cipher_settings(cipher_suite: int) -> tuple[int, int, Callable[..., _Aead]]:
    """``RecordLayer._getCipherSettings`` for the TLS 1.3 suites (key length, IV length,
    factory); anything else is refused."""
    if cipher_suite in CipherSuite.aes256GcmSuites:
        return 32, 4, _aes_gcm
    if cipher_suite in CipherSuite.aes128GcmSuites:
        return 16, 4, _aes_gcm
    if cipher_suite in CipherSuite.chacha20Suites:
        return 32, 12, _chacha20
    raise ValueError(f"cipher suite 0x{cipher_suite:04x} is not a TLS 1.3 AEAD suite offered")


class _CheckedConnection(TLSConnection):  # type: ignore[misc]
    """A tlslite client connection that verifies the server's chain the moment it arrives
    (before it answers the server's CertificateRequest), its records sealed by
    ``cryptography``."""

    def __init__(self, sock: socket.socket, check: Callable[[list[bytes]], None]) -> None:
        super().__init__(sock)
        # an instance attribute: only this connection's record layer, tlslite itself unchanged
        self._recordLayer._getCipherSettings = _cipher_settings
        self._check = check
        self.refusal: ZtagentError | None = None
        self.server_checked = False

    def _clientGetKeyFromChain(
        self, certificate: Any, settings: Any, tack_ext: Any = None
    ) -> Iterator[Any]:
        result: Any = None
        for result in super()._clientGetKeyFromChain(certificate, settings, tack_ext):
            if result in (0, 1):
                yield result
            else:
                break
        _public, chain, _tack = result
        try:
            self._check([bytes(c.bytes) for c in chain.x509List])
        except TlsError as err:
            self.refusal = err
            alert = (
                AlertDescription.bad_certificate
                if err.code == "tls_server_name_mismatch"
                else AlertDescription.unknown_ca
            )
            yield from self._sendError(alert, err.message)
        self.server_checked = True
        yield result

    # After the handshake (http.client reads and writes through these, blocking): the
    # server's verdict on our certificate comes as an alert on the first read in TLS 1.3.
    def read(self, max: int | None = None, min: int = 1) -> bytearray:
        if max == 0:  # http.client reads 0 bytes of an empty body: a socket returns at once
            return bytearray()
        try:
            data: bytearray = super().read(max, min)
        except TLSAbruptCloseError:  # EOF without close_notify, as ssl's suppress_ragged_eofs
            return bytearray()
        except TLSRemoteAlert as exc:
            raise after_handshake_refusal(exc) from None
        except TLSError as exc:
            raise ConnectionError(f"TLS: {type(exc).__name__}: {exc}") from None
        return data

    def recv_into(self, b: bytearray | memoryview) -> int:
        """As a socket's (tlslite's returns None at the end of the stream, which
        ``SocketIO`` takes for "would block")."""
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def write(self, s: bytes) -> None:
        try:
            super().write(s)
        except TLSRemoteAlert as exc:
            raise after_handshake_refusal(exc) from None
        except TLSError as exc:
            raise ConnectionError(f"TLS: {type(exc).__name__}: {exc}") from None
        except (BrokenPipeError, ConnectionResetError):
            # a server that refused our certificate sent an alert and closed; our write
            # then fails first: read the alert if it is still there (bounded), else as is
            alert = self._pending_alert()
            if alert is not None:
                raise after_handshake_refusal(alert) from None
            raise

    def _pending_alert(self) -> TLSRemoteAlert | None:
        raw: socket.socket = getattr(self.sock, "socket", None) or self.sock
        try:
            raw.settimeout(ALERT_WAIT_S)
            for _ in super().readAsync(READ_MAX, 1):
                pass
        except TLSRemoteAlert as alert:
            return alert
        except (TLSError, OSError, ValueError):
            return None
        return None


def after_handshake_refusal(alert: TLSRemoteAlert) -> TlsError:
    """An alert in place of the first answer: the server refused our certificate (TLS 1.3
    servers check it after the client's Finished)."""
    return TlsError(
        "tls_handshake_refused",
        f"the server ended the connection with alert {alert} (it did not accept this "
        "device's certificate, or ended the session)",
        received=str(alert),
    )


# --- connecting ------------------------------------------------------------------------------


def keystore_client(
    ca_bundle: Path | None, identity: DeviceIdentity, *, ca_key: str
) -> KeystoreTlsClient:
    """The client presenting ``identity``, its servers checked against ``ca_bundle``: required,
    since a key-store identity's servers are never checked against the system trust store.
    ``ConfigError`` naming ``ca_key``."""
    if ca_bundle is None:
        raise ConfigError(
            ca_key,
            "is required with a PKCS#11 or TPM client key (the server is checked against it, "
            "not the system trust store)",
        )
    try:
        return KeystoreTlsClient(ca_bundle.read_bytes(), identity)
    except OSError as exc:
        raise ConfigError(ca_key, f"{ca_bundle}: {exc.strerror}") from None
    except ConfigError as err:
        raise ConfigError(ca_key, f"{ca_bundle}: {err.message}") from None


class KeystoreTlsClient:
    """Opens TLS 1.3 connections presenting ``identity``, the server checked against
    ``ca_bundle_pem`` (PEM certificates: roots, optionally intermediates)."""

    def __init__(
        self,
        ca_bundle_pem: bytes,
        identity: DeviceIdentity,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        try:
            self._roots = x509.load_pem_x509_certificates(ca_bundle_pem)
        except ValueError as exc:
            raise ConfigError("ca_bundle", f"not a PEM certificate bundle: {exc}") from None
        self.identity = identity
        self._clock = clock

    def handshake(self, sock: socket.socket, host: str) -> TLSConnection:
        """TLS 1.3 over the connected ``sock`` (its timeout applies); the connection, or a
        ``TlsError`` (the socket closed) / ``OSError``."""
        try:
            chain_pem, store = self.identity.current()
        except ZtagentError as err:
            sock.close()
            raise TlsError(
                "tls_signing_failed", f"the key store of {self.identity.cert}: {err}"
            ) from None
        try:
            chain = X509CertChain()
            chain.parsePemList(chain_pem.decode("ascii"))
        except (ValueError, SyntaxError, UnicodeDecodeError) as exc:
            sock.close()
            raise TlsError(
                "tls_signing_failed", f"{self.identity.cert}: not a PEM chain ({exc})"
            ) from None
        key = _StoreKey(store)
        now = self._clock()
        conn = _CheckedConnection(
            sock, lambda der: verify_server_chain(host, der, self._roots, now)
        )
        settings = HandshakeSettings()
        settings.minVersion = settings.maxVersion = TLS13
        # tlslite 0.8.2 compresses the client's Certificate when *it* offered compression,
        # whether or not the server's CertificateRequest accepted it; OpenSSL 3.0 (nginx,
        # mosquitto) then aborts with unexpected_message (seen here). Certificates are small.
        settings.certificate_compression_send = []
        settings.certificate_compression_receive = []
        settings.cipherNames = ["aes256gcm", "aes128gcm", "chacha20-poly1305"]
        server_name = None if isinstance(_subject(host), x509.IPAddress) else host
        try:
            conn.handshakeClientCert(chain, key, settings=settings, serverName=server_name)
        except TLSLocalAlert as exc:
            sock.close()
            raise conn.refusal or key.failure or _refused(host, f"{exc}") from None
        except TLSRemoteAlert as exc:
            sock.close()
            raise _refused(host, f"the server sent alert {exc}") from None
        except TLSAbruptCloseError:
            sock.close()
            raise _refused(host, "the server closed the connection during the handshake") from None
        except TLSError as exc:
            sock.close()
            raise key.failure or _refused(host, f"{type(exc).__name__}: {exc}") from None
        except ZtagentError:
            sock.close()
            raise
        except OSError:
            sock.close()
            raise
        if not conn.server_checked:  # e.g. a resumed session (never offered): refuse
            conn.close()
            raise _refused(host, "the server's certificate was not checked")
        return conn

    def connect(self, host: str, port: int, timeout_s: float) -> TLSConnection:
        sock = socket.create_connection((host.strip("[]"), port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.handshake(sock, host)


def _refused(host: str, why: str) -> TlsError:
    return TlsError("tls_handshake_refused", f"{host}: TLS 1.3 handshake refused: {why}")


# --- HTTPS (urllib / http.client) ------------------------------------------------------------


class _KeystoreHTTPSConnection(http.client.HTTPConnection):
    default_port = http.client.HTTPS_PORT

    def __init__(self, host: str, *, client: KeystoreTlsClient, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._client = client

    def connect(self) -> None:
        timeout = self.timeout if isinstance(self.timeout, int | float) else 30.0
        self.sock = self._client.connect(self.host, self.port, timeout)


class KeystoreHTTPSHandler(urllib.request.HTTPSHandler):
    """``https://`` for ``urllib.request`` through ``client`` (``build_opener`` puts it in
    place of the default ``HTTPSHandler``). A ``TlsError`` reaches the caller as it is
    (urllib wraps only ``OSError``s in ``URLError``)."""

    def __init__(self, client: KeystoreTlsClient) -> None:
        super().__init__()
        self._client = client

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_KeystoreHTTPSConnection, client=self._client)
        return self.do_open(factory, req)


# --- MQTT (paho) -----------------------------------------------------------------------------


class PahoTlsSocket:
    """The socket paho-mqtt drives (``recv``, ``send``, ``pending``, ``fileno``,
    ``setblocking``, ``close``) over a tlslite connection. Reads are non-blocking (a partial
    record waits inside tlslite's read generator; paho ``select``s on the TCP socket); a
    write is sent whole, blocking up to ``timeout_s``. TLS failures after the handshake
    become ``ConnectionError`` (paho: connection lost)."""

    def __init__(self, conn: TLSConnection, timeout_s: float) -> None:
        self._conn = conn
        self._timeout_s = timeout_s
        self._reader: Iterator[Any] | None = None
        self._plain = b""
        self.refusal: TlsError | None = None
        """Set when the broker answered with an alert (it refused our certificate)."""

    def _raw(self) -> socket.socket:
        """The TCP socket under tlslite's ``BufferedSocket``."""
        raw: socket.socket = getattr(self._conn.sock, "socket", self._conn.sock)
        return raw

    def fileno(self) -> int:
        return self._raw().fileno()

    def setblocking(self, flag: bool) -> None:
        if flag:
            self._raw().settimeout(self._timeout_s)
        else:
            self._raw().setblocking(False)

    def pending(self) -> int:
        """Plaintext not yet returned plus TCP bytes tlslite already took off the socket
        (its ``BufferedSocket`` reads ahead; ``select`` on the socket would not see them)."""
        ahead = getattr(self._conn.sock, "_read_buffer", b"")
        return len(self._plain) + len(ahead)

    def recv(self, bufsize: int) -> bytes:
        if not self._plain:
            self._plain = self._read()
        out, self._plain = self._plain[:bufsize], self._plain[bufsize:]
        return out

    def _read(self) -> bytes:
        if self._reader is None:
            self._reader = self._conn.readAsync(READ_MAX, 1)
        try:
            result = next(self._reader)
        except StopIteration:  # closed: end of stream
            self._reader = None
            return b""
        except TLSRemoteAlert as exc:
            self._reader = None
            self.refusal = after_handshake_refusal(exc)
            raise ConnectionError(str(self.refusal)) from None
        except (TLSError, ValueError) as exc:
            self._reader = None
            raise ConnectionError(f"TLS: {type(exc).__name__}: {exc}") from None
        if result in (0, 1):
            raise BlockingIOError(errno.EWOULDBLOCK, "TLS record incomplete")
        self._reader = None
        return bytes(result)

    def send(self, data: bytes | bytearray) -> int:
        sock = self._raw()
        sock.settimeout(self._timeout_s)
        try:
            self._conn.write(bytes(data))
        except TlsError as err:
            self.refusal = err
            raise ConnectionError(str(err)) from None
        except (TLSError, ValueError) as exc:
            raise ConnectionError(f"TLS: {type(exc).__name__}: {exc}") from None
        finally:
            sock.setblocking(False)
        return len(data)

    def close(self) -> None:
        sock = self._raw()
        try:
            sock.settimeout(1.0)
            self._conn.close()
        except (TLSError, OSError, ValueError):
            pass
        finally:
            sock.close()
