"""Verify a device's attestation ``Evidence`` into an ``AttestedPosture``.

``verify_evidence`` is pure apart from the three stores it is handed (nonces, bound AKs,
firmware SVN high-water marks); the time is ``ctx.now``. Checks run in this order and the
first failure raises its ``PostureError``:

1. parse everything (``evidence_malformed`` / ``eventlog_malformed``): quote, signature, AK
   public, PCR values (exactly the quote's selection, right sizes), event log, firmware
   manifest and signature envelope, host facts (a JSON object);
2. the AK is the one bound to this device (``ak_not_bound``): the AK named by the device
   certificate's AK-name extension (``ctx.cert_ak_name``, from TPM-bound enrollment) when
   it has one, and then only that AK, whatever the registry says; otherwise the AK the
   registry bound to the device id (BeginAkBinding/CompleteAkBinding);
3. the quote signature verifies with it (``quote_bad_signature``);
4. the quote's ``extraData`` is a nonce issued to this certificate, unused, unexpired
   (``nonce_mismatch`` / ``nonce_reused`` / ``nonce_expired``); it is consumed either way;
5. the quoted PCR selection and bank are the configured ones (``pcr_selection_mismatch``);
6. the reported PCR values hash to the quote's ``pcrDigest`` (``pcr_digest_mismatch``);
7. the event log replays to those values (``eventlog_replay_mismatch``);
8. every measured component is in the reference values (``boot_not_reference``);
9. the firmware manifest is signed by a trusted key (``firmware_untrusted_key`` /
   ``firmware_bad_signature``);
10. its ``image_sha256`` is the measured firmware digest (``firmware_digest_mismatch``);
11. its SVN is not below the highest seen for the device (``firmware_rollback``); only now,
    with everything else passed, is the SVN recorded.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from ztagent import json_input
from ztagent.errors import ConfigError
from ztagent.posture.errors import PostureError, short_hex
from ztagent.posture.eventlog import DIGEST_SIZES, parse_event_log, replay
from ztagent.posture.firmware import (
    FirmwareManifest,
    FirmwarePublicKey,
    FirmwareSignature,
    check_firmware_digest,
    verify_manifest,
)
from ztagent.posture.nonces import Nonces
from ztagent.posture.quote import (
    ak_name,
    parse_quote,
    pcr_composite_digest,
    signature_hash,
    verify_quote_signature,
)
from ztagent.posture.reference import ReferenceValues, check_boot
from ztagent.posture.state import AkRegistry, RollbackStore

MAX_HOST_FACTS_BYTES = 64 * 1024


@dataclass(frozen=True)
class Evidence:
    """What a device sends to attest (the fields of ``ztagent.v1.Evidence``, as plain values;
    the attestation service converts the protobuf message)."""

    quote: bytes
    """TPM2B_ATTEST contents: the marshalled TPMS_ATTEST the TPM signed."""
    quote_signature: bytes
    """Marshalled TPMT_SIGNATURE over ``quote``."""
    pcr_bank: str
    pcr_values: Mapping[int, bytes]
    event_log: bytes
    """TCG PC Client crypto-agile binary event log."""
    ak_public: bytes
    """Marshalled TPM2B_PUBLIC of the attestation key."""
    firmware_manifest: bytes
    firmware_signature: bytes
    host_facts: bytes
    """Self-reported JSON object; informative, never trusted."""


@dataclass(frozen=True)
class AttestedPosture:
    """A verified attestation, bound to the device certificate that presented it."""

    attestation_id: str
    device_id: str
    cert_fingerprint: str
    ak_name: str
    verified_at: datetime
    expires_at: datetime
    firmware: Mapping[str, Any]
    boot: Mapping[str, Any]
    host: Mapping[str, Any]
    firmware_svn: int
    quote_clock: int
    quote_reset_count: int

    def as_input(self, now: datetime) -> dict[str, Any]:
        """``input.posture`` for the policy: verified while ``now`` is before ``expires_at``.
        ``age_s`` is whole seconds, rounded up (never younger than it is): a policy that reads
        it sees a new value once a second, so the decision cache still answers in between."""
        firmware, boot, host = self._measured_input
        return {
            "verified": self.verified_at <= now < self.expires_at,
            "age_s": math.ceil(max(0.0, (now - self.verified_at).total_seconds())),
            "firmware": firmware,
            "boot": boot,
            "host": host,
        }

    @functools.cached_property
    def _measured_input(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The parts of ``input.posture`` that do not change with time: built once per
        attestation, shared (read-only) by every request's input."""
        boot = {"verified": bool(self.boot["verified"]), "pcrs": dict(self.boot["pcrs"])}
        return dict(self.firmware), boot, dict(self.host)


@dataclass(frozen=True)
class AttestationContext:
    """Who is attesting (from the mTLS certificate), what is expected, and when it is."""

    device_id: str
    cert_fingerprint: str
    pcr_selection: tuple[int, ...]
    references: ReferenceValues
    trusted_firmware_keys: Mapping[str, FirmwarePublicKey]
    max_age_s: float
    now: datetime
    cert_ak_name: str | None = None
    """Hex TPM name of the AK the device certificate binds (its AK-name extension), or
    None; when set it is authoritative and the registry is not consulted."""

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("validation time must be timezone-aware")
        selection = self.pcr_selection
        if not selection or tuple(sorted(set(selection))) != selection:
            raise ConfigError(
                "posture.pcr_selection", f"{list(selection)}: expected ascending, distinct PCRs"
            )
        uncovered = sorted(set(self.references.pcrs) - set(selection))
        if uncovered:
            raise ConfigError(
                "posture.pcr_selection",
                f"{list(selection)} leaves reference PCRs {uncovered} unquoted",
            )
        if self.references.bank != "sha256" or "firmware" not in self.references.components:
            raise ConfigError(
                "posture.reference_values",
                f"bank {self.references.bank} with components "
                f"{sorted(self.references.components)}; expected sha256 and a firmware component",
            )
        if self.max_age_s <= 0:
            raise ConfigError("posture.max_age", f"{self.max_age_s}, expected > 0 seconds")


def _host_facts(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {"self_reported": True}
    if len(raw) > MAX_HOST_FACTS_BYTES:
        raise PostureError(
            "evidence_malformed", f"host facts are {len(raw)} bytes, limit {MAX_HOST_FACTS_BYTES}"
        )
    try:
        doc = json_input.loads(raw)
    except ValueError as exc:  # not UTF-8, not JSON, or nested too deep
        raise PostureError("evidence_malformed", f"host facts: {exc}") from None
    if not isinstance(doc, dict):
        raise PostureError(
            "evidence_malformed", f"host facts are a {type(doc).__name__}, expected an object"
        )
    return {**doc, "self_reported": True}


def _pcr_values(evidence: Evidence, select: tuple[int, ...], bank: str) -> dict[int, bytes]:
    if evidence.pcr_bank != bank:
        raise PostureError(
            "evidence_malformed", f"pcr_bank {evidence.pcr_bank!r}, the quote is over {bank!r}"
        )
    values = {int(k): bytes(v) for k, v in evidence.pcr_values.items()}
    if set(values) != set(select):
        raise PostureError(
            "evidence_malformed",
            f"pcr_values for PCRs {sorted(values)}, the quote selects {list(select)}",
        )
    size = DIGEST_SIZES[bank]
    for index, value in values.items():
        if len(value) != size:
            raise PostureError(
                "evidence_malformed", f"PCR {index} value is {len(value)} bytes, expected {size}"
            )
    return values


def verify_evidence(
    evidence: Evidence,
    ctx: AttestationContext,
    *,
    nonces: Nonces,
    registry: AkRegistry,
    rollback: RollbackStore,
) -> AttestedPosture:
    """The attested posture, or the first ``PostureError`` (see the module doc for the order)."""
    # 1. parse
    quote = parse_quote(evidence.quote)
    sig_hash = signature_hash(evidence.quote_signature)
    name = ak_name(evidence.ak_public)
    values = _pcr_values(evidence, quote.pcr_select, quote.bank)
    events = parse_event_log(evidence.event_log)
    FirmwareManifest.parse(evidence.firmware_manifest)
    FirmwareSignature.parse(evidence.firmware_signature)
    host = _host_facts(evidence.host_facts)

    # 2. the bound AK: the certificate's, else the registry's
    if ctx.cert_ak_name is not None:
        if ctx.cert_ak_name.lower() != name:
            raise PostureError(
                "ak_not_bound",
                f"quote AK {short_hex(name)}, the device certificate of {ctx.device_id} binds "
                f"AK {short_hex(ctx.cert_ak_name.lower())}",
            )
        bound: str | None = name
    else:
        bound = registry.bound_ak(ctx.device_id)
    if bound is None:
        raise PostureError(
            "ak_not_bound", f"device {ctx.device_id} has no bound AK; expected AK binding first"
        )
    if bound != name:
        raise PostureError(
            "ak_not_bound",
            f"quote AK {short_hex(name)}, device {ctx.device_id} is bound to {short_hex(bound)}",
        )
    # 3. signature, 4. nonce
    verify_quote_signature(evidence.quote, evidence.quote_signature, evidence.ak_public)
    nonces.consume(ctx.cert_fingerprint, quote.extra_data, ctx.now)

    # 5. selection, 6. digest
    if quote.pcr_select != ctx.pcr_selection or quote.bank != ctx.references.bank:
        raise PostureError(
            "pcr_selection_mismatch",
            f"quote selects {quote.bank}:{list(quote.pcr_select)}, expected "
            f"{ctx.references.bank}:{list(ctx.pcr_selection)}",
        )
    digest = pcr_composite_digest(values, quote.pcr_select, sig_hash)
    if digest != quote.pcr_digest:
        raise PostureError(
            "pcr_digest_mismatch",
            f"reported PCR values hash to {short_hex(digest)}, the quote signed "
            f"{short_hex(quote.pcr_digest)}",
        )
    # 7. replay
    replayed = replay(events, quote.bank, quote.pcr_select)
    for index in quote.pcr_select:
        if replayed[index] != values[index]:
            raise PostureError(
                "eventlog_replay_mismatch",
                f"event log replays PCR {index} to {short_hex(replayed[index])}, quoted "
                f"{short_hex(values[index])}",
            )
    # 8. reference values
    boot = check_boot(events, ctx.references)
    # 9. firmware signature, 10. digest, 11. rollback
    manifest, signer = verify_manifest(
        evidence.firmware_manifest, evidence.firmware_signature, ctx.trusted_firmware_keys
    )
    check_firmware_digest(manifest, boot.components["firmware"][1])
    rollback.check_and_record(ctx.device_id, manifest.svn)

    attestation_id = hashlib.sha256(evidence.quote + evidence.quote_signature).hexdigest()[:32]
    return AttestedPosture(
        attestation_id=attestation_id,
        device_id=ctx.device_id,
        cert_fingerprint=ctx.cert_fingerprint,
        ak_name=name,
        verified_at=ctx.now,
        expires_at=ctx.now + timedelta(seconds=ctx.max_age_s),
        firmware={
            "name": manifest.name,
            "version": manifest.version,
            "signed": True,
            "signer": signer,
        },
        boot={
            "verified": True,
            "pcrs": {str(index): values[index].hex() for index in quote.pcr_select},
        },
        host=host,
        firmware_svn=manifest.svn,
        quote_clock=quote.clock,
        quote_reset_count=quote.reset_count,
    )


class PostureStore(Protocol):
    """Where verified postures are kept: ``PostureCache`` in one process,
    ``ztagent.sidecar.shared_cache.SharedPostureCache`` across sidecar workers."""

    def put(self, posture: AttestedPosture) -> None: ...

    def get(self, cert_fingerprint: str, now: datetime) -> AttestedPosture | None: ...

    def drop(self, cert_fingerprint: str) -> None: ...


@dataclass
class PostureCache:
    """cert fingerprint -> its latest ``AttestedPosture``; expired entries are dropped."""

    max_entries: int = 10_000
    _entries: dict[str, AttestedPosture] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, posture: AttestedPosture) -> None:
        with self._lock:
            self._entries.pop(posture.cert_fingerprint, None)
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]  # the least recently attested
            self._entries[posture.cert_fingerprint] = posture

    def get(self, cert_fingerprint: str, now: datetime) -> AttestedPosture | None:
        with self._lock:
            posture = self._entries.get(cert_fingerprint)
            if posture is not None and now >= posture.expires_at:
                del self._entries[cert_fingerprint]
                return None
            return posture

    def drop(self, cert_fingerprint: str) -> None:
        with self._lock:
            self._entries.pop(cert_fingerprint, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
