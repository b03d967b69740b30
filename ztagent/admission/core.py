"""Per-call admission: device, posture, user, policy — then the decision is logged.

    1 identity   peer certificate -> VerifiedDevice (pure check, cached per certificate)
    2 posture    unverified until attestation exists (filled by the posture stage)
    3 user       bearer JWT -> VerifiedUser (cached per token), or anonymous
    4 policy     data.ztagent.authz.decision(input) -> allow / deny, failure mode, dry run
    5 log        one hash-chained decision-log line, written off the request path — for
                 every call, refused ones included

``AdmissionCore.decide(call)`` takes the call's plain values and returns a ``Verdict``; it
never raises for anything a client sends. A refusal carries its error: CertError / TokenError
-> UNAUTHENTICATED, DeniedError -> PERMISSION_DENIED, a policy engine failure in closed mode
-> UNAVAILABLE, an unexpected exception -> INTERNAL ``admission_error`` (logged once, without
the client's data). The gRPC adapters (``ztagent.sidecar.pipeline``) turn it into a status.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ztagent.admission.call import DEVICE_ID_HEADER, SPIFFE_ID_HEADER, Clock, utc_now
from ztagent.admission.policy_input import (
    build_input,
    request_metadata,
    split_method,
    unverified_posture,
)
from ztagent.admission.refusal_budget import RefusalBudget, RefusalSummary
from ztagent.config import Config, FailureMode
from ztagent.errors import DeniedError, TransportError, ZtagentError, raised_at
from ztagent.pki.errors import CertError
from ztagent.pki.verify import DeviceChecker, VerifiedDevice
from ztagent.policy.decision_log import DecisionSink
from ztagent.policy.decision_record import DecisionRecord, new_decision_id
from ztagent.policy.embedded import serves_shadow
from ztagent.policy.errors import PolicyError
from ztagent.policy.types import Decision, PolicyEngine
from ztagent.posture.verifier import PostureStore
from ztagent.tokens.errors import TokenError
from ztagent.tokens.verifier import TokenVerifier, anonymous_user_input, extract_bearer
from ztagent.tokens.verify import VerifiedUser, thumbprint_of_digest

log = logging.getLogger("ztagent.pipeline")

MAX_REFUSAL_MESSAGE_CHARS = 512


class AdmissionError(ZtagentError):
    """An unexpected exception inside admission (code ``admission_error``): a bug, never the
    client's fault; the call is refused INTERNAL and the details stay in the sidecar's log."""

    status_name = "INTERNAL"
    codes = frozenset({"admission_error"})


class RouteError(ZtagentError):
    """The policy allowed a call for a service no route serves (code ``no_route``)."""

    status_name = "UNIMPLEMENTED"
    codes = frozenset({"no_route"})


class AdmissionMetrics(Protocol):
    """What the core records (``ztagent.sidecar.metrics.Metrics`` implements it)."""

    def decision(
        self, service: str, outcome: str, reasons: Sequence[str], policy_s: float
    ) -> None: ...

    def refusal(self, code: str) -> None: ...

    def observe_admission(self, seconds: float, logged: bool) -> None: ...


@dataclass(frozen=True)
class Call:
    """What admission reads of a call, as plain values (the adapter extracts them)."""

    full_method: str
    metadata: Sequence[tuple[str, str | bytes]]
    peer: str
    peer_cert_pem: bytes | None
    """The leaf certificate the TLS layer verified (None: no client certificate)."""


@dataclass(frozen=True)
class Admitted:
    """Who an allowed call was admitted for: what the sidecar's identity assertion states
    to the workload (and what an in-process handler may read)."""

    device_id: str
    spiffe_id: str
    decision_id: str
    method: str
    """The full ``/package.Service/Method``."""
    user: str | None


@dataclass(frozen=True)
class Verdict:
    """Allow with the headers to add upstream and who was admitted, or a refusal with its
    error; the decision-log record is submitted either way."""

    headers: tuple[tuple[str, str], ...] = ()
    error: ZtagentError | None = None
    admitted: Admitted | None = None

    @property
    def allowed(self) -> bool:
        return self.error is None


Metadata = Sequence[tuple[str, str | bytes]]

# Headers a policy may add for the upstream: lowercase x-*, never our identity headers.
_POLICY_HEADER_RE = re.compile(r"^x-[a-z0-9][a-z0-9_.-]*$")
_RESERVED_HEADERS = frozenset({DEVICE_ID_HEADER, SPIFFE_ID_HEADER})
_MAX_CACHED_DOCS = 10_000


def x5t_s256(device: VerifiedDevice) -> str:
    """RFC 8705 thumbprint of the client certificate: base64url(SHA-256(DER)), no padding."""
    return thumbprint_of_digest(bytes.fromhex(device.fingerprint_sha256))


def policy_headers(decision: Decision) -> list[tuple[str, str]]:
    out = []
    for key, value in decision.headers.items():
        if _POLICY_HEADER_RE.match(key) and key not in _RESERVED_HEADERS and "\n" not in value:
            out.append((key, value))
        else:
            log.warning("policy header %r dropped (expected x-* and not an identity header)", key)
    return out


@dataclass(frozen=True)
class RouteModes:
    failure_mode: FailureMode
    dry_run: bool


class AdmissionCore:
    """The admission decision for every call: device, user, posture, policy, log."""

    def __init__(
        self,
        config: Config,
        checker: DeviceChecker,
        engine: PolicyEngine,
        tokens: TokenVerifier | None,
        decision_log: DecisionSink,
        clock: Clock = utc_now,
        *,
        posture_cache: PostureStore | None = None,
        metrics: AdmissionMetrics | None = None,
        node: str = "",
        monotonic: Callable[[], float] = time.monotonic,
        local_methods: Sequence[str] = (),
    ) -> None:
        """``local_methods``: full method names the adapter answers itself (server
        reflection's ``ServerReflectionInfo``), admitted like routed ones instead of refused
        ``no_route``; any other method of their services is ``no_route``."""
        self.checker = checker
        self.engine = engine
        self.tokens = tokens
        self.decision_log = decision_log
        self.posture_cache = posture_cache
        self.metrics = metrics
        self._clock = clock
        self._node = node
        """``input.context.node``: the host name (the adapter knows it)."""
        self._input_headers = config.policy.input_headers
        self._forwarded = frozenset(r.service for r in config.routes)
        self._local_methods = frozenset(local_methods)
        local_services = {split_method(m)[0] for m in local_methods}
        self._routed = tuple(sorted({*self._forwarded, *local_services}))
        """Every service served, for the ``no_route`` message."""
        self._budget = RefusalBudget(
            config.decision_log.refusal_burst, config.decision_log.refusal_interval_s
        )
        self._monotonic = monotonic
        self._block_on_full_log = config.decision_log.on_full == "block"
        policy = config.policy
        self._default = RouteModes(policy.failure_mode, policy.dry_run)
        self._modes = {
            r.service: RouteModes(
                r.failure_mode if r.failure_mode is not None else policy.failure_mode,
                r.dry_run if r.dry_run is not None else policy.dry_run,
            )
            for r in config.routes
        }
        # Per-certificate and per-token input documents, built once and shared read-only by
        # every request of that certificate / token (the checkers return the same cached
        # VerifiedDevice / VerifiedUser object while their answer holds).
        self._device_docs: dict[str, tuple[VerifiedDevice, dict[str, Any], str]] = {}
        self._user_docs: dict[int, tuple[VerifiedUser, dict[str, Any]]] = {}
        self._unverified = unverified_posture()
        """``input.posture`` without a fresh attestation: one document, shared read-only."""
        self._headers: dict[
            tuple[int, int], tuple[VerifiedDevice, Decision, tuple[tuple[str, str], ...]]
        ] = {}

    def verify_device_pem(self, pem: bytes | None) -> VerifiedDevice:
        if not pem:
            raise CertError(
                "cert_missing", "no client certificate on this connection (expected an mTLS peer)"
            )
        return self.checker.check_pem(pem, self._clock())

    async def user_input(self, metadata: Metadata | None, device: VerifiedDevice) -> dict[str, Any]:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return anonymous_user_input()
        if len(values) > 1 or not isinstance(values[0], str):
            raise TokenError(
                "token_malformed", f"expected one authorization header, got {len(values)}"
            )
        if self.tokens is None:
            raise TokenError(
                "token_unverifiable",
                "a bearer token was sent but this sidecar has no [tokens] issuer configured",
            )
        token = extract_bearer(values[0])
        user = await self.tokens.verify(token, self._device_doc(device)[1])
        return self._user_doc(user)

    def _device_doc(self, device: VerifiedDevice) -> tuple[dict[str, Any], str]:
        """``input.device`` and the RFC 8705 thumbprint, computed once per certificate."""
        entry = self._device_docs.get(device.fingerprint_sha256)
        if entry is None or entry[0] is not device:
            if len(self._device_docs) >= _MAX_CACHED_DOCS:
                self._device_docs.clear()
            entry = (device, device.as_input(), x5t_s256(device))
            self._device_docs[device.fingerprint_sha256] = entry
        return entry[1], entry[2]

    def _user_doc(self, user: VerifiedUser) -> dict[str, Any]:
        """``input.user`` for a verified token, built once per cached ``VerifiedUser``."""
        entry = self._user_docs.get(id(user))
        if entry is None or entry[0] is not user:
            if len(self._user_docs) >= _MAX_CACHED_DOCS:
                self._user_docs.clear()
            entry = (user, user.as_input())
            self._user_docs[id(user)] = entry
        return entry[1]

    def _upstream_headers(
        self, device: VerifiedDevice, decision: Decision
    ) -> tuple[tuple[str, str], ...]:
        """The identity headers and the policy's, built once per (device, decision): a cache
        hit returns the same ``Decision`` object, so repeated calls reuse them."""
        key = (id(device), id(decision))
        entry = self._headers.get(key)
        if entry is None or entry[0] is not device or entry[1] is not decision:
            if len(self._headers) >= _MAX_CACHED_DOCS:
                self._headers.clear()
            headers = (
                (DEVICE_ID_HEADER, device.device_id),
                (SPIFFE_ID_HEADER, device.spiffe_id),
                *policy_headers(decision),
            )
            entry = self._headers[key] = (device, decision, headers)
        return entry[2]

    def posture_input(
        self, device: VerifiedDevice, now: datetime
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """input.posture for this certificate, and the decision log's link to the attestation
        that backs it (None: no fresh attestation, posture unverified)."""
        if self.posture_cache is None:
            return self._unverified, None
        posture = self.posture_cache.get(device.fingerprint_sha256, now)
        if posture is None:
            return self._unverified, None
        doc = posture.as_input(now)
        return doc, {"attestation_id": posture.attestation_id, "quote_age_s": doc["age_s"]}

    def _count(
        self,
        service: str,
        decision: Decision,
        failure: PolicyError | None,
        modes: RouteModes,
        policy_s: float,
    ) -> None:
        assert self.metrics is not None
        if failure is not None:
            outcome = "failure_open" if decision.allow else "failure_closed"
        elif decision.allow:
            outcome = "allow"
        else:
            outcome = "dry_run" if modes.dry_run else "deny"
        self.metrics.decision(service, outcome, decision.reasons, policy_s)

    async def decide(self, call: Call, *, hold_log: bool = False) -> Verdict:
        """The verdict on one call. Never raises for client input (see the module doc).

        ``hold_log``: an admitted call's decision-log record is queued without waking the
        writer (``DecisionSink.hold``); the caller must ``release_log()`` once it has sent the
        call on, on every path (refusals are always submitted at once)."""
        started = time.perf_counter()
        now = self._clock()
        device: VerifiedDevice | None = None
        user: dict[str, Any] | None = None
        try:
            device = self.verify_device_pem(call.peer_cert_pem)
            user = await self.user_input(call.metadata, device)
            return await self._decide(call, device, user, started, now, hold_log)
        except ZtagentError as err:
            return await self._refuse(err, call, device, user, now, started)
        except Exception as exc:  # a bug: INTERNAL, one line without the client's data
            log.error("admission_error: %s at %s", type(exc).__name__, raised_at(exc))
            error = AdmissionError("admission_error", "internal error in admission (see the log)")
            return await self._refuse(error, call, device, user, now, started)

    async def recheck(self, call: Call) -> ZtagentError | None:
        """The credentials of a call admitted earlier and still open (a stream), checked
        again: the device certificate (revoked since, expired, a trust reload) and the user
        token (expired, its key withdrawn). None while they hold, and nothing is logged;
        otherwise the refusal, logged like any (its ``refusal`` has ``"open_call": true``)
        for the caller to end the call with. Never raises for client input."""
        started = time.perf_counter()
        now = self._clock()
        device: VerifiedDevice | None = None
        try:
            device = self.verify_device_pem(call.peer_cert_pem)
            await self.user_input(call.metadata, device)
            return None
        except ZtagentError as err:
            error = err
        except Exception as exc:  # a bug: INTERNAL, one line without the client's data
            log.error("admission_error: %s at %s", type(exc).__name__, raised_at(exc))
            error = AdmissionError("admission_error", "internal error in admission (see the log)")
        await self._refuse(error, call, device, None, now, started, open_call=True)
        return error

    async def _refuse(
        self,
        err: ZtagentError,
        call: Call,
        device: VerifiedDevice | None,
        user: dict[str, Any] | None,
        now: datetime,
        started: float,
        *,
        open_call: bool = False,
    ) -> Verdict:
        """A refusal before (or instead of) a policy decision: logged like any decision.
        ``open_call``: it ends a call admitted earlier (``recheck``)."""
        service, method = split_method(call.full_method)
        refusal = _refusal_doc(err)
        if open_call:
            refusal["open_call"] = True
        input_doc: dict[str, Any] = {
            "device": self._device_doc(device)[0] if device is not None else None,
            "user": user,
            "request": {
                "service": service,
                "method": method,
                "full_method": call.full_method[:MAX_REFUSAL_MESSAGE_CHARS],
                "metadata": request_metadata(call.metadata, self._input_headers),
                "peer": call.peer,
            },
        }
        record = DecisionRecord(
            decision_id=new_decision_id(now),
            time=now,
            device_id=device.device_id if device is not None else None,
            user_sub=user.get("sub") if user else None,
            service=service,
            method=method,
            allow=False,
            enforced=False,
            dry_run=False,
            reasons=(err.code,),
            failure=None,
            policy_revision=self.engine.revision,
            latency_us=int((time.perf_counter() - started) * 1e6),
            input=input_doc,
            refusal=refusal,
        )
        caller = _caller(device, call)
        logged = await self._submit_refusal(record, caller, err, call.full_method)
        if self.metrics is not None:
            self.metrics.refusal(err.code)
            self.metrics.observe_admission(record.latency_us / 1e6, logged)
        return Verdict(error=err)

    async def _submit_refusal(
        self, record: DecisionRecord, caller: str, err: ZtagentError, full_method: str
    ) -> bool:
        """A refusal's decision-log line and its ``refused ...`` line in the sidecar's own log,
        within the caller's budget; beyond it, counted for the summary, which both logs get
        instead: a flood of refusals fills neither."""
        write, summaries = self._budget.admit(caller, err.code, record.method, self._monotonic())
        for summary in summaries:
            await self._submit_summary(summary)
        if not write:
            return True
        log.info("refused %s: %s", full_method[:MAX_REFUSAL_MESSAGE_CHARS], err)
        return await self._submit(record)

    async def _submit_summary(self, summary: RefusalSummary) -> None:
        record = self._summary_record(summary)
        assert record.refusal is not None
        log.info("%s", record.refusal["message"])
        await self._submit(record)

    async def flush_refusal_summaries(self) -> int:
        """Writes the summaries of callers whose window has ended (call it periodically, so a
        caller that went quiet still gets its summary line); returns how many."""
        summaries = self._budget.due(self._monotonic())
        for summary in summaries:
            await self._submit_summary(summary)
        return len(summaries)

    def _summary_record(self, summary: RefusalSummary) -> DecisionRecord:
        now = self._clock()
        device = None if summary.caller.startswith(("peer:", "cert:")) else summary.caller
        return DecisionRecord(
            decision_id=new_decision_id(now),
            time=now,
            device_id=device,
            user_sub=None,
            service="",
            method="",
            allow=False,
            enforced=False,
            dry_run=False,
            reasons=("refusals_summarised",),
            failure=None,
            policy_revision=self.engine.revision,
            latency_us=0,
            input={},
            refusal={
                "code": "refusals_summarised",
                "caller": summary.caller,
                "count": summary.count,
                "over_s": round(summary.until - summary.since, 3),
                "by": [{"code": c, "method": m, "count": n} for c, m, n in summary.by_kind],
                "message": f"{summary.count} further refusals of {summary.caller} beyond "
                f"{self._budget.burst} lines per {self._budget.interval_s:g} s",
            },
        )

    async def _submit(self, record: DecisionRecord) -> bool:
        if self._block_on_full_log:
            return await self.decision_log.asubmit(record)
        return self.decision_log.submit(record)

    def release_log(self) -> None:
        """Wakes the decision-log writer for the records ``decide(hold_log=True)`` held."""
        self.decision_log.release()

    async def _decide(
        self,
        call: Call,
        device: VerifiedDevice,
        user: dict[str, Any],
        started: float,
        now: datetime,
        hold_log: bool,
    ) -> Verdict:
        full_method = call.full_method
        posture_doc, attestation = self.posture_input(device, now)
        input_doc = build_input(
            device=self._device_doc(device)[0],
            posture=posture_doc,
            user=user,
            full_method=full_method,
            metadata=request_metadata(call.metadata, self._input_headers),
            peer=call.peer,
            now=now,
            node=self._node,
        )
        request = input_doc["request"]
        service: str = request["service"]
        method: str = request["method"]
        modes = self._modes.get(service, self._default)
        failure: PolicyError | None = None
        policy_started = time.perf_counter()
        try:
            decision = await self.engine.evaluate(input_doc)
        except PolicyError as err:
            failure = err
            allow = modes.failure_mode == "open"
            decision = Decision(
                allow=allow,
                reasons=(f"failure_mode_{modes.failure_mode}:{err.code}",),
                revision=self.engine.revision,
            )
            log.warning(
                "policy failure for %s (%s): %s; failure_mode=%s -> %s",
                full_method,
                device.device_id,
                err,
                modes.failure_mode,
                "allow" if allow else "deny",
            )
        policy_s = time.perf_counter() - policy_started
        if not modes.dry_run and serves_shadow(self.engine, decision.revision):
            # a shadow bundle (.manifest metadata.ztagent.dry_run): logged, never enforced
            modes = RouteModes(modes.failure_mode, dry_run=True)
        enforced = decision.allow or modes.dry_run
        unrouted: RouteError | None = None
        if enforced and service not in self._forwarded and full_method not in self._local_methods:
            known = ", ".join(self._routed) or "none"
            unrouted = RouteError(
                "no_route", f"no route for service {service or full_method!r} (routed: {known})"
            )
            enforced = False
        record = DecisionRecord(
            decision_id=new_decision_id(now),
            time=now,
            device_id=device.device_id,
            user_sub=user.get("sub"),
            service=service,
            method=method,
            allow=decision.allow,
            enforced=enforced,
            dry_run=modes.dry_run,
            reasons=decision.reasons,
            failure=failure.code if failure else None,
            policy_revision=decision.revision,
            latency_us=int((time.perf_counter() - started) * 1e6),
            attestation=attestation,
            cached=decision.cached,
            input=input_doc,
            refusal=None if unrouted is None else _refusal_doc(unrouted),
        )
        error: ZtagentError | None = None
        if enforced:
            if hold_log and not self._block_on_full_log:
                logged = self.decision_log.hold(record)
            else:
                logged = await self._submit(record)
        else:
            if unrouted is not None:
                error = unrouted
            elif failure is not None:
                error = TransportError(
                    failure.code,
                    f"policy engine unavailable (failure_mode closed): {failure.message}",
                )
            else:
                error = DeniedError(
                    "policy_denied", ", ".join(decision.reasons) or "denied by policy"
                )
            logged = await self._submit_refusal(record, _caller(device, call), error, full_method)
        if self.metrics is not None:
            self._count(service, decision, failure, modes, policy_s)
            self.metrics.observe_admission(record.latency_us / 1e6, logged)
        if error is not None:
            if self.metrics is not None:
                self.metrics.refusal(error.code)
            return Verdict(error=error)
        if not decision.allow:
            log.info(
                "dry run: would deny %s for %s: %s", full_method, device.device_id, decision.reasons
            )
        return Verdict(
            headers=self._upstream_headers(device, decision),
            admitted=Admitted(
                device_id=device.device_id,
                spiffe_id=device.spiffe_id,
                decision_id=record.decision_id,
                method=full_method,
                user=record.user_sub,
            ),
        )


def _refusal_doc(err: ZtagentError) -> dict[str, Any]:
    """The decision log's ``refusal`` object for ``err``."""
    refusal: dict[str, Any] = {
        "code": err.code,
        "status": err.rpc_status(),
        "message": err.message[:MAX_REFUSAL_MESSAGE_CHARS],
    }
    if err.received is not None:
        refusal["received"] = err.received
    if err.expected is not None:
        refusal["expected"] = err.expected
    return refusal


def _caller(device: VerifiedDevice | None, call: Call) -> str:
    """Whose refusal budget a refusal uses: the device; else the certificate it presented
    (one that failed the identity check, e.g. revoked: its holder cannot escape the budget by
    changing address); else the peer's address, an IPv6 one by its /64 (a host picks any
    address in its subnet), the port never."""
    if device is not None:
        return device.device_id
    if call.peer_cert_pem:
        return f"cert:{hashlib.sha256(call.peer_cert_pem).hexdigest()[:32]}"
    return f"peer:{_peer_host(call.peer)}"


def _peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:5000`` -> ``10.0.0.7``; ``ipv6:%5B2001:db8::1%5D:5000`` (or without
    the escapes) -> ``2001:db8::/64``; anything else (``unix:...``) as it is."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # no zone index
    except ValueError:
        return host
    if address.version == 6:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
