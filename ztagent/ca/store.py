"""The CA directory: root and issuing CA, sidecar server cert, device certs, CRL.

Library functions used by ``ztagent ca ...`` and by the tests. Layout of a CA directory is
``CaLayout`` (documented in ``certs-dev/README.md``). All keys are EC P-256, written as
PKCS#8 PEM with mode 0600; every file is written atomically. The CA's state — trust domain,
CRL number, issued and revoked serials, used bootstrap tokens, the signed CRLs — is in its
database (``ztagent.ca.db``: ``<dir>/ca.db`` by default, or PostgreSQL with ``db=``); every
function takes ``db`` as a DSN / SQLite path or an open ``CaDatabase``. ``crl.pem`` in the
directory is a copy of the newest CRL for file-based consumers. ``init_ca`` holds an
exclusive lock on ``.ca.lock`` while it writes the key files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztagent.ca import ca_keys
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
    sign_leaf,
)
from ztagent.ca.db import CaDatabase, IssuedEntry, RevokedEntry, open_database
from ztagent.enrollment import EnrollError
from ztagent.files import KEY_MODE, PUBLIC_MODE, make_private_dir, write_atomic
from ztagent.pki.errors import CaError, CertError
from ztagent.pki.spiffe import DeviceId, TrustDomain, device_spiffe_id

__all__ = ["CaLayout", "IssuedEntry", "RevokedEntry", "database"]

DbArg = CaDatabase | str | None
"""Where the CA's state is: an open database, a ``postgresql://`` DSN or SQLite path, or
None for ``<ca dir>/ca.db``."""


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
    """The SQLite database (the default engine)."""
    legacy_state: Path = field(init=False)
    """``ca.json``: the state of a CA from before the database (``ca migrate``)."""
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
            "state": "ca.db",
            "legacy_state": "ca.json",
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


def open_ca_database(ca_dir: Path, db: str | None = None) -> CaDatabase:
    """``open_database``, after importing a CA from before the database (``ca.json``) into
    the default SQLite file the first time it is opened."""
    layout = CaLayout(ca_dir)
    if db is None and not layout.state.exists() and layout.legacy_state.exists():
        from ztagent.ca.migrate import migrate_from_json

        migrate_from_json(ca_dir)
    return open_database(ca_dir, db)


@contextlib.contextmanager
def database(ca_dir: Path, db: DbArg = None) -> Iterator[CaDatabase]:
    """The CA database: ``db`` itself when it is open (left open), else opened and closed."""
    if isinstance(db, CaDatabase):
        yield db
        return
    opened = open_ca_database(ca_dir, db)
    try:
        yield opened
    finally:
        opened.close()


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
    return any(p.exists() for p in (layout.root_cert, layout.root_key, layout.legacy_state))


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
    db: DbArg = None,
    key_store: str = "file",
    pin: str | None = None,
    pin_file: Path | None = None,
) -> CaLayout:
    """Create root CA, issuing CA, server cert, a demo device cert and an empty CRL, and a
    fresh CA database (``db``; ``force`` empties an existing one).

    ``key_store`` is where the issuing CA key lives: ``file`` (``issuing-ca.key``) or
    ``pkcs11:token=<label>;object=<name>`` (generated on the token, non-extractable and
    sensitive, recorded in ``issuing-ca.keystore.json``; no key file is written). The token's
    PIN is ``pin``, else the first line of ``pin_file`` (whose path is recorded, never the
    PIN), else ``ZTAGENT_PKCS11_PIN``. The root CA key is a file either way."""
    trust_domain = _trust_domain(trust_domain)
    demo_device_id = _device_id(demo_device_id)
    token_uri = None if key_store == "file" else ca_keys.parse_token_spec(key_store)
    if token_uri is not None:
        pin = ca_keys.token_pin(pin, pin_file, f"key store {key_store}")
    moment = _now(now)
    layout = CaLayout(ca_dir)
    record = ca_keys.keystore_path(ca_dir)
    _make_dir(ca_dir)
    with _locked(layout), database(ca_dir, db) as store:
        if _ca_present(layout) and not force:
            raise CaError("ca_exists", f"a CA already exists in {ca_dir} (use force to replace it)")
        with ca_keys.new_issuing_key(token_uri, pin) as token_key:
            store.initialise(trust_domain, replace=force)
            _make_dir(layout.devices_dir)
            root, issuing = new_ca(
                f"ztagent dev ({trust_domain})", now=moment, issuing_key=token_key
            )
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
            store.record_issued(_entry(server.cert, "server", None), moment)
            store.record_issued(_entry(device.cert, "device", demo_device_id), moment)
            _write_pair(layout.root_cert, layout.root_key, root)
            if token_key is None:
                _write_pair(layout.issuing_cert, layout.issuing_key, issuing)
                record.unlink(missing_ok=True)  # an older token CA's record
            else:
                _write(layout.issuing_cert, cert_pem(issuing.cert), PUBLIC_MODE)
                ca_keys.write_record(record, token_key, pin_file)
                layout.issuing_key.unlink(missing_ok=True)  # an older file CA's key
            _write(layout.bundle, cert_pem(root.cert, issuing.cert))
            _write_pair(layout.server_cert, layout.server_key, server, issuing.cert)
            _write_pair(
                layout.device_cert(demo_device_id),
                layout.device_key(demo_device_id),
                device,
                issuing.cert,
            )
            _sign_crl(layout, store, issuing, *store.next_crl(), moment, CRL_LIFETIME)
    return layout


def _entry(
    cert: x509.Certificate, kind: str, device_id: str | None, ak_name: str | None = None
) -> IssuedEntry:
    return IssuedEntry(cert.serial_number, kind, device_id, cert.not_valid_after_utc, ak_name)


def load_issuing(layout: CaLayout, *, pin: str | None = None) -> KeyPair:
    """The issuing CA certificate and key of an existing CA directory.

    With ``issuing-ca.keystore.json`` the key is the one on the token it names (a
    ``ca_keys.TokenCaKey``, checked to match the certificate); its PIN is ``pin``, else the
    recorded ``pin_file``, else ``ZTAGENT_PKCS11_PIN``."""
    record = ca_keys.keystore_path(layout.dir)
    try:
        cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
        if record.exists() or record.is_symlink():
            return KeyPair(cert, ca_keys.load_token_key(record, cert, pin))
        key = serialization.load_pem_private_key(layout.issuing_key.read_bytes(), None)
    except FileNotFoundError as exc:
        raise CaError("ca_missing", f"no CA in {layout.dir}: {exc.filename} not found") from None
    except ValueError as exc:
        raise CaError("ca_state_invalid", f"cannot read the issuing CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError("ca_state_invalid", f"{layout.issuing_key} is not an EC private key")
    return KeyPair(cert, key)


def trust_domain_of(ca_dir: Path, db: DbArg = None) -> str:
    with database(ca_dir, db) as store:
        return store.trust_domain()


def issue_device_cert(
    ca_dir: Path,
    device_id: str,
    out: Path,
    *,
    days: int = DEVICE_DAYS,
    now: datetime | None = None,
    db: DbArg = None,
) -> x509.Certificate:
    """Sign a device cert; write ``out`` (leaf + issuing CA) and ``out.with_suffix('.key')``.

    Lifetimes above the sidecar's maximum are allowed here; the sidecar refuses them.
    """
    device_id = _device_id(device_id)
    if days < 1:
        raise CaError("days_invalid", f"days is {days} (expected at least 1)")
    layout = CaLayout(ca_dir)
    moment = _now(now)
    with database(ca_dir, db) as store:
        issuing = load_issuing(layout)
        device = build_device(issuing, store.trust_domain(), device_id, now=moment, days=days)
        _make_dir(out.parent)
        _write_pair(out, out.with_suffix(".key"), device, issuing.cert)
        store.record_issued(_entry(device.cert, "device", device_id), moment)
    return device.cert


def issue_device_for_key(
    ca_dir: Path,
    device_id: str,
    public_key: CertificatePublicKeyTypes,
    *,
    days: int = DEVICE_DAYS,
    now: datetime | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
    ak_name: str | None = None,
    db: DbArg = None,
    issuing: KeyPair | None = None,
    token: tuple[str, int] | None = None,
) -> x509.Certificate:
    """Sign a device cert (as ``build_device``) for a key the CA never sees and record it in
    the CA database, so ``revoke`` knows it. Writes no certificate file. ``extensions`` are
    added non-critical (the AK-name extension of TPM-bound enrollment; ``ak_name`` is
    recorded with the certificate).

    The caller (the enrollment service) checks the key type and caps ``days``. ``token``
    (jti, exp) is the bootstrap token consumed with the recording, in one transaction:
    ``token_reused`` (and the certificate never recorded nor returned) if it already was.
    """
    device_id = _device_id(device_id)
    if days < 1:
        raise CaError("days_invalid", f"days is {days} (expected at least 1)")
    moment = _now(now)
    not_before = moment - BACKDATE
    with database(ca_dir, db) as store:
        signer = issuing or load_issuing(CaLayout(ca_dir))
        cert = sign_leaf(
            signer,
            public_key,
            subject_cn=device_id,
            uris=[device_spiffe_id(store.trust_domain(), device_id)],
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=not_before,
            not_after=not_before + timedelta(days=days),
            extensions=extensions,
        )
        if not store.record_issued(_entry(cert, "device", device_id, ak_name), moment, token=token):
            assert token is not None
            raise EnrollError(
                "token_reused",
                f"token jti {token[0][:8]}… was already used (expected a token never used "
                "before; ask the operator for a new one)",
            )
    return cert


def _sign_crl(
    layout: CaLayout,
    store: CaDatabase,
    issuing: KeyPair,
    number: int,
    revoked: dict[int, datetime],
    now: datetime,
    validity: timedelta,
) -> x509.CertificateRevocationList:
    """Sign CRL ``number`` listing ``revoked``, store it in the database (where every
    replica serves the newest from) and copy it to ``crl.pem`` unless a newer one is there."""
    crl = build_crl(issuing, revoked, number=number, this_update=now, next_update=now + validity)
    pem = crl.public_bytes(serialization.Encoding.PEM)
    store.store_crl(number, pem, now + validity)
    if _crl_number_of(layout.crl) < number:
        _write(layout.crl, pem)
    return crl


def _crl_number_of(path: Path) -> int:
    """The CRL number of ``path`` (-1: missing or unreadable)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return -1
    return int(ext.value.crl_number)


def write_crl(
    ca_dir: Path,
    now: datetime | None = None,
    *,
    validity: timedelta = CRL_LIFETIME,
    db: DbArg = None,
    issuing: KeyPair | None = None,
) -> x509.CertificateRevocationList:
    """Re-sign the CRL with the next CRL number and nextUpdate ``validity`` from now."""
    layout = CaLayout(ca_dir)
    moment = _now(now)
    with database(ca_dir, db) as store:
        signer = issuing or load_issuing(layout)
        return _sign_crl(layout, store, signer, *store.next_crl(), moment, validity)


def revoke(
    ca_dir: Path,
    *,
    serial: int | None = None,
    cert_path: Path | None = None,
    now: datetime | None = None,
    crl_validity: timedelta = CRL_LIFETIME,
    db: DbArg = None,
) -> int:
    """Revoke one cert (by serial or file) and re-sign the CRL; return the serial.

    Revoking an already revoked serial keeps its first revocation date; the CRL is still
    re-signed (next CRL number, fresh nextUpdate).
    """
    if (serial is None) == (cert_path is None):
        raise CaError("revoke_target", "give exactly one of serial or cert_path")
    layout = CaLayout(ca_dir)
    moment = _now(now)
    with database(ca_dir, db) as store:
        issuing = load_issuing(layout)
        if cert_path is not None:
            serial = _serial_of_file(cert_path, issuing)
        assert serial is not None
        number, revoked = store.revoke(serial, moment)
        _sign_crl(layout, store, issuing, number, revoked, moment, crl_validity)
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
