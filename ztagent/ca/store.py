"""The CA directory: root and issuing CA, sidecar server cert, device certs, CRL.

Library functions used by ``ztagent ca ...`` and by the tests. Layout of a CA directory is
``CaLayout`` (documented in ``certs-dev/README.md``). All keys are EC P-256, written as
PKCS#8 PEM with mode 0600; every file is written atomically. ``ca.json`` holds the state:
trust domain, CRL number, revoked serials with dates, issued serials with device ids.
Mutating operations hold an exclusive lock on ``.ca.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztagent.ca.builders import (
    BACKDATE,
    CRL_LIFETIME,
    DEFAULT_TRUST_DOMAIN,
    DEVICE_DAYS,
    SERVER_LIFETIME,
    KeyPair,
    _now,
    build_crl,
    build_device,
    build_leaf,
    cert_pem,
    key_pem,
    new_ca,
    serial_hex,
    sign_leaf,
)
from ztagent.files import KEY_MODE, PUBLIC_MODE, make_private_dir, write_atomic
from ztagent.pki.errors import CaError, CertError
from ztagent.pki.spiffe import DeviceId, TrustDomain, device_spiffe_id
from ztagent.timefmt import parse_rfc3339, rfc3339

STATE_VERSION = 1


@dataclass(frozen=True)
class CaLayout:
    """The files of a CA directory (every path is a field, so ``vars(layout)`` lists them)."""

    dir: Path
    root_cert: Path = field(init=False)
    root_key: Path = field(init=False)
    issuing_cert: Path = field(init=False)
    issuing_key: Path = field(init=False)
    bundle: Path = field(init=False)
    """Root + issuing CA: the sidecar's client CA bundle and the devices' server CA."""
    server_cert: Path = field(init=False)
    """Server leaf followed by the issuing CA."""
    server_key: Path = field(init=False)
    crl: Path = field(init=False)
    state: Path = field(init=False)
    devices_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        names = {
            "root_cert": "root-ca.pem",
            "root_key": "root-ca.key",
            "issuing_cert": "issuing-ca.pem",
            "issuing_key": "issuing-ca.key",
            "bundle": "ca-bundle.pem",
            "server_cert": "server.pem",
            "server_key": "server.key",
            "crl": "crl.pem",
            "state": "ca.json",
            "devices_dir": "devices",
        }
        for attr, name in names.items():
            object.__setattr__(self, attr, self.dir / name)

    @property
    def lock(self) -> Path:
        return self.dir / ".ca.lock"

    def device_cert(self, device_id: str) -> Path:
        """Device leaf followed by the issuing CA."""
        return self.devices_dir / f"{device_id}.pem"

    def device_key(self, device_id: str) -> Path:
        return self.devices_dir / f"{device_id}.key"


def _write(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """``write_atomic``, never through a symlink; ``ca_state_invalid`` naming the path when the
    file cannot be written (a symlink planted at it is refused, not followed or replaced)."""
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        raise CaError("ca_state_invalid", f"cannot write {path}: {exc.strerror}") from None


def _make_dir(path: Path) -> None:
    """A CA directory (or subdirectory): 0700 whatever the umask, parents too."""
    try:
        make_private_dir(path)
    except OSError as exc:
        raise CaError("ca_state_invalid", f"cannot create {path}: {exc.strerror}") from None


def _write_pair(cert_path: Path, key_path: Path, pair: KeyPair, *chain: x509.Certificate) -> None:
    _write(key_path, key_pem(pair.key), KEY_MODE)
    _write(cert_path, cert_pem(pair.cert, *chain), PUBLIC_MODE)


# --- the CA directory -----------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime


@dataclass(frozen=True)
class IssuedEntry:
    serial: int
    kind: str  # "server" | "device"
    device_id: str | None
    not_after: datetime


@dataclass(frozen=True)
class CaState:
    """The contents of ``ca.json``."""

    trust_domain: str
    crl_number: int
    revoked: tuple[RevokedEntry, ...] = ()
    issued: tuple[IssuedEntry, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "version": STATE_VERSION,
            "trust_domain": self.trust_domain,
            "crl_number": self.crl_number,
            "revoked": [
                {"serial": serial_hex(r.serial), "revoked_at": rfc3339(r.revoked_at)}
                for r in self.revoked
            ],
            "issued": [
                {
                    "serial": serial_hex(i.serial),
                    "kind": i.kind,
                    "device_id": i.device_id,
                    "not_after": rfc3339(i.not_after),
                }
                for i in self.issued
            ],
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: Path) -> CaState:
        try:
            doc: Any = json.loads(data)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r} (expected {STATE_VERSION})")
            return cls(
                trust_domain=str(doc["trust_domain"]),
                crl_number=int(doc["crl_number"]),
                revoked=tuple(
                    RevokedEntry(int(r["serial"], 16), parse_rfc3339(r["revoked_at"]))
                    for r in doc["revoked"]
                ),
                issued=tuple(
                    IssuedEntry(
                        int(i["serial"], 16),
                        str(i["kind"]),
                        i.get("device_id"),
                        parse_rfc3339(i["not_after"]),
                    )
                    for i in doc["issued"]
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CaError("ca_state_invalid", f"{source}: cannot read CA state: {exc}") from None

    def with_issued(self, cert: x509.Certificate, kind: str, device_id: str | None) -> CaState:
        entry = IssuedEntry(cert.serial_number, kind, device_id, cert.not_valid_after_utc)
        return CaState(self.trust_domain, self.crl_number, self.revoked, (*self.issued, entry))


@contextlib.contextmanager
def _locked(layout: CaLayout) -> Iterator[None]:
    try:
        fd = os.open(layout.lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_MODE)
    except FileNotFoundError:
        raise CaError(
            "ca_missing", f"no CA in {layout.dir}: the directory does not exist"
        ) from None
    except OSError as exc:
        raise CaError("ca_state_invalid", f"cannot lock {layout.lock}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ca_present(layout: CaLayout) -> bool:
    return any(p.exists() for p in (layout.root_cert, layout.root_key, layout.state))


def _trust_domain(trust_domain: str) -> TrustDomain:
    """The CA's entry points take plain strings (the CLI, scripts): parsed here, once."""
    try:
        return TrustDomain(trust_domain)
    except CertError as exc:
        raise CaError("trust_domain_invalid", exc.message) from None


def _device_id(device_id: str) -> DeviceId:
    try:
        return DeviceId(device_id)
    except CertError as exc:
        raise CaError("device_id_invalid", exc.message) from None


def init_ca(
    ca_dir: Path,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    force: bool = False,
    demo_device_id: str = "demo-device",
    now: datetime | None = None,
) -> CaLayout:
    """Create root CA, issuing CA, server cert, a demo device cert and an empty CRL."""
    trust_domain = _trust_domain(trust_domain)
    demo_device_id = _device_id(demo_device_id)
    moment = _now(now)
    layout = CaLayout(ca_dir)
    _make_dir(ca_dir)
    with _locked(layout):
        if _ca_present(layout) and not force:
            raise CaError("ca_exists", f"a CA already exists in {ca_dir} (use force to replace it)")
        _make_dir(layout.devices_dir)
        root, issuing = new_ca(f"ztagent dev ({trust_domain})", now=moment)
        start = moment - BACKDATE
        server = build_leaf(
            issuing,
            subject_cn="ztagent sidecar",
            uris=[],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            not_before=start,
            not_after=start + SERVER_LIFETIME,
            dns=["localhost"],
            ips=["127.0.0.1", "::1"],
        )
        device = build_device(issuing, trust_domain, demo_device_id, now=moment)
        state = (
            CaState(trust_domain, crl_number=1)
            .with_issued(server.cert, "server", None)
            .with_issued(device.cert, "device", demo_device_id)
        )
        _write_pair(layout.root_cert, layout.root_key, root)
        _write_pair(layout.issuing_cert, layout.issuing_key, issuing)
        _write(layout.bundle, cert_pem(root.cert, issuing.cert))
        _write_pair(layout.server_cert, layout.server_key, server, issuing.cert)
        _write_pair(
            layout.device_cert(demo_device_id),
            layout.device_key(demo_device_id),
            device,
            issuing.cert,
        )
        _write_crl(layout, issuing, state, moment)
        _write(layout.state, state.to_json())
    return layout


def load_issuing(layout: CaLayout) -> KeyPair:
    """The issuing CA certificate and key of an existing CA directory."""
    try:
        cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
        key = serialization.load_pem_private_key(layout.issuing_key.read_bytes(), None)
    except FileNotFoundError as exc:
        raise CaError("ca_missing", f"no CA in {layout.dir}: {exc.filename} not found") from None
    except ValueError as exc:
        raise CaError("ca_state_invalid", f"cannot read the issuing CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError("ca_state_invalid", f"{layout.issuing_key} is not an EC private key")
    return KeyPair(cert, key)


def load_state(layout: CaLayout) -> CaState:
    try:
        data = layout.state.read_bytes()
    except FileNotFoundError:
        raise CaError("ca_missing", f"no CA in {layout.dir}: {layout.state} not found") from None
    return CaState.from_json(data, layout.state)


def issue_device_cert(
    ca_dir: Path,
    device_id: str,
    out: Path,
    *,
    days: int = DEVICE_DAYS,
    now: datetime | None = None,
) -> x509.Certificate:
    """Sign a device cert; write ``out`` (leaf + issuing CA) and ``out.with_suffix('.key')``.

    Lifetimes above the sidecar's maximum are allowed here; the sidecar refuses them.
    """
    device_id = _device_id(device_id)
    if days < 1:
        raise CaError("days_invalid", f"days is {days} (expected at least 1)")
    layout = CaLayout(ca_dir)
    with _locked(layout):
        state = load_state(layout)
        issuing = load_issuing(layout)
        device = build_device(issuing, state.trust_domain, device_id, now=_now(now), days=days)
        _make_dir(out.parent)
        _write_pair(out, out.with_suffix(".key"), device, issuing.cert)
        _write(layout.state, state.with_issued(device.cert, "device", device_id).to_json())
    return device.cert


def issue_device_for_key(
    ca_dir: Path,
    device_id: str,
    public_key: CertificatePublicKeyTypes,
    *,
    days: int = DEVICE_DAYS,
    now: datetime | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """Sign a device cert (as ``build_device``) for a key the CA never sees; record it in
    ``ca.json`` under the CA lock, so ``revoke`` knows it. Writes no certificate file.
    ``extensions`` are added non-critical (the AK-name extension of TPM-bound enrollment).

    The caller (the enrollment service) checks the key type and caps ``days``.
    """
    device_id = _device_id(device_id)
    if days < 1:
        raise CaError("days_invalid", f"days is {days} (expected at least 1)")
    layout = CaLayout(ca_dir)
    not_before = _now(now) - BACKDATE
    with _locked(layout):
        state = load_state(layout)
        issuing = load_issuing(layout)
        cert = sign_leaf(
            issuing,
            public_key,
            subject_cn=device_id,
            uris=[device_spiffe_id(state.trust_domain, device_id)],
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=not_before,
            not_after=not_before + timedelta(days=days),
            extensions=extensions,
        )
        _write(layout.state, state.with_issued(cert, "device", device_id).to_json())
    return cert


def _write_crl(
    layout: CaLayout,
    issuing: KeyPair,
    state: CaState,
    now: datetime,
    validity: timedelta = CRL_LIFETIME,
) -> None:
    crl = build_crl(
        issuing,
        {r.serial: r.revoked_at for r in state.revoked},
        number=state.crl_number,
        this_update=now,
        next_update=now + validity,
    )
    _write(layout.crl, crl.public_bytes(serialization.Encoding.PEM))


def write_crl(
    ca_dir: Path, now: datetime | None = None, *, validity: timedelta = CRL_LIFETIME
) -> x509.CertificateRevocationList:
    """Re-sign ``crl.pem`` with the next CRL number and nextUpdate ``validity`` from now."""
    layout = CaLayout(ca_dir)
    moment = _now(now)
    with _locked(layout):
        state = load_state(layout)
        issuing = load_issuing(layout)
        state = CaState(state.trust_domain, state.crl_number + 1, state.revoked, state.issued)
        _write_crl(layout, issuing, state, moment, validity)
        _write(layout.state, state.to_json())
    return x509.load_pem_x509_crl(layout.crl.read_bytes())


def revoke(
    ca_dir: Path,
    *,
    serial: int | None = None,
    cert_path: Path | None = None,
    now: datetime | None = None,
    crl_validity: timedelta = CRL_LIFETIME,
) -> int:
    """Revoke one cert (by serial or file) and re-sign the CRL; return the serial.

    Revoking an already revoked serial keeps its first revocation date; the CRL is still
    re-signed (next CRL number, fresh nextUpdate).
    """
    if (serial is None) == (cert_path is None):
        raise CaError("revoke_target", "give exactly one of serial or cert_path")
    layout = CaLayout(ca_dir)
    moment = _now(now)
    with _locked(layout):
        state = load_state(layout)
        issuing = load_issuing(layout)
        if cert_path is not None:
            serial = _serial_of_file(cert_path, issuing)
        assert serial is not None
        revoked = state.revoked
        if not any(r.serial == serial for r in revoked):
            if not any(i.serial == serial for i in state.issued):
                raise CaError(
                    "cert_not_found",
                    f"serial {serial_hex(serial)} was not issued by this CA "
                    f"(not in {layout.state})",
                )
            revoked = (*revoked, RevokedEntry(serial, moment))
        state = CaState(state.trust_domain, state.crl_number + 1, revoked, state.issued)
        _write_crl(layout, issuing, state, moment, crl_validity)
        _write(layout.state, state.to_json())
    return serial


def _serial_of_file(cert_path: Path, issuing: KeyPair) -> int:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise CaError("cert_not_found", f"{cert_path} not found") from None
    except ValueError as exc:
        raise CaError("cert_not_found", f"{cert_path} holds no PEM certificate: {exc}") from None
    try:
        cert.verify_directly_issued_by(issuing.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CaError(
            "cert_not_from_ca",
            f"{cert_path} was issued by {cert.issuer.rfc4514_string()!r} "
            f"(expected {issuing.cert.subject.rfc4514_string()!r}): {exc or 'bad signature'}",
        ) from None
    return cert.serial_number
