"""Key stores: a 0600 PKCS#8 file, and a non-extractable key on a private SoftHSM2 token."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from tests.fixtures.softhsm import SoftHsm, softhsm_fixture  # noqa: F401 (the fixture)
from ztagent.device.keystores import (
    DEFAULT_PKCS11_MODULE,
    PIN_ENV,
    FileKeyStore,
    KeyStoreError,
    KeyStoreSpec,
    Pkcs11KeyStore,
    Pkcs11Uri,
    open_key_store,
    resolve_pin,
    verify_digest_signature,
)
from ztagent.errors import ConfigError

DIGEST = hashlib.sha256(b"to be signed").digest()


# --- file --------------------------------------------------------------------------------


def test_file_store_is_0600_p256_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    store = FileKeyStore.create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert store.public_key().curve.name == "secp256r1"
    again = FileKeyStore.load(path)
    assert again.public_key() == store.public_key()
    sig = again.sign_digest_ecdsa(DIGEST)
    assert verify_digest_signature(store.public_key(), DIGEST, sig)
    assert store.record() == {"type": "file"}


def test_file_store_refuses_missing_and_non_p256(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="keystore_key_missing"):
        FileKeyStore.load(tmp_path / "nope.key")
    other = tmp_path / "p384.key"
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP384R1())
    other.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyStoreError, match="expected EC P-256"):
        FileKeyStore.load(other)


def test_signature_check_rejects_other_digest(tmp_path: Path) -> None:
    store = FileKeyStore.create(tmp_path / "k")
    sig = store.sign_digest_ecdsa(DIGEST)
    assert not verify_digest_signature(store.public_key(), hashlib.sha256(b"x").digest(), sig)
    with pytest.raises(KeyStoreError, match="expected a 32-byte"):
        store.sign_digest_ecdsa(b"short")


# --- URIs and specs ----------------------------------------------------------------------


def test_pkcs11_uri_parsing() -> None:
    uri = Pkcs11Uri.parse(
        "pkcs11:token=edge%20hsm;object=device;id=%01%02%ff;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so"
    )
    assert uri == Pkcs11Uri(
        token="edge hsm",
        object="device",
        id=b"\x01\x02\xff",
        module="/usr/lib/softhsm/libsofthsm2.so",
    )
    assert str(uri) == "pkcs11:token=edge%20hsm;object=device;id=%01%02%FF"
    assert Pkcs11Uri.parse(str(uri)) == Pkcs11Uri("edge hsm", "device", b"\x01\x02\xff")
    in_path = Pkcs11Uri.parse("pkcs11:token=t;module-path=%2Fopt%2Fp11.so")
    assert in_path.module == "/opt/p11.so"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs12:token=t", "expected a URI starting with 'pkcs11:'"),
        ("pkcs11:object=k", "names no token"),
        ("pkcs11:token=t;object=k?pin-value=1234", "the PIN must not be in the URI"),
        ("pkcs11:token=t;pin-source=file:/p", "the PIN must not be in the URI"),
        ("pkcs11:token=t;slot-id=3", "'slot-id' is not supported"),
        ("pkcs11:token=t;token=u", "appears twice"),
        ("pkcs11:token=t;type=public", "expected 'private'"),
        ("pkcs11:token", "has no '=value'"),
    ],
)
def test_pkcs11_uri_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Pkcs11Uri.parse(text)


def test_key_store_spec() -> None:
    assert KeyStoreSpec.parse("file").kind == "file"
    spec = KeyStoreSpec.parse("pkcs11:token=t;object=k")
    assert spec.kind == "pkcs11"
    assert spec.uri == Pkcs11Uri(token="t", object="k")
    assert KeyStoreSpec.parse("tpm").kind == "tpm"
    with pytest.raises(ConfigError, match="expected file, pkcs11:URI or tpm"):
        KeyStoreSpec.parse("yubikey")


def test_resolve_pin(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("4321\n")
    assert resolve_pin(pin_file, {PIN_ENV: "env"}) == "4321"
    assert resolve_pin(None, {PIN_ENV: "env"}) == "env"
    assert resolve_pin(None, {}) is None
    with pytest.raises(ConfigError, match="--pin-file: cannot read"):
        resolve_pin(tmp_path / "missing", {})


# --- PKCS#11 on SoftHSM2 -----------------------------------------------------------------


def test_pkcs11_key_is_generated_on_token_and_not_extractable(softhsm: SoftHsm) -> None:
    store = Pkcs11KeyStore.create(softhsm.module, softhsm.token_label, softhsm.pin, "device")
    try:
        private = store.private_key_object
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.LOCAL] is True  # generated on the token, not imported
        assert private[Attribute.TOKEN] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]
        sig = store.sign_digest_ecdsa(DIGEST)
        assert verify_digest_signature(store.public_key(), DIGEST, sig)
        assert not verify_digest_signature(
            store.public_key(), hashlib.sha256(b"other").digest(), sig
        )
        record = store.record()
        assert record["type"] == "pkcs11"
        assert record["module"] == DEFAULT_PKCS11_MODULE
        assert record["uri"].startswith(f"pkcs11:token={softhsm.token_label};object=device;id=")
        assert "pin" not in str(record).lower()
    finally:
        store.close()


def test_pkcs11_wrap_export_is_refused(softhsm: SoftHsm) -> None:
    store = Pkcs11KeyStore.create(softhsm.module, softhsm.token_label, softhsm.pin, "device")
    try:
        session = store._session
        wrapping = session.generate_key(
            pkcs11.KeyType.AES, 256, store=False, template={Attribute.WRAP: True}
        )
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapping.wrap_key(store.private_key_object)
    finally:
        store.close()


def test_pkcs11_reload_by_record_and_by_label(softhsm: SoftHsm, tmp_path: Path) -> None:
    created = Pkcs11KeyStore.create(softhsm.module, softhsm.token_label, softhsm.pin, "device")
    record = created.record()
    public = created.public_key()
    created.close()
    loaded = open_key_store(record, tmp_path / "unused", softhsm.pin)
    try:
        assert loaded.public_key() == public
        assert verify_digest_signature(public, DIGEST, loaded.sign_digest_ecdsa(DIGEST))
    finally:
        loaded.close()
    by_label = Pkcs11KeyStore.load(softhsm.uri("device"), None, softhsm.pin)
    try:
        assert by_label.public_key() == public
        assert by_label.uri.id is not None  # pinned to the exact key found
    finally:
        by_label.close()


def test_pkcs11_refusals(softhsm: SoftHsm, tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="keystore_pin_incorrect"):
        Pkcs11KeyStore.load(softhsm.uri("device"), None, "0000")
    with pytest.raises(KeyStoreError, match="keystore_key_missing"):
        Pkcs11KeyStore.load(softhsm.uri("absent"), None, softhsm.pin)
    with pytest.raises(KeyStoreError, match="keystore_unavailable: token 'nope'"):
        Pkcs11KeyStore.load("pkcs11:token=nope;object=k", softhsm.module, softhsm.pin)
    with pytest.raises(KeyStoreError, match="cannot load PKCS#11 module"):
        Pkcs11KeyStore.load("pkcs11:token=t;object=k", str(tmp_path / "no.so"), softhsm.pin)
    with pytest.raises(ConfigError, match="needs a PIN"):
        open_key_store(
            {"type": "pkcs11", "uri": "pkcs11:token=t;object=k", "module": softhsm.module},
            tmp_path,
            None,
        )


def test_pkcs11_destroy_removes_both_objects(softhsm: SoftHsm) -> None:
    store = Pkcs11KeyStore.create(softhsm.module, softhsm.token_label, softhsm.pin, "device")
    uri = store.uri
    store.destroy()
    store.close()
    lib = pkcs11.lib(softhsm.module)
    with lib.get_token(token_label=softhsm.token_label).open(user_pin=softhsm.pin) as session:
        left = list(session.get_objects({Attribute.ID: uri.id}))
        assert left == []
        assert list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})) == []
