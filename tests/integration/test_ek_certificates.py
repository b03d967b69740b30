"""EK certificates with real swtpm TPMs: a sidecar with ``posture.ek_ca_bundle`` and a CA run
with an EK CA bundle bind an AK only for a TPM whose EK certificate (read from its NV, as
stored by a development "manufacturer") chains to a trusted manufacturer CA and names that
EK. Without the setting the EK stays trusted on first use (the other posture tests)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import Pki, channel, write_config
from ztagent._proto.v1 import attestation_pb2_grpc as apb_grpc
from ztagent._proto.v1 import enrollment_pb2 as epb
from ztagent._proto.v1 import enrollment_pb2_grpc as epb_grpc
from ztagent.ca.bootstrap import ReplayStore, issue_bootstrap_token
from ztagent.ca.service import CaServer, start_ca_server
from ztagent.config import load_config
from ztagent.dev import tpm_manufacturer as dev_manufacturer
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.attest import AttestRpcError, bind_ak
from ztagent.device.csr import build_csr
from ztagent.device.enroll import enroll
from ztagent.device.keystores import FileKeyStore
from ztagent.device.tpm import DeviceTpm
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration


@dataclass
class World:
    pki: Pki
    tmp: Path
    trusted: Path  # the manufacturer CA the sidecar and the CA trust
    rogue: Path  # another "manufacturer", not trusted
    sidecar: Sidecar
    ca: CaServer
    swtpms: list[SwtpmProcess]

    def tpm(self, name: str, *, certified_by: Path | None = None) -> DeviceTpm:
        proc = start_swtpm(self.tmp / "tpms" / name)
        self.swtpms.append(proc)
        tpm = DeviceTpm(proc.tcti)
        if certified_by is not None:
            dev_manufacturer.provision(tpm, certified_by)
        return tpm


@pytest.fixture
async def world(pki: Pki, tmp_path: Path, swtpms: list[SwtpmProcess]) -> AsyncIterator[World]:
    trusted_ca = dev_manufacturer.init(tmp_path / "manufacturer")
    dev_manufacturer.init(tmp_path / "rogue", name="rogue TPM maker")
    config = write_config(pki, {}, posture_extra=f'ek_ca_bundle = "{trusted_ca}"\n')
    car = Sidecar(load_config(config))
    await car.start()
    ca_server = await start_ca_server(
        pki.layout.dir,
        listen="127.0.0.1:0",
        renew_listen="127.0.0.1:0",
        ek_ca_bundle=trusted_ca,
    )
    try:
        yield World(
            pki, tmp_path, tmp_path / "manufacturer", tmp_path / "rogue", car, ca_server, swtpms
        )
    finally:
        await car.stop(0)
        await ca_server.stop(None)


async def _bind(w: World, tpm: DeviceTpm, name: str) -> str:
    async with channel(w.pki, w.sidecar.port, w.pki.mint(name)) as ch:
        return await bind_ak(apb_grpc.AttestationStub(ch), tpm, w.tmp / "state" / name)


async def _bind_refused(w: World, tpm: DeviceTpm, name: str) -> AttestRpcError:
    with pytest.raises(AttestRpcError) as info:
        await _bind(w, tpm, name)
    return info.value


async def test_a_tpm_certified_by_a_trusted_manufacturer_binds(world: World) -> None:
    tpm = world.tpm("good", certified_by=world.trusted)
    name = await _bind(world, tpm, "cam-good")
    assert name == tpm.ak_name().hex()


async def test_tpms_without_a_trusted_ek_certificate_are_refused(world: World) -> None:
    err = await _bind_refused(world, world.tpm("bare"), "cam-bare")
    assert err.status == "PERMISSION_DENIED" and ": ek_cert_missing: " in err.message

    err = await _bind_refused(world, world.tpm("rogue", certified_by=world.rogue), "cam-rogue")
    assert err.status == "PERMISSION_DENIED" and ": ek_cert_untrusted: " in err.message

    # A genuine certificate copied from another TPM: it names that TPM's EK, not this one's.
    donor = world.tpm("donor", certified_by=world.trusted)
    thief = world.tpm("thief")
    certificate = donor.ek_certificate()
    assert certificate is not None
    thief.provision_ek_certificate(certificate)
    err = await _bind_refused(world, thief, "cam-thief")
    assert err.status == "PERMISSION_DENIED" and ": ek_cert_mismatch: " in err.message


async def test_tpm_enrollment_at_a_ca_with_an_ek_bundle(world: World) -> None:
    ca_address = f"127.0.0.1:{world.ca.enroll_port}"
    good = world.tpm("enroll-good", certified_by=world.trusted)
    result = await enroll(
        ca_address,
        issue_bootstrap_token(world.pki.layout.dir, "cam-enrolled"),
        world.pki.layout.bundle,
        world.tmp / "devices" / "cam-enrolled",
        tpm=good,
    )
    assert result.device_id == "cam-enrolled"

    # A TPM without a certificate is refused and its bootstrap token stays unspent.
    bare = world.tpm("enroll-bare")
    token = issue_bootstrap_token(world.pki.layout.dir, "cam-bare")
    csr = build_csr(FileKeyStore.create(world.tmp / "bare-key.pem"), "cam-bare")
    creds = grpc.ssl_channel_credentials(root_certificates=world.pki.layout.bundle.read_bytes())
    async with grpc.aio.secure_channel(ca_address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await epb_grpc.EnrollmentStub(ch).BeginTpmEnroll(
                epb.EnrollRequest(
                    csr=csr,
                    bootstrap_token=token,
                    ek_public=bare.ek_public(),
                    ak_public=bare.ak_public(),
                ),
                timeout=10,
            )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (info.value.details() or "").startswith("ek_cert_missing: ")
    replay = ReplayStore.for_ca(world.pki.layout.dir)
    payload = token.split(".")[1]
    jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    assert not replay.is_used(jti)
