"""The posture part of `make run`: two demo devices boot on their own swtpm (one with a
tampered kernel), attest to the sidecar, and the attested one may then delete from storage.
DEVELOPMENT ONLY (dev firmware vendor key, simulated measured boot)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ztagent.config import Config
from ztagent.dev import tpm_manufacturer as dev_manufacturer
from ztagent.dev.boot_sim import demo_components, simulate_boot
from ztagent.dev.pki import ensure_dev_firmware_vendor, ensure_dev_tpm_manufacturer
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.attest import attest_once
from ztagent.device.host_facts import collect_host_facts
from ztagent.device.tpm import DeviceTpm
from ztagent.device.transport import device_credentials
from ztagent.files import write_atomic
from ztagent.posture.firmware import sign_manifest

FIRMWARE_SVN = 3


@dataclass(frozen=True)
class DemoDevice:
    name: str
    cert: Path
    dir: Path
    tpm: DeviceTpm
    event_log: bytes
    manifest: bytes
    signature: bytes


def _boot(
    name: str,
    cert: Path,
    device_dir: Path,
    vendor_key: Path,
    manufacturer: Path,
    *,
    tamper_kernel: bool,
) -> tuple[DemoDevice, SwtpmProcess]:
    """A fresh swtpm (a fresh boot: PCRs start at zero) with an EK certificate from the dev
    TPM manufacturer, measured boot, signed firmware."""
    proc = start_swtpm(device_dir / "tpm")
    try:
        tpm = DeviceTpm(proc.tcti)
        dev_manufacturer.provision(tpm, manufacturer)
        components = demo_components(tamper_kernel=tamper_kernel)
        log = simulate_boot(tpm, components)
        write_atomic(device_dir / "event-log.bin", log)
        firmware = components[0]
        manifest, signature = sign_manifest(
            vendor_key, firmware.image, name=firmware.name, version=firmware.version,
            svn=FIRMWARE_SVN,
        )  # fmt: skip
    except BaseException:
        proc.stop()
        raise
    return DemoDevice(name, cert, device_dir, tpm, log, manifest, signature), proc


@contextlib.contextmanager
def booted_devices(
    root: Path, ca_dir: Path, good: tuple[str, Path], tampered: tuple[str, Path]
) -> Iterator[tuple[DemoDevice, DemoDevice]]:
    vendor_key = ensure_dev_firmware_vendor(ca_dir)
    manufacturer = ensure_dev_tpm_manufacturer(ca_dir).parent
    devices = root / "var" / "devices"
    procs: list[SwtpmProcess] = []
    try:
        dev_good, proc = _boot(
            *good, devices / good[0], vendor_key, manufacturer, tamper_kernel=False
        )
        procs.append(proc)
        dev_bad, proc = _boot(
            *tampered, devices / tampered[0], vendor_key, manufacturer, tamper_kernel=True
        )
        procs.append(proc)
        yield dev_good, dev_bad
    finally:
        for proc in procs:
            proc.stop()


def attest(config: Config, device: DemoDevice) -> Any:
    """One attestation round over the sidecar's mTLS port; the AttestResponse."""

    async def run() -> Any:
        creds = device_credentials(device.cert, config.tls.client_ca.read_bytes())
        async with grpc.aio.secure_channel(config.listen.address, creds) as channel:
            return await attest_once(
                channel,
                device.tpm,
                state_dir=device.dir,
                pcrs=config.posture.pcrs,
                event_log=device.event_log,
                firmware_manifest=device.manifest,
                firmware_signature=device.signature,
                host_facts=collect_host_facts(),
            )

    return asyncio.run(run())
