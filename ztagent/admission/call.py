"""What admission needs from a call: the peer certificate, the identity header names, a clock.

The checks themselves are pure (``ztagent.pki.verify``); the pipeline (``pipeline.py``) runs
them in order for every call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

DEVICE_ID_HEADER = "x-ztagent-device-id"
SPIFFE_ID_HEADER = "x-ztagent-spiffe-id"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def peer_certificate_pem(auth_context: Mapping[str, Sequence[bytes]]) -> bytes | None:
    """The leaf certificate grpc saw in the TLS handshake (grpc gives the leaf only), or None
    without one (``AdmissionCore.verify_device_pem`` refuses that as ``cert_missing``)."""
    pems = auth_context.get("x509_pem_cert")
    return pems[0] if pems else None
