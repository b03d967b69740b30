"""PKCS#10 requests signed through the key store: file and PKCS#11 alike verify."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from tests.fixtures.softhsm import SoftHsm, softhsm_fixture  # noqa: F401 (the fixture)
from ztagent.device.csr import build_csr
from ztagent.device.keystores import FileKeyStore, KeyStoreError, Pkcs11KeyStore


def _check(der: bytes, public: ec.EllipticCurvePublicKey, device_id: str) -> None:
    request = x509.load_der_x509_csr(der)
    assert request.is_signature_valid
    assert request.public_key() == public
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert request.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert isinstance(request.signature_hash_algorithm, hashes.SHA256)


def test_csr_from_file_store(tmp_path: Path) -> None:
    store = FileKeyStore.create(tmp_path / "device.key")
    _check(build_csr(store, "dev-1"), store.public_key(), "dev-1")


def test_csr_from_pkcs11_store(softhsm: SoftHsm) -> None:
    store = Pkcs11KeyStore.create(softhsm.module, softhsm.token_label, softhsm.pin, "device")
    try:
        _check(build_csr(store, "hsm-dev"), store.public_key(), "hsm-dev")
    finally:
        store.close()


class _WrongKeyStore:
    """A store whose signatures come from another key than the one it advertises."""

    def __init__(self, tmp_path: Path) -> None:
        self._shown = FileKeyStore.create(tmp_path / "shown.key")
        self._signer = FileKeyStore.create(tmp_path / "signer.key")

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._shown.public_key()

    def sign_digest_ecdsa(self, digest: bytes) -> bytes:
        return self._signer.sign_digest_ecdsa(digest)

    def description(self) -> str:
        return "wrong-key store"

    def record(self) -> dict[str, str]:
        return {"type": "test"}

    def close(self) -> None:
        return None


def test_csr_refuses_a_store_that_signs_with_another_key(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="wrong-key store produced a CSR signature"):
        build_csr(_WrongKeyStore(tmp_path), "dev-1")
