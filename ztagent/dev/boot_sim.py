"""A measured-boot simulator: extends synthetic boot components into a (software) TPM.

For tests and the demo device. ``simulate_boot`` measures each ``BootComponent`` the way
ztagent's convention says (``ztagent.posture.eventlog``): one event per component in its
``COMPONENT_PCRS`` PCR, data = the component JSON, sha256 digest = SHA-256 of the image; then
one ``EV_SEPARATOR`` (data = four zero bytes, as UEFI firmware writes) per PCR used. It
extends the TPM's sha256 bank and returns the matching binary event log, so a verifier that
replays the log gets exactly the PCR values the TPM quotes.

PCRs only return to zero when the TPM restarts (TPM2_Startup(CLEAR)): run the simulator once
per boot, on a freshly started swtpm (``start_swtpm`` starts it with ``startup-clear``).
It refuses to run when a PCR it would extend is not zero.

``demo_components`` gives deterministic images, so reference values made once from a
simulated boot's log (``reference.reference_from_event_log``) match every simulated boot of
the same versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.attest import EVENT_LOG_FILE
from ztagent.device.tpm import DeviceTpm, TpmError
from ztagent.files import write_atomic
from ztagent.posture.eventlog import (
    COMPONENT_PCRS,
    EV_SEPARATOR,
    Event,
    encode_event_log,
    measurement_event,
)

SEPARATOR_DATA = b"\x00\x00\x00\x00"
DEMO_IMAGE_SIZE = 4096
DEMO_BOOTLOADER_VERSION = "2.1.0"
DEMO_KERNEL_VERSION = "6.6.0"


@dataclass(frozen=True)
class BootComponent:
    """A component the boot measures: ``component`` is a ``COMPONENT_PCRS`` key."""

    component: str
    name: str
    version: str
    image: bytes

    def __post_init__(self) -> None:
        if self.component not in COMPONENT_PCRS:
            raise ValueError(
                f"unknown component {self.component!r}, expected one of {sorted(COMPONENT_PCRS)}"
            )

    @property
    def pcr(self) -> int:
        return COMPONENT_PCRS[self.component]

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.image).digest()


def boot_events(components: Sequence[BootComponent]) -> list[Event]:
    """The events of one boot of ``components`` (sha256 bank), in extend order. No IO."""
    if not components:
        raise ValueError("a boot measures at least one component")
    events = [measurement_event(c.component, c.name, c.version, c.image) for c in components]
    separator = hashlib.sha256(SEPARATOR_DATA).digest()
    for pcr in sorted({c.pcr for c in components}):
        events.append(Event(pcr, EV_SEPARATOR, {"sha256": separator}, SEPARATOR_DATA))
    return events


def simulate_boot(tpm: DeviceTpm, components: Sequence[BootComponent]) -> bytes:
    """Extend ``components`` into ``tpm`` (sha256 bank); return the binary event log.

    Raise ``TpmError("tpm_error")`` when a PCR to be extended is not zero (the TPM has
    already booted: restart it first).
    """
    events = boot_events(components)
    used = sorted({event.pcr for event in events})
    current = tpm.read_pcrs(used, "sha256")
    dirty = [pcr for pcr in used if current[pcr] != bytes(32)]
    if dirty:
        raise TpmError(
            "tpm_error",
            f"PCRs {dirty} are already extended (expected all of {used} at zero): "
            "simulate_boot needs a freshly started TPM",
        )
    for event in events:
        tpm.extend(event.pcr, event.digests["sha256"])
    return encode_event_log(events, banks=("sha256",))


def demo_image(name: str, version: str) -> bytes:
    """A deterministic synthetic image: ``b"<name> <version>\\n"`` zero-padded to 4 KiB."""
    header = f"{name} {version}\n".encode()
    return header + bytes(DEMO_IMAGE_SIZE - len(header))


def demo_components(version: str = "1.3.0", *, tamper_kernel: bool = False) -> list[BootComponent]:
    """Firmware ``edge-fw`` at ``version``; boot loader and kernel at fixed versions. With
    ``tamper_kernel`` the kernel image is modified (same name and version, another digest):
    what a device with a rootkit in its kernel measures."""
    kernel_image = demo_image("edge-kernel", DEMO_KERNEL_VERSION)
    if tamper_kernel:
        kernel_image += b"\x00rootkit"
    return [
        BootComponent("firmware", "edge-fw", version, demo_image("edge-fw", version)),
        BootComponent(
            "bootloader",
            "edge-boot",
            DEMO_BOOTLOADER_VERSION,
            demo_image("edge-boot", DEMO_BOOTLOADER_VERSION),
        ),
        BootComponent("kernel", "edge-kernel", DEMO_KERNEL_VERSION, kernel_image),
    ]


def boot_demo_device(
    device_dir: Path, components: Sequence[BootComponent] | None = None
) -> SwtpmProcess:
    """Start the demo device's swtpm (state in ``<device_dir>/tpm``), simulate its boot and
    write the event log to ``<device_dir>/event-log.bin`` (where ``ztagent attest`` looks).

    The caller owns the returned process and must ``stop()`` it; every call is a new boot.
    """
    swtpm = start_swtpm(device_dir / "tpm")
    try:
        log = simulate_boot(DeviceTpm(swtpm.tcti), components or demo_components())
        write_atomic(device_dir / EVENT_LOG_FILE, log)
    except BaseException:
        swtpm.stop()
        raise
    return swtpm
