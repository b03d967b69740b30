"""TPM-bound enrollment end to end: a real swtpm per device, the real CA service on
127.0.0.1:0, the real sidecar.

A device enrolls with ``enroll(..., tpm=...)``: the CA seals a MakeCredential challenge to the
TPM's EK for its AK, the TPM's ActivateCredential opens it, and the certificate comes back
naming the AK (the AK-name extension). The device then attests to a sidecar that has never
bound its AK and is verified. Refusals: a wrong secret (``ak_binding_failed``, the token is
not spent), a completion after 60 s (``tpm_enroll_expired``), a quote by another TPM for that
certificate (``ak_not_bound``, even when the sidecar's registry binds that other AK to the
device id), and TPM fields sent to plain ``Enroll``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.conftest import (
    SHIPPED_POLICIES,
    Pki,
    channel,
    sidecar_assertion_pub,
    write_config,
)
from ztagent._proto.v1 import attestation_pb2 as apb
from ztagent._proto.v1 import attestation_pb2_grpc as apb_grpc
from ztagent._proto.v1 import enrollment_pb2 as epb
from ztagent._proto.v1 import enrollment_pb2_grpc as epb_grpc
from ztagent._proto.workloads.v1 import storage_pb2
from ztagent.ca import builders
from ztagent.ca.audit import audit_path
from ztagent.ca.bootstrap import ReplayStore, issue_bootstrap_token
from ztagent.ca.service import CaServer, start_ca_server
from ztagent.cli import main as cli_main
from ztagent.config import load_config
from ztagent.dev.boot_sim import demo_components, simulate_boot
from ztagent.dev.issuer import init_dev_issuer, mint_token
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.attest import attest_once, read_binding
from ztagent.device.csr import build_csr
from ztagent.device.enroll import enroll, renew, token_device_id
from ztagent.device.keystores import FileKeyStore, KeyStoreError, open_key_store
from ztagent.device.tpm import DeviceTpm
from ztagent.device.transport import channel_credentials
from ztagent.errors import ConfigError
from ztagent.pki.device_check import AK_NAME_OID, cert_ak_name
from ztagent.posture.firmware import generate_firmware_key, sign_manifest
from ztagent.sidecar.server import Sidecar
from ztagent.workloads.storage.server import start_storage_server, stop_storage_server

pytestmark = pytest.mark.integration

DEVICE = "cam-tpm"
STORAGE = "ztagent.workloads.v1.Storage"
PCRS = (0, 4, 7)


class Clock:
    """The CA's clock, movable by tests (TLS itself still uses real time)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Tpm:
    tpm: DeviceTpm
    event_log: bytes
    manifest: bytes
    signature: bytes


@dataclass
class Stack:
    pki: Pki
    ca: CaServer
    ca_clock: Clock
    sidecar: Sidecar
    vendor_key: Path
    user_token: str
    tmp: Path
    swtpms: list[SwtpmProcess]

    @property
    def ca_address(self) -> str:
        return f"127.0.0.1:{self.ca.enroll_port}"

    def boot(self, name: str) -> Tpm:
        """A fresh swtpm with a measured boot and a signed firmware manifest."""
        proc = start_swtpm(self.tmp / "tpms" / name)
        self.swtpms.append(proc)
        tpm = DeviceTpm(proc.tcti)
        components = demo_components()
        log = simulate_boot(tpm, components)
        manifest, signature = sign_manifest(
            self.vendor_key, components[0].image, name="edge-fw", version="1.3.0", svn=3
        )
        return Tpm(tpm, log, manifest, signature)


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path, swtpms: list[SwtpmProcess]) -> AsyncIterator[Stack]:
    clock = Clock()
    ca_server = await start_ca_server(
        pki.layout.dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0", clock=clock
    )
    storage, storage_port = await start_storage_server(
        "127.0.0.1:0", tmp_path / "storage", trust_keys=[sidecar_assertion_pub(pki)]
    )
    vendor_key, vendor_pub = generate_firmware_key(tmp_path / "vendor", "acme")
    issuer = init_dev_issuer(pki.layout.dir, "ztagent.dev", force=True)
    config = write_config(
        pki,
        {STORAGE: f"127.0.0.1:{storage_port}"},
        extra=(
            f'[tokens]\nissuer = "{issuer.issuer}"\naudience = "{issuer.audience}"\n'
            f'jwks_file = "{issuer.jwks_path}"\n'
        ),
        policy=SHIPPED_POLICIES,
        posture_extra=f'firmware_keys = ["{vendor_pub}"]\nmax_age_s = 600\n',
    )
    car = Sidecar(load_config(config))
    await car.start()
    user_token = mint_token(pki.layout.dir, sub="alice", roles=["writer"])
    try:
        yield Stack(pki, ca_server, clock, car, vendor_key, user_token, tmp_path, swtpms)
    finally:
        await car.stop(0)
        await stop_storage_server(storage, 0)
        await ca_server.stop(None)


def device_pair(device_dir: Path) -> builders.KeyPair:
    cert = x509.load_pem_x509_certificates((device_dir / "device.pem").read_bytes())[0]
    key = serialization.load_pem_private_key((device_dir / "device.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return builders.KeyPair(cert, key)


async def tpm_enroll(st: Stack, dev: Tpm, device_dir: Path, token: str | None = None) -> None:
    await enroll(
        st.ca_address,
        token or issue_bootstrap_token(st.pki.layout.dir, DEVICE),
        st.pki.layout.bundle,
        device_dir,
        renew_server=f"127.0.0.1:{st.ca.renew_port}",
        tpm=dev.tpm,
    )


async def attest(
    st: Stack, pair: builders.KeyPair, dev: Tpm, state_dir: Path
) -> apb.AttestResponse:
    async with channel(st.pki, st.sidecar.port, pair) as ch:
        return await attest_once(
            ch,
            dev.tpm,
            state_dir=state_dir,
            pcrs=PCRS,
            event_log=dev.event_log,
            firmware_manifest=dev.manifest,
            firmware_signature=dev.signature,
            host_facts={"os": "test"},
        )


async def evidence(dev: Tpm, nonce: bytes) -> apb.Evidence:
    quote = dev.tpm.quote(nonce, list(PCRS))
    return apb.Evidence(
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


async def delete(st: Stack, pair: builders.KeyPair) -> str:
    request = storage_pb2.DeleteRequest(key="k").SerializeToString()
    async with channel(st.pki, st.sidecar.port, pair) as ch:
        try:
            await ch.unary_unary(f"/{STORAGE}/Delete")(
                request, metadata=(("authorization", f"Bearer {st.user_token}"),), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
    return "OK"


def registry(st: Stack) -> dict[str, str]:
    path = st.pki.layout.dir.parent / "state" / "ak-bindings.json"
    if not path.exists():
        return {}
    devices = json.loads(path.read_text())["devices"]
    return {str(k): str(v) for k, v in devices.items()}


def codes(response: apb.AttestResponse) -> list[str]:
    return [f.code for f in response.failures]


async def test_tpm_device_enrolls_and_attests_without_a_sidecar_binding(stack: Stack) -> None:
    dev = stack.boot("dev")
    device_dir = stack.tmp / "device"
    await tpm_enroll(stack, dev, device_dir)
    ak_name = dev.tpm.ak_name().hex()

    # the certificate names the TPM's AK, in a non-critical extension
    pair = device_pair(device_dir)
    ext = pair.cert.extensions.get_extension_for_oid(AK_NAME_OID)
    assert not ext.critical
    assert cert_ak_name(pair.cert) == ak_name
    # the device dir records the binding in the format `ztagent attest` reads
    record = read_binding(device_dir)
    assert record is not None and record["ak_name"] == ak_name
    enrollment_id = record["binding_id"]
    assert json.loads((device_dir / "enrollment.json").read_text())["ak_name"] == ak_name
    # the CA's audit log records the AK
    issued = [
        json.loads(line)
        for line in audit_path(stack.pki.layout.dir).read_text().splitlines()
        if json.loads(line).get("event") == "issued"  # checkpoints have no event
    ]
    assert issued[-1]["device_id"] == DEVICE and issued[-1]["ak_name"] == ak_name

    # attestation to a sidecar that never bound this AK
    assert registry(stack) == {}
    assert await delete(stack, pair) == "PERMISSION_DENIED: policy_denied: posture_required"
    response = await attest(stack, pair, dev, device_dir)
    assert response.verified, codes(response)
    assert await delete(stack, pair) == "OK"
    assert registry(stack) == {}  # no BeginAkBinding/CompleteAkBinding happened
    record = read_binding(device_dir)
    assert record is not None and record["binding_id"] == enrollment_id

    # renewal keeps the AK in the new certificate, which attests the same way
    await renew(device_dir)
    renewed = device_pair(device_dir)
    assert renewed.cert.serial_number != pair.cert.serial_number
    assert cert_ak_name(renewed.cert) == ak_name
    assert (await attest(stack, renewed, dev, device_dir)).verified
    assert registry(stack) == {}


async def test_another_tpm_cannot_quote_for_a_tpm_bound_certificate(stack: Stack) -> None:
    dev = stack.boot("dev")
    other = stack.boot("other")
    device_dir = stack.tmp / "device"
    await tpm_enroll(stack, dev, device_dir)
    pair = device_pair(device_dir)

    # The registry path binds the other TPM's AK to the same device id, through a certificate
    # without the extension (a plain hand-issued cert for the device).
    plain = stack.pki.mint(DEVICE)
    assert (await attest(stack, plain, other, stack.tmp / "plain")).verified
    assert registry(stack) == {DEVICE: other.tpm.ak_name().hex()}

    async with channel(stack.pki, stack.sidecar.port, pair) as ch:
        stub = apb_grpc.AttestationStub(ch)
        # a quote by the other TPM for the TPM-bound certificate: the certificate's AK wins
        nonce = (await stub.Challenge(apb.ChallengeRequest())).nonce
        foreign = await evidence(other, nonce)
        refused = await stub.Attest(apb.AttestRequest(evidence=foreign))
        assert codes(refused) == ["ak_not_bound"]
        assert "device certificate" in refused.failures[0].message
        # the certificate's own TPM is accepted although the registry names another AK
        nonce = (await stub.Challenge(apb.ChallengeRequest())).nonce
        own = await evidence(dev, nonce)
        assert (await stub.Attest(apb.AttestRequest(evidence=own))).verified
        # and the sidecar will not bind the other AK for this certificate
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.BeginAkBinding(
                apb.BeginAkBindingRequest(
                    ek_public=other.tpm.ek_public(), ak_public=other.tpm.ak_public()
                )
            )
        assert (info.value.details() or "").startswith("ak_binding_failed: ")


async def _begin(st: Stack, dev: Tpm, token: str) -> epb.BeginTpmEnrollResponse:
    store = FileKeyStore.create(st.tmp / f"key-{token[-8:]}.pem")
    request = epb.EnrollRequest(
        csr=build_csr(store, token_device_id(token)),
        bootstrap_token=token,
        ek_public=dev.tpm.ek_public(),
        ak_public=dev.tpm.ak_public(),
    )
    async with _ca_channel(st) as ch:
        response: epb.BeginTpmEnrollResponse = await epb_grpc.EnrollmentStub(ch).BeginTpmEnroll(
            request, timeout=10
        )
        return response


def _ca_channel(st: Stack) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=st.pki.layout.bundle.read_bytes())
    return grpc.aio.secure_channel(st.ca_address, creds)


async def _complete(st: Stack, enrollment_id: str, secret: bytes) -> epb.EnrollResponse:
    async with _ca_channel(st) as ch:
        response: epb.EnrollResponse = await epb_grpc.EnrollmentStub(ch).CompleteTpmEnroll(
            epb.CompleteTpmEnrollRequest(enrollment_id=enrollment_id, secret=secret), timeout=10
        )
        return response


async def _refused(coro: object, status: grpc.StatusCode, code: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code() == status, info.value.details()
    details = info.value.details() or ""
    assert details.startswith(f"{code}: "), details
    return details


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


async def test_wrong_secret_is_refused_and_the_token_is_not_spent(stack: Stack) -> None:
    dev = stack.boot("dev")
    token = issue_bootstrap_token(stack.pki.layout.dir, DEVICE)
    replay = ReplayStore.for_ca(stack.pki.layout.dir)

    begin = await _begin(stack, dev, token)
    await _refused(
        _complete(stack, begin.enrollment_id, b"\x00" * 32),
        grpc.StatusCode.PERMISSION_DENIED,
        "ak_binding_failed",
    )
    assert not replay.is_used(_jti(token))
    # the pending enrollment was single use: even the right secret cannot complete it now
    secret = dev.tpm.activate_credential(begin.credential_blob, begin.encrypted_secret)
    await _refused(
        _complete(stack, begin.enrollment_id, secret),
        grpc.StatusCode.PERMISSION_DENIED,
        "ak_binding_failed",
    )
    assert not replay.is_used(_jti(token))

    # the same token still enrolls; then it is spent
    device_dir = stack.tmp / "device"
    await tpm_enroll(stack, dev, device_dir, token)
    assert cert_ak_name(device_pair(device_dir).cert) == dev.tpm.ak_name().hex()
    assert replay.is_used(_jti(token))
    await _refused(_begin(stack, dev, token), grpc.StatusCode.UNAUTHENTICATED, "token_reused")

    refusals = [
        json.loads(line)
        for line in audit_path(stack.pki.layout.dir).read_text().splitlines()
        if json.loads(line).get("event") == "refused"
    ]
    assert [r["code"] for r in refusals][:2] == ["ak_binding_failed", "ak_binding_failed"]


async def test_expired_pending_enrollment_is_refused(stack: Stack) -> None:
    dev = stack.boot("dev")
    token = issue_bootstrap_token(stack.pki.layout.dir, DEVICE)
    begin = await _begin(stack, dev, token)
    secret = dev.tpm.activate_credential(begin.credential_blob, begin.encrypted_secret)
    stack.ca_clock.offset = timedelta(seconds=61)
    await _refused(
        _complete(stack, begin.enrollment_id, secret),
        grpc.StatusCode.UNAUTHENTICATED,
        "tpm_enroll_expired",
    )
    assert not ReplayStore.for_ca(stack.pki.layout.dir).is_used(_jti(token))
    # within the 60 s, the same secret-exchange completes
    stack.ca_clock.offset = timedelta()
    begin = await _begin(stack, dev, token)
    secret = dev.tpm.activate_credential(begin.credential_blob, begin.encrypted_secret)
    stack.ca_clock.offset = timedelta(seconds=59)
    response = await _complete(stack, begin.enrollment_id, secret)
    assert response.ak_name == dev.tpm.ak_name().hex()


async def test_bad_tpm_inputs_are_refused_without_spending_the_token(stack: Stack) -> None:
    dev = stack.boot("dev")
    token = issue_bootstrap_token(stack.pki.layout.dir, DEVICE)
    store = FileKeyStore.create(stack.tmp / "key.pem")
    csr = build_csr(store, DEVICE)
    ek, ak = dev.tpm.ek_public(), dev.tpm.ak_public()
    async with _ca_channel(stack) as ch:
        stub = epb_grpc.EnrollmentStub(ch)
        # plain Enroll with TPM fields
        await _refused(
            stub.Enroll(epb.EnrollRequest(csr=csr, bootstrap_token=token, ak_public=ak)),
            grpc.StatusCode.PERMISSION_DENIED,
            "ak_binding_failed",
        )
        # the EK offered as the AK: not a restricted signing key
        details = await _refused(
            stub.BeginTpmEnroll(
                epb.EnrollRequest(csr=csr, bootstrap_token=token, ek_public=ek, ak_public=ek)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "ak_binding_failed",
        )
        assert "AK attributes" in details
        # no TPM at all
        await _refused(
            stub.BeginTpmEnroll(epb.EnrollRequest(csr=csr, bootstrap_token=token)),
            grpc.StatusCode.PERMISSION_DENIED,
            "ak_binding_failed",
        )
        # an unknown enrollment id
        await _refused(
            stub.CompleteTpmEnroll(epb.CompleteTpmEnrollRequest(enrollment_id="0" * 32)),
            grpc.StatusCode.PERMISSION_DENIED,
            "ak_binding_failed",
        )
        # a token for another device than the CSR names
        other_token = issue_bootstrap_token(stack.pki.layout.dir, "someone-else")
        await _refused(
            stub.BeginTpmEnroll(
                epb.EnrollRequest(csr=csr, bootstrap_token=other_token, ek_public=ek, ak_public=ak)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "token_device_mismatch",
        )
    assert not ReplayStore.for_ca(stack.pki.layout.dir).is_used(_jti(token))


async def _health_over(st: Stack, credentials: grpc.ChannelCredentials) -> str:
    """A call to the sidecar over mTLS with the given client credentials; the status name."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.secure_channel(f"127.0.0.1:{st.sidecar.port}", credentials) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def test_tpm_key_store_keeps_the_tls_key_in_the_tpm(stack: Stack) -> None:
    dev = stack.boot("dev")
    device_dir = stack.tmp / "device"
    await enroll(
        stack.ca_address,
        issue_bootstrap_token(stack.pki.layout.dir, DEVICE),
        stack.pki.layout.bundle,
        device_dir,
        "tpm",
        renew_server=f"127.0.0.1:{stack.ca.renew_port}",
        tpm=dev.tpm,
    )
    # no key file: keystore.json names the TPM and the persistent handle
    assert not (device_dir / "device.key").exists()
    record = json.loads((device_dir / "keystore.json").read_text())
    assert record == {"type": "tpm", "tcti": dev.tpm.tcti, "handle": "0x81000a4c"}
    store = open_key_store(record, device_dir / "device.key", None)
    cert = x509.load_pem_x509_certificates((device_dir / "device.pem").read_bytes())[0]
    assert cert.public_key() == store.public_key()
    assert cert_ak_name(cert) == dev.tpm.ak_name().hex()  # and its AK is bound as well

    # mTLS to the sidecar: the handshake is signed by the TPM
    chain, bundle = (device_dir / "device.pem").read_bytes(), stack.pki.layout.bundle.read_bytes()
    assert await _health_over(stack, channel_credentials(store, chain, bundle)) == "SERVING"

    # renewal rotates the key inside the TPM (the other slot) and evicts the old one
    await renew(device_dir)
    rotated = json.loads((device_dir / "keystore.json").read_text())
    assert rotated["handle"] == "0x81000a4d"
    renewed = x509.load_pem_x509_certificates((device_dir / "device.pem").read_bytes())[0]
    new_store = open_key_store(rotated, device_dir / "device.key", None)
    assert renewed.public_key() == new_store.public_key() != store.public_key()
    with pytest.raises(KeyStoreError, match="keystore_key_missing"):
        open_key_store(record, device_dir / "device.key", None)
    chain = (device_dir / "device.pem").read_bytes()
    assert await _health_over(stack, channel_credentials(new_store, chain, bundle)) == "SERVING"
    await renew(device_dir)  # and back to the first slot
    assert json.loads((device_dir / "keystore.json").read_text())["handle"] == "0x81000a4c"

    # `ztagent attest --dir` finds the key through keystore.json: the TPM signs the handshake
    (device_dir / "event-log.bin").write_bytes(dev.event_log)
    (stack.tmp / "fw.manifest.json").write_bytes(dev.manifest)
    (stack.tmp / "fw.manifest.sig").write_bytes(dev.signature)
    attest_cli = [
        "attest", "--server", f"127.0.0.1:{stack.sidecar.port}", "--dir", str(device_dir),
        "--tpm", dev.tpm.tcti, "--firmware", str(stack.tmp / "fw.manifest.json"),
        "--firmware-sig", str(stack.tmp / "fw.manifest.sig"),
    ]  # fmt: skip
    assert await asyncio.to_thread(cli_main, attest_cli) == 0


async def test_tpm_key_store_needs_a_tpm(stack: Stack) -> None:
    with pytest.raises(ConfigError, match="--tpm: the tpm key store needs the TPM"):
        await enroll(
            stack.ca_address,
            issue_bootstrap_token(stack.pki.layout.dir, DEVICE),
            stack.pki.layout.bundle,
            stack.tmp / "device",
            "tpm",
        )
