"""PKCS#10 certification requests signed through a ``KeyStore``.

One code path for every store: the request is built with ``asn1crypto`` and its
``certification_request_info`` is signed by the store (SHA-256, then ``sign_digest_ecdsa``),
because ``cryptography`` cannot sign with a key it does not hold (an HSM or TPM key). The
subject is ``CN=<device id>``; the CA decides the rest (SAN, EKU, lifetime), so nothing else
is requested. The finished request is checked against the store's public key before it is
returned, so a store that signs badly is caught here rather than by the CA.
"""

from __future__ import annotations

import hashlib

from asn1crypto import csr as asn1_csr  # type: ignore[import-untyped]
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztagent.device.keystores import KeyStore, KeyStoreError


def build_csr(store: KeyStore, device_id: str) -> bytes:
    """A DER PKCS#10 request for ``CN=device_id`` with the store's key, signed by the store."""
    spki = store.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": asn1_x509.Name.build({"common_name": device_id}),
            "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
            "attributes": [],
        }
    )
    digest = hashlib.sha256(info.dump()).digest()
    signature = store.sign_digest_ecdsa(digest)
    request = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": signature,
        }
    )
    der: bytes = request.dump()
    if not x509.load_der_x509_csr(der).is_signature_valid:
        raise KeyStoreError(
            "keystore_failed",
            f"{store.description()} produced a CSR signature that does not verify "
            "with its own public key",
        )
    return der
