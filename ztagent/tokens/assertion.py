"""Identity assertions: the sidecar's signed statement to a workload about who is calling.

A workload behind the sidecar used to take the device id from the ``x-ztagent-device-id``
header, which any local process able to reach its socket could send. Now the sidecar adds to
every call it forwards one ``x-ztagent-assertion``: a compact JWS (ES256, header ``typ``
``ztagent-assertion+jwt``, ``kid`` the RFC 7638 thumbprint of the signing key) whose payload
is::

    {"iss": "ztagent-sidecar", "sub": <device id>, "spiffe": <SPIFFE id>,
     "method": "/pkg.Service/Method", "did": <decision id>, "user": <user sub, optional>,
     "iat": <seconds>, "exp": <iat + lifetime>, "jti": <random>}

The workload verifies it with the sidecar's public key (``AssertionVerifier``) and takes the
device id from it only. Refused (``UNAUTHENTICATED``, ``AssertionError_``):

``assertion_missing`` (no header), ``assertion_malformed`` (several headers, not a compact
JWS, bad claims, over ``MAX_ASSERTION_BYTES``), ``assertion_bad_signature`` (a key the
workload does not trust, or a signature that does not verify), ``assertion_expired``,
``assertion_not_yet_valid``, ``assertion_wrong_method`` (minted for another method: a
captured assertion cannot be replayed against another RPC), ``assertion_replayed`` (its
``jti`` was already accepted: each assertion admits one call).

The JWS is RFC 7515 compact serialisation with ES256 (RFC 7518 section 3.4: the raw 64-byte
``r || s`` signature), made and checked with ``cryptography`` directly: joserfc, which the
user-token check uses, costs about 250 µs more per operation here, five times the ECDSA work
itself, on every forwarded call. Tests check interoperability with joserfc both ways.

A lifetime of seconds bounds how long a captured assertion is worth anything; the replay
cache holds each ``jti`` until its ``exp``. The signing key is the sidecar's
(``[assertion] signing_key``, by default its TLS server key); verification keys are PEM
public keys or certificates, re-read when their files change (a rotated server certificate).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ztagent import canonical_json, randomness
from ztagent.errors import VerificationError
from ztagent.files import KEY_MODE, PUBLIC_MODE, refuse_symlink, write_atomic

ASSERTION_HEADER = "x-ztagent-assertion"
TYP = "ztagent-assertion+jwt"
ISSUER = "ztagent-sidecar"
DEFAULT_LIFETIME_S = 30
MAX_LIFETIME_S = 300
LEEWAY_S = 5
MAX_ASSERTION_BYTES = 4096
MAX_REPLAY_ENTRIES = 200_000
KEY_RECHECK_S = 2.0


class AssertionCode(StrEnum):
    """Every ``AssertionError_`` code."""

    ASSERTION_BAD_SIGNATURE = "assertion_bad_signature"
    ASSERTION_EXPIRED = "assertion_expired"
    ASSERTION_MALFORMED = "assertion_malformed"
    ASSERTION_MISSING = "assertion_missing"
    ASSERTION_NOT_YET_VALID = "assertion_not_yet_valid"
    ASSERTION_REPLAYED = "assertion_replayed"
    ASSERTION_WRONG_METHOD = "assertion_wrong_method"


class AssertionError_(VerificationError):
    """An identity assertion was missing or refused (UNAUTHENTICATED)."""

    codes = frozenset(AssertionCode)


@dataclass(frozen=True)
class AssertedIdentity:
    """What a verified assertion says about the call."""

    device_id: str
    spiffe_id: str
    method: str
    decision_id: str
    user: str | None
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _unb64(text: str) -> bytes:
    if _B64URL.fullmatch(text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256) of a P-256 public key: the assertion's ``kid``."""
    numbers = public_key.public_numbers()
    jwk = (
        f'{{"crv":"P-256","kty":"EC","x":"{_b64(numbers.x.to_bytes(32, "big"))}",'
        f'"y":"{_b64(numbers.y.to_bytes(32, "big"))}"}}'
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(jwk.encode())
    return _b64(digest.finalize())


_ES256 = ec.ECDSA(hashes.SHA256())


def _load_private(pem: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{where}: expected an EC P-256 private key (ES256)")
    return key


def _load_public(pem: bytes, where: str) -> ec.EllipticCurvePublicKey:
    """A PEM public key, or the key of the first certificate in a PEM file."""
    key: object
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"{where}: not a PEM public key or certificate ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{where}: expected an EC P-256 public key (ES256)")
    return key


class AssertionSigner:
    """Mints assertions with the sidecar's key (``lifetime_s`` seconds each)."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        lifetime_s: int = DEFAULT_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= lifetime_s <= MAX_LIFETIME_S:
            raise ValueError(f"lifetime {lifetime_s} s (expected 1 to {MAX_LIFETIME_S})")
        self._key = key
        header = {"alg": "ES256", "typ": TYP, "kid": key_id(key.public_key())}
        self._header = _b64(json.dumps(header, separators=(",", ":")).encode())
        self._lifetime = lifetime_s
        self._clock = clock

    @classmethod
    def from_file(
        cls, path: Path, lifetime_s: int = DEFAULT_LIFETIME_S, public_path: Path | None = None
    ) -> AssertionSigner:
        """The key at ``path``, generated there first if missing (``ensure_signing_key``)."""
        return cls(ensure_signing_key(path, public_path), lifetime_s)

    def mint(
        self,
        *,
        device_id: str,
        spiffe_id: str,
        method: str,
        decision_id: str,
        user: str | None = None,
    ) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": device_id,
            "spiffe": spiffe_id,
            "method": method,
            "did": decision_id,
            "iat": now,
            "exp": now + self._lifetime,
            "jti": _b64(randomness.take(16)),
        }
        if user is not None:
            claims["user"] = user
        payload = _b64(canonical_json.dumps(claims))
        signing_input = f"{self._header}.{payload}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), _ES256))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def public_key_path(key_path: Path) -> Path:
    """Where ``ensure_signing_key`` writes the public half: ``<name>.pub`` beside the key."""
    return key_path.with_suffix(".pub")


def ensure_signing_key(path: Path, public_path: Path | None = None) -> ec.EllipticCurvePrivateKey:
    """The P-256 key at ``path``; generated (mode 0600) when the file does not exist. Its
    public key is written (0644) to ``public_path`` (default: beside it, ``.pub``) when that
    file does not hold it yet. A symlinked path is refused (ELOOP)."""
    refuse_symlink(path)
    if path.exists():
        key = _load_private(path.read_bytes(), str(path))
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(path, pem, KEY_MODE)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path = public_path or public_key_path(path)
    pub_path.parent.mkdir(parents=True, exist_ok=True)
    if not pub_path.exists() or pub_path.read_bytes() != public:
        write_atomic(pub_path, public, PUBLIC_MODE)
    return key


class _KeyFiles:
    """The trusted public keys, by ``kid``, re-read when a file changes: checked at most
    every ``KEY_RECHECK_S``, and at once when an assertion names a key not loaded (the
    sidecar may have made its key after the workload started). A file that is missing or
    unreadable keeps its last good key, if any (the refusal names the files)."""

    def __init__(self, paths: Sequence[Path], monotonic: Callable[[], float]) -> None:
        if not paths:
            raise ValueError("no trusted signer key configured")
        self._paths = tuple(paths)
        self._monotonic = monotonic
        self._stamps: dict[Path, tuple[int, int, int]] = {}
        self._by_path: dict[Path, tuple[str, ec.EllipticCurvePublicKey]] = {}
        self._problems: dict[Path, str] = {}
        self._checked = monotonic()
        self._lock = threading.Lock()
        self._reload()

    def describe(self) -> str:
        """The trusted files and what is wrong with those that gave no key."""
        parts = []
        for path in self._paths:
            problem = self._problems.get(path)
            parts.append(
                f"{path}" + (f" ({problem})" if problem and path not in self._by_path else "")
            )
        return ", ".join(parts)

    def _reload(self) -> None:
        with self._lock:
            for path in self._paths:
                try:
                    st = os.stat(path)
                    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                    if self._stamps.get(path) == stamp:
                        continue
                    key = _load_public(path.read_bytes(), str(path))
                except FileNotFoundError:
                    self._problems[path] = "missing"
                    continue
                except (OSError, ValueError) as exc:
                    self._problems[path] = str(exc)
                    continue
                self._stamps[path] = stamp
                self._by_path[path] = (key_id(key), key)
                self._problems.pop(path, None)

    def _find(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        for found_kid, key in list(self._by_path.values()):
            if found_kid == kid:
                return key
        return None

    def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        now = self._monotonic()
        if now - self._checked >= KEY_RECHECK_S:
            self._checked = now
            self._reload()
        key = self._find(kid)
        if key is None:  # a stat per trusted file: cheap, and only re-read when changed
            self._reload()
            key = self._find(kid)
        return key


class AssertionVerifier:
    """Checks the assertion of an incoming call; one per workload process.

    ``public_keys``: PEM files (public keys or certificates) of every signer the workload
    trusts: the sidecar, and for the storage workload also the inference workload, which
    writes escalations into a device's namespace on that device's behalf.
    """

    def __init__(
        self,
        public_keys: Sequence[Path],
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = _KeyFiles(public_keys, monotonic)
        self._clock = clock
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def trusted(self) -> str:
        """The trusted key files, and why those that gave no key did not (for the log)."""
        return self._keys.describe()

    def verify(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, method: str
    ) -> AssertedIdentity:
        """The identity the call's one ``x-ztagent-assertion`` vouches for, checked for
        ``method`` (the full ``/pkg.Service/Method``); ``AssertionError_`` otherwise."""
        values = [v for k, v in metadata or () if k == ASSERTION_HEADER]
        if not values:
            raise AssertionError_(
                "assertion_missing",
                f"no {ASSERTION_HEADER} (call this workload through the ztagent sidecar)",
            )
        if len(values) > 1 or not isinstance(values[0], str):
            raise AssertionError_(
                "assertion_malformed", f"expected one text {ASSERTION_HEADER}, got {len(values)}"
            )
        token = values[0]
        if len(token) > MAX_ASSERTION_BYTES:
            raise AssertionError_(
                "assertion_malformed",
                f"{len(token)} bytes (expected at most {MAX_ASSERTION_BYTES})",
            )
        claims = self._verified_claims(token)
        identity = _identity(claims)
        now = int(self._clock())
        if now > identity.expires_at + LEEWAY_S:
            raise AssertionError_(
                "assertion_expired",
                f"expired at {identity.expires_at}, now {now} (decision {identity.decision_id})",
            )
        if identity.issued_at > now + LEEWAY_S:
            raise AssertionError_(
                "assertion_not_yet_valid", f"issued at {identity.issued_at}, now {now}"
            )
        if identity.expires_at - identity.issued_at > MAX_LIFETIME_S:
            raise AssertionError_(
                "assertion_malformed",
                f"lifetime {identity.expires_at - identity.issued_at} s "
                f"(expected at most {MAX_LIFETIME_S})",
            )
        if identity.method != method:
            raise AssertionError_(
                "assertion_wrong_method",
                f"minted for {identity.method!r}, used for {method!r}",
            )
        self._once(str(claims["jti"]), identity.expires_at + LEEWAY_S, now)
        return identity

    def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            header_b64, payload_b64, signature_b64 = token.split(".")
            header = orjson.loads(_unb64(header_b64))  # nesting bounded: JSONDecodeError
            signature = _unb64(signature_b64)
        except ValueError as exc:  # also json and base64 errors
            raise AssertionError_(
                "assertion_malformed", f"not a compact JWS ({type(exc).__name__})"
            ) from None
        if not isinstance(header, dict):
            raise AssertionError_("assertion_malformed", "the JWS header is not a JSON object")
        if header.get("alg") != "ES256" or header.get("typ") != TYP or "crit" in header:
            raise AssertionError_(
                "assertion_malformed",
                f"alg {header.get('alg')!r}, typ {header.get('typ')!r} (expected ES256, {TYP})",
            )
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AssertionError_(
                "assertion_bad_signature",
                f"signed by key {str(kid)[:16]!r}, which this workload does not trust",
            )
        if len(signature) != 64:
            raise AssertionError_("assertion_bad_signature", "the signature is not 64 bytes")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, f"{header_b64}.{payload_b64}".encode(), _ES256)
        except InvalidSignature:
            raise AssertionError_(
                "assertion_bad_signature", "the signature does not verify"
            ) from None
        try:
            claims = orjson.loads(_unb64(payload_b64))
        except ValueError:
            raise AssertionError_("assertion_malformed", "the payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AssertionError_("assertion_malformed", "the payload is not a JSON object")
        return claims

    def _once(self, jti: str, keep_until: int, now: int) -> None:
        with self._lock:
            while self._seen:
                oldest_jti, until = next(iter(self._seen.items()))
                if until >= now and len(self._seen) < MAX_REPLAY_ENTRIES:
                    break
                del self._seen[oldest_jti]
            if jti in self._seen:
                raise AssertionError_(
                    "assertion_replayed", "this assertion was already used for a call"
                )
            self._seen[jti] = keep_until


def _identity(claims: dict[str, Any]) -> AssertedIdentity:
    def text(name: str) -> str:
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise AssertionError_("assertion_malformed", f"claim {name!r} missing or not text")
        return value

    def seconds(name: str) -> int:
        value = claims.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**40:
            raise AssertionError_("assertion_malformed", f"claim {name!r} is not a time")
        return value

    if claims.get("iss") != ISSUER:
        raise AssertionError_(
            "assertion_malformed", f"iss {claims.get('iss')!r} (expected {ISSUER!r})"
        )
    text("jti")
    user = claims.get("user")
    if user is not None and not isinstance(user, str):
        raise AssertionError_("assertion_malformed", "claim 'user' is not text")
    return AssertedIdentity(
        device_id=text("sub"),
        spiffe_id=text("spiffe"),
        method=text("method"),
        decision_id=text("did"),
        user=user,
        issued_at=seconds("iat"),
        expires_at=seconds("exp"),
    )
