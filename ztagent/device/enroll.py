"""The device side of enrollment: ``ztagent enroll``, ``ztagent renew`` (and ``--watch``).

The flows live here and the checks of the CA's answer; the directory's files and the key
store's lifecycle are ``device.device_dir``, the mTLS transport ``device.transport``, the
retry timing ``ztagent.schedule``.

Device directory (``--out`` / ``--dir``)::

    device.pem       the device certificate, then the issuing CA (PEM)
    device.key       the private key, PKCS#8 PEM, mode 0600 (file key store only)
    ca-bundle.pem    root + issuing CA: trusted for the CA service and the sidecar
    keystore.json    which store holds the key, never a PIN:
                     {"type": "file"} or
                     {"type": "pkcs11", "uri": "pkcs11:token=...;object=...;id=...",
                      "module": "/usr/lib/softhsm/libsofthsm2.so"}
    enrollment.json  {"version", "server", "renew_server", "device_id", "spiffe_id", "serial",
                      "not_before", "not_after"} (times RFC 3339 UTC, serial lowercase hex;
                      plus "ak_name" after TPM-bound enrollment)
    ak-bound         after TPM-bound enrollment only: the ``ztagent.device.attest`` record
                     {"ak_name", "binding_id" (the enrollment id), "bound_at"}, so
                     ``ztagent attest --dir`` does not bind the AK again

Every file is written atomically (temp file, fsync, rename, fsync dir); a new file key is
generated under a temporary name and renamed into place only after the CA answered, and
``enrollment.json`` is written last. The PKCS#11 PIN is a parameter: the CLI reads it from
``--pin-file`` or ``ZTAGENT_PKCS11_PIN`` (``keystores.resolve_pin``).

``enroll`` generates the key in the chosen store (``file``, ``pkcs11:URI``, or ``tpm``: the
TLS key made inside the TPM given as ``tpm``, which then also binds its AK as below), builds
a CSR for the device id the bootstrap token carries (the CA requires ``CN`` to match it), and
calls ``Enroll`` over server-auth TLS trusting ``ca_bundle``. It refuses a directory that
already holds a certificate, unless that certificate has expired or ``force=True``.

**TPM-bound enrollment** (``tpm=DeviceTpm(...)``; with the file or pkcs11 key store the TPM
contributes its attestation key only): ``BeginTpmEnroll`` with the CSR, the token and the TPM's EK
and AK public areas; the TPM's ActivateCredential opens the CA's challenge; ``CompleteTpmEnroll``
returns the secret, and the certificate comes back with the AK's TPM name in its AK-name
extension (checked against this TPM's AK: ``enroll_response_invalid`` otherwise). A sidecar
then accepts this TPM's quotes for this certificate without an AK binding of its own.

**Expired-certificate recovery.** A device that was offline past its certificate's
``notAfter`` cannot ``renew`` (renewal is authenticated by the current certificate). The
operator issues a fresh bootstrap token *for the same device id* (``ztagent ca token
--device-id <id>``) and the device runs ``enroll`` again into the same directory. Because the
certificate has expired no ``force`` is needed; the device keeps its id (a token for another
id is refused before anything is sent, ``device_id_mismatch``); a new key is generated and
the old one (file or token object) is removed once the new certificate is written.

``renew`` opens the current key store, does mTLS to the renewal address (``renew_server`` in
``enrollment.json``: the enrollment host on port 8445 unless given) with the current
certificate, generating a new key first when ``rotate_key`` (the default); a PKCS#11 key is
used through gRPC's custom-signer hook, so it never leaves the token. ``renew_watch`` renews
at 2/3 of the lifetime and retries an unreachable CA with jittered exponential backoff
(1 s doubling to 300 s) until the certificate expires.

Errors: ``EnrollClientError`` (``already_enrolled``, ``cert_expired``,
``device_id_mismatch``, ``device_dir_invalid``, ``token_unreadable``,
``enroll_response_invalid``, ``enroll_refused``); ``CaUnreachable`` (``ca_unreachable``, a
``TransportError``: UNAVAILABLE or DEADLINE_EXCEEDED); the CA's own refusals come back as
``EnrollError`` with the CA's code (``token_reused``, ``renew_cert_revoked``...);
``KeyStoreError``/``ConfigError`` from the key store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.experimental
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ztagent._proto.v1 import enrollment_pb2 as pb
from ztagent.device.csr import build_csr
from ztagent.device.device_dir import (
    DEFAULT_RENEW_PORT,
    DEVICE_KEY,
    ENROLLMENT_FILE,
    NEW_KEY_FILE,
    discard_key,
    existing_enrollment,
    load_device_dir,
    new_key_store,
    read_ca_bundle,
    remove_old_key,
    serial_text,
    write_state,
)
from ztagent.device.errors import CaUnreachable, EnrollClientError
from ztagent.device.keystores import (
    DEFAULT_KEY_LABEL,
    FileKeyStore,
    KeyStore,
    KeyStoreSpec,
    Pkcs11KeyStore,
    TpmKeyStore,
    open_key_store,
    require_pin,
)
from ztagent.device.tpm import DeviceTpm
from ztagent.device.transport import (
    RPC_TIMEOUT_S,
    call_ca,
    channel_credentials,
)
from ztagent.errors import ConfigError, ZtagentError
from ztagent.failure_log import FailureLog
from ztagent.pki.device_check import cert_ak_name
from ztagent.pki.errors import CertError
from ztagent.schedule import Backoff, refresh_at
from ztagent.timefmt import rfc3339

log = logging.getLogger(__name__)

WALL_CLOCK_RECHECK_S = 60.0
"""``renew --watch`` re-reads the wall clock at least this often while it waits."""
RENEW_BACKOFF = Backoff(initial_s=1.0, cap_s=300.0, floor_s=1.0)
"""Renewal retries: 1 s doubling to 300 s, never sleeping past half the time to expiry."""


@dataclass(frozen=True)
class EnrollResult:
    dir: Path
    device_id: str
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    key_store: str
    """The store's ``description()``."""
    recovered: bool
    """True when this replaced an expired certificate (the recovery path)."""


@dataclass(frozen=True)
class RenewResult:
    dir: Path
    device_id: str
    serial: str
    previous_serial: str
    not_before: datetime
    not_after: datetime
    key_rotated: bool


# --- pure helpers ----------------------------------------------------------------------------


def renew_at(cert: x509.Certificate) -> datetime:
    """When renewal is due: 2/3 of the way from notBefore to notAfter."""
    return refresh_at(cert.not_valid_before_utc, cert.not_valid_after_utc)


def renew_due(cert: x509.Certificate, now: datetime) -> bool:
    return now >= renew_at(cert)


def is_expired(cert: x509.Certificate, now: datetime) -> bool:
    return now >= cert.not_valid_after_utc


def default_renew_server(server: str, announced_port: int = 0) -> str:
    """The enrollment host with the renewal port the CA announced (``EnrollResponse``'s
    ``renew_port``), or 8445 when it did not (``host:8444`` -> ``host:8445``)."""
    port_number = announced_port or DEFAULT_RENEW_PORT
    host, sep, port = server.rpartition(":")
    if sep and port.isdigit() and host:
        return f"{host}:{port_number}"
    return f"{server}:{port_number}"


def token_device_id(token: str) -> str:
    """The ``device_id`` claim of a bootstrap token, read *without* verifying it.

    Only to name the CSR's subject (the CA requires it to match the token) and to refuse a
    token for another device before it is spent; the CA verifies the token.
    """
    parts = token.strip().split(".")
    try:
        if len(parts) != 3:
            raise ValueError("not three dot-separated parts")
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        device_id = claims["device_id"]
        if not isinstance(device_id, str) or not device_id:
            raise ValueError("device_id is not a non-empty string")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise EnrollClientError(
            "token_unreadable",
            f"the bootstrap token is not a compact JWS with a device_id claim ({exc})",
        ) from None
    return device_id


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


# --- the CA's answer -----------------------------------------------------------------------


def _check_response(
    response: pb.EnrollResponse, store: KeyStore, device_id: str
) -> tuple[x509.Certificate, bytes, bytes]:
    """The leaf, chain and bundle of an answer, checked against what was asked."""
    try:
        chain = x509.load_pem_x509_certificates(bytes(response.certificate_chain))
        bundle = x509.load_pem_x509_certificates(bytes(response.ca_bundle))
    except ValueError as exc:
        raise EnrollClientError("enroll_response_invalid", f"unreadable PEM: {exc}") from None
    leaf = chain[0]
    if leaf.public_key() != store.public_key():
        raise EnrollClientError(
            "enroll_response_invalid",
            "the certificate's public key is not the key of the CSR "
            f"(expected the key in {store.description()})",
        )
    if response.device_id != device_id:
        raise EnrollClientError(
            "enroll_response_invalid",
            f"the CA issued for device {response.device_id!r} (expected {device_id!r})",
        )
    issuers = [*chain[1:], *bundle]
    for issuer in issuers:
        try:
            leaf.verify_directly_issued_by(issuer)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise EnrollClientError(
            "enroll_response_invalid",
            f"the certificate (issuer {leaf.issuer.rfc4514_string()}) is not signed by "
            "any CA of the returned chain or bundle",
        )
    return leaf, bytes(response.certificate_chain), bytes(response.ca_bundle)


# --- enroll ----------------------------------------------------------------------------------


async def _enroll_with_tpm(
    server: str,
    credentials: grpc.ChannelCredentials,
    request: pb.EnrollRequest,
    tpm: DeviceTpm,
    rpc_timeout_s: float,
) -> tuple[pb.EnrollResponse, str, str]:
    """BeginTpmEnroll -> ActivateCredential -> CompleteTpmEnroll: (answer, AK name, id)."""
    request.ek_public = await asyncio.to_thread(tpm.ek_public)
    ek_certificate: bytes | None = await asyncio.to_thread(tpm.ek_certificate)
    request.ek_certificate = ek_certificate or b""
    request.ak_public = await asyncio.to_thread(tpm.ak_public)
    ak_name = (await asyncio.to_thread(tpm.ak_name)).hex()
    begin = await call_ca("BeginTpmEnroll", server, credentials, request, rpc_timeout_s)
    secret = await asyncio.to_thread(
        tpm.activate_credential, bytes(begin.credential_blob), bytes(begin.encrypted_secret)
    )
    complete = pb.CompleteTpmEnrollRequest(enrollment_id=begin.enrollment_id, secret=secret)
    response = await call_ca("CompleteTpmEnroll", server, credentials, complete, rpc_timeout_s)
    return response, ak_name, str(begin.enrollment_id)


def _check_ak_name(leaf: x509.Certificate, response: pb.EnrollResponse, ak_name: str) -> None:
    try:
        in_cert = cert_ak_name(leaf)
    except CertError as err:
        raise EnrollClientError("enroll_response_invalid", err.message) from None
    if in_cert != ak_name or response.ak_name.lower() != ak_name:
        raise EnrollClientError(
            "enroll_response_invalid",
            f"the certificate binds AK {in_cert!r} (answer says {response.ak_name!r}), "
            f"expected this TPM's AK {ak_name!r}",
        )


async def enroll(
    server: str,
    token: str,
    ca_bundle: Path,
    out_dir: Path,
    key_store: str = "file",
    *,
    pin: str | None = None,
    force: bool = False,
    renew_server: str | None = None,
    now: datetime | None = None,
    rpc_timeout_s: float = RPC_TIMEOUT_S,
    tpm: DeviceTpm | None = None,
) -> EnrollResult:
    """Enroll this device with a bootstrap token; write the device directory ``out_dir``.

    With ``tpm`` the enrollment is TPM-bound: the certificate names the TPM's AK and
    ``out_dir/ak-bound`` records it (``TpmError`` when the TPM fails).
    """
    spec = KeyStoreSpec.parse(key_store)
    roots = read_ca_bundle(ca_bundle)
    device_id = token_device_id(token)
    moment = _now(now)
    existing = existing_enrollment(out_dir)
    recovered = False
    if existing is not None and not force:
        cert, old_id, _ = existing
        if not is_expired(cert, moment):
            raise EnrollClientError(
                "already_enrolled",
                f"{out_dir} holds a certificate for device {old_id!r} valid until "
                f"{rfc3339(cert.not_valid_after_utc)}: use renew (or force to replace it)",
            )
        if old_id != device_id:
            raise EnrollClientError(
                "device_id_mismatch",
                f"the bootstrap token is for device {device_id!r} but {out_dir} holds expired "
                f"device {old_id!r} (expected a token for {old_id!r}; force enrolls the "
                "directory as another device)",
            )
        recovered = True
        log.info("recovering expired device %s in %s with a fresh token", device_id, out_dir)
    if spec.kind == "pkcs11":
        require_pin(pin)
    store = new_key_store(spec, out_dir, pin, tpm, existing[2] if existing else None)
    ak_binding: tuple[str, str] | None = None
    try:
        request = pb.EnrollRequest(csr=build_csr(store, device_id), bootstrap_token=token)
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        if tpm is None:
            response = await call_ca("Enroll", server, credentials, request, rpc_timeout_s)
        else:
            response, ak_name, enrollment_id = await _enroll_with_tpm(
                server, credentials, request, tpm, rpc_timeout_s
            )
            ak_binding = (ak_name, enrollment_id)
        leaf, chain_pem, bundle_pem = _check_response(response, store, device_id)
        if ak_binding is not None:
            _check_ak_name(leaf, response, ak_binding[0])
    except BaseException:
        discard_key(store)
        raise
    try:
        write_state(
            out_dir,
            leaf=leaf,
            chain_pem=chain_pem,
            bundle_pem=bundle_pem,
            store=store,
            server=server,
            renew_server=renew_server or default_renew_server(server, response.renew_port),
            device_id=device_id,
            spiffe_id=response.spiffe_id,
            ak_binding=ak_binding,
        )
        if existing is not None:
            remove_old_key(out_dir, existing[2], store, pin)
        description = store.description()
    finally:
        store.close()
    log.info("enrolled device %s, serial %s, key in %s", device_id, serial_text(leaf), description)
    return EnrollResult(
        dir=out_dir,
        device_id=device_id,
        spiffe_id=response.spiffe_id,
        serial=serial_text(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        key_store=description,
        recovered=recovered,
    )


# --- renew -----------------------------------------------------------------------------------


def _rotated_store(current: KeyStore, dir: Path, pin: str | None) -> KeyStore:
    if isinstance(current, FileKeyStore):
        return FileKeyStore.create(dir / NEW_KEY_FILE)
    if isinstance(current, Pkcs11KeyStore):
        if current.uri.token is None:
            raise ConfigError("keystore.json", f"{current.uri} names no token label")
        return Pkcs11KeyStore.create(
            current.module,
            current.uri.token,
            require_pin(pin),
            current.uri.object or DEFAULT_KEY_LABEL,
        )
    if isinstance(current, TpmKeyStore):
        return TpmKeyStore.create(current.tpm, avoid=current.handle)
    raise ConfigError("keystore.json", f"cannot rotate a key in {current.description()}")


async def renew(
    dir: Path,
    *,
    pin: str | None = None,
    rotate_key: bool = True,
    server: str | None = None,
    now: datetime | None = None,
    rpc_timeout_s: float = RPC_TIMEOUT_S,
) -> RenewResult:
    """Renew the device certificate over mTLS with the current one; same device id."""
    state = load_device_dir(dir)
    moment = _now(now)
    if is_expired(state.cert, moment):
        raise EnrollClientError(
            "cert_expired",
            f"the certificate in {dir} expired at {rfc3339(state.cert.not_valid_after_utc)} "
            f"(now {rfc3339(moment)}) and cannot authenticate a renewal: recover with a fresh "
            f"bootstrap token for device {state.device_id!r} and `ztagent enroll --out {dir}` "
            "(keeps the device id)",
        )
    address = server or str(state.enrollment.get("renew_server") or "")
    if not address:
        raise EnrollClientError("device_dir_invalid", f"{dir / ENROLLMENT_FILE}: no renew_server")
    current = open_key_store(state.key_store, dir / DEVICE_KEY, pin)
    try:
        new = _rotated_store(current, dir, pin) if rotate_key else current
        try:
            csr = build_csr(new, state.device_id)
            response = await call_ca(
                "Renew",
                address,
                channel_credentials(current, state.chain_pem, state.ca_bundle_pem),
                pb.RenewRequest(csr=csr),
                rpc_timeout_s,
            )
            leaf, chain_pem, bundle_pem = _check_response(response, new, state.device_id)
        except BaseException:
            if new is not current:
                discard_key(new)
            raise
        try:
            write_state(
                dir,
                leaf=leaf,
                chain_pem=chain_pem,
                bundle_pem=bundle_pem,
                store=new,
                server=str(state.enrollment.get("server") or ""),
                renew_server=address,
                device_id=state.device_id,
                spiffe_id=response.spiffe_id or str(state.enrollment.get("spiffe_id") or ""),
            )
            if new is not current and isinstance(current, Pkcs11KeyStore | TpmKeyStore):
                try:
                    current.destroy()
                except ZtagentError as err:
                    log.warning(
                        "could not delete the rotated-out key %s: %s", current.description(), err
                    )
        finally:
            if new is not current:
                new.close()
    finally:
        current.close()
    previous = serial_text(state.cert)
    log.info("renewed device %s: serial %s -> %s", state.device_id, previous, serial_text(leaf))
    return RenewResult(
        dir=dir,
        device_id=state.device_id,
        serial=serial_text(leaf),
        previous_serial=previous,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        key_rotated=new is not current,
    )


# --- renew --watch ---------------------------------------------------------------------------


async def renew_watch(
    dir: Path,
    *,
    pin: str | None = None,
    rotate_key: bool = True,
    server: str | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    rng: Callable[[], float] = random.random,
    max_attempts: int | None = None,
    backoff: Backoff = RENEW_BACKOFF,
) -> list[RenewResult]:
    """Renew at 2/3 of each certificate's lifetime, forever (or ``max_attempts`` attempts).

    While the CA is unreachable (``CaUnreachable``) it retries with ``backoff`` until the
    certificate expires; then ``renew`` raises ``cert_expired`` (the recovery path), which
    ends the watch, as does any refusal by the CA. Returns the renewals done when
    ``max_attempts`` (successful or not) have been made.
    """
    results: list[RenewResult] = []
    attempts = 0
    while True:
        cert = load_device_dir(dir).cert
        due = renew_at(cert)
        logged_for: float | None = None
        # Sleep in slices of at most WALL_CLOCK_RECHECK_S and ask the wall clock again after
        # each: a monotonic sleep computed once would miss a clock step (a node that was
        # suspended, or whose clock was corrected) and wait on while the certificate expires.
        while not renew_due(cert, moment := clock()):
            wait = (due - moment).total_seconds()
            if logged_for is None or abs(logged_for - wait) > 2 * WALL_CLOCK_RECHECK_S:
                left = timedelta(seconds=int((cert.not_valid_after_utc - moment).total_seconds()))
                log.info(
                    "next renewal of %s at %s (in %.0f s; the certificate expires in %s)",
                    dir,
                    rfc3339(due),
                    wait,
                    left,
                )
            logged_for = wait - WALL_CLOCK_RECHECK_S
            await sleep(min(wait, WALL_CLOCK_RECHECK_S))
        failures = 0
        failing = FailureLog(log, f"renewal of {dir}")  # one line, summaries, one on recovery
        while True:
            if max_attempts is not None and attempts >= max_attempts:
                return results
            attempts += 1
            (log.debug if failing.failing else log.info)("renewal attempt %d for %s", attempts, dir)
            try:
                results.append(
                    await renew(dir, pin=pin, rotate_key=rotate_key, server=server, now=clock())
                )
                failing.succeeded()
                break
            except CaUnreachable as err:
                failures += 1
                remaining = (cert.not_valid_after_utc - clock()).total_seconds()
                delay = backoff.delay(failures, remaining, rng)
                left = timedelta(seconds=int(max(0.0, remaining)))
                failing.failed(f"{err}; retry in {delay:.1f} s, certificate expires in {left}")
                await sleep(delay)
