"""The posture commands as an operator and a device run them, against a real sidecar and swtpm:
firmware keygen/sign, posture simulate-boot, posture reference, attest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.conftest import SHIPPED_POLICIES, Pki, write_config
from ztagent.ca import store as ca_store
from ztagent.cli import main
from ztagent.config import load_config
from ztagent.dev.swtpm import start_swtpm
from ztagent.posture.firmware import load_trusted_keys, verify_manifest
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration


def test_firmware_keygen_and_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firmware", "keygen", "--out", str(tmp_path / "v"), "--name", "acme"]) == 0
    assert (tmp_path / "v" / "acme.key").stat().st_mode & 0o777 == 0o600
    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware image" * 100)
    args = ["firmware", "sign", str(image), "--key", str(tmp_path / "v" / "acme.key")]
    assert main([*args, "--name", "edge-fw", "--version", "2.0.0", "--svn", "7"]) == 0
    manifest = (tmp_path / "fw.manifest.json").read_bytes()
    signature = (tmp_path / "fw.manifest.sig").read_bytes()
    parsed, signer = verify_manifest(
        manifest, signature, load_trusted_keys([tmp_path / "v" / "acme.pub"])
    )
    assert (parsed.name, parsed.version, parsed.svn) == ("edge-fw", "2.0.0", 7)
    assert signer


async def test_simulate_boot_reference_and_attest(pki: Pki, tmp_path: Path) -> None:
    # Vendor key and the firmware the devices run.
    assert main(["firmware", "keygen", "--out", str(tmp_path / "vendor")]) == 0
    from ztagent.dev.boot_sim import demo_image

    firmware = tmp_path / "edge-fw.bin"
    firmware.write_bytes(demo_image("edge-fw", "1.3.0"))
    sign = ["firmware", "sign", str(firmware), "--key", str(tmp_path / "vendor" / "vendor.key")]
    assert main([*sign, "--name", "edge-fw", "--version", "1.3.0", "--svn", "1"]) == 0

    # A known-good device boots; its log becomes the reference values.
    golden = start_swtpm(tmp_path / "golden")
    try:
        log = tmp_path / "golden.bin"
        boot = ["posture", "simulate-boot", "--tpm", golden.tcti, "--out", str(log)]
        assert main([*boot, "--firmware-image", str(firmware)]) == 0
    finally:
        golden.stop()
    refs = tmp_path / "refs.json"
    assert main(["posture", "reference", "--eventlog", str(log), "--out", str(refs)]) == 0

    config = write_config(
        pki,
        {},
        policy=SHIPPED_POLICIES,
        posture_extra=(f'firmware_keys = ["{tmp_path / "vendor" / "vendor.pub"}"]\n'),
    )
    text = config.read_text().replace(
        str(SHIPPED_POLICIES / "data" / "reference-values.json"), str(refs)
    )
    config.write_text(text)
    car = Sidecar(load_config(config))
    await car.start()
    try:
        for name, tamper, expected in (("cam-ok", False, 0), ("cam-bad", True, 1)):
            cert = tmp_path / f"{name}.pem"
            ca_store.issue_device_cert(pki.layout.dir, name, cert)
            tpm = start_swtpm(tmp_path / name / "tpm")
            try:
                device_log = tmp_path / name / "event-log.bin"
                boot = ["posture", "simulate-boot", "--tpm", tpm.tcti, "--out", str(device_log)]
                boot += ["--firmware-image", str(firmware)]
                assert main([*boot, *(["--tamper-kernel"] if tamper else [])]) == 0
                attest = [
                    "attest", "--server", f"127.0.0.1:{car.port}", "--dir", str(tmp_path / name),
                    "--tpm", tpm.tcti, "--cert", str(cert), "--ca-bundle", str(pki.layout.bundle),
                    "--firmware", str(tmp_path / "edge-fw.manifest.json"),
                    "--firmware-sig", str(tmp_path / "edge-fw.manifest.sig"),
                ]  # fmt: skip
                assert await asyncio.to_thread(main, attest) == expected, name
            finally:
                tpm.stop()
    finally:
        await car.stop(0)
