"""Shared constants and helpers of the pki tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.pki.verify import TrustMaterial

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
CA_CREATED = NOW - timedelta(days=1)  # so the CA's CRL is valid until NOW + 61 days
TRUST_DOMAIN = "ztagent.dev"
DEVICE_URI = "spiffe://ztagent.dev/device/dev-1"
CLIENT_AUTH = [ExtendedKeyUsageOID.CLIENT_AUTH]


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@dataclass(frozen=True)
class Pki:
    dir: Path
    root: builders.KeyPair
    issuing: builders.KeyPair

    @property
    def layout(self) -> ca_store.CaLayout:
        return ca_store.CaLayout(self.dir)

    def trust(self, crl_pem: bytes | None = None, *, no_crl: bool = False) -> TrustMaterial:
        crl = None if no_crl else (crl_pem if crl_pem is not None else self.layout.crl.read_bytes())
        return TrustMaterial.from_pem(self.layout.bundle.read_bytes(), crl)


Mint = Callable[..., builders.KeyPair]
