"""The device side of attestation against a real software TPM (swtpm, one per module).

Quotes are checked with ``tpm2_checkquote`` from tpm2-tools (independent of our code); AK
binding uses ``tpm2_pytss.utils.make_credential`` (through ``posture.ak_binding``) in software.
The device client talks gRPC to ``FakeAttestation`` below, a stand-in sidecar that implements
the real ``Attestation`` service with the verifier's own building blocks (``ak_binding``,
``quote``); it is not the sidecar's verifier (that is tested with the sidecar).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PUBLIC, TPMA_OBJECT
from tpm2_pytss.utils import make_credential

from tests.fixtures.swtpm import Swtpm, swtpm  # noqa: F401 (the module fixture)
from ztagent._proto.v1 import attestation_pb2 as pb
from ztagent._proto.v1 import attestation_pb2_grpc as pb_grpc
from ztagent.dev.boot_sim import boot_demo_device, demo_components, simulate_boot
from ztagent.device import attest as device
from ztagent.device.attest import (
    AK_BOUND_FILE,
    RETRY_BACKOFF,
    EvidenceInputs,
    attest_loop,
    attest_once,
    load_evidence_inputs,
    read_binding,
)
from ztagent.device.tpm import AK_ATTRIBUTES, DeviceTpm, TpmError
from ztagent.errors import ConfigError
from ztagent.posture.ak_binding import begin_binding, complete_binding
from ztagent.posture.errors import PostureError
from ztagent.posture.eventlog import COMPONENT_PCRS, parse_event_log, replay
from ztagent.posture.quote import ak_name, parse_quote, pcr_composite_digest
from ztagent.posture.quote import verify_quote_signature as verify_signature
from ztagent.schedule import Backoff

pytestmark = pytest.mark.integration

UNUSED_PCR = next(i for i in range(10, 16) if i not in COMPONENT_PCRS.values())
PCRS = sorted({*COMPONENT_PCRS.values(), UNUSED_PCR})
"""The PCRs boot components are measured into, plus one nothing measures (stays zero)."""


@pytest.fixture
def tpm(swtpm: Swtpm) -> DeviceTpm:  # noqa: F811
    """A client for the module's swtpm as it runs now (tests may restart it: new ports)."""
    return DeviceTpm(swtpm.tcti)


def _public(raw: bytes) -> Any:
    public, used = TPM2B_PUBLIC.unmarshal(raw)
    assert used == len(raw)
    return public


# --- keys ------------------------------------------------------------------------------


def test_ek_is_the_standard_ecc_ek_and_deterministic(tpm: DeviceTpm) -> None:
    first, second = tpm.ek_public(), tpm.ek_public()
    assert first == second
    area = _public(first).publicArea
    attrs = int(area.objectAttributes)
    assert attrs & int(TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM)
    assert not attrs & int(TPMA_OBJECT.SIGN_ENCRYPT)
    assert len(bytes(area.unique.ecc.x)) == 32


def test_ak_is_a_restricted_signing_key_stable_across_instances_and_restarts(
    swtpm: Swtpm,  # noqa: F811
) -> None:
    first = DeviceTpm(swtpm.tcti).ak_public()
    assert DeviceTpm(swtpm.tcti).ak_public() == first
    swtpm.restart()  # new ports, PCRs reset, persistent objects kept
    assert DeviceTpm(swtpm.tcti).ak_public() == first
    attrs = _public(first).publicArea.objectAttributes
    for flag in ("FIXEDTPM", "FIXEDPARENT", "RESTRICTED", "SIGN_ENCRYPT"):
        assert attrs & getattr(TPMA_OBJECT, flag), flag
    assert not attrs & TPMA_OBJECT.DECRYPT
    assert DeviceTpm(swtpm.tcti).ak_name().hex() == ak_name(first)


def test_a_foreign_key_at_the_ak_handle_is_refused_not_used(
    swtpm: Swtpm,  # noqa: F811
) -> None:
    handle = 0x81000B01
    with ESAPI(swtpm.tcti) as esapi:
        template = TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256",
            objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        )
        key, _, _, _, _ = esapi.create_primary(None, template, ESYS_TR.OWNER)
        persistent = esapi.evict_control(ESYS_TR.OWNER, key, handle)
        esapi.flush_context(key)
        esapi.tr_close(persistent)
    with pytest.raises(TpmError, match="0x81000b01 holds a key that is not a ztagent AK"):
        DeviceTpm(swtpm.tcti, ak_handle=handle).ak_public()


def test_unreachable_tpm_is_tpm_unavailable() -> None:
    with pytest.raises(TpmError, match="IO failure") as info:
        DeviceTpm("swtpm:host=127.0.0.1,port=1").ek_public()
    assert info.value.code == "tpm_unavailable"


def test_bad_arguments_are_refused_before_the_tpm(tpm: DeviceTpm) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        tpm.extend(0, b"short")
    with pytest.raises(ValueError, match="PCR index"):
        tpm.read_pcrs([24])
    with pytest.raises(ValueError, match="PCR bank"):
        tpm.quote(b"n" * 16, [0], bank="md5")


# --- quotes and measured boot ------------------------------------------------------------


def _checkquote(
    tmp_path: Path,
    ak_public: bytes,
    attest: bytes,
    sig: bytes,
    pcrs: dict[int, bytes],
    nonce: bytes,
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ak.pem").write_bytes(_public(ak_public).to_pem())
    (tmp_path / "msg").write_bytes(attest)  # TPMS_ATTEST, as tpm2_quote -m writes it
    (tmp_path / "sig").write_bytes(sig)  # marshalled TPMT_SIGNATURE (tpm2_quote -s)
    (tmp_path / "pcrs").write_bytes(b"".join(pcrs[i] for i in sorted(pcrs)))  # raw values
    selection = "sha256:" + ",".join(str(i) for i in sorted(pcrs))
    return subprocess.run(
        [
            "tpm2_checkquote", "-u", str(tmp_path / "ak.pem"), "-m", str(tmp_path / "msg"),
            "-s", str(tmp_path / "sig"), "-f", str(tmp_path / "pcrs"), "-l", selection,
            "-g", "sha256", "-q", nonce.hex(),
        ],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip


def test_simulated_boot_quote_verifies_with_tpm2_checkquote(
    swtpm: Swtpm,  # noqa: F811
    tmp_path: Path,
) -> None:
    swtpm.restart()  # PCRs back to zero
    tpm = DeviceTpm(swtpm.tcti)
    log = simulate_boot(tpm, demo_components())
    values = tpm.read_pcrs(PCRS)
    assert replay(parse_event_log(log), "sha256", PCRS) == values
    assert all(values[pcr] != bytes(32) for pcr in COMPONENT_PCRS.values())
    assert values[UNUSED_PCR] == bytes(32)

    nonce = os.urandom(32)
    attest, signature = tpm.quote(nonce, PCRS)
    ak_public = tpm.ak_public()
    ok = _checkquote(tmp_path, ak_public, attest, signature, values, nonce)
    assert ok.returncode == 0, ok.stderr

    quote = parse_quote(attest)
    assert quote.extra_data == nonce and quote.pcr_select == tuple(PCRS)
    assert quote.pcr_digest == pcr_composite_digest(values, PCRS)
    verify_signature(attest, signature, ak_public)

    wrong_nonce = _checkquote(tmp_path, ak_public, attest, signature, values, os.urandom(32))
    assert wrong_nonce.returncode != 0
    tampered = bytearray(attest)
    tampered[-1] ^= 1
    bad = _checkquote(tmp_path, ak_public, bytes(tampered), signature, values, nonce)
    assert bad.returncode != 0


def test_simulate_boot_refuses_an_already_booted_tpm(swtpm: Swtpm) -> None:  # noqa: F811
    swtpm.restart()
    tpm = DeviceTpm(swtpm.tcti)
    simulate_boot(tpm, demo_components())
    with pytest.raises(TpmError, match="needs a freshly started TPM"):
        simulate_boot(tpm, demo_components("1.4.0"))


def test_extend_changes_exactly_that_pcr(tpm: DeviceTpm) -> None:
    before = tpm.read_pcrs(list(range(24)))
    digest = hashlib.sha256(b"measured").digest()
    tpm.extend(16, digest)
    after = tpm.read_pcrs(list(range(24)))
    assert after[16] == hashlib.sha256(before[16] + digest).digest()
    assert {i: v for i, v in after.items() if i != 16} == {
        i: v for i, v in before.items() if i != 16
    }


# --- credential activation -------------------------------------------------------------


def test_activate_credential_recovers_a_software_made_secret(tpm: DeviceTpm) -> None:
    ek, ak = _public(tpm.ek_public()), _public(tpm.ak_public())
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek, secret, ak.get_name())
    assert tpm.activate_credential(blob.marshal(), encrypted.marshal()) == secret


def test_activate_credential_refuses_a_credential_for_another_key(tpm: DeviceTpm) -> None:
    ek = _public(tpm.ek_public())
    other = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRIBUTES)
    blob, encrypted = make_credential(ek, os.urandom(32), other.get_name())
    with pytest.raises(TpmError, match="activate credential") as info:
        tpm.activate_credential(blob.marshal(), encrypted.marshal())
    assert info.value.code == "tpm_error"
    with pytest.raises(TpmError, match=r"not a marshalled TPM2B_ID_OBJECT|trailing"):
        tpm.activate_credential(b"\x00\x05ab", encrypted.marshal())


def test_many_operations_do_not_exhaust_tpm_object_slots(tpm: DeviceTpm) -> None:
    ek, ak = _public(tpm.ek_public()), _public(tpm.ak_public())
    for i in range(30):
        attest, _ = tpm.quote(i.to_bytes(16, "big"), PCRS)
        assert parse_quote(attest).extra_data == i.to_bytes(16, "big")
    for _ in range(8):
        blob, encrypted = make_credential(ek, b"s" * 32, ak.get_name())
        assert tpm.activate_credential(blob.marshal(), encrypted.marshal()) == b"s" * 32
        tpm.ek_public()


# --- the device client against a stand-in sidecar ----------------------------------------


class FakeAttestation(pb_grpc.AttestationServicer):
    """The Attestation service, built from the verifier's pieces; records what it saw."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] = {}
        self.bound: set[str] = set()
        self.nonces: list[bytes] = []
        self.evidence: list[pb.Evidence] = []
        self.answers: list[pb.AttestResponse] = []
        self.begin_calls = 0
        self.verdicts: list[bool] = []  # forced answers, consumed first

    async def Challenge(self, request: Any, context: Any) -> pb.ChallengeResponse:
        self.nonces.append(os.urandom(32))
        return pb.ChallengeResponse(nonce=self.nonces[-1], expires_at=int(time.time()) + 60)

    async def BeginAkBinding(self, request: Any, context: Any) -> pb.BeginAkBindingResponse:
        self.begin_calls += 1
        pending, blob, encrypted = begin_binding(request.ek_public, request.ak_public)
        binding_id = os.urandom(8).hex()
        self.pending[binding_id] = pending
        return pb.BeginAkBindingResponse(
            binding_id=binding_id, credential_blob=blob, encrypted_secret=encrypted
        )

    async def CompleteAkBinding(self, request: Any, context: Any) -> pb.CompleteAkBindingResponse:
        try:
            name = complete_binding(self.pending.pop(request.binding_id), request.secret)
        except PostureError:
            return pb.CompleteAkBindingResponse(bound=False)
        self.bound.add(name)
        return pb.CompleteAkBindingResponse(bound=True, ak_name=name)

    async def Attest(self, request: Any, context: Any) -> pb.AttestResponse:
        ev = request.evidence
        self.evidence.append(ev)
        failures = []
        if ak_name(ev.ak_public) not in self.bound:
            failures.append(pb.Failure(code="ak_not_bound", message="unknown AK"))
        try:
            verify_signature(ev.quote, ev.quote_signature, ev.ak_public)
            quote = parse_quote(ev.quote)
            values = dict(ev.pcr_values)
            if quote.extra_data != self.nonces[-1]:
                failures.append(pb.Failure(code="nonce_mismatch"))
            if quote.pcr_digest != pcr_composite_digest(values, quote.pcr_select):
                failures.append(pb.Failure(code="pcr_digest_mismatch"))
        except PostureError as err:
            failures.append(pb.Failure(code=err.code, message=err.message))
        verified = not failures and (self.verdicts.pop(0) if self.verdicts else True)
        answer = pb.AttestResponse(
            verified=verified,
            failures=failures,
            posture_expires_at=int(time.time()) + 600 if verified else 0,
            attestation_id=f"att-{len(self.evidence)}",
        )
        self.answers.append(answer)
        return answer


@pytest.fixture
async def sidecar() -> AsyncIterator[tuple[FakeAttestation, grpc.aio.Channel]]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    service = FakeAttestation()
    pb_grpc.add_AttestationServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, channel
    finally:
        await channel.close()
        await server.stop(None)


def _kwargs(state_dir: Path, log: bytes) -> dict[str, Any]:
    return {
        "state_dir": state_dir,
        "pcrs": PCRS,
        "event_log": log,
        "firmware_manifest": b'{"name":"edge-fw"}',
        "firmware_signature": b"sig",
        "host_facts": {"self_reported": True, "hostname": "dev-1"},
    }


async def test_attest_once_binds_the_ak_once_then_sends_full_evidence(
    swtpm: Swtpm,  # noqa: F811
    sidecar: tuple[FakeAttestation, grpc.aio.Channel],
    tmp_path: Path,
) -> None:
    service, channel = sidecar
    swtpm.restart()
    tpm = DeviceTpm(swtpm.tcti)
    log = simulate_boot(tpm, demo_components())

    first = await attest_once(channel, tpm, **_kwargs(tmp_path, log))
    assert first.verified, list(first.failures)
    assert service.begin_calls == 1
    record = read_binding(tmp_path)
    assert record is not None and record["ak_name"] == tpm.ak_name().hex()

    second = await attest_once(channel, tpm, **_kwargs(tmp_path, log))
    assert second.verified and service.begin_calls == 1  # bound once

    ev = service.evidence[-1]
    assert ev.pcr_bank == "sha256" and sorted(ev.pcr_values) == PCRS
    assert dict(ev.pcr_values) == replay(parse_event_log(ev.event_log), "sha256", PCRS)
    assert ev.ak_public == tpm.ak_public()
    assert ev.firmware_manifest == b'{"name":"edge-fw"}' and ev.firmware_signature == b"sig"
    assert json.loads(ev.host_facts) == {"self_reported": True, "hostname": "dev-1"}


async def test_attest_once_rebinds_when_the_sidecar_forgot_the_ak(
    tpm: DeviceTpm, sidecar: tuple[FakeAttestation, grpc.aio.Channel], tmp_path: Path
) -> None:
    service, channel = sidecar
    (tmp_path / AK_BOUND_FILE).write_text(json.dumps({"ak_name": tpm.ak_name().hex()}))
    response = await attest_once(channel, tpm, **_kwargs(tmp_path, b"log"))
    assert response.verified and service.begin_calls == 1 and len(service.evidence) == 2
    assert [f.code for f in service.answers[0].failures] == ["ak_not_bound"]
    record = read_binding(tmp_path)
    assert record is not None and record["binding_id"]


async def test_a_refused_binding_is_ak_binding_failed(
    tpm: DeviceTpm,
    sidecar: tuple[FakeAttestation, grpc.aio.Channel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, channel = sidecar
    monkeypatch.setattr(tpm, "activate_credential", lambda blob, secret: b"\x00" * 32)
    with pytest.raises(PostureError, match="refused binding") as info:
        await attest_once(channel, tpm, **_kwargs(tmp_path, b"log"))
    assert info.value.code == "ak_binding_failed"
    assert not (tmp_path / AK_BOUND_FILE).exists()


async def test_an_unreachable_sidecar_is_attestation_unavailable(
    tpm: DeviceTpm, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(device.AttestRpcError, match="BeginAkBinding: UNAVAILABLE") as info:
            await attest_once(channel, tpm, **_kwargs(tmp_path, b"log"))
    assert info.value.code == "attestation_unavailable"


async def test_attest_loop_retries_with_backoff_and_reports_every_round(
    tpm: DeviceTpm, sidecar: tuple[FakeAttestation, grpc.aio.Channel], tmp_path: Path
) -> None:
    service, channel = sidecar
    service.verdicts = [False, False, True]
    seen: list[Any] = []
    done = asyncio.Event()

    def on_result(result: Any) -> None:
        seen.append(result)
        if len(seen) == 3:
            done.set()

    task = asyncio.create_task(
        attest_loop(
            channel,
            tpm,
            state_dir=tmp_path,
            pcrs=PCRS,
            inputs=EvidenceInputs(b"log"),
            host_facts=lambda: {"self_reported": True},
            on_result=on_result,
            retry=Backoff(initial_s=0.01, cap_s=0.05),
        )
    )
    await asyncio.wait_for(done.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.verified for r in seen] == [False, False, True]


def test_next_attempt_is_two_thirds_of_the_lifetime_or_the_backoff() -> None:
    ok = pb.AttestResponse(verified=True, posture_expires_at=1_000 + 600)
    assert device.next_attempt_in(ok, 0, 1_000.0, RETRY_BACKOFF) == pytest.approx(400.0)
    nearly_expired = pb.AttestResponse(verified=True, posture_expires_at=1_000)
    assert device.next_attempt_in(nearly_expired, 0, 1_000.0, RETRY_BACKOFF) == 1.0
    retry = Backoff(initial_s=1, cap_s=8, jitter=0.5)
    delays = [device.next_attempt_in(None, n, 0.0, retry, rnd=lambda: 0.0) for n in (1, 2, 3, 9)]
    assert delays == [1, 2, 4, 8]
    assert device.next_attempt_in(None, 3, 0.0, retry, rnd=lambda: 1.0) == 2.0


def test_attest_every_caps_the_wait_after_a_success_only() -> None:
    ok = pb.AttestResponse(verified=True, posture_expires_at=1_000 + 600)
    assert device.next_attempt_in(ok, 0, 1_000.0, RETRY_BACKOFF, every_s=30) == 30
    assert device.next_attempt_in(ok, 0, 1_000.0, RETRY_BACKOFF, every_s=900) == pytest.approx(400)
    retry = Backoff(initial_s=1, cap_s=8, jitter=0.5)
    assert device.next_attempt_in(None, 2, 0.0, retry, rnd=lambda: 0.0, every_s=0.5) == 2


# --- the demo device and evidence inputs ---------------------------------------------------


def test_boot_demo_device_writes_the_log_attest_reads(tmp_path: Path) -> None:
    swtpm_process = boot_demo_device(tmp_path)
    try:
        inputs = load_evidence_inputs(tmp_path)
        values = DeviceTpm(swtpm_process.tcti).read_pcrs(PCRS)
        assert replay(parse_event_log(inputs.event_log), "sha256", PCRS) == values
        assert inputs.firmware_manifest is None and inputs.firmware_signature is None
    finally:
        swtpm_process.stop()
    assert swtpm_process.process.poll() is not None


def test_load_evidence_inputs_needs_manifest_and_signature_together(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(b"log")
    (tmp_path / "fw.json").write_bytes(b"{}")
    (tmp_path / "fw.sig").write_bytes(b"sig")
    both = load_evidence_inputs(
        tmp_path,
        event_log=tmp_path / "log",
        firmware=tmp_path / "fw.json",
        firmware_signature=tmp_path / "fw.sig",
    )
    assert both == EvidenceInputs(b"log", b"{}", b"sig")
    with pytest.raises(ConfigError, match="--firmware-sig: a firmware manifest and its sig"):
        load_evidence_inputs(tmp_path, event_log=tmp_path / "log", firmware=tmp_path / "fw.json")
    with pytest.raises(ConfigError, match="--event-log: cannot read"):
        load_evidence_inputs(tmp_path, event_log=tmp_path / "missing")
