"""The CA's enrollment service (``ztagent ca serve``): Enroll, BeginTpmEnroll,
CompleteTpmEnroll, Renew, GetCACerts, GetCRL.

One ``grpc.aio`` server, two TLS ports, both with the CA's ``server.pem`` (server leaf +
issuing CA, SANs localhost/127.0.0.1/::1, from ``ca init``):

- the enrollment port (default 8444): server-auth TLS only (``require_client_auth=False``:
  no client certificate is requested), for devices that have nothing but a bootstrap token;
- the renewal port (default 8445): mTLS, client certificates must chain to ``ca-bundle.pem``.

Every RPC is served on both ports. ``Renew`` needs the peer certificate from the TLS session,
which only the renewal port asks for; on the enrollment port it is ``renew_cert_missing``.

Enroll, in this order: verify the token (signature by the issuing CA, typ, alg, exp) →
check the CSR (DER, key type, self-signature) → check the CSR names no other device
(``token_device_mismatch``) → consume the token's ``jti`` → issue → audit. So a refused CSR
(a typo, a weak key) does not burn the token and the device may retry with a good CSR, while
a token is consumed before anything is issued with it: two concurrent requests with one
token cannot both get a certificate. If issuing then fails (``ca_unavailable``) the token
stays used and the operator makes a new one. ``Enroll`` refuses a request carrying TPM
fields (``ak_binding_failed``): a TPM is bound only by the two-step exchange below.

TPM-bound enrollment reuses the posture AK binding (``ztagent.posture.ak_binding``):
``BeginTpmEnroll`` runs Enroll's checks up to, not including, spending the token (and refuses
an already spent one early, ``token_reused``), checks the EK and AK public areas and answers a
MakeCredential challenge sealed to the EK for the AK's name. The pending enrollment (token,
CSR, device id, secret) is kept in memory under a random enrollment id, single use, for
``TPM_ENROLL_TTL_S``. ``CompleteTpmEnroll`` takes it (unknown or used: ``ak_binding_failed``;
too late: ``tpm_enroll_expired``), compares the secret in constant time
(``ak_binding_failed``), verifies the token again, and only then spends it and issues a
certificate carrying the AK name in the AK-name extension
(``ztagent.pki.device_check.AK_NAME_OID``); the audit line records ``ak_name``. A wrong secret
consumes the pending enrollment but not the token: the device may begin again. The exchange
proves that the AK lives in the TPM holding that EK, and the token proves the device id. With
``ek_trust`` (``ca serve --ek-ca-bundle``) the EK certificate must also chain to a trusted TPM
manufacturer and certify that EK (``ztagent.posture.ek_cert``); without it the EK is trusted
on first use.

Renew: the peer certificate must pass the sidecar's device check against this CA's bundle and
CRL (chain, validity, clientAuth, SPIFFE ID in this trust domain, lifetime <= 90 days, not in
the CRL) and must not be revoked in ``ca.json`` either; the device id comes from its SPIFFE
ID; the CSR may carry a new key; the new certificate gets the same device id and, when the
current certificate carries an AK name, the same AK name (the binding was proven at
enrollment and the TPM has not changed as far as the CA can tell).

``GetCRL`` re-signs ``crl.pem`` (``ztagent.ca.store.write_crl``) when less than half its validity
is left. Refusals are gRPC errors with the ``EnrollError``'s status and details
``"<code>: <message>"``; anything unexpected is logged here and returned as
``ca_unavailable`` without a traceback. Every issuance, refusal and revocation is appended to
``<ca_dir>/audit.jsonl``.

CPU and file work (signing, ``fsync``, the CA lock) runs in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, NoReturn, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztagent._proto.v1 import enrollment_pb2, enrollment_pb2_grpc
from ztagent.admission.call import peer_certificate_pem
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.ca.audit import AuditLog
from ztagent.ca.bootstrap import BootstrapClaims, ReplayStore, verify_bootstrap_token
from ztagent.ca.crl_http import CrlHttpServer, start_crl_http
from ztagent.ca.db import CaDatabase
from ztagent.ca.issuance import (
    DEFAULT_LIFETIME_DAYS,
    MAX_LIFETIME_DAYS,
    IssuancePolicy,
    check_csr,
    check_csr_names,
    issue_for,
)
from ztagent.enrollment import EnrollError
from ztagent.errors import ConfigError
from ztagent.pki.device_check import cert_ak_name, verify_device_cert
from ztagent.pki.errors import CaError, CertError
from ztagent.pki.policy import DevicePolicy
from ztagent.pki.trust import TrustMaterial
from ztagent.posture.ak_binding import PendingBinding, begin_binding, complete_binding
from ztagent.posture.ek_cert import EkTrust, check_ek_certificate
from ztagent.posture.errors import PostureError
from ztagent.rpc_status import error_trailers, grpc_status_for
from ztagent.signals import wait_for_stop_signal
from ztagent.timefmt import rfc3339

log = logging.getLogger("ztagent.enroll.ca")

DEFAULT_LISTEN: Final = "127.0.0.1:8444"
DEFAULT_RENEW_LISTEN: Final = "127.0.0.1:8445"


def crl_needs_resigning(crl_pem: bytes, now: datetime) -> bool:
    """True when less than half of the CRL's validity is left (or it cannot be read): a
    sidecar that syncs then always holds a CRL with at least half its validity ahead."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError:
        return True
    next_update = crl.next_update_utc
    if next_update is None:
        return True
    return next_update - now < (next_update - crl.last_update_utc) / 2


STOP_GRACE_S: Final = 5.0
MAX_MESSAGE_BYTES: Final = 64 * 1024
TPM_ENROLL_TTL_S: Final = 60
"""A pending TPM-bound enrollment must be completed within this many seconds."""
MAX_PENDING_TPM_ENROLLMENTS: Final = 1000

Clock = Callable[[], datetime]
_T = TypeVar("_T")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _ca_call(fn: Callable[[], _T]) -> _T:
    """Run a CA-file operation; CA and OS errors become ``ca_unavailable``."""
    try:
        return fn()
    except CaError as exc:
        raise EnrollError("ca_unavailable", f"{exc.code}: {exc.message}") from None
    except OSError as exc:
        raise EnrollError("ca_unavailable", f"CA files: {exc}") from None


@dataclass(frozen=True)
class PendingTpmEnrollment:
    """A BeginTpmEnroll that passed every check but the TPM's answer."""

    binding: PendingBinding
    token: str
    csr: x509.CertificateSigningRequest
    device_id: str
    jti: str
    expires_at: datetime


class PendingTpmEnrollments:
    """enrollment id -> pending TPM-bound enrollment: single use, bounded, expiring.

    When full, the oldest is dropped (its completion then fails; it never succeeds).
    """

    def __init__(self, max_pending: int = MAX_PENDING_TPM_ENROLLMENTS) -> None:
        self._max = max_pending
        self._entries: dict[str, PendingTpmEnrollment] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, entry: PendingTpmEnrollment, now: datetime) -> str:
        """Keep ``entry`` until its ``expires_at``; its enrollment id (128 random bits)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
                del self._entries[key]
            while len(self._entries) >= self._max:
                del self._entries[next(iter(self._entries))]
            enrollment_id = secrets.token_hex(16)
            self._entries[enrollment_id] = entry
            return enrollment_id

    def take(self, enrollment_id: str, now: datetime) -> PendingTpmEnrollment:
        """Remove and return the entry: ``ak_binding_failed`` if unknown or already taken,
        ``tpm_enroll_expired`` if past its ``expires_at``."""
        with self._lock:
            entry = self._entries.pop(enrollment_id, None)
        if entry is None:
            raise EnrollError(
                "ak_binding_failed",
                f"enrollment id {enrollment_id[:32]!r} is unknown or already completed "
                "(expected the id BeginTpmEnroll returned, used once)",
            )
        if now >= entry.expires_at:
            raise EnrollError(
                "tpm_enroll_expired",
                f"the TPM enrollment of {entry.device_id!r} expired at "
                f"{rfc3339(entry.expires_at)} (now {rfc3339(now)}, "
                f"{TPM_ENROLL_TTL_S} s after BeginTpmEnroll); begin again",
            )
        return entry


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    """Implements ``ztagent.v1.Enrollment`` over one CA directory."""

    def __init__(
        self,
        ca_dir: Path,
        policy: IssuancePolicy | None = None,
        *,
        clock: Clock = _utc_now,
        ek_trust: EkTrust | None = None,
        crl_validity: timedelta = builders.CRL_LIFETIME,
        db: ca_store.DbArg = None,
    ) -> None:
        self.layout = ca_store.CaLayout(ca_dir)
        self.policy = policy or IssuancePolicy()
        self.ek_trust = ek_trust
        """TPM-manufacturer CAs: when set, TPM-bound enrollment requires an EK certificate."""
        self.renew_port = 0
        """The bound renewal port, announced in every EnrollResponse (set at start)."""
        self.crl_validity = crl_validity
        self.db = db if isinstance(db, CaDatabase) else ca_store.open_ca_database(ca_dir, db)
        """The CA's state: SQLite in the CA directory, or PostgreSQL shared by replicas."""
        self.replay = ReplayStore(self.db)
        self.audit = AuditLog.for_ca(ca_dir)
        self.pending_tpm = PendingTpmEnrollments()
        self._clock = clock

    # --- the RPCs ---------------------------------------------------------------------------

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        peer = context.peer()
        return await self._answer(context, "enroll", peer, lambda: self._enroll(request, peer))

    async def BeginTpmEnroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.BeginTpmEnrollResponse:
        peer = context.peer()
        return await self._answer(
            context, "begin_tpm_enroll", peer, lambda: self._begin_tpm_enroll(request, peer)
        )

    async def CompleteTpmEnroll(
        self, request: enrollment_pb2.CompleteTpmEnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        peer = context.peer()
        return await self._answer(
            context, "complete_tpm_enroll", peer, lambda: self._complete_tpm_enroll(request, peer)
        )

    async def Renew(
        self, request: enrollment_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        peer = context.peer()
        leaf_pem = peer_certificate_pem(context.auth_context() or {})
        return await self._answer(
            context, "renew", peer, lambda: self._renew(request, leaf_pem, peer)
        )

    async def GetCACerts(
        self, request: enrollment_pb2.GetCACertsRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.GetCACertsResponse:
        try:
            bundle = await asyncio.to_thread(_ca_call, self.layout.bundle.read_bytes)
        except EnrollError as err:
            await _abort(context, err)
        return enrollment_pb2.GetCACertsResponse(ca_bundle=bundle)

    async def GetCRL(
        self, request: enrollment_pb2.GetCRLRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.GetCRLResponse:
        try:
            crl = await asyncio.to_thread(_ca_call, self.current_crl_pem)
        except EnrollError as err:
            await _abort(context, err)
        return enrollment_pb2.GetCRLResponse(crl=crl)

    # --- the work (in a worker thread) ------------------------------------------------------

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        peer: str,
        work: Callable[[], _T],
    ) -> _T:
        """Runs ``work`` in a worker thread; a refusal aborts the call with its status, and
        anything unexpected is logged and answered as ``ca_unavailable`` (no traceback)."""
        try:
            return await asyncio.to_thread(work)
        except EnrollError as err:
            await _abort(context, err)
        except Exception:
            log.exception("%s from %s failed unexpectedly", method, peer)
        internal = EnrollError("ca_unavailable", "internal error in the CA (see the CA's log)")
        await asyncio.to_thread(self._audit_refusal, internal, None, method, peer)
        await _abort(context, internal)

    def _audit_refusal(
        self, err: EnrollError, device_id: str | None, method: str, peer: str
    ) -> None:
        try:
            self.audit.refused(
                err.code,
                device_id,
                method=method,
                peer=peer,
                message=err.message,
                now=self._clock(),
            )
        except OSError:
            log.exception("cannot write the audit log %s", self.audit.path)

    def _enroll(
        self, request: enrollment_pb2.EnrollRequest, peer: str
    ) -> enrollment_pb2.EnrollResponse:
        now = self._clock()
        device_id: str | None = None
        try:
            if request.ek_public or request.ak_public:
                raise EnrollError(
                    "ak_binding_failed",
                    "Enroll does not bind a TPM (got ek_public/ak_public; expected "
                    "BeginTpmEnroll then CompleteTpmEnroll for a TPM-bound certificate)",
                )
            td = _ca_call(self.db.trust_domain)
            issuing = _ca_call(lambda: ca_store.load_issuing(self.layout))
            claims = verify_bootstrap_token(request.bootstrap_token, issuing.cert, td, now)
            device_id = claims.device_id
            csr = check_csr(request.csr)
            check_csr_names(csr, device_id, td, "token_device_mismatch")
            # the token is consumed with the recording of the certificate, in one transaction
            cert = issue_for(
                self.layout.dir,
                device_id,
                csr.public_key(),
                self.policy,
                now,
                db=self.db,
                token=(claims.jti, claims.expires_at),
            )
        except EnrollError as err:
            self._audit_refusal(err, device_id, "enroll", peer)
            raise
        self.audit.issued(
            cert, device_id, method="enroll", peer=peer, now=now, extra={"jti": claims.jti}
        )
        log.info("enrolled %s (serial %x) for %s", device_id, cert.serial_number, peer)
        return self._response(cert, issuing.cert, device_id, td)

    def _begin_tpm_enroll(
        self, request: enrollment_pb2.EnrollRequest, peer: str
    ) -> enrollment_pb2.BeginTpmEnrollResponse:
        now = self._clock()
        device_id: str | None = None
        try:
            td = _ca_call(self.db.trust_domain)
            issuing = _ca_call(lambda: ca_store.load_issuing(self.layout))
            claims = verify_bootstrap_token(request.bootstrap_token, issuing.cert, td, now)
            device_id = claims.device_id
            csr = check_csr(request.csr)
            check_csr_names(csr, device_id, td, "token_device_mismatch")
            if self.replay.is_used(claims.jti):
                raise EnrollError(
                    "token_reused",
                    f"token jti {claims.jti[:8]}… was already used (expected a token never "
                    "used before; ask the operator for a new one)",
                )
            if self.ek_trust is not None:
                try:
                    check_ek_certificate(
                        request.ek_public, request.ek_certificate, self.ek_trust, now
                    )
                except PostureError as exc:
                    raise EnrollError(exc.code, exc.message) from None
            try:
                binding, blob, encrypted = begin_binding(request.ek_public, request.ak_public)
            except PostureError as exc:
                raise EnrollError("ak_binding_failed", f"{exc.code}: {exc.message}") from None
        except EnrollError as err:
            self._audit_refusal(err, device_id, "begin_tpm_enroll", peer)
            raise
        pending = PendingTpmEnrollment(
            binding=binding,
            token=request.bootstrap_token,
            csr=csr,
            device_id=device_id,
            jti=claims.jti,
            expires_at=now + timedelta(seconds=TPM_ENROLL_TTL_S),
        )
        enrollment_id = self.pending_tpm.add(pending, now)
        log.info(
            "TPM enrollment of %s begun for %s (AK %s, id %s…)",
            device_id,
            peer,
            binding.ak_name,
            enrollment_id[:8],
        )
        return enrollment_pb2.BeginTpmEnrollResponse(
            enrollment_id=enrollment_id, credential_blob=blob, encrypted_secret=encrypted
        )

    def _complete_tpm_enroll(
        self, request: enrollment_pb2.CompleteTpmEnrollRequest, peer: str
    ) -> enrollment_pb2.EnrollResponse:
        now = self._clock()
        device_id: str | None = None
        try:
            pending = self.pending_tpm.take(request.enrollment_id, now)
            device_id = pending.device_id
            try:
                ak_name = complete_binding(pending.binding, request.secret)
            except PostureError as exc:
                raise EnrollError("ak_binding_failed", exc.message) from None
            td = _ca_call(self.db.trust_domain)
            issuing = _ca_call(lambda: ca_store.load_issuing(self.layout))
            claims = self._recheck_token(pending, issuing.cert, td, now)
            cert = issue_for(
                self.layout.dir,
                device_id,
                pending.csr.public_key(),
                self.policy,
                now,
                ak_name=ak_name,
                db=self.db,
                token=(claims.jti, claims.expires_at),
            )
        except EnrollError as err:
            self._audit_refusal(err, device_id, "complete_tpm_enroll", peer)
            raise
        self.audit.issued(
            cert,
            device_id,
            method="enroll",
            peer=peer,
            now=now,
            extra={"jti": claims.jti, "ak_name": ak_name},
        )
        log.info(
            "enrolled %s (serial %x, AK %s) for %s", device_id, cert.serial_number, ak_name, peer
        )
        return self._response(cert, issuing.cert, device_id, td)

    @staticmethod
    def _recheck_token(
        pending: PendingTpmEnrollment, issuing: x509.Certificate, td: str, now: datetime
    ) -> BootstrapClaims:
        """The token again at completion: it may have expired, or the CA changed, since."""
        claims = verify_bootstrap_token(pending.token, issuing, td, now)
        if (claims.device_id, claims.jti) != (pending.device_id, pending.jti):
            raise EnrollError("ca_unavailable", "pending enrollment does not match its token")
        return claims

    def _renew(
        self, request: enrollment_pb2.RenewRequest, leaf_pem: bytes | None, peer: str
    ) -> enrollment_pb2.EnrollResponse:
        now = self._clock()
        device_id: str | None = None
        try:
            if leaf_pem is None:
                raise EnrollError(
                    "renew_cert_missing",
                    "no client certificate in the TLS session (expected mTLS with the current "
                    "device certificate, on the renewal port)",
                )
            td = _ca_call(self.db.trust_domain)
            issuing = _ca_call(lambda: ca_store.load_issuing(self.layout))
            leaf, device_id, ak_name = self._check_peer(leaf_pem, td, now)
            csr = check_csr(request.csr)
            check_csr_names(csr, device_id, td, "csr_device_mismatch")
            cert = issue_for(
                self.layout.dir,
                device_id,
                csr.public_key(),
                self.policy,
                now,
                ak_name=ak_name,
                db=self.db,
            )
        except EnrollError as err:
            self._audit_refusal(err, device_id, "renew", peer)
            raise
        previous = builders.serial_hex(leaf.serial_number)
        extra: dict[str, object] = {"previous_serial": previous}
        if ak_name is not None:
            extra["ak_name"] = ak_name
        self.audit.issued(cert, device_id, method="renew", peer=peer, now=now, extra=extra)
        log.info(
            "renewed %s (serial %s -> %x) for %s", device_id, previous, cert.serial_number, peer
        )
        return self._response(cert, issuing.cert, device_id, td)

    def _check_peer(
        self, leaf_pem: bytes, td: str, now: datetime
    ) -> tuple[x509.Certificate, str, str | None]:
        """The peer's leaf, device id and AK name (None without the AK-name extension)."""
        try:
            leaf = x509.load_pem_x509_certificate(leaf_pem)
        except ValueError as exc:
            raise EnrollError(
                "renew_cert_invalid", f"client certificate is not PEM: {exc}"
            ) from None
        crl_pem = _ca_call(self.current_crl_pem)
        bundle = _ca_call(self.layout.bundle.read_bytes)
        try:
            trust = TrustMaterial.from_pem(bundle, crl_pem)
        except ConfigError as exc:
            raise EnrollError("ca_unavailable", f"CA bundle or CRL: {exc.message}") from None
        policy = DevicePolicy(trust_domain=td, max_lifetime=timedelta(days=MAX_LIFETIME_DAYS))
        try:
            device = verify_device_cert(leaf, trust, policy, now)
        except CertError as exc:
            code = "renew_cert_revoked" if exc.code == "cert_revoked" else "renew_cert_invalid"
            raise EnrollError(code, f"{exc.code}: {exc.message}") from None
        revoked_at = _ca_call(lambda: self.db.revocation(leaf.serial_number))
        if revoked_at is not None:
            raise EnrollError(
                "renew_cert_revoked",
                f"certificate serial {builders.serial_hex(leaf.serial_number)} was revoked at "
                f"{rfc3339(revoked_at)} (in {self.db.location})",
            )
        return leaf, device.device_id, device.ak_name

    def current_crl_pem(self) -> bytes:
        """The newest CRL any replica signed (from the database), re-signed first
        (``crl_validity`` from now) when less than half of its validity is left."""
        now = self._clock()
        latest = self.db.latest_crl()
        data = latest[1] if latest is not None else self.layout.crl.read_bytes()
        if crl_needs_resigning(data, now):
            log.info("re-signing the CRL (less than half its validity left)")
            crl = ca_store.write_crl(self.layout.dir, now, validity=self.crl_validity, db=self.db)
            data = crl.public_bytes(serialization.Encoding.PEM)
        return data

    def _response(
        self, cert: x509.Certificate, issuing: x509.Certificate, device_id: str, td: str
    ) -> enrollment_pb2.EnrollResponse:
        bundle = _ca_call(self.layout.bundle.read_bytes)
        return enrollment_pb2.EnrollResponse(
            certificate_chain=builders.cert_pem(cert, issuing),
            ca_bundle=bundle,
            device_id=device_id,
            spiffe_id=f"spiffe://{td}/device/{device_id}",
            serial=builders.serial_hex(cert.serial_number),
            not_before=int(cert.not_valid_before_utc.timestamp()),
            not_after=int(cert.not_valid_after_utc.timestamp()),
            ak_name=cert_ak_name(cert) or "",
            renew_port=self.renew_port,
        )


async def _abort(context: grpc.aio.ServicerContext, err: EnrollError) -> NoReturn:
    await context.abort(grpc_status_for(err), err.details, error_trailers(err))
    raise AssertionError("context.abort returned")  # pragma: no cover


# --- the server ----------------------------------------------------------------------------


@dataclass
class CaServer:
    """A started enrollment server."""

    server: grpc.aio.Server
    service: EnrollmentService
    enroll_port: int
    renew_port: int
    crl_http: CrlHttpServer | None = None
    """The CRL over HTTPS (``crl_http=``), closed with the server."""

    async def stop(self, grace: float | None = STOP_GRACE_S) -> None:
        if self.crl_http is not None:
            await asyncio.to_thread(self.crl_http.close)
        await self.server.stop(grace)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaError("ca_missing", f"cannot read {path}: {exc.strerror or exc}") from None


async def start_ca_server(
    ca_dir: Path,
    *,
    listen: str = DEFAULT_LISTEN,
    renew_listen: str = DEFAULT_RENEW_LISTEN,
    lifetime_days: int = DEFAULT_LIFETIME_DAYS,
    clock: Clock = _utc_now,
    ek_ca_bundle: Path | None = None,
    crl_validity_days: float = builders.CRL_LIFETIME.days,
    crl_http: str | None = None,
    db: str | None = None,
) -> CaServer:
    """Check the CA and the settings, bind both ports, start serving.

    ``ConfigError`` for a bad lifetime (``ca.lifetime_days``) or an address that cannot be
    bound (``ca.listen`` / ``ca.renew_listen``); ``CaError`` if the CA files are missing.
    ``clock`` is the service's time (token checks, issuance, TPM enrollment expiry; tests
    move it); TLS uses the real time. ``crl_http`` (``HOST:PORT``): also serve the CRL
    ``GetCRL`` serves over HTTPS there (``ztagent.ca.crl_http``, ``/crl.der`` and
    ``/crl.pem``, with ``server.pem``); ``ConfigError`` ``ca.crl_http`` if it cannot bind.
    """
    policy = IssuancePolicy(lifetime_days=lifetime_days)
    layout = ca_store.CaLayout(ca_dir)
    database = ca_store.open_ca_database(ca_dir, db)
    database.trust_domain()  # a CA is there
    ca_store.load_issuing(layout)
    key, chain, bundle = _read(layout.server_key), _read(layout.server_cert), _read(layout.bundle)
    ek_trust = EkTrust.load(ek_ca_bundle, "ca.ek_ca_bundle") if ek_ca_bundle else None
    if not 1 <= crl_validity_days <= 365:
        raise ConfigError("ca.crl_validity", f"{crl_validity_days} days (expected 1 to 365 days)")
    service = EnrollmentService(
        ca_dir,
        policy,
        clock=clock,
        ek_trust=ek_trust,
        crl_validity=timedelta(days=crl_validity_days),
        db=database,
    )
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(service, server)
    from grpc_reflection.v1alpha import reflection

    # Reflection on both ports (the enrollment port needs no client certificate): it names
    # only the schema; every Enroll / Renew still checks its token or certificate.
    enrollment = enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name
    reflection.enable_server_reflection((enrollment, reflection.SERVICE_NAME), server)
    enroll_creds = grpc.ssl_server_credentials([(key, chain)], require_client_auth=False)
    renew_creds = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=bundle, require_client_auth=True
    )
    ports: list[int] = []
    for setting, address, creds in (
        ("ca.listen", listen, enroll_creds),
        ("ca.renew_listen", renew_listen, renew_creds),
    ):
        try:
            ports.append(server.add_secure_port(address, creds))
        except RuntimeError as exc:
            await server.stop(None)
            raise ConfigError(setting, f"cannot bind {address!r}: {exc}") from None
    service.renew_port = ports[1]
    crl_server = None
    if crl_http is not None:
        tls = (layout.server_cert, layout.server_key)
        try:
            crl_server = await asyncio.to_thread(
                start_crl_http, crl_http, service.current_crl_pem, tls=tls, clock=clock
            )
        except ConfigError:
            await server.stop(None)
            raise
    await server.start()
    log.info("CA enrollment on port %d, renewal (mTLS) on port %d", ports[0], ports[1])
    return CaServer(server, service, ports[0], ports[1], crl_server)


async def run_ca_server(
    ca_dir: Path,
    *,
    listen: str = DEFAULT_LISTEN,
    renew_listen: str = DEFAULT_RENEW_LISTEN,
    lifetime_days: int = DEFAULT_LIFETIME_DAYS,
    ek_ca_bundle: Path | None = None,
    crl_validity_days: float = builders.CRL_LIFETIME.days,
    db: str | None = None,
    crl_http: str | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop with a 5 s grace."""
    running = await start_ca_server(
        ca_dir,
        listen=listen,
        renew_listen=renew_listen,
        lifetime_days=lifetime_days,
        ek_ca_bundle=ek_ca_bundle,
        crl_validity_days=crl_validity_days,
        db=db,
        crl_http=crl_http,
    )
    try:
        await wait_for_stop_signal()
        log.info("CA enrollment service stopping")
    finally:
        await running.stop(STOP_GRACE_S)


__all__ = [
    "TPM_ENROLL_TTL_S",
    "CaServer",
    "EnrollmentService",
    "PendingTpmEnrollment",
    "PendingTpmEnrollments",
    "run_ca_server",
    "start_ca_server",
]
