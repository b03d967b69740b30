"""PKCS#11 keys (an HSM, SoftHSM2 in the tests): the URI, the shared logged-in session, the
non-extractable EC P-256 key pair. Base level, so the device's key stores
(``ztagent.device.keystores``) and the CA's token-held issuing key (``ztagent.ca.ca_keys``)
use one session registry: PKCS#11 login state belongs to the process, so two registries on one
token would fail with ``CKR_USER_ALREADY_LOGGED_IN``.

The private key of a ``Pkcs11KeyStore`` never leaves the token (``CKA_EXTRACTABLE`` false,
``CKA_SENSITIVE`` true): everything that needs it asks the store to sign a SHA-256 digest
(``CKM_ECDSA``; SoftHSM2 has no ``CKM_ECDSA_SHA256``) and gets the DER ``ECDSA-Sig-Value``.

URIs (RFC 7512 subset): ``pkcs11:token=<label>;object=<key label>?module-path=<module>``; may
name ``token`` (label), ``serial``, ``object``, ``id`` (percent-encoded bytes),
``type=private`` and, as a path or query attribute, ``module-path``; anything else is refused,
``pin-value`` included: the PIN never goes into a URI or a file. It comes from ``--pin-file``
or ``ZTAGENT_PKCS11_PIN`` (``resolve_pin``).

Errors: ``ConfigError`` for a bad URI or a missing PIN (exit 2); ``KeyStoreError`` (codes
``keystore_unavailable``, ``keystore_key_missing``, ``keystore_pin_incorrect``,
``keystore_failed``) when the token or key cannot be used.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from ztagent.errors import ConfigError, ZtagentError

DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_KEY_LABEL = "ztagent-device"
PIN_ENV = "ZTAGENT_PKCS11_PIN"
DIGEST_LEN = 32
P256_COORD_LEN = 32
KEY_ID_LEN = 8

_PATH_ATTRS = frozenset({"token", "serial", "object", "id", "type", "module-path"})
_QUERY_ATTRS = frozenset({"module-path"})


class KeyStoreCode(StrEnum):
    """Every ``KeyStoreError`` code."""

    KEYSTORE_FAILED = "keystore_failed"
    KEYSTORE_KEY_MISSING = "keystore_key_missing"
    KEYSTORE_PIN_INCORRECT = "keystore_pin_incorrect"
    KEYSTORE_UNAVAILABLE = "keystore_unavailable"


class KeyStoreError(ZtagentError):
    """A key store could not be opened or used (module, token, PIN, key object, signing)."""

    codes = frozenset(KeyStoreCode)


def _check_digest(digest: bytes) -> None:
    if len(digest) != DIGEST_LEN:
        raise KeyStoreError(
            "keystore_failed",
            f"digest is {len(digest)} bytes (expected a {DIGEST_LEN}-byte SHA-256 digest)",
        )


def verify_digest_signature(
    public_key: ec.EllipticCurvePublicKey, digest: bytes, signature: bytes
) -> bool:
    """True when ``signature`` (DER) is a valid ECDSA signature of ``digest`` (SHA-256)."""
    try:
        public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


# --- PKCS#11 URI (RFC 7512 subset) -----------------------------------------------------------


def _pct(value: str | bytes) -> str:
    return quote(value, safe="")


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of a ``pkcs11:`` URI that find one private key on one token."""

    token: str | None = None
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None
    module: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse ``pkcs11:attr=value;...?module-path=...``; refuse what it cannot honour."""
        key = "--key-store"
        if not text.startswith("pkcs11:"):
            raise ConfigError(key, f"got {text!r}, expected a URI starting with 'pkcs11:'")
        body = text[len("pkcs11:") :]
        path, _, query = body.partition("?")
        found: dict[str, bytes] = {}
        for part, allowed, sep in ((path, _PATH_ATTRS, ";"), (query, _QUERY_ATTRS, "&")):
            for item in filter(None, part.split(sep)):
                name, eq, raw = item.partition("=")
                if not eq:
                    raise ConfigError(key, f"pkcs11 URI attribute {item!r} has no '=value'")
                if name in ("pin-value", "pin-source"):
                    raise ConfigError(
                        key,
                        f"pkcs11 URI carries {name!r}: the PIN must not be in the URI "
                        f"(use --pin-file or {PIN_ENV})",
                    )
                if name not in allowed:
                    raise ConfigError(
                        key,
                        f"pkcs11 URI attribute {name!r} is not supported "
                        f"(expected one of {', '.join(sorted(allowed))})",
                    )
                if name in found:
                    raise ConfigError(key, f"pkcs11 URI attribute {name!r} appears twice")
                found[name] = unquote_to_bytes(raw)

        def text_of(name: str) -> str | None:
            value = found.get(name)
            if value is None:
                return None
            try:
                return value.decode()
            except UnicodeDecodeError:
                raise ConfigError(key, f"pkcs11 URI attribute {name!r} is not UTF-8") from None

        kind = text_of("type")
        if kind is not None and kind != "private":
            raise ConfigError(key, f"pkcs11 URI type is {kind!r} (expected 'private')")
        uri = cls(
            token=text_of("token"),
            object=text_of("object"),
            id=found.get("id"),
            serial=text_of("serial"),
            module=text_of("module-path"),
        )
        if uri.token is None and uri.serial is None:
            raise ConfigError(key, f"pkcs11 URI {text!r} names no token (expected token=LABEL)")
        return uri

    def __str__(self) -> str:
        """The URI without ``module-path`` (``keystore.json`` keeps the module apart)."""
        parts = []
        if self.token is not None:
            parts.append(f"token={_pct(self.token)}")
        if self.serial is not None:
            parts.append(f"serial={_pct(self.serial)}")
        if self.object is not None:
            parts.append(f"object={_pct(self.object)}")
        if self.id is not None:
            parts.append(f"id={_pct(self.id)}")
        return "pkcs11:" + ";".join(parts)


# --- PKCS#11 ---------------------------------------------------------------------------------


def _wrap(what: str, exc: Exception) -> KeyStoreError:
    if isinstance(exc, pkcs11.exceptions.PinIncorrect | pkcs11.exceptions.PinLenRange):
        return KeyStoreError("keystore_pin_incorrect", f"{what}: the token refused the PIN")
    if isinstance(exc, pkcs11.exceptions.NoSuchKey):
        return KeyStoreError("keystore_key_missing", f"{what}: no such key on the token")
    if isinstance(exc, pkcs11.exceptions.MultipleObjectsReturned):
        return KeyStoreError(
            "keystore_key_missing", f"{what}: several keys match (add id=... to the URI)"
        )
    if isinstance(exc, pkcs11.exceptions.NoSuchToken | pkcs11.exceptions.TokenNotPresent):
        return KeyStoreError("keystore_unavailable", f"{what}: no such token")
    return KeyStoreError("keystore_failed", f"{what}: {type(exc).__name__} {exc}".rstrip())


@dataclass
class _SharedSession:
    """One logged-in session per token, shared by every store on it.

    PKCS#11 login state belongs to the application, not the session: a second ``C_Login``
    fails with ``CKR_USER_ALREADY_LOGGED_IN`` and closing any logged-in session logs all of
    them out. So stores on one token share one session (and one lock: a session runs one
    operation at a time), closed when the last store on it closes.
    """

    session: Any
    pin_digest: bytes
    lock: threading.Lock
    users: int = 0


_SessionKey = tuple[str, str | None, str | None]
_sessions: dict[_SessionKey, _SharedSession] = {}
_sessions_lock = threading.Lock()


def _session_key(module: str, uri: Pkcs11Uri) -> _SessionKey:
    return (module, uri.token, uri.serial)


def _acquire_session(module: str, uri: Pkcs11Uri, pin: str) -> _SharedSession:
    key = _session_key(module, uri)
    digest = hashlib.sha256(pin.encode()).digest()
    with _sessions_lock:
        shared = _sessions.get(key)
        if shared is not None:
            if not hmac.compare_digest(shared.pin_digest, digest):
                raise KeyStoreError(
                    "keystore_pin_incorrect",
                    f"token {uri.token or uri.serial!r} is open with another PIN",
                )
        else:
            shared = _SharedSession(_open_session(module, uri, pin), digest, threading.Lock())
            _sessions[key] = shared
        shared.users += 1
        return shared


def _release_session(module: str, uri: Pkcs11Uri, owned: _SharedSession | None = None) -> None:
    """One user less on the token's shared session (closed with its last user). ``owned``:
    only if it is still that session (a store outliving ``close_all_sessions`` must not
    release a newer session of the same token)."""
    key = _session_key(module, uri)
    with _sessions_lock:
        shared = _sessions.get(key)
        if shared is None or (owned is not None and shared is not owned):
            return
        shared.users -= 1
        if shared.users > 0:
            return
        del _sessions[key]
    with shared.lock, contextlib.suppress(pkcs11.exceptions.PKCS11Error):
        shared.session.close()


def close_all_sessions() -> None:
    """Close every shared PKCS#11 session (at shutdown, or before re-initialising a module)."""
    with _sessions_lock:
        shared = list(_sessions.values())
        _sessions.clear()
    for entry in shared:
        with entry.lock, contextlib.suppress(pkcs11.exceptions.PKCS11Error):
            entry.session.close()


def _open_session(module: str, uri: Pkcs11Uri, pin: str) -> Any:
    try:
        lib = pkcs11.lib(module)
    except (pkcs11.exceptions.PKCS11Error, OSError, RuntimeError) as exc:
        raise KeyStoreError(
            "keystore_unavailable", f"cannot load PKCS#11 module {module}: {exc}"
        ) from None
    where = f"token {uri.token or uri.serial!r}"
    try:
        kwargs: dict[str, Any] = {}
        if uri.token is not None:
            kwargs["token_label"] = uri.token
        if uri.serial is not None:
            kwargs["token_serial"] = uri.serial.encode()
        token = lib.get_token(**kwargs)
        return token.open(user_pin=pin, rw=True)
    except pkcs11.exceptions.PKCS11Error as exc:
        raise _wrap(where, exc) from None


class Pkcs11KeyStore:
    """An EC P-256 key pair on a PKCS#11 token; the private half is not extractable.

    Uses the token's shared logged-in session until ``close()``. Token operations are
    serialised with the session's lock, since the gRPC custom signer calls in from gRPC's own
    threads.
    """

    def __init__(
        self, module: str, uri: Pkcs11Uri, shared: _SharedSession, private: Any, public: Any
    ) -> None:
        self.module = module
        self.uri = uri
        self._shared = shared
        self._session = shared.session
        self._private = private
        self._public_obj = public
        self._lock = shared.lock
        self._closed = False
        der = encode_ec_public_key(public)
        key = serialization.load_der_public_key(der)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise KeyStoreError("keystore_failed", f"{uri} is not an EC P-256 key")
        self._public = key

    @classmethod
    def create(
        cls,
        module: str,
        token_label: str,
        pin: str,
        label: str = DEFAULT_KEY_LABEL,
        *,
        key_id: bytes | None = None,
    ) -> Pkcs11KeyStore:
        """Generate a non-extractable P-256 key pair on the token, stored as token objects.

        ``key_id`` (``CKA_ID``, random 8 bytes by default) tells keys with one label apart.
        """
        key_id = key_id if key_id is not None else secrets.token_bytes(KEY_ID_LEN)
        uri = Pkcs11Uri(token=token_label, object=label, id=key_id)
        shared = _acquire_session(module, uri, pin)
        try:
            with shared.lock:
                public, private = cls._generate(shared.session, label, key_id)
            return cls(module, uri, shared, private, public)
        except pkcs11.exceptions.PKCS11Error as exc:
            _release_session(module, uri)
            raise _wrap(f"generating a key on token {token_label!r}", exc) from None
        except BaseException:
            _release_session(module, uri)
            raise

    @staticmethod
    def _generate(session: Any, label: str, key_id: bytes) -> tuple[Any, Any]:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        public, private = params.generate_keypair(
            store=True,
            label=label,
            id=key_id,
            private_template={
                Attribute.EXTRACTABLE: False,
                Attribute.SENSITIVE: True,
                Attribute.SIGN: True,
            },
        )
        return public, private

    @classmethod
    def load(cls, uri: str | Pkcs11Uri, module: str | None, pin: str) -> Pkcs11KeyStore:
        """Open the key named by ``uri`` (``object`` and/or ``id``) on its token."""
        parsed = uri if isinstance(uri, Pkcs11Uri) else Pkcs11Uri.parse(uri)
        if parsed.object is None and parsed.id is None:
            raise ConfigError("--key-store", f"{parsed} names no key (expected object= or id=)")
        module = module or parsed.module or DEFAULT_PKCS11_MODULE
        shared = _acquire_session(module, parsed, pin)
        query: dict[str, Any] = {}
        if parsed.object is not None:
            query["label"] = parsed.object
        if parsed.id is not None:
            query["id"] = parsed.id
        try:
            with shared.lock:
                private = shared.session.get_key(object_class=ObjectClass.PRIVATE_KEY, **query)
                public = shared.session.get_key(object_class=ObjectClass.PUBLIC_KEY, **query)
                key_id = bytes(private[Attribute.ID])
            return cls(module, replace(parsed, id=key_id, module=None), shared, private, public)
        except pkcs11.exceptions.PKCS11Error as exc:
            _release_session(module, parsed)
            raise _wrap(str(parsed), exc) from None
        except BaseException:
            _release_session(module, parsed)
            raise

    def is_open(self) -> bool:
        """Not closed, and its shared session is still the token's (``close_all_sessions``
        or a re-initialised module ends it)."""
        with _sessions_lock:
            live = _sessions.get(_session_key(self.module, self.uri)) is self._shared
        return live and not self._closed

    @property
    def private_key_object(self) -> Any:
        """The token's private key object (python-pkcs11), e.g. to read its attributes."""
        return self._private

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest_ecdsa(self, digest: bytes) -> bytes:
        """``CKM_ECDSA`` over the digest (SoftHSM2 has no CKM_ECDSA_SHA256), DER-encoded."""
        _check_digest(digest)
        try:
            with self._lock:
                raw = self._private.sign(digest, mechanism=Mechanism.ECDSA)
        except pkcs11.exceptions.PKCS11Error as exc:
            raise _wrap(f"signing with {self.uri}", exc) from None
        if len(raw) != 2 * P256_COORD_LEN:
            raise KeyStoreError(
                "keystore_failed", f"the token returned a {len(raw)}-byte signature (expected 64)"
            )
        r = int.from_bytes(raw[:P256_COORD_LEN], "big")
        s = int.from_bytes(raw[P256_COORD_LEN:], "big")
        return encode_dss_signature(r, s)

    def description(self) -> str:
        return f"pkcs11 {self.uri} (module {self.module})"

    def record(self) -> dict[str, str]:
        return {"type": "pkcs11", "uri": str(self.uri), "module": self.module}

    def destroy(self) -> None:
        """Delete the key pair from the token (a rotated-out or abandoned key)."""
        try:
            with self._lock:
                self._private.destroy()
                self._public_obj.destroy()
        except pkcs11.exceptions.PKCS11Error as exc:
            raise _wrap(f"deleting {self.uri}", exc) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_session(self.module, self.uri, self._shared)


# --- PINs ------------------------------------------------------------------------------------


def require_pin(pin: str | None) -> str:
    if pin is None or pin == "":
        raise ConfigError(
            "--pin-file", f"the PKCS#11 token needs a PIN: give --pin-file or set {PIN_ENV}"
        )
    return pin


def resolve_pin(pin_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The PIN from ``--pin-file`` (first line) or else ``ZTAGENT_PKCS11_PIN``; None if neither.

    For the CLI: the library functions take the PIN as a value.
    """
    if pin_file is not None:
        try:
            return pin_file.read_text().splitlines()[0] if pin_file.stat().st_size else ""
        except OSError as exc:
            raise ConfigError("--pin-file", f"cannot read {pin_file}: {exc.strerror}") from None
    env = os.environ if environ is None else environ
    return env.get(PIN_ENV)
