"""The device's gRPC transport to the CA: mTLS with the key wherever the key store keeps it
(a PEM file, or a custom signer for PKCS#11 and TPM keys that never leave their store), and
the mapping of the CA's statuses back to errors."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental
from cryptography.hazmat.primitives import hashes

from ztagent._proto.v1 import enrollment_pb2_grpc as pb_grpc
from ztagent.device.device_dir import KEYSTORE_FILE, read_json
from ztagent.device.errors import CaUnreachable, EnrollClientError
from ztagent.device.keystores import (
    FileKeyStore,
    KeyStore,
    open_key_store,
)
from ztagent.enrollment import STATUS_BY_CODE, EnrollError
from ztagent.errors import ZtagentError

log = logging.getLogger("ztagent.device.enroll")

RPC_TIMEOUT_S = 30.0
TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def channel_credentials(
    store: KeyStore, cert_chain_pem: bytes, ca_bundle_pem: bytes
) -> grpc.ChannelCredentials:
    """Client credentials presenting ``cert_chain_pem`` with the store's key.

    A file store hands gRPC its PEM key; any other store signs the TLS handshake through
    ``grpc.experimental.ssl_channel_credentials_with_custom_signer`` (the key stays put).
    """
    if isinstance(store, FileKeyStore):
        return grpc.ssl_channel_credentials(
            root_certificates=ca_bundle_pem,
            private_key=store.private_key_pem(),
            certificate_chain=cert_chain_pem,
        )
    algorithms = grpc.experimental.PrivateKeySignatureAlgorithm

    def sign(data: bytes, algorithm: Any, on_complete: Callable[[Any], None]) -> bytes:
        # Synchronous answer (bytes). Raising fails the handshake at once (tried here); the
        # asynchronous on_complete route, called before returning, stalls it to the deadline.
        if algorithm != algorithms.ECDSA_SECP256R1_SHA256:
            log.error("TLS asked %s for %s", store.description(), algorithm)
            raise ValueError(f"unsupported signature algorithm {algorithm} (expected ECDSA P-256)")
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        try:
            return store.sign_digest_ecdsa(digest.finalize())
        except ZtagentError as err:
            log.error("TLS handshake signing failed: %s", err)
            raise

    with warnings.catch_warnings():
        # Experimental in grpcio 1.85 and the only way to do client TLS with a key that
        # cannot leave its store; pinned by pyproject, covered by the integration tests.
        warnings.simplefilter("ignore", grpc.experimental.ExperimentalApiWarning)
        return grpc.experimental.ssl_channel_credentials_with_custom_signer(
            private_key_sign_fn=sign,
            root_certificates=ca_bundle_pem,
            certificate_chain=cert_chain_pem,
        )


async def call_ca(
    method: str, address: str, credentials: grpc.ChannelCredentials, request: Any, timeout_s: float
) -> Any:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        try:
            return await getattr(stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(method, exc) from None


def rpc_error(method: str, exc: grpc.aio.AioRpcError) -> ZtagentError:
    details = str(exc.details() or "")
    if exc.code() in TRANSIENT_CODES:
        return CaUnreachable(method, exc.code().name, details)
    code, sep, message = details.partition(": ")
    if sep and code in STATUS_BY_CODE:
        return EnrollError(code, message)
    return EnrollClientError("enroll_refused", f"{method}: {exc.code().name}: {details}")


def device_credentials(
    cert: Path, ca_bundle_pem: bytes, pin: str | None = None
) -> grpc.ChannelCredentials:
    """Client credentials for ``cert`` of a device directory, with the key wherever that
    directory's ``keystore.json`` says (a file next to the cert when there is none)."""
    record_path = cert.parent / KEYSTORE_FILE
    record = read_json(record_path) if record_path.exists() else {"type": "file"}
    store = open_key_store(record, cert.with_suffix(".key"), pin)
    try:
        return channel_credentials(store, cert.read_bytes(), ca_bundle_pem)
    except OSError as exc:
        raise EnrollClientError("device_dir_invalid", f"cannot read {cert}: {exc}") from None
