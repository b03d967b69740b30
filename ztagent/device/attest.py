"""The device side of posture attestation (the library behind ``ztagent attest``).

``attest_once`` runs one round over an mTLS channel to the sidecar (built by the CLI with the
device certificate): AK binding first when this device directory has no record of it
(BeginAkBinding -> TPM ActivateCredential -> CompleteAkBinding, recorded in
``<state_dir>/ak-bound``; TPM-bound enrollment writes the same record, since its certificate
already names the AK and the sidecar needs no binding of its own), then Challenge -> TPM
quote over the nonce -> PCR read -> Attest with the full ``Evidence``. If the sidecar answers
``ak_not_bound`` although the record says bound (its state was reset, or this is another
sidecar), the record is dropped, the AK is bound again and the round is retried once.
``attest_loop`` repeats rounds: at 2/3 of the posture lifetime after a success, with
jittered exponential backoff after a failure.

Errors: ``AttestRpcError`` (code ``attestation_unavailable``, a ``TransportError``) when an
RPC fails; ``TpmError`` from the TPM; ``PostureError("ak_binding_failed")`` when the sidecar
refuses the binding. A refused attestation is not an error: the ``AttestResponse`` says
``verified=False`` with its failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from ztagent._proto.v1 import attestation_pb2 as pb
from ztagent._proto.v1 import attestation_pb2_grpc as pb_grpc
from ztagent.device.errors import EnrollClientError
from ztagent.device.host_facts import collect_host_facts
from ztagent.device.tpm import DeviceTpm
from ztagent.errors import ConfigError, TransportError, ZtagentError
from ztagent.files import make_private_dir, write_atomic
from ztagent.posture.errors import PostureError
from ztagent.schedule import Backoff, refresh_in

AK_BOUND_FILE = "ak-bound"
"""JSON record ``{"ak_name", "binding_id", "bound_at"}`` written after a successful binding."""
EVENT_LOG_FILE = "event-log.bin"
"""A device directory's own event log (the demo device's boot simulator writes it)."""
SYSTEM_EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
PCR_BANK = "sha256"
RPC_TIMEOUT_S = 30.0
MIN_RENEW_S = 1.0

_T = TypeVar("_T")


class AttestRpcError(TransportError):
    """An attestation RPC failed (sidecar unreachable, TLS refused, deadline, status)."""

    def __init__(self, method: str, status: str, details: str) -> None:
        super().__init__("attestation_unavailable", f"{method}: {status}: {details}")
        self.method = method
        self.status = status


@dataclass(frozen=True)
class EvidenceInputs:
    """What a device sends besides its TPM's answers: the event log and firmware manifest."""

    event_log: bytes
    firmware_manifest: bytes | None = None
    firmware_signature: bytes | None = None


RETRY_BACKOFF = Backoff(initial_s=1.0, cap_s=60.0)
"""Re-attestation after a failed round: 1 s doubling to 60 s."""


# --- inputs (file IO at the edge) --------------------------------------------------------


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc


def load_evidence_inputs(
    state_dir: Path,
    *,
    event_log: Path | None = None,
    firmware: Path | None = None,
    firmware_signature: Path | None = None,
) -> EvidenceInputs:
    """Read the event log and the optional firmware manifest + signature.

    The event log is ``event_log`` if given, else ``<state_dir>/event-log.bin`` if present,
    else the kernel's ``/sys/kernel/security/tpm0/binary_bios_measurements``. The manifest
    and its signature come together or not at all. Raise ``ConfigError`` otherwise.
    """
    if (firmware is None) != (firmware_signature is None):
        raise ConfigError(
            "--firmware-sig" if firmware is not None else "--firmware",
            "a firmware manifest and its signature must be given together",
        )
    if event_log is None:
        own = state_dir / EVENT_LOG_FILE
        event_log = own if own.exists() else SYSTEM_EVENT_LOG
    return EvidenceInputs(
        event_log=_read(event_log, "--event-log"),
        firmware_manifest=_read(firmware, "--firmware") if firmware else None,
        firmware_signature=(
            _read(firmware_signature, "--firmware-sig") if firmware_signature else None
        ),
    )


# --- AK binding record ---------------------------------------------------------------------


def read_binding(state_dir: Path) -> dict[str, Any] | None:
    """The ``ak-bound`` record, or None when absent or unreadable (then bind again)."""
    try:
        doc = json.loads((state_dir / AK_BOUND_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("ak_name"), str) else None


def record_binding(state_dir: Path, ak_name: str, binding_id: str) -> None:
    """Write the ``ak-bound`` record: this device's AK (hex name) is bound, by ``binding_id``
    (a sidecar's binding id, or the CA's enrollment id after TPM-bound enrollment).
    Never through a symlink: ``device_dir_invalid`` names the file."""
    path = state_dir / AK_BOUND_FILE
    doc = {
        "ak_name": ak_name,
        "binding_id": binding_id,
        "bound_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        make_private_dir(state_dir)
        write_atomic(path, (json.dumps(doc, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise EnrollClientError(
            "device_dir_invalid", f"cannot write {exc.filename or path}: {exc.strerror}"
        ) from None


def _drop_binding(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / AK_BOUND_FILE).unlink()


# --- one round -----------------------------------------------------------------------------


async def _rpc(method: str, call: Any, request: Any) -> Any:
    try:
        return await call(request, timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        raise AttestRpcError(method, exc.code().name, str(exc.details())) from exc


async def _tpm(fn: Callable[..., _T], *args: Any) -> _T:
    return await asyncio.to_thread(fn, *args)


async def bind_ak(stub: Any, tpm: DeviceTpm, state_dir: Path) -> str:
    """Run the AK binding exchange and record it; return the AK name (hex)."""
    ek_public = await _tpm(tpm.ek_public)
    ek_certificate = await _tpm(tpm.ek_certificate) or b""
    ak_public = await _tpm(tpm.ak_public)
    local_name = (await _tpm(tpm.ak_name)).hex()
    begin = await _rpc(
        "BeginAkBinding",
        stub.BeginAkBinding,
        pb.BeginAkBindingRequest(
            ek_public=ek_public, ak_public=ak_public, ek_certificate=ek_certificate
        ),
    )
    secret = await _tpm(tpm.activate_credential, begin.credential_blob, begin.encrypted_secret)
    done = await _rpc(
        "CompleteAkBinding",
        stub.CompleteAkBinding,
        pb.CompleteAkBindingRequest(binding_id=begin.binding_id, secret=secret),
    )
    if not done.bound:
        raise PostureError("ak_binding_failed", f"the sidecar refused binding AK {local_name}")
    if done.ak_name and done.ak_name.lower() != local_name:
        raise PostureError(
            "ak_binding_failed",
            f"the sidecar bound AK {done.ak_name}, expected this TPM's AK {local_name}",
        )
    record_binding(state_dir, local_name, begin.binding_id)
    return local_name


async def _attest(
    stub: Any,
    tpm: DeviceTpm,
    pcrs: Sequence[int],
    inputs: EvidenceInputs,
    host_facts: Mapping[str, Any],
) -> Any:
    challenge = await _rpc("Challenge", stub.Challenge, pb.ChallengeRequest())
    quote = await _tpm(tpm.quote, bytes(challenge.nonce), list(pcrs), PCR_BANK)
    values = await _tpm(tpm.read_pcrs, list(pcrs), PCR_BANK)
    evidence = pb.Evidence(
        quote=quote.attest,
        quote_signature=quote.signature,
        pcr_bank=PCR_BANK,
        pcr_values=values,
        event_log=inputs.event_log,
        ak_public=await _tpm(tpm.ak_public),
        firmware_manifest=inputs.firmware_manifest or b"",
        firmware_signature=inputs.firmware_signature or b"",
        host_facts=json.dumps(dict(host_facts), sort_keys=True, default=str).encode(),
    )
    return await _rpc("Attest", stub.Attest, pb.AttestRequest(evidence=evidence))


async def attest_once(
    channel: grpc.aio.Channel,
    tpm: DeviceTpm,
    *,
    state_dir: Path,
    pcrs: Sequence[int],
    event_log: bytes,
    firmware_manifest: bytes | None,
    firmware_signature: bytes | None,
    host_facts: Mapping[str, Any],
) -> pb.AttestResponse:
    """One attestation round (binding the AK first if needed); the sidecar's answer."""
    stub = pb_grpc.AttestationStub(channel)
    inputs = EvidenceInputs(event_log, firmware_manifest, firmware_signature)
    record = read_binding(state_dir)
    current = (await _tpm(tpm.ak_name)).hex()
    just_bound = False
    if record is None or record["ak_name"] != current:
        await bind_ak(stub, tpm, state_dir)
        just_bound = True
    response = await _attest(stub, tpm, pcrs, inputs, host_facts)
    if not just_bound and any(f.code == "ak_not_bound" for f in response.failures):
        _drop_binding(state_dir)
        await bind_ak(stub, tpm, state_dir)
        response = await _attest(stub, tpm, pcrs, inputs, host_facts)
    result: pb.AttestResponse = response
    return result


# --- the loop ------------------------------------------------------------------------------


def next_attempt_in(
    response: pb.AttestResponse | None,
    failures: int,
    now: float,
    retry: Backoff,
    rnd: Callable[[], float] = random.random,
    *,
    every_s: float | None = None,
) -> float:
    """Seconds until the next round: after a success, 2/3 of the remaining posture lifetime
    (at least ``MIN_RENEW_S``), or ``every_s`` if that is sooner; the backoff after
    ``failures`` consecutive failures."""
    if response is not None and response.verified and failures == 0:
        wait = refresh_in(response.posture_expires_at - now, MIN_RENEW_S)
        return wait if every_s is None else min(every_s, wait)
    return retry.delay(failures, rng=rnd)


async def attest_loop(
    channel: grpc.aio.Channel,
    tpm: DeviceTpm,
    *,
    state_dir: Path,
    pcrs: Sequence[int],
    inputs: EvidenceInputs,
    host_facts: Callable[[], Mapping[str, Any]] = collect_host_facts,
    on_result: Callable[[pb.AttestResponse | ZtagentError], None] | None = None,
    retry: Backoff = RETRY_BACKOFF,
    every_s: float | None = None,
) -> NoReturn:
    """Attest forever (until cancelled); ``on_result`` sees every answer or error. The next
    round comes at ``next_attempt_in`` (``every_s`` caps the wait after a success).

    Host facts are collected anew for every round. Errors other than ``ZtagentError``
    (programming errors) propagate and end the loop.
    """
    failures = 0
    while True:
        response: pb.AttestResponse | None = None
        try:
            response = await attest_once(
                channel,
                tpm,
                state_dir=state_dir,
                pcrs=pcrs,
                event_log=inputs.event_log,
                firmware_manifest=inputs.firmware_manifest,
                firmware_signature=inputs.firmware_signature,
                host_facts=await asyncio.to_thread(host_facts),
            )
            outcome: pb.AttestResponse | ZtagentError = response
        except ZtagentError as err:
            outcome = err
        failures = 0 if response is not None and response.verified else failures + 1
        if on_result is not None:
            on_result(outcome)
        await asyncio.sleep(
            next_attempt_in(response, failures, time.time(), retry, every_s=every_s)
        )


def open_sidecar_channel(
    server: str,
    cert: Path,
    key: Path | None,
    ca_bundle: Path,
    device_dir: Path,
    pin: str | None,
) -> grpc.aio.Channel:
    """mTLS to the sidecar as the device. Without ``key``, the key is wherever
    ``device_dir/keystore.json`` says (a file, a PKCS#11 token, the TPM: then it signs the
    handshake); with it (or without a keystore.json), the key file next to ``cert``."""
    from ztagent.device.device_dir import KEYSTORE_FILE
    from ztagent.device.transport import device_credentials

    try:
        if key is None and (device_dir / KEYSTORE_FILE).exists():
            creds = device_credentials(cert, ca_bundle.read_bytes(), pin)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca_bundle.read_bytes(),
                private_key=(key or cert.with_suffix(".key")).read_bytes(),
                certificate_chain=cert.read_bytes(),
            )
    except OSError as exc:
        raise ConfigError(str(exc.filename), f"cannot read: {exc.strerror}") from exc
    return grpc.aio.secure_channel(server, creds)
