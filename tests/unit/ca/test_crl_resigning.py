"""The CA re-signs its CRL when less than half of its validity is left, so a sidecar that
synced always holds a CRL with at least half the validity ahead (31 days by default)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from tests.unit.pki._support import NOW
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.ca.service import crl_needs_resigning


def test_default_validity_leaves_a_month_after_a_sync() -> None:
    assert timedelta(days=62) == builders.CRL_LIFETIME
    assert timedelta(days=30) <= builders.CRL_LIFETIME / 2


def test_re_signed_at_half_of_its_validity(tmp_path: Path) -> None:
    ca_store.init_ca(tmp_path / "ca", now=NOW)
    crl = ca_store.write_crl(tmp_path / "ca", now=NOW, validity=timedelta(days=10))
    pem = crl.public_bytes(Encoding.PEM)
    assert crl.next_update_utc == NOW + timedelta(days=10)
    assert not crl_needs_resigning(pem, NOW + timedelta(days=4, hours=23))
    assert crl_needs_resigning(pem, NOW + timedelta(days=5, hours=1))
    assert crl_needs_resigning(pem, NOW + timedelta(days=11))  # past nextUpdate
    assert crl_needs_resigning(b"not a CRL", NOW)


def test_revoke_signs_with_the_given_validity(tmp_path: Path) -> None:
    ca_dir = ca_store.init_ca(tmp_path / "ca", now=NOW).dir
    cert_path = tmp_path / "d.pem"
    ca_store.issue_device_cert(ca_dir, "d", cert_path, now=NOW)
    ca_store.revoke(ca_dir, cert_path=cert_path, now=NOW, crl_validity=timedelta(days=3))
    from cryptography import x509

    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.next_update_utc == NOW + timedelta(days=3)
