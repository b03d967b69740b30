"""The device directory: its files, read and written atomically, and the key store's
lifecycle around an enrollment (a new key, discarding one that got no certificate, removing
the previous one).

Files: ``device.pem`` (leaf + issuing CA), ``device.key`` (file store only),
``ca-bundle.pem``, ``keystore.json`` (which store holds the key), ``enrollment.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ztagent.device.attest import record_binding
from ztagent.device.errors import EnrollClientError
from ztagent.device.keystores import (
    DEFAULT_KEY_LABEL,
    DEFAULT_PKCS11_MODULE,
    FileKeyStore,
    KeyStore,
    KeyStoreSpec,
    Pkcs11KeyStore,
    TpmKeyStore,
    open_key_store,
    require_pin,
)
from ztagent.device.tpm import DeviceTpm
from ztagent.errors import ConfigError, ZtagentError
from ztagent.files import PUBLIC_MODE, make_private_dir, refuse_symlink, write_atomic
from ztagent.timefmt import rfc3339

log = logging.getLogger("ztagent.device.enroll")

DEVICE_CERT = "device.pem"
DEVICE_KEY = "device.key"
CA_BUNDLE = "ca-bundle.pem"
KEYSTORE_FILE = "keystore.json"
ENROLLMENT_FILE = "enrollment.json"
NEW_KEY_FILE = ".device.key.new"
STATE_VERSION = 1
DEFAULT_RENEW_PORT = 8445


def serial_text(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


@dataclass(frozen=True)
class DeviceDir:
    """What ``renew`` reads from a device directory."""

    dir: Path
    enrollment: dict[str, Any]
    chain_pem: bytes
    cert: x509.Certificate
    ca_bundle_pem: bytes
    key_store: dict[str, Any]

    @property
    def device_id(self) -> str:
        return str(self.enrollment["device_id"])


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EnrollClientError("device_dir_invalid", f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise EnrollClientError("device_dir_invalid", f"{path} is not a JSON object")
    return doc


def load_device_dir(dir: Path) -> DeviceDir:
    try:
        chain_pem = (dir / DEVICE_CERT).read_bytes()
        bundle = (dir / CA_BUNDLE).read_bytes()
        cert = x509.load_pem_x509_certificate(chain_pem)
    except OSError as exc:
        raise EnrollClientError(
            "device_dir_invalid", f"{dir} is not an enrolled device directory: {exc}"
        ) from None
    except ValueError as exc:
        raise EnrollClientError("device_dir_invalid", f"{dir / DEVICE_CERT}: {exc}") from None
    enrollment = read_json(dir / ENROLLMENT_FILE)
    if not isinstance(enrollment.get("device_id"), str):
        raise EnrollClientError("device_dir_invalid", f"{dir / ENROLLMENT_FILE}: no device_id")
    return DeviceDir(dir, enrollment, chain_pem, cert, bundle, read_json(dir / KEYSTORE_FILE))


def cert_device_id(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def existing_enrollment(
    dir: Path,
) -> tuple[x509.Certificate, str | None, dict[str, Any] | None] | None:
    """The current certificate, device id and key store record, if the dir is enrolled."""
    path = dir / DEVICE_CERT
    if not path.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise EnrollClientError(
            "device_dir_invalid", f"{path} exists but cannot be read ({exc}); use force"
        ) from None
    device_id = cert_device_id(cert)
    with contextlib.suppress(EnrollClientError):
        device_id = str(read_json(dir / ENROLLMENT_FILE).get("device_id") or device_id)
    record: dict[str, Any] | None = None
    with contextlib.suppress(EnrollClientError):
        record = read_json(dir / KEYSTORE_FILE)
    return cert, device_id, record


def unwritable(path: Path, exc: OSError) -> EnrollClientError:
    """``device_dir_invalid`` naming the file a device-directory write could not do (a
    symlink planted at it is refused, never written through or replaced)."""
    return EnrollClientError("device_dir_invalid", f"cannot write {path}: {exc.strerror}")


def write_file(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """One device-directory file, atomically with ``mode``, never through a symlink."""
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise unwritable(path, exc) from None


def make_device_dir(dir: Path) -> None:
    """The device directory: 0700 (parents too) whatever the umask."""
    try:
        make_private_dir(dir)
    except OSError as exc:
        raise EnrollClientError(
            "device_dir_invalid", f"cannot create {dir}: {exc.strerror}"
        ) from None


def promote(tmp: Path, final: Path) -> None:
    """Renames the new key file into place; a symlink at ``final`` is refused, not replaced."""
    try:
        refuse_symlink(final)
        os.replace(tmp, final)
    except OSError as exc:
        raise unwritable(final, exc) from None
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_state(
    dir: Path,
    *,
    leaf: x509.Certificate,
    chain_pem: bytes,
    bundle_pem: bytes,
    store: KeyStore,
    server: str,
    renew_server: str,
    device_id: str,
    spiffe_id: str,
    ak_binding: tuple[str, str] | None = None,
) -> None:
    """``ak_binding`` = (AK name, enrollment id) after TPM-bound enrollment."""
    if isinstance(store, FileKeyStore) and store.path.name == NEW_KEY_FILE:
        promote(store.path, dir / DEVICE_KEY)
        store.path = dir / DEVICE_KEY
    write_file(dir / DEVICE_CERT, chain_pem)
    write_file(dir / CA_BUNDLE, bundle_pem)
    write_file(dir / KEYSTORE_FILE, json_bytes(store.record()))
    doc = {
        "version": STATE_VERSION,
        "server": server,
        "renew_server": renew_server,
        "device_id": device_id,
        "spiffe_id": spiffe_id,
        "serial": serial_text(leaf),
        "not_before": rfc3339(leaf.not_valid_before_utc),
        "not_after": rfc3339(leaf.not_valid_after_utc),
    }
    if ak_binding is not None:
        doc["ak_name"] = ak_binding[0]
        record_binding(dir, *ak_binding)
    write_file(dir / ENROLLMENT_FILE, json_bytes(doc))


def discard_key(store: KeyStore) -> None:
    """Drop a key that never got a certificate."""
    with contextlib.suppress(OSError, ZtagentError):
        if isinstance(store, FileKeyStore) and store.path.name == NEW_KEY_FILE:
            store.path.unlink()
        elif isinstance(store, Pkcs11KeyStore | TpmKeyStore):
            store.destroy()
    store.close()


def read_ca_bundle(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError("--ca-bundle", f"cannot read {path}: {exc.strerror}") from None


def new_key_store(
    spec: KeyStoreSpec,
    dir: Path,
    pin: str | None,
    tpm: DeviceTpm | None,
    previous: Mapping[str, Any] | None,
) -> KeyStore:
    make_device_dir(dir)
    if spec.kind == "file":
        return FileKeyStore.create(dir / NEW_KEY_FILE)
    if spec.kind == "tpm":
        if tpm is None:
            raise ConfigError("--tpm", "the tpm key store needs the TPM: give --tpm TCTI")
        return TpmKeyStore.create(tpm, avoid=tpm_handle(previous, tpm))
    uri = spec.uri
    assert uri is not None
    if uri.token is None:
        raise ConfigError("--key-store", f"{uri} names no token label (expected token=LABEL)")
    return Pkcs11KeyStore.create(
        uri.module or DEFAULT_PKCS11_MODULE,
        uri.token,
        require_pin(pin),
        uri.object or DEFAULT_KEY_LABEL,
        key_id=uri.id,
    )


def tpm_handle(record: Mapping[str, Any] | None, tpm: DeviceTpm) -> int | None:
    """The identity slot a previous enrollment's key uses in this TPM (kept until replaced)."""
    if record is None or record.get("type") != "tpm" or record.get("tcti") != tpm.tcti:
        return None
    try:
        return int(str(record.get("handle")), 16)
    except ValueError:
        return None


def remove_old_key(
    dir: Path, record: dict[str, Any] | None, new: KeyStore, pin: str | None
) -> None:
    """After re-enrollment: delete the previous key (token objects, or a now unused file)."""
    if record is None or record == new.record():
        return
    try:
        if record.get("type") in ("pkcs11", "tpm"):
            old = open_key_store(record, dir / DEVICE_KEY, pin)
            try:
                if isinstance(old, Pkcs11KeyStore | TpmKeyStore) and old.record() != new.record():
                    old.destroy()
            finally:
                old.close()
        elif record.get("type") == "file" and not isinstance(new, FileKeyStore):
            (dir / DEVICE_KEY).unlink(missing_ok=True)
    except (OSError, ZtagentError) as err:
        log.warning("could not remove the previous key (%s): %s", record, err)
