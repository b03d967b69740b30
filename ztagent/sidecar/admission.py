"""Per-call admission: who is calling (device certificate) before anything is forwarded.

The checks themselves are pure (``ztagent.pki.verify``); this module only pulls the peer
certificate out of grpc's auth context and turns the verified identity into the headers the
upstream receives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import grpc

from ztagent.pki.errors import CertError
from ztagent.pki.verify import DeviceChecker, VerifiedDevice

DEVICE_ID_HEADER = "x-ztagent-device-id"
SPIFFE_ID_HEADER = "x-ztagent-spiffe-id"

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def peer_certificate_pem(auth_context: Mapping[str, Sequence[bytes]]) -> bytes:
    """The leaf certificate grpc saw in the TLS handshake (grpc gives the leaf only)."""
    pems = auth_context.get("x509_pem_cert")
    if not pems:
        raise CertError(
            "cert_missing", "no client certificate on this connection (expected an mTLS peer)"
        )
    return pems[0]


class DeviceAdmission:
    """Admits a call when its peer certificate passes the device identity check."""

    def __init__(self, checker: DeviceChecker, clock: Clock = utc_now) -> None:
        self.checker = checker
        self._clock = clock

    def verify(self, auth_context: Mapping[str, Sequence[bytes]]) -> VerifiedDevice:
        return self.checker.check_pem(peer_certificate_pem(auth_context), self._clock())

    def admit(
        self, context: grpc.aio.ServicerContext, full_method: str
    ) -> Sequence[tuple[str, str | bytes]]:
        device = self.verify(context.auth_context())
        return ((DEVICE_ID_HEADER, device.device_id), (SPIFFE_ID_HEADER, device.spiffe_id))
