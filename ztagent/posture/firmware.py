"""Signed firmware manifests: vendor tooling (keys, signing) and the verifier's checks.

Manifest (JSON object, exactly these keys)::

    {"name": "edge-fw", "version": "1.3.0", "image_sha256": "<64 hex>", "svn": 3}

``svn`` is the security version number the rollback store compares. The detached signature
file is JSON, the signature covering the manifest bytes exactly as sent::

    {"key_id": "<first 16 hex of SHA-256(SPKI DER) of the public key>",
     "alg": "Ed25519" | "ES256", "sig": "<base64>"}

``ES256`` is ECDSA P-256 with SHA-256 and a DER signature; ``Ed25519`` a raw 64-byte one.
A ``key_id`` that is not a trusted key is ``firmware_untrusted_key``; a trusted key whose
signature does not verify is ``firmware_bad_signature``. The trusted key's id is the
``signer`` of the attested posture.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ztagent import json_input
from ztagent.errors import ConfigError
from ztagent.files import KEY_MODE, PUBLIC_MODE, make_private_dir, write_atomic
from ztagent.posture.errors import PostureError, short_hex

FirmwarePublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
SIGNATURE_ALGS = ("Ed25519", "ES256")
MAX_MANIFEST_BYTES = 16 * 1024
MAX_SVN = 2**32 - 1
TRUSTED_KEYS_CONFIG_KEY = "posture.firmware_keys"
_MANIFEST_KEYS = frozenset({"name", "version", "image_sha256", "svn"})


@dataclass(frozen=True)
class FirmwareManifest:
    """A parsed, well-formed manifest (signature checked separately by ``verify_manifest``)."""

    name: str
    version: str
    image_sha256: str
    svn: int

    @classmethod
    def parse(cls, raw: bytes) -> FirmwareManifest:
        def bad(message: str) -> PostureError:
            return PostureError("evidence_malformed", f"firmware manifest: {message}")

        doc = _load_json(raw, bad)
        if not isinstance(doc, dict) or set(doc) != _MANIFEST_KEYS:
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise bad(f"keys {got}, expected {sorted(_MANIFEST_KEYS)}")
        name, version, digest, svn = (doc[k] for k in ("name", "version", "image_sha256", "svn"))
        if not (isinstance(name, str) and name and isinstance(version, str) and version):
            raise bad("name and version must be non-empty strings")
        if not _is_sha256_hex(digest):
            raise bad(f"image_sha256 {digest!r}, expected 64 lower-case hex digits")
        if isinstance(svn, bool) or not isinstance(svn, int) or not 0 <= svn <= MAX_SVN:
            raise bad(f"svn {svn!r}, expected an integer 0..{MAX_SVN}")
        return cls(name=name, version=version, image_sha256=digest, svn=svn)

    def to_bytes(self) -> bytes:
        doc = {
            "image_sha256": self.image_sha256,
            "name": self.name,
            "svn": self.svn,
            "version": self.version,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _load_json(raw: bytes, bad: Callable[[str], PostureError]) -> Any:
    """A size-checked JSON document (manifest or signature envelope)."""
    if not raw or len(raw) > MAX_MANIFEST_BYTES:
        raise bad(f"{len(raw)} bytes, expected 1..{MAX_MANIFEST_BYTES}")
    try:
        return json_input.loads(raw)  # a device sends it: nesting bounded
    except ValueError as exc:  # also not UTF-8, NaN, nested too deep
        raise bad(str(exc)) from None


def _is_sha256_hex(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


@dataclass(frozen=True)
class FirmwareSignature:
    """The parsed signature envelope."""

    key_id: str
    alg: str
    sig: bytes

    @classmethod
    def parse(cls, raw: bytes, label: str = "firmware signature") -> FirmwareSignature:
        def bad(message: str) -> PostureError:
            return PostureError("evidence_malformed", f"{label}: {message}")

        doc = _load_json(raw, bad)
        if not isinstance(doc, dict) or set(doc) != {"key_id", "alg", "sig"}:
            raise bad("expected exactly key_id, alg, sig")
        key_id, alg, sig = doc["key_id"], doc["alg"], doc["sig"]
        if not isinstance(key_id, str) or not key_id:
            raise bad(f"key_id {key_id!r}, expected a hex key id")
        if alg not in SIGNATURE_ALGS:
            raise bad(f"alg {alg!r}, expected one of {list(SIGNATURE_ALGS)}")
        if not isinstance(sig, str):
            raise bad("sig must be a base64 string")
        try:
            decoded = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad(f"sig is not base64 ({exc})") from exc
        return cls(key_id=key_id, alg=alg, sig=decoded)

    def to_bytes(self) -> bytes:
        doc = {"alg": self.alg, "key_id": self.key_id, "sig": base64.b64encode(self.sig).decode()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def key_id(public_key: FirmwarePublicKey) -> str:
    """First 16 hex digits of SHA-256 over the key's SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def verify_signature(
    data: bytes,
    signature: bytes,
    trusted_keys: Mapping[str, FirmwarePublicKey],
    what: str,
    *,
    label: str = "firmware signature",
) -> str:
    """The id of the trusted key whose signature envelope over ``data`` verifies.

    ``what`` names the signed document in messages; ``label`` the envelope. Codes:
    ``evidence_malformed`` (envelope), ``firmware_untrusted_key``, ``firmware_bad_signature``.
    """
    envelope = FirmwareSignature.parse(signature, label)
    key = trusted_keys.get(envelope.key_id)
    if key is None:
        raise PostureError(
            "firmware_untrusted_key",
            f"{what} is signed by key {envelope.key_id}, "
            f"expected one of {sorted(trusted_keys) or 'no trusted keys'}",
        )
    try:
        if envelope.alg == "Ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(envelope.sig, data)
        elif (
            envelope.alg == "ES256"
            and isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP256R1)
        ):
            key.verify(envelope.sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise PostureError(
                "firmware_bad_signature",
                f"signature alg {envelope.alg} does not match key {envelope.key_id} "
                f"({type(key).__name__})",
            )
    except (InvalidSignature, ValueError) as exc:
        raise PostureError(
            "firmware_bad_signature",
            f"{what} signature does not verify with trusted key {envelope.key_id}",
        ) from exc
    return envelope.key_id


def verify_manifest(
    manifest_bytes: bytes, signature: bytes, trusted_keys: Mapping[str, FirmwarePublicKey]
) -> tuple[FirmwareManifest, str]:
    """The manifest and the id of the trusted key whose signature over it verifies."""
    manifest = FirmwareManifest.parse(manifest_bytes)
    what = f"manifest {manifest.name} {manifest.version}"
    return manifest, verify_signature(manifest_bytes, signature, trusted_keys, what)


def check_firmware_digest(manifest: FirmwareManifest, measured_sha256_hex: str) -> None:
    """The signed manifest must describe the firmware image the TPM measured."""
    if manifest.image_sha256 != measured_sha256_hex.lower():
        raise PostureError(
            "firmware_digest_mismatch",
            f"manifest {manifest.name} {manifest.version} image_sha256 "
            f"{short_hex(manifest.image_sha256)}, measured firmware "
            f"{short_hex(measured_sha256_hex)}",
        )


def load_trusted_keys(
    paths: Iterable[Path], setting: str = TRUSTED_KEYS_CONFIG_KEY
) -> dict[str, FirmwarePublicKey]:
    """PEM public keys (Ed25519 or EC P-256) by key id; ``ConfigError`` naming ``setting`` on
    a bad file."""
    keys: dict[str, FirmwarePublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(setting, f"{path} is not a PEM public key") from exc
        if not (
            isinstance(key, ed25519.Ed25519PublicKey)
            or (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1))
        ):
            raise ConfigError(
                setting,
                f"{path} holds a {type(key).__name__}, expected Ed25519 or EC P-256",
            )
        keys[key_id(key)] = key
    return keys


def generate_firmware_key(out_dir: Path, name: str, alg: str = "Ed25519") -> tuple[Path, Path]:
    """A vendor signing key: ``<name>.key`` (PKCS#8 PEM, 0600) and ``<name>.pub`` (PEM)."""
    if alg not in SIGNATURE_ALGS:
        raise ConfigError("firmware.alg", f"{alg!r}, expected one of {list(SIGNATURE_ALGS)}")
    out = Path(out_dir)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError("firmware.key", f"{path} exists; refusing to overwrite a key")
    make_private_dir(out)
    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if alg == "Ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    write_atomic(
        private_path,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        KEY_MODE,
    )
    write_atomic(
        public_path,
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        PUBLIC_MODE,
    )
    return private_path, public_path


def sign_manifest(
    private_key_path: Path, image: bytes | Path, *, name: str, version: str, svn: int
) -> tuple[bytes, bytes]:
    """(manifest bytes, signature envelope bytes) for ``image`` (its bytes or its file)."""
    try:
        key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), None)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("firmware.signing_key", f"cannot load key or image: {exc}") from exc
    manifest = FirmwareManifest(
        name=name, version=version, image_sha256=hashlib.sha256(data).hexdigest(), svn=svn
    )
    raw = manifest.to_bytes()
    try:
        FirmwareManifest.parse(raw)  # refuse to sign what a verifier would refuse to read
    except PostureError as exc:
        raise ConfigError("firmware.manifest", exc.message) from exc
    return raw, _envelope(key, raw, "firmware.signing_key")


def sign_bytes(private_key_path: Path, data: bytes, setting: str) -> bytes:
    """The signature envelope over ``data`` with the PEM key at ``private_key_path``;
    ``ConfigError`` naming ``setting`` when the key cannot be used."""
    try:
        key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(setting, f"cannot load signing key {private_key_path}: {exc}") from exc
    return _envelope(key, data, setting)


def _envelope(key: Any, data: bytes, setting: str) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        alg, sig = "Ed25519", key.sign(data)
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        alg, sig = "ES256", key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        raise ConfigError(setting, f"{type(key).__name__}, expected Ed25519 or EC P-256")
    return FirmwareSignature(key_id=key_id(key.public_key()), alg=alg, sig=sig).to_bytes()
