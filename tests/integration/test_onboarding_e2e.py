"""Onboarding end to end: CA service, `enroll`, the new certificate accepted by a running
sidecar, and a revocation at the CA reaching the sidecar through GetCRL (tls.crl_source)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import Pki, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.ca.service import start_ca_server
from ztagent.config import load_config
from ztagent.device.enroll import enroll
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration


async def test_enrolled_device_is_accepted_and_revocation_reaches_the_sidecar(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    ca_server = await start_ca_server(
        pki.layout.dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0"
    )
    local_crl = (
        tmp_path / "state" / "crl.pem"
    )  # absent, in a directory not made yet: the first fetch creates both
    config = write_config(pki, {SERVICE: upstream.address})
    config.write_text(
        config.read_text().replace(
            f'crl = "{pki.layout.crl}"',
            f'crl = "{local_crl}"\ncrl_source = "ca://127.0.0.1:{ca_server.enroll_port}"\n'
            "crl_refresh_interval_s = 0.1",
        )
    )
    car = Sidecar(load_config(config))
    try:
        await car.start()
        assert local_crl.exists()
        device_dir = tmp_path / "device"
        token = issue_bootstrap_token(pki.layout.dir, "cam-new")
        result = await enroll(
            f"127.0.0.1:{ca_server.enroll_port}", token, pki.layout.bundle, device_dir
        )
        assert result.device_id == "cam-new"
        creds = grpc.ssl_channel_credentials(
            root_certificates=(device_dir / "ca-bundle.pem").read_bytes(),
            private_key=(device_dir / "device.key").read_bytes(),
            certificate_chain=(device_dir / "device.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{car.port}", creds) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Unary")
            assert await call(b"hello", timeout=5) == b"hello"
            assert dict(upstream.seen[-1].metadata)["x-ztagent-device-id"] == "cam-new"
            ca_store.revoke(pki.layout.dir, cert_path=device_dir / "device.pem")
            for _ in range(100):
                try:
                    await call(b"again", timeout=5)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert (err.details() or "").startswith("cert_revoked: ")
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("revocation at the CA never reached the sidecar")
    finally:
        await car.stop(0)
        await ca_server.stop(0)
