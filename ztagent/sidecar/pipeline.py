"""Per-call admission: device, posture, user, policy — then the decision is logged.

    1 identity   peer certificate -> VerifiedDevice (pure check, cached per certificate)
    2 posture    unverified until attestation exists (filled by the posture stage)
    3 user       bearer JWT -> VerifiedUser (cached per token), or anonymous
    4 policy     data.ztagent.authz.decision(input) -> allow / deny, failure mode, dry run
    5 log        one hash-chained decision-log line, written off the request path

Raises a ZtagentError to refuse: CertError / TokenError -> UNAUTHENTICATED, DeniedError ->
PERMISSION_DENIED, a policy engine failure in closed mode -> UNAVAILABLE.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from ztagent.config import Config, FailureMode
from ztagent.errors import DeniedError, TransportError
from ztagent.pki.verify import DeviceChecker, VerifiedDevice
from ztagent.policy.decision_log import DecisionLog, NullDecisionLog
from ztagent.policy.decision_record import DecisionRecord, new_decision_id
from ztagent.policy.errors import PolicyError
from ztagent.policy.types import Decision, PolicyEngine
from ztagent.posture.verifier import PostureStore
from ztagent.sidecar.admission import (
    DEVICE_ID_HEADER,
    SPIFFE_ID_HEADER,
    Clock,
    peer_certificate_pem,
    utc_now,
)
from ztagent.sidecar.metrics import Metrics
from ztagent.sidecar.policy_input import (
    build_input,
    request_metadata,
    split_method,
    unverified_posture,
)
from ztagent.tokens.errors import TokenError
from ztagent.tokens.verifier import TokenVerifier, anonymous_user_input, extract_bearer
from ztagent.tokens.verify import VerifiedUser, thumbprint_of_digest

log = logging.getLogger("ztagent.pipeline")

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


class Pipeline:
    """The Admission the proxy calls for every request."""

    def __init__(
        self,
        config: Config,
        checker: DeviceChecker,
        engine: PolicyEngine,
        tokens: TokenVerifier | None,
        decision_log: DecisionLog | NullDecisionLog,
        clock: Clock = utc_now,
        *,
        posture_cache: PostureStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.checker = checker
        self.engine = engine
        self.tokens = tokens
        self.decision_log = decision_log
        self.posture_cache = posture_cache
        self.metrics = metrics
        self._clock = clock
        self._node = socket.gethostname()
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

    def verify_device(self, auth_context: Mapping[str, Sequence[bytes]]) -> VerifiedDevice:
        return self.checker.check_pem(peer_certificate_pem(auth_context), self._clock())

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

    def posture_input(
        self, device: VerifiedDevice, now: datetime
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """input.posture for this certificate, and the decision log's link to the attestation
        that backs it (None: no fresh attestation, posture unverified)."""
        if self.posture_cache is None:
            return unverified_posture(), None
        posture = self.posture_cache.get(device.fingerprint_sha256, now)
        if posture is None:
            return unverified_posture(), None
        doc = posture.as_input(now)
        return doc, {"attestation_id": posture.attestation_id, "quote_age_s": doc["age_s"]}

    def _count(
        self,
        service: str,
        decision: Decision,
        failure: PolicyError | None,
        modes: RouteModes,
        policy_s: float,
        latency_us: int,
        logged: bool,
    ) -> None:
        assert self.metrics is not None
        if failure is not None:
            outcome = "failure_open" if decision.allow else "failure_closed"
        elif decision.allow:
            outcome = "allow"
        else:
            outcome = "dry_run" if modes.dry_run else "deny"
        self.metrics.decision(service, outcome, decision.reasons, policy_s)
        self.metrics.admission_seconds.observe(latency_us / 1e6)
        if not logged:
            self.metrics.log_dropped.inc()

    async def admit(self, context: grpc.aio.ServicerContext, full_method: str) -> Metadata:
        started = time.perf_counter()
        device = self.verify_device(context.auth_context())
        metadata = context.invocation_metadata()
        user = await self.user_input(metadata, device)
        now = self._clock()
        posture_doc, attestation = self.posture_input(device, now)
        input_doc = build_input(
            device=self._device_doc(device)[0],
            posture=posture_doc,
            user=user,
            full_method=full_method,
            metadata=request_metadata(metadata),
            peer=context.peer() or "",
            now=now,
            node=self._node,
        )
        service, method = split_method(full_method)
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
        enforced = decision.allow or modes.dry_run
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
            input=input_doc,
        )
        if self._block_on_full_log:
            logged = await self.decision_log.asubmit(record)
        else:
            logged = self.decision_log.submit(record)
        if self.metrics is not None:
            self._count(service, decision, failure, modes, policy_s, record.latency_us, logged)
        if not enforced:
            if failure is not None:
                raise TransportError(
                    failure.code,
                    f"policy engine unavailable (failure_mode closed): {failure.message}",
                )
            raise DeniedError("policy_denied", ", ".join(decision.reasons) or "denied by policy")
        if not decision.allow:
            log.info(
                "dry run: would deny %s for %s: %s", full_method, device.device_id, decision.reasons
            )
        return (
            (DEVICE_ID_HEADER, device.device_id),
            (SPIFFE_ID_HEADER, device.spiffe_id),
            *policy_headers(decision),
        )
