"""A dev CA built once per session in a temp dir, and a helper that mints leaves from it."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ObjectIdentifier

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.pki.verify import DevicePolicy

from ._support import CA_CREATED, CLIENT_AUTH, DEVICE_URI, NOW, TRUST_DOMAIN, Mint, Pki


def _load_pair(cert: Path, key: Path) -> builders.KeyPair:
    k = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    return builders.KeyPair(x509.load_pem_x509_certificate(cert.read_bytes()), k)


@pytest.fixture(scope="session")
def session_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    layout = ca_store.init_ca(tmp_path_factory.mktemp("ca") / "ca", now=CA_CREATED)
    return Pki(
        layout.dir,
        _load_pair(layout.root_cert, layout.root_key),
        _load_pair(layout.issuing_cert, layout.issuing_key),
    )


@pytest.fixture
def pki(session_pki: Pki, tmp_path: Path) -> Pki:
    """A private copy of the session CA, for tests that revoke or rewrite files."""
    target = tmp_path / "ca"
    shutil.copytree(session_pki.dir, target)
    return Pki(target, session_pki.root, session_pki.issuing)


@pytest.fixture(scope="session")
def policy() -> DevicePolicy:
    return DevicePolicy(trust_domain=TRUST_DOMAIN)


@pytest.fixture(scope="session")
def mint(session_pki: Pki) -> Mint:
    """Mint a leaf from the session issuing CA; good device-cert defaults, any overridable."""

    def _mint(
        *,
        issuer: builders.KeyPair | None = None,
        uris: Sequence[str] = (DEVICE_URI,),
        eku: Sequence[ObjectIdentifier] | None = CLIENT_AUTH,
        not_before: datetime = NOW - timedelta(days=1),
        not_after: datetime = NOW + timedelta(days=29),
    ) -> builders.KeyPair:
        return builders.build_leaf(
            issuer or session_pki.issuing,
            subject_cn="dev-1",
            uris=list(uris),
            eku=eku,
            not_before=not_before,
            not_after=not_after,
        )

    return _mint
