"""Posture through the running sidecar with a real software TPM (swtpm) per test.

A device boots (measured into its swtpm by the boot simulator), binds its AK, attests over
the sidecar's mTLS port, and its calls to a posture-requiring route (Storage.Delete in the
shipped policy) are then allowed; every forged or stale piece of evidence is refused with its
code, and expiry brings `posture_required` back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import (
    SHIPPED_POLICIES,
    Pki,
    channel,
    sidecar_assertion_pub,
    write_config,
)
from ztagent._proto.v1 import attestation_pb2 as pb
from ztagent._proto.v1 import attestation_pb2_grpc as pb_grpc
from ztagent._proto.workloads.v1 import storage_pb2
from ztagent.ca import builders
from ztagent.config import load_config
from ztagent.dev.boot_sim import BootComponent, demo_components, demo_image, simulate_boot
from ztagent.dev.issuer import init_dev_issuer, mint_token
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.attest import AttestRpcError, attest_once
from ztagent.device.tpm import DeviceTpm
from ztagent.posture.firmware import generate_firmware_key, sign_manifest
from ztagent.sidecar import attestation
from ztagent.sidecar.server import Sidecar
from ztagent.workloads.storage.server import start_storage_server, stop_storage_server

pytestmark = pytest.mark.integration

STORAGE = "ztagent.workloads.v1.Storage"
PCRS = (0, 4, 7)


class Clock:
    """The sidecar's clock, movable by tests (TLS itself still uses real time)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Stack:
    pki: Pki
    sidecar: Sidecar
    clock: Clock
    vendor_key: Path
    token: str
    tmp: Path


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path) -> AsyncIterator[Stack]:
    server, port = await start_storage_server(
        "127.0.0.1:0", tmp_path / "storage", trust_keys=[sidecar_assertion_pub(pki)]
    )
    vendor_key, vendor_pub = generate_firmware_key(tmp_path / "vendor", "acme")
    issuer = init_dev_issuer(pki.layout.dir, "ztagent.dev", force=True)
    config = write_config(
        pki,
        {STORAGE: f"127.0.0.1:{port}"},
        extra=(
            f'[tokens]\nissuer = "{issuer.issuer}"\naudience = "{issuer.audience}"\n'
            f'jwks_file = "{issuer.jwks_path}"\n'
        ),
        policy=SHIPPED_POLICIES,
        posture_extra=f'firmware_keys = ["{vendor_pub}"]\nmax_age_s = 600\n',
    )
    clock = Clock()
    car = Sidecar(load_config(config), clock=clock)
    await car.start()
    token = mint_token(pki.layout.dir, sub="alice", roles=["writer"])
    yield Stack(pki, car, clock, vendor_key, token, tmp_path)
    await car.stop(0)
    await stop_storage_server(server, 0)


@dataclass
class Device:
    name: str
    pair: builders.KeyPair
    tpm: DeviceTpm
    dir: Path
    event_log: bytes
    manifest: bytes
    signature: bytes


def boot(
    st: Stack,
    swtpms: list[SwtpmProcess],
    name: str,
    *,
    components: list[BootComponent] | None = None,
    svn: int = 3,
    firmware_version: str = "1.3.0",
    sign_with: Path | None = None,
    manifest_image: bytes | None = None,
) -> Device:
    """A fresh swtpm, a measured boot, a signed firmware manifest."""
    device_dir = st.tmp / "devices" / name
    proc = start_swtpm(device_dir / "tpm")
    swtpms.append(proc)
    tpm = DeviceTpm(proc.tcti)
    comps = components or demo_components(firmware_version)
    log = simulate_boot(tpm, comps)
    image = manifest_image if manifest_image is not None else comps[0].image
    manifest, signature = sign_manifest(
        sign_with or st.vendor_key, image, name="edge-fw", version=comps[0].version, svn=svn
    )
    return Device(name, st.pki.mint(name), tpm, device_dir, log, manifest, signature)


async def attest(st: Stack, dev: Device, **override: bytes) -> pb.AttestResponse:
    async with channel(st.pki, st.sidecar.port, dev.pair) as ch:
        return await attest_once(
            ch,
            dev.tpm,
            state_dir=dev.dir,
            pcrs=PCRS,
            event_log=override.get("event_log", dev.event_log),
            firmware_manifest=dev.manifest,
            firmware_signature=dev.signature,
            host_facts={"os": "test"},
        )


async def delete(st: Stack, dev: Device) -> str:
    request = storage_pb2.DeleteRequest(key="k").SerializeToString()
    async with channel(st.pki, st.sidecar.port, dev.pair) as ch:
        try:
            await ch.unary_unary(f"/{STORAGE}/Delete")(
                request, metadata=(("authorization", f"Bearer {st.token}"),), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
    return "OK"


def codes(response: pb.AttestResponse) -> list[str]:
    return [f.code for f in response.failures]


async def test_good_device_attests_and_posture_routes_open(
    stack: Stack, swtpms: list[SwtpmProcess]
) -> None:
    dev = boot(stack, swtpms, "cam-good")
    assert await delete(stack, dev) == "PERMISSION_DENIED: policy_denied: posture_required"
    response = await attest(stack, dev)
    assert response.verified, codes(response)
    assert response.attestation_id
    assert await delete(stack, dev) == "OK"
    # The decision log links the decision to the attestation that backed it.
    log_path = stack.pki.layout.dir.parent / "decisions.jsonl"
    await stack.sidecar.stop(0)
    decisions = [json.loads(line) for line in log_path.read_text().splitlines()]
    last = [d for d in decisions if "checkpoint" not in d][-1]  # the close checkpoint follows
    assert last["attestation"]["attestation_id"] == response.attestation_id
    assert last["attestation"]["quote_age_s"] >= 0
    posture = last["input"]["posture"]
    assert posture["verified"] is True
    assert posture["firmware"]["name"] == "edge-fw" and posture["firmware"]["version"] == "1.3.0"
    assert posture["boot"]["verified"] is True and set(posture["boot"]["pcrs"]) == {"0", "4", "7"}
    assert posture["host"]["self_reported"] is True


async def test_posture_expiry_brings_posture_required_back(
    stack: Stack, swtpms: list[SwtpmProcess]
) -> None:
    dev = boot(stack, swtpms, "cam-exp")
    assert (await attest(stack, dev)).verified
    assert await delete(stack, dev) == "OK"
    stack.clock.offset = timedelta(seconds=601)
    assert await delete(stack, dev) == "PERMISSION_DENIED: policy_denied: posture_required"


async def test_both_allowed_firmware_versions_attest(
    stack: Stack, swtpms: list[SwtpmProcess]
) -> None:
    for version in ("1.2.0", "1.3.0"):
        dev = boot(stack, swtpms, f"cam-{version.replace('.', '')}", firmware_version=version)
        assert (await attest(stack, dev)).verified, version


async def test_tampered_kernel_is_not_reference(stack: Stack, swtpms: list[SwtpmProcess]) -> None:
    comps = demo_components()
    comps[2] = replace(comps[2], image=comps[2].image + b"rootkit")
    dev = boot(stack, swtpms, "cam-tampered", components=comps)
    response = await attest(stack, dev)
    assert codes(response) == ["boot_not_reference"]
    assert "kernel" in response.failures[0].message
    assert await delete(stack, dev) == "PERMISSION_DENIED: policy_denied: posture_required"


async def test_edited_event_log_does_not_replay(stack: Stack, swtpms: list[SwtpmProcess]) -> None:
    """The log claims the reference kernel while the TPM measured a modified one."""
    comps = demo_components()
    tampered = replace(comps[2], image=comps[2].image + b"rootkit")
    dev = boot(stack, swtpms, "cam-liar", components=[comps[0], comps[1], tampered])
    from ztagent.dev.boot_sim import boot_events
    from ztagent.posture.eventlog import encode_event_log

    honest_looking = encode_event_log(boot_events(comps))
    assert codes(await attest(stack, dev, event_log=honest_looking)) == ["eventlog_replay_mismatch"]


async def test_firmware_checks(stack: Stack, swtpms: list[SwtpmProcess]) -> None:
    rogue_key, _ = generate_firmware_key(stack.tmp / "rogue", "rogue")
    dev = boot(stack, swtpms, "cam-rogue-fw", sign_with=rogue_key)
    assert codes(await attest(stack, dev)) == ["firmware_untrusted_key"]

    dev = boot(stack, swtpms, "cam-fw-mismatch", manifest_image=demo_image("edge-fw", "9.9.9"))
    assert codes(await attest(stack, dev)) == ["firmware_digest_mismatch"]

    dev = boot(stack, swtpms, "cam-rollback", svn=5)
    assert (await attest(stack, dev)).verified
    # Same device (same certificate, new boot) with an older security version.
    older = boot(stack, swtpms, "cam-rollback-2", svn=4)
    older.pair = dev.pair
    assert codes(await attest(stack, older)) == ["firmware_rollback"]


async def test_a_manifest_nested_past_the_parser_is_malformed_evidence(
    stack: Stack, swtpms: list[SwtpmProcess]
) -> None:
    """The device chooses its manifest bytes: 5,000 levels of nesting are an
    ``evidence_malformed`` failure in the answer, not an UNKNOWN status with a traceback."""
    dev = boot(stack, swtpms, "cam-deep-manifest")
    dev.manifest = b"[" * 5000 + b"]" * 5000
    response = await attest(stack, dev)
    assert not response.verified and codes(response) == ["evidence_malformed"]
    assert "nested more than 32 levels" in response.failures[0].message


async def test_a_bug_in_verification_is_internal_and_fails_closed(
    stack: Stack,
    swtpms: list[SwtpmProcess],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception while verifying (a bug injected here) is INTERNAL
    ``attestation_error``: the posture an earlier attestation left is dropped, and the log
    has one line with the exception's type and place, never its message."""
    dev = boot(stack, swtpms, "cam-bug")
    assert (await attest(stack, dev)).verified
    assert await delete(stack, dev) == "OK"

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("secret-from-the-device")

    monkeypatch.setattr(attestation, "verify_evidence", broken)
    with pytest.raises(AttestRpcError) as info:
        await attest(stack, dev)
    assert info.value.message == (
        "Attest: INTERNAL: attestation_error: internal error in attestation (see the sidecar's log)"
    )
    assert (await delete(stack, dev)).startswith("PERMISSION_DENIED")  # posture gone
    lines = [r.getMessage() for r in caplog.records if "attestation_error" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("attestation_error: KeyError at ")
    assert "secret-from-the-device" not in caplog.text


async def test_failed_attestations_log_within_the_refusal_budget(
    stack: Stack,
    swtpms: list[SwtpmProcess],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A device repeating bad evidence gets ``refusal_burst`` (100) failure lines in the
    sidecar's log per interval, then one summary line for the rest: it cannot fill the log."""
    dev = boot(stack, swtpms, "cam-flood")
    dev.manifest = b"not json"
    now = [1000.0]
    monkeypatch.setattr(attestation, "_monotonic", lambda: now[0])
    caplog.set_level(logging.WARNING, logger="ztagent.attestation")
    for _ in range(105):
        assert codes(await attest(stack, dev)) == ["evidence_malformed"]
    now[0] += 61  # the window ends: the next failure brings the summary
    assert codes(await attest(stack, dev)) == ["evidence_malformed"]
    said = [r.getMessage() for r in caplog.records if r.name == "ztagent.attestation"]
    assert len(said) == 100 + 2  # the burst, the summary, the first line of the new window
    assert said[0].startswith("attestation of cam-flood refused: evidence_malformed")
    assert said[100].startswith("5 further failed attestations of cam-flood in ")
    assert said[100].endswith("beyond 100 lines per 60 s: evidence_malformed x5")
    for _ in range(99 + 4):  # the rest of the new window's burst of 100, then 4 counted
        assert codes(await attest(stack, dev)) == ["evidence_malformed"]
    now[0] += 61  # the device stops failing: the sidecar's periodic flush writes the summary
    assert stack.sidecar.attestation is not None
    assert stack.sidecar.attestation.flush_log_summaries() == 1
    said = [r.getMessage() for r in caplog.records if r.name == "ztagent.attestation"]
    assert len(said) == 100 + 2 + 99 + 1
    assert said[-1].startswith("4 further failed attestations of cam-flood in ")


async def _evidence(st: Stack, dev: Device, nonce: bytes) -> pb.Evidence:
    quote = dev.tpm.quote(nonce, list(PCRS))
    return pb.Evidence(
        quote=quote.attest,
        quote_signature=quote.signature,
        pcr_bank="sha256",
        pcr_values=dev.tpm.read_pcrs(list(PCRS)),
        event_log=dev.event_log,
        ak_public=dev.tpm.ak_public(),
        firmware_manifest=dev.manifest,
        firmware_signature=dev.signature,
        host_facts=b"{}",
    )


async def test_nonce_and_ak_attacks(stack: Stack, swtpms: list[SwtpmProcess]) -> None:
    dev = boot(stack, swtpms, "cam-a")
    other = boot(stack, swtpms, "cam-b")
    assert (await attest(stack, dev)).verified  # binds cam-a's AK
    assert (await attest(stack, other)).verified  # binds cam-b's AK

    async with channel(stack.pki, stack.sidecar.port, dev.pair) as ch:
        stub = pb_grpc.AttestationStub(ch)
        nonce = (await stub.Challenge(pb.ChallengeRequest())).nonce
        evidence = await _evidence(stack, dev, nonce)
        assert (await stub.Attest(pb.AttestRequest(evidence=evidence))).verified
        # Replaying the same evidence (same nonce) is refused.
        replayed = await stub.Attest(pb.AttestRequest(evidence=evidence))
        assert codes(replayed) == ["nonce_reused"]
        # A quote over a nonce the sidecar never issued.
        forged = await _evidence(stack, dev, b"\x01" * 32)
        assert codes(await stub.Attest(pb.AttestRequest(evidence=forged))) == ["nonce_mismatch"]
        # A PCR value altered after the quote.
        nonce = (await stub.Challenge(pb.ChallengeRequest())).nonce
        altered = await _evidence(stack, dev, nonce)
        altered.pcr_values[7] = b"\x00" * 32
        assert codes(await stub.Attest(pb.AttestRequest(evidence=altered))) == [
            "pcr_digest_mismatch"
        ]
        # Another device's AK (cam-b's TPM) quoting for cam-a's certificate.
        nonce = (await stub.Challenge(pb.ChallengeRequest())).nonce
        foreign = await _evidence(stack, other, nonce)
        assert codes(await stub.Attest(pb.AttestRequest(evidence=foreign))) == ["ak_not_bound"]

    # A nonce issued to cam-b, used by cam-a.
    async with channel(stack.pki, stack.sidecar.port, other.pair) as ch_b:
        nonce_b = (await pb_grpc.AttestationStub(ch_b).Challenge(pb.ChallengeRequest())).nonce
    async with channel(stack.pki, stack.sidecar.port, dev.pair) as ch:
        stolen = await _evidence(stack, dev, nonce_b)
        response = await pb_grpc.AttestationStub(ch).Attest(pb.AttestRequest(evidence=stolen))
        assert codes(response) == ["nonce_mismatch"]

    # An expired nonce.
    async with channel(stack.pki, stack.sidecar.port, dev.pair) as ch:
        stub = pb_grpc.AttestationStub(ch)
        nonce = (await stub.Challenge(pb.ChallengeRequest())).nonce
        stack.clock.offset = timedelta(seconds=61)
        late = await _evidence(stack, dev, nonce)
        assert codes(await stub.Attest(pb.AttestRequest(evidence=late))) == ["nonce_expired"]


async def test_attestation_requires_a_valid_device_certificate(
    stack: Stack, swtpms: list[SwtpmProcess]
) -> None:
    bad = stack.pki.mint(uris=["spiffe://evil.example/device/x"])
    async with channel(stack.pki, stack.sidecar.port, bad) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.AttestationStub(ch).Challenge(pb.ChallengeRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
