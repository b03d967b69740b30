"""The ztagent.v1.Attestation service the sidecar serves on its mTLS port.

The caller is identified by its device certificate (the same check as every proxied call);
nonces and AK bindings are bound to that certificate's fingerprint. A certificate from
TPM-bound enrollment names its AK itself (``VerifiedDevice.ak_name``): that AK is accepted
without a binding here, no other AK is, and BeginAkBinding refuses to bind another AK for it
(``ak_binding_failed``). The verification itself is pure (``ztagent.posture.verifier``); this
module owns the stores and the cache.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc

from ztagent._proto.v1 import attestation_pb2, attestation_pb2_grpc
from ztagent.admission.call import Clock
from ztagent.admission.refusal_budget import RefusalBudget, RefusalSummary
from ztagent.config import PostureConfig
from ztagent.errors import ConfigError, TransportError, ZtagentError, raised_at
from ztagent.files import make_private_dir
from ztagent.pki.verify import VerifiedDevice
from ztagent.posture.ak_binding import PendingBindings, begin_binding, complete_binding
from ztagent.posture.ek_cert import EkTrust, check_ek_certificate
from ztagent.posture.errors import PostureError, short_hex
from ztagent.posture.firmware import FirmwarePublicKey, load_trusted_keys
from ztagent.posture.nonces import Nonces, NonceStore
from ztagent.posture.reference import ReferenceValues
from ztagent.posture.state import AkRegistry, RollbackStore
from ztagent.posture.verifier import (
    AttestationContext,
    Evidence,
    PostureCache,
    PostureStore,
    verify_evidence,
)
from ztagent.rpc_status import error_trailers, grpc_status_for
from ztagent.sidecar.metrics import Metrics
from ztagent.sidecar.pipeline import Pipeline
from ztagent.sidecar.shared_cache import SharedPostureCache
from ztagent.sidecar.shared_nonces import SharedNonceStore

log = logging.getLogger("ztagent.attestation")


class AttestationError(ZtagentError):
    """An unexpected exception while verifying evidence (code ``attestation_error``): a bug,
    never the device's fault; answered INTERNAL, details only in the sidecar's log."""

    status_name = "INTERNAL"
    codes = frozenset({"attestation_error"})


STATE_UNWRITABLE = "posture_state_unwritable"


def state_unwritable(exc: OSError) -> TransportError:
    """A posture state file could not be written (a symlink planted at its path is refused,
    ``ELOOP``): logged naming the file; the device only learns that the sidecar failed."""
    log.error("cannot write posture state %s: %s", exc.filename, exc.strerror)
    return TransportError(
        STATE_UNWRITABLE,
        "the sidecar cannot write its posture state (its log names the file); try again later",
    )


def evidence_from_message(message: attestation_pb2.Evidence) -> Evidence:
    """The protobuf ``Evidence`` as the plain value the verifier checks."""
    return Evidence(
        quote=bytes(message.quote),
        quote_signature=bytes(message.quote_signature),
        pcr_bank=message.pcr_bank,
        pcr_values={int(k): bytes(v) for k, v in message.pcr_values.items()},
        event_log=bytes(message.event_log),
        ak_public=bytes(message.ak_public),
        firmware_manifest=bytes(message.firmware_manifest),
        firmware_signature=bytes(message.firmware_signature),
        host_facts=bytes(message.host_facts),
    )


@dataclass
class PostureState:
    """Everything attestation keeps between calls."""

    config: PostureConfig
    references: ReferenceValues
    trusted_keys: dict[str, FirmwarePublicKey]
    nonces: Nonces
    pending: PendingBindings
    registry: AkRegistry
    rollback: RollbackStore
    cache: PostureStore
    ek_trust: EkTrust | None = None
    """TPM-manufacturer CAs; when set, AK binding requires a trusted EK certificate."""

    @classmethod
    def load(cls, config: PostureConfig, *, shared: bool = False) -> PostureState:
        """``shared``: postures and challenge nonces go through ``state_dir`` so that sidecar
        workers see each other's (``listen.workers > 1``)."""
        state_dir: Path = config.state_dir
        try:
            return cls._load(config, state_dir, shared)
        except OSError as exc:
            raise ConfigError(
                "posture.state_dir", f"{exc.filename or state_dir}: {exc.strerror}"
            ) from None

    @classmethod
    def _load(cls, config: PostureConfig, state_dir: Path, shared: bool) -> PostureState:
        assert config.reference_values is not None
        make_private_dir(state_dir)  # 0700 (parents too) whatever the umask
        return cls(
            config=config,
            references=ReferenceValues.load(config.reference_values),
            trusted_keys=dict(load_trusted_keys(config.firmware_keys)),
            nonces=(
                SharedNonceStore(state_dir, ttl_s=config.nonce_ttl_s)
                if shared
                else NonceStore(ttl_s=config.nonce_ttl_s)
            ),
            pending=PendingBindings(),
            registry=AkRegistry(state_dir / "ak-bindings.json"),
            rollback=RollbackStore(state_dir / "firmware-svn.json"),
            cache=SharedPostureCache(state_dir) if shared else PostureCache(),
            ek_trust=EkTrust.load(config.ek_ca_bundle) if config.ek_ca_bundle else None,
        )


def _monotonic() -> float:
    return time.monotonic()


class AttestationService(attestation_pb2_grpc.AttestationServicer):
    """``log_budget``: how many failure lines one device may write to the sidecar's log per
    interval (the decision log's ``refusal_burst`` / ``refusal_interval_s``); the rest are
    counted into one summary line, so a device repeating bad evidence cannot fill the log."""

    def __init__(
        self,
        pipeline: Pipeline,
        state: PostureState,
        clock: Clock,
        log_budget: RefusalBudget,
    ) -> None:
        self._pipeline = pipeline
        self._state = state
        self._clock = clock
        self._log_budget = log_budget

    async def _device(self, context: grpc.aio.ServicerContext) -> VerifiedDevice:
        try:
            return self._pipeline.verify_device(context.auth_context())
        except ZtagentError as err:
            await context.abort(
                grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
            )
            raise AssertionError("unreachable") from err

    def _log_failure(self, device_id: str, err: PostureError) -> None:
        write, summaries = self._log_budget.admit(device_id, err.code, "Attest", _monotonic())
        for summary in summaries:
            self._log_summary(summary)
        if write:
            log.warning("attestation of %s refused: %s", device_id, err)

    def flush_log_summaries(self) -> int:
        """Logs the summaries of devices whose window has ended (call it periodically, so a
        device that stopped failing still gets its summary line); returns how many."""
        summaries = self._log_budget.due(_monotonic())
        for summary in summaries:
            self._log_summary(summary)
        return len(summaries)

    def _log_summary(self, summary: RefusalSummary) -> None:
        kinds = ", ".join(f"{code} x{n}" for code, _, n in summary.by_kind)
        log.warning(
            "%d further failed attestations of %s in %.0f s, beyond %d lines per %g s: %s",
            summary.count,
            summary.caller,
            summary.until - summary.since,
            self._log_budget.burst,
            self._log_budget.interval_s,
            kinds,
        )

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, err: ZtagentError) -> NoReturn:
        await context.abort(grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err))
        raise AssertionError("unreachable") from err

    async def Challenge(
        self, request: attestation_pb2.ChallengeRequest, context: grpc.aio.ServicerContext
    ) -> attestation_pb2.ChallengeResponse:
        device = await self._device(context)
        try:
            nonce, expires_at = self._state.nonces.issue(device.fingerprint_sha256, self._clock())
        except OSError as exc:
            await self._abort(context, state_unwritable(exc))
        return attestation_pb2.ChallengeResponse(
            nonce=nonce, expires_at=int(expires_at.timestamp())
        )

    async def Attest(
        self, request: attestation_pb2.AttestRequest, context: grpc.aio.ServicerContext
    ) -> attestation_pb2.AttestResponse:
        device = await self._device(context)
        state = self._state
        ctx = AttestationContext(
            device_id=device.device_id,
            cert_fingerprint=device.fingerprint_sha256,
            pcr_selection=state.config.pcrs,
            references=state.references,
            trusted_firmware_keys=state.trusted_keys,
            max_age_s=state.config.max_age_s,
            now=self._clock(),
            cert_ak_name=device.ak_name,
        )
        try:
            posture = verify_evidence(
                evidence_from_message(request.evidence),
                ctx,
                nonces=state.nonces,
                registry=state.registry,
                rollback=state.rollback,
            )
        except OSError as exc:  # the rollback high-water mark could not be recorded
            await self._abort(context, state_unwritable(exc))
        except PostureError as err:
            # The newest evidence says no: a posture cached from an earlier attestation of
            # this certificate no longer stands.
            state.cache.drop(device.fingerprint_sha256)
            self._log_failure(device.device_id, err)
            if isinstance(self._pipeline.metrics, Metrics):
                self._pipeline.metrics.attestation(False, err.code)
            return attestation_pb2.AttestResponse(
                verified=False,
                failures=[attestation_pb2.Failure(code=err.code, message=err.message)],
            )
        except Exception as exc:  # a bug: fail closed, one line without the device's data
            state.cache.drop(device.fingerprint_sha256)
            log.error("attestation_error: %s at %s", type(exc).__name__, raised_at(exc))
            if isinstance(self._pipeline.metrics, Metrics):
                self._pipeline.metrics.attestation(False, "attestation_error")
            await self._abort(
                context,
                AttestationError(
                    "attestation_error", "internal error in attestation (see the sidecar's log)"
                ),
            )
        try:
            state.cache.put(posture)
        except OSError as exc:
            state.cache.drop(device.fingerprint_sha256)
            await self._abort(context, state_unwritable(exc))
        if isinstance(self._pipeline.metrics, Metrics):
            self._pipeline.metrics.attestation(True)
        log.info(
            "device %s attested (%s): firmware %s %s, posture valid until %s",
            device.device_id,
            posture.attestation_id,
            posture.firmware.get("name"),
            posture.firmware.get("version"),
            posture.expires_at.isoformat(),
        )
        return attestation_pb2.AttestResponse(
            verified=True,
            posture_expires_at=int(posture.expires_at.timestamp()),
            attestation_id=posture.attestation_id,
        )

    async def BeginAkBinding(
        self, request: attestation_pb2.BeginAkBindingRequest, context: grpc.aio.ServicerContext
    ) -> attestation_pb2.BeginAkBindingResponse:
        device = await self._device(context)
        if self._state.ek_trust is not None:
            try:
                ek = check_ek_certificate(
                    request.ek_public, request.ek_certificate, self._state.ek_trust, self._clock()
                )
            except PostureError as err:
                log.warning("AK binding of %s refused: %s", device.device_id, err)
                status = (
                    grpc.StatusCode.INVALID_ARGUMENT
                    if err.code in ("ek_cert_malformed", "evidence_malformed")
                    else grpc.StatusCode.PERMISSION_DENIED
                )
                await context.abort(status, f"{err.code}: {err.message}")
                raise AssertionError("unreachable") from err
            log.info(
                "device %s: EK certificate serial %s from %s trusted",
                device.device_id, ek.serial, ek.issuer,
            )  # fmt: skip
        try:
            pending, blob, secret = begin_binding(
                request.ek_public, request.ak_public, rng=secrets.token_bytes
            )
            if device.ak_name is not None and device.ak_name != pending.ak_name:
                raise PostureError(
                    "ak_binding_failed",
                    f"the device certificate binds AK {short_hex(device.ak_name)}; AK "
                    f"{short_hex(pending.ak_name)} cannot be bound for it",
                )
        except PostureError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err.code}: {err.message}")
            raise AssertionError("unreachable") from err
        binding_id = self._state.pending.add(pending, device.fingerprint_sha256, self._clock())
        return attestation_pb2.BeginAkBindingResponse(
            binding_id=binding_id, credential_blob=blob, encrypted_secret=secret
        )

    async def CompleteAkBinding(
        self, request: attestation_pb2.CompleteAkBindingRequest, context: grpc.aio.ServicerContext
    ) -> attestation_pb2.CompleteAkBindingResponse:
        device = await self._device(context)
        try:
            pending = self._state.pending.take(
                request.binding_id, device.fingerprint_sha256, self._clock()
            )
            ak_name = complete_binding(pending, request.secret)
        except PostureError as err:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{err.code}: {err.message}")
            raise AssertionError("unreachable") from err
        try:
            self._state.registry.bind(device.device_id, ak_name)
        except OSError as exc:
            await self._abort(context, state_unwritable(exc))
        log.info(
            "device %s: AK %s bound (MakeCredential/ActivateCredential)", device.device_id, ak_name
        )
        return attestation_pb2.CompleteAkBindingResponse(bound=True, ak_name=ak_name)
