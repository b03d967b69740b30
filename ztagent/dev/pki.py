"""DEVELOPMENT ONLY: the whole dev PKI that `ztagent ca init` and `make certs` create.

``init_dev_pki`` makes the CA directory (``ztagent.ca.store.init_ca``) and, beside it, the dev
token issuer, a firmware vendor key, a TPM manufacturer CA for swtpm EK certificates and a
model publisher key. Each helper below replaces what it finds, so a re-created PKI never
mixes keys of two generations.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ztagent.ca import store
from ztagent.dev import tpm_manufacturer
from ztagent.dev.issuer import DevIssuer, init_dev_issuer
from ztagent.posture.firmware import generate_firmware_key


@dataclass(frozen=True)
class DevPki:
    layout: store.CaLayout
    issuer: DevIssuer
    firmware_vendor_key: Path
    tpm_manufacturer_cert: Path
    model_publisher_key: Path


def init_dev_pki(
    ca_dir: Path,
    trust_domain: str,
    *,
    force: bool = False,
    db: str | None = None,
    key_store: str = "file",
    pin_file: Path | None = None,
) -> DevPki:
    """The dev CA in ``ca_dir`` (refused over an existing one without ``force``; the issuing
    key in ``key_store``, see ``init_ca``) and the dev token issuer, firmware vendor, TPM
    manufacturer and model publisher next to it."""
    layout = store.init_ca(
        ca_dir, trust_domain, force=force, db=db, key_store=key_store, pin_file=pin_file
    )
    return DevPki(
        layout=layout,
        issuer=init_dev_issuer(ca_dir, trust_domain, force=True),
        firmware_vendor_key=dev_firmware_vendor(ca_dir),
        tpm_manufacturer_cert=dev_tpm_manufacturer(ca_dir, fresh=True),
        model_publisher_key=dev_model_publisher(ca_dir),
    )


def dev_model_publisher(ca_dir: Path) -> Path:
    """A fresh model-signing key pair in <ca_dir>/models/publisher.{key,pub} (``make run``
    signs the trained manifests with it); returns the private key's path."""
    return _fresh_signing_key(ca_dir / "models", "publisher")


def dev_firmware_vendor(ca_dir: Path) -> Path:
    """A fresh firmware vendor key pair in <ca_dir>/firmware/ (the example config trusts
    vendor.pub); returns the private key's path."""
    return _fresh_signing_key(ca_dir / "firmware", "vendor")


def dev_tpm_manufacturer(ca_dir: Path, *, fresh: bool = False) -> Path:
    """The CA that certifies swtpm EKs in <ca_dir>/tpm-manufacturer/ (the example config's
    posture.ek_ca_bundle); returns its certificate's path."""
    out = ca_dir / "tpm-manufacturer"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    return tpm_manufacturer.init(out)


def ensure_dev_firmware_vendor(ca_dir: Path) -> Path:
    """The dev firmware vendor's private key, created when missing (older dev PKIs)."""
    key = ca_dir / "firmware" / "vendor.key"
    return key if key.exists() else dev_firmware_vendor(ca_dir)


def ensure_dev_tpm_manufacturer(ca_dir: Path) -> Path:
    """The dev TPM manufacturer CA's certificate, created when missing (older dev PKIs)."""
    return dev_tpm_manufacturer(ca_dir)


def _fresh_signing_key(out: Path, name: str) -> Path:
    """A new Ed25519 pair ``<out>/<name>.key`` / ``.pub``, replacing any; the private key."""
    for stale in (out / f"{name}.key", out / f"{name}.pub"):
        stale.unlink(missing_ok=True)
    private, _ = generate_firmware_key(out, name)
    return private
