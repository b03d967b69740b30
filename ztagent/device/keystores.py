"""Where a device's private key lives: a PKCS#8 file, a PKCS#11 token (an HSM) or the TPM.

A ``KeyStore`` holds one EC P-256 key and signs SHA-256 digests with it; the private key of a
``Pkcs11KeyStore`` never leaves the token (``CKA_EXTRACTABLE`` false, ``CKA_SENSITIVE``
true), so everything that needs the key (the CSR, the mTLS handshake) asks the store to sign.

Key store specs (``--key-store``): ``file``; ``pkcs11:<RFC 7512 URI>``, for example
``pkcs11:token=edge;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so``; ``tpm`` (a
key made inside the device's TPM, ``TpmKeyStore``, with the TCTI of ``--tpm``). The URI may
name ``token`` (label), ``serial``, ``object`` (key label), ``id`` (percent-encoded bytes),
``type=private`` and, as a path or query attribute, ``module-path``; anything else is refused,
``pin-value`` included:
the PIN never goes into a URI or a file of the device directory. It comes from ``--pin-file``
or ``ZTAGENT_PKCS11_PIN``, read by the CLI with ``resolve_pin``.

``record()`` is what ``keystore.json`` holds: ``{"type": "file"}`` or ``{"type": "pkcs11",
"uri": "pkcs11:token=...;object=...;id=...", "module": "/usr/lib/softhsm/libsofthsm2.so"}``
or ``{"type": "tpm", "tcti": "device:/dev/tpmrm0", "handle": "0x81000a4c"}``.

Errors: ``ConfigError`` for a bad spec, URI or missing PIN (exit 2); ``KeyStoreError`` (codes
``keystore_unavailable``, ``keystore_key_missing``, ``keystore_pin_incorrect``,
``keystore_failed``) when the store cannot be used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from ztagent.device.tpm import IDENTITY_KEY_HANDLES, DeviceTpm, TpmError
from ztagent.errors import ConfigError
from ztagent.files import KEY_MODE, write_atomic

# The PKCS#11 part lives in the base module ``ztagent.pkcs11_keys`` (one session registry
# for the device's stores and the CA's token-held issuing key); re-exported here.
from ztagent.pkcs11_keys import DEFAULT_KEY_LABEL as DEFAULT_KEY_LABEL
from ztagent.pkcs11_keys import DEFAULT_PKCS11_MODULE as DEFAULT_PKCS11_MODULE
from ztagent.pkcs11_keys import DIGEST_LEN as DIGEST_LEN
from ztagent.pkcs11_keys import KEY_ID_LEN as KEY_ID_LEN
from ztagent.pkcs11_keys import P256_COORD_LEN as P256_COORD_LEN
from ztagent.pkcs11_keys import PIN_ENV as PIN_ENV
from ztagent.pkcs11_keys import KeyStoreCode as KeyStoreCode
from ztagent.pkcs11_keys import KeyStoreError as KeyStoreError
from ztagent.pkcs11_keys import Pkcs11KeyStore as Pkcs11KeyStore
from ztagent.pkcs11_keys import Pkcs11Uri as Pkcs11Uri
from ztagent.pkcs11_keys import _check_digest
from ztagent.pkcs11_keys import close_all_sessions as close_all_sessions
from ztagent.pkcs11_keys import require_pin as require_pin
from ztagent.pkcs11_keys import resolve_pin as resolve_pin
from ztagent.pkcs11_keys import verify_digest_signature as verify_digest_signature
from ztagent.posture.errors import PostureError
from ztagent.posture.quote import p256_public_key


class KeyStore(Protocol):
    """One EC P-256 private key that signs SHA-256 digests; the key may never leave it."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest_ecdsa(self, digest: bytes) -> bytes:
        """ECDSA over a 32-byte SHA-256 digest; the DER ``ECDSA-Sig-Value``."""
        ...

    def description(self) -> str: ...

    def record(self) -> dict[str, str]:
        """What ``keystore.json`` holds to find the key again (never a PIN)."""
        ...

    def close(self) -> None: ...


# --- file ------------------------------------------------------------------------------------


class FileKeyStore:
    """A P-256 key in a PKCS#8 PEM file (mode 0600, written atomically)."""

    def __init__(self, path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        self.path = path
        self._key = key

    @classmethod
    def create(cls, path: Path) -> FileKeyStore:
        """Generate a P-256 key and write it to ``path`` (replacing any file there, 0600
        whatever the umask); a symlink at ``path`` is refused (``keystore_failed``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        store = cls(path, key)
        try:
            write_atomic(path, store.private_key_pem(), KEY_MODE)
        except OSError as exc:
            raise KeyStoreError(
                "keystore_failed", f"cannot write the key file {path}: {exc.strerror}"
            ) from None
        return store

    @classmethod
    def load(cls, path: Path) -> FileKeyStore:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyStoreError(
                "keystore_key_missing", f"cannot read {path}: {exc.strerror or exc}"
            ) from None
        try:
            key = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(
                "keystore_failed", f"{path} is not an unencrypted PEM private key: {exc}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise KeyStoreError(
                "keystore_failed", f"{path} holds a {type(key).__name__} (expected EC P-256)"
            )
        return cls(path, key)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign_digest_ecdsa(self, digest: bytes) -> bytes:
        _check_digest(digest)
        return self._key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    def private_key_pem(self) -> bytes:
        """PKCS#8 PEM (for gRPC's ``ssl_channel_credentials``; file stores only)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def description(self) -> str:
        return f"file {self.path}"

    def record(self) -> dict[str, str]:
        return {"type": "file"}

    def close(self) -> None:
        return None


# --- specs, records, PINs (the edge) ---------------------------------------------------------


class TpmKeyStore:
    """The device key in its TPM: an ECC P-256 signing key at a persistent handle
    (``IDENTITY_KEY_HANDLES``), created inside the TPM, never exported. Each signature is one
    TPM2_Sign; a renewal with key rotation makes the new key in the other handle."""

    def __init__(self, tpm: DeviceTpm, handle: int, public: ec.EllipticCurvePublicKey) -> None:
        self.tpm = tpm
        self.handle = handle
        self._public = public

    @classmethod
    def create(cls, tpm: DeviceTpm, *, avoid: int | None = None) -> TpmKeyStore:
        """A new key in the first identity slot other than ``avoid`` (the key in use)."""
        handle = next(h for h in IDENTITY_KEY_HANDLES if h != avoid)
        public = tpm.create_identity_key(handle)
        return cls(tpm, handle, _p256_public(public))

    @classmethod
    def load(cls, tcti: str, handle: int) -> TpmKeyStore:
        tpm = DeviceTpm(tcti)
        return cls(tpm, handle, _p256_public(tpm.identity_public(handle)))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign_digest_ecdsa(self, digest: bytes) -> bytes:
        _check_digest(digest)
        r, s = self.tpm.sign_digest(self.handle, digest)
        return encode_dss_signature(r, s)

    def description(self) -> str:
        return f"TPM key 0x{self.handle:08x} ({self.tpm.tcti})"

    def record(self) -> dict[str, str]:
        return {"type": "tpm", "tcti": self.tpm.tcti, "handle": f"0x{self.handle:08x}"}

    def destroy(self) -> None:
        self.tpm.delete_identity_key(self.handle)

    def close(self) -> None:
        return None


def _p256_public(tpm2b_public: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return p256_public_key(tpm2b_public, "TPM identity key")
    except PostureError as err:
        raise KeyStoreError("keystore_failed", err.message) from None


@dataclass(frozen=True)
class KeyStoreSpec:
    """A parsed ``--key-store`` value: ``kind`` is ``file``, ``pkcs11`` or ``tpm``."""

    kind: str
    uri: Pkcs11Uri | None = None

    @classmethod
    def parse(cls, spec: str) -> KeyStoreSpec:
        if spec == "file":
            return cls("file")
        if spec.startswith("pkcs11:"):
            return cls("pkcs11", Pkcs11Uri.parse(spec))
        if spec == "tpm":
            return cls("tpm")
        raise ConfigError("--key-store", f"got {spec!r}, expected file, pkcs11:URI or tpm")


def open_key_store(record: Mapping[str, Any], key_path: Path, pin: str | None) -> KeyStore:
    """Open the store a ``keystore.json`` record names (``key_path`` for a file store)."""
    kind = record.get("type")
    if kind == "file":
        return FileKeyStore.load(key_path)
    if kind == "pkcs11":
        uri, module = record.get("uri"), record.get("module")
        if not isinstance(uri, str) or not isinstance(module, str):
            raise KeyStoreError("keystore_failed", "keystore.json: pkcs11 needs uri and module")
        return Pkcs11KeyStore.load(uri, module, require_pin(pin))
    if kind == "tpm":
        tcti, handle = record.get("tcti"), record.get("handle")
        if not isinstance(tcti, str) or not isinstance(handle, str):
            raise KeyStoreError("keystore_failed", "keystore.json: tpm needs tcti and handle")
        try:
            number = int(handle, 16)
        except ValueError:
            number = -1
        if number not in IDENTITY_KEY_HANDLES:
            raise KeyStoreError(
                "keystore_failed", f"keystore.json: tpm handle {handle!r} is not an identity slot"
            )
        try:
            return TpmKeyStore.load(tcti, number)
        except TpmError as err:
            raise KeyStoreError(
                "keystore_key_missing" if err.code == "tpm_key_missing" else "keystore_unavailable",
                err.message,
            ) from None
    raise KeyStoreError(
        "keystore_failed", f"keystore.json: type {kind!r} (expected file, pkcs11 or tpm)"
    )
