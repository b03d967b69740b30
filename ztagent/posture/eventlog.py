"""The TCG PC Client crypto-agile binary event log: parse, encode, replay.

Format (TCG PC Client Platform Firmware Profile, section 10; all integers little-endian):

* The first event is a legacy ``TCG_PCR_EVENT`` (SHA-1 layout): ``pcrIndex u32`` (0),
  ``eventType u32`` (``EV_NO_ACTION``), ``digest[20]`` (zero), ``eventSize u32``, then the
  ``TCG_EfiSpecIDEventStruct``: ``signature[16]`` = ``"Spec ID Event03\\0"``,
  ``platformClass u32``, ``specVersionMinor u8``, ``specVersionMajor u8`` (2),
  ``specErrata u8``, ``uintnSize u8`` (1 or 2), ``numberOfAlgorithms u32``, then per algorithm
  ``algId u16`` + ``digestSize u16``, then ``vendorInfoSize u8`` + ``vendorInfo``.
* Every further event is a ``TCG_PCR_EVENT2``: ``pcrIndex u32``, ``eventType u32``,
  ``count u32``, per digest ``algId u16`` + the digest (its size is the one the header gives),
  ``eventSize u32``, event data. Each event carries exactly the header's banks.

``parse_event_log`` returns the ``TCG_PCR_EVENT2`` entries only (the Spec ID header is format,
not a measurement); ``encode_event_log`` writes the header for the banks it is given, so
``parse_event_log(encode_event_log(events)) == events``. Anything out of bounds, truncated,
oversized or of an unknown algorithm raises ``PostureError("eventlog_malformed")`` naming
the byte offset.

``replay`` recomputes PCRs: each starts at 32 zero bytes (the bank's digest size) and every
event except ``EV_NO_ACTION`` extends it, ``new = H(old || digest)``. (An H-CRTM
``StartupLocality`` event is not modelled: ztagent devices start PCR 0 at zero.)

ztagent's measured-boot convention (the boot simulator and the reference values follow it):

* every measured boot component is one event whose data is UTF-8 JSON
  ``{"component": C, "name": N, "version": V}`` (``component_event_data``) and whose digest in
  each bank is that bank's hash of the component image (sha256: SHA-256 of the image);
* the event goes to the component's PCR, ``COMPONENT_PCRS``: ``firmware`` -> PCR 0 (platform
  firmware, ``EV_EFI_PLATFORM_FIRMWARE_BLOB``), ``bootloader`` -> PCR 4 (boot manager code,
  ``EV_IPL``), ``kernel`` -> PCR 7 (``EV_IPL``). On UEFI PCs PCR 7 holds the Secure Boot
  policy and GRUB measures the kernel into PCR 9; ztagent's edge boot chain has no Secure Boot
  variables and uses PCR 7 for the kernel so that the default quote selection ``0,4,7``
  covers all three components;
* other events (``EV_S_CRTM_VERSION``, ``EV_POST_CODE``, ``EV_SEPARATOR``, ``EV_ACTION``...)
  may appear; their data is not component JSON and they are replayed but not matched against
  reference values. ``measurement_event`` builds a component event.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ztagent import json_input
from ztagent.posture.errors import PostureError

EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_ACTION = 0x5
EV_S_CRTM_VERSION = 0x8
EV_IPL = 0xD
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008

COMPONENT_PCRS: Mapping[str, int] = {"firmware": 0, "bootloader": 4, "kernel": 7}
COMPONENT_EVENT_TYPES: Mapping[str, int] = {
    "firmware": EV_EFI_PLATFORM_FIRMWARE_BLOB,
    "bootloader": EV_IPL,
    "kernel": EV_IPL,
}

# TPM_ALG_ID -> (name, digest size). SM3 is known so real logs parse; it cannot be replayed.
ALGORITHMS: Mapping[int, tuple[str, int]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0012: ("sm3_256", 32),
}
ALG_IDS: Mapping[str, int] = {name: alg for alg, (name, _size) in ALGORITHMS.items()}
DIGEST_SIZES: Mapping[str, int] = {name: size for name, size in ALGORITHMS.values()}

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
MAX_EVENT_LOG_BYTES = 4 * 1024 * 1024
MAX_EVENTS = 20_000
PLATFORM_CLASS_CLIENT = 0
_UINTN_64 = 2


@dataclass(frozen=True)
class Event:
    """One ``TCG_PCR_EVENT2``: the PCR it extends, its type, a digest per bank, its data."""

    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    data: bytes


@dataclass(frozen=True)
class ComponentMeasurement:
    """A measured boot component, read from an event that follows ztagent's convention."""

    component: str
    name: str
    version: str
    pcr: int
    digest: bytes


def _malformed(offset: int, message: str) -> PostureError:
    return PostureError("eventlog_malformed", f"at byte {offset}: {message}")


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.raw):
            raise _malformed(
                self.pos, f"{what} needs {size} bytes, {len(self.raw) - self.pos} left"
            )
        chunk = self.raw[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    @property
    def left(self) -> int:
        return len(self.raw) - self.pos


def _parse_spec_id(reader: _Reader) -> list[tuple[int, str, int]]:
    start = reader.pos
    pcr = reader.u32("header pcrIndex")
    event_type = reader.u32("header eventType")
    if pcr != 0 or event_type != EV_NO_ACTION:
        raise _malformed(
            start,
            f"first event is PCR {pcr} type {event_type:#x}, expected the Spec ID event "
            f"(PCR 0, EV_NO_ACTION)",
        )
    reader.take(20, "header SHA-1 digest")
    size = reader.u32("header eventSize")
    body_start = reader.pos
    body = _Reader(reader.take(size, "Spec ID event"))
    signature = body.take(16, "Spec ID signature")
    if signature != SPEC_ID_SIGNATURE:
        raise _malformed(body_start, f"signature {signature!r}, expected {SPEC_ID_SIGNATURE!r}")
    body.u32("platformClass")
    body.u8("specVersionMinor")
    major = body.u8("specVersionMajor")
    body.u8("specErrata")
    uintn = body.u8("uintnSize")
    if major != 2 or uintn not in (1, 2):
        raise _malformed(
            body_start, f"spec version major {major}, uintnSize {uintn}; expected 2 and 1|2"
        )
    count = body.u32("numberOfAlgorithms")
    if not 1 <= count <= len(ALGORITHMS):
        raise _malformed(
            body_start + body.pos - 4, f"numberOfAlgorithms {count}, expected 1..{len(ALGORITHMS)}"
        )
    banks: list[tuple[int, str, int]] = []
    for _ in range(count):
        at = body_start + body.pos
        alg = body.u16("algId")
        digest_size = body.u16("digestSize")
        known = ALGORITHMS.get(alg)
        if known is None:
            raise _malformed(at, f"unknown algorithm {alg:#06x}")
        if digest_size != known[1]:
            raise _malformed(at, f"{known[0]} digest size {digest_size}, expected {known[1]}")
        if any(alg == seen for seen, _n, _s in banks):
            raise _malformed(at, f"algorithm {known[0]} listed twice")
        banks.append((alg, known[0], digest_size))
    vendor_size = body.u8("vendorInfoSize")
    body.take(vendor_size, "vendorInfo")
    if body.left:
        raise _malformed(body_start + body.pos, f"{body.left} bytes after the Spec ID event")
    return banks


def parse_event_log(raw: bytes, *, max_bytes: int = MAX_EVENT_LOG_BYTES) -> tuple[Event, ...]:
    """The ``TCG_PCR_EVENT2`` entries of a crypto-agile log (strict; see the module doc)."""
    if len(raw) > max_bytes:
        raise _malformed(max_bytes, f"log is {len(raw)} bytes, limit {max_bytes}")
    reader = _Reader(bytes(raw))
    banks = _parse_spec_id(reader)
    by_id = {alg: (name, size) for alg, name, size in banks}
    events: list[Event] = []
    while reader.left:
        start = reader.pos
        if len(events) >= MAX_EVENTS:
            raise _malformed(start, f"more than {MAX_EVENTS} events")
        pcr = reader.u32("pcrIndex")
        event_type = reader.u32("eventType")
        count = reader.u32("digest count")
        if count != len(banks):
            raise _malformed(start + 8, f"{count} digests, the header declares {len(banks)}")
        digests: dict[str, bytes] = {}
        for _ in range(count):
            at = reader.pos
            alg = reader.u16("digest algId")
            bank = by_id.get(alg)
            if bank is None:
                raise _malformed(at, f"digest algorithm {alg:#06x} is not in the header")
            if bank[0] in digests:
                raise _malformed(at, f"two {bank[0]} digests")
            digests[bank[0]] = reader.take(bank[1], f"{bank[0]} digest")
        size = reader.u32("eventSize")
        data = reader.take(size, "event data")
        events.append(Event(pcr=pcr, event_type=event_type, digests=digests, data=data))
    return tuple(events)


def _spec_id_event(banks: Sequence[str]) -> bytes:
    body = SPEC_ID_SIGNATURE + struct.pack(
        "<IBBBBI", PLATFORM_CLASS_CLIENT, 0, 2, 0, _UINTN_64, len(banks)
    )
    for bank in banks:
        body += struct.pack("<HH", ALG_IDS[bank], DIGEST_SIZES[bank])
    body += b"\x00"  # vendorInfoSize
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def encode_event_log(events: Iterable[Event], banks: Sequence[str] = ("sha256",)) -> bytes:
    """The crypto-agile log of ``events`` with a Spec ID header for ``banks``.

    Raises ``ValueError`` for events that lack a bank, carry another bank or have a digest of
    the wrong size (this is tooling for building logs, not a check of received evidence).
    """
    if not banks or len(set(banks)) != len(banks):
        raise ValueError(f"banks must be distinct and non-empty, got {list(banks)}")
    for bank in banks:
        if bank not in ALG_IDS:
            raise ValueError(f"unknown bank {bank!r}, expected one of {sorted(ALG_IDS)}")
    out = [_spec_id_event(banks)]
    for index, event in enumerate(events):
        if set(event.digests) != set(banks):
            raise ValueError(
                f"event {index} has banks {sorted(event.digests)}, expected {sorted(banks)}"
            )
        part = struct.pack("<III", event.pcr, event.event_type, len(banks))
        for bank in banks:
            digest = event.digests[bank]
            if len(digest) != DIGEST_SIZES[bank]:
                raise ValueError(f"event {index}: {bank} digest is {len(digest)} bytes")
            part += struct.pack("<H", ALG_IDS[bank]) + digest
        out.append(part + struct.pack("<I", len(event.data)) + event.data)
    return b"".join(out)


def replay(
    events: Iterable[Event], bank: str = "sha256", pcrs: Iterable[int] = ()
) -> dict[int, bytes]:
    """PCR values after replaying ``events`` in ``bank``, for each index in ``pcrs``."""
    if bank not in DIGEST_SIZES or bank == "sm3_256":
        raise PostureError("evidence_malformed", f"PCR bank {bank!r} cannot be replayed")
    wanted = sorted(set(pcrs))
    values = {index: bytes(DIGEST_SIZES[bank]) for index in wanted}
    for index, event in enumerate(events):
        if event.event_type == EV_NO_ACTION or event.pcr not in values:
            continue
        digest = event.digests.get(bank)
        if digest is None:
            raise PostureError(
                "eventlog_malformed", f"event {index} (PCR {event.pcr}) has no {bank} digest"
            )
        values[event.pcr] = hashlib.new(bank, values[event.pcr] + digest).digest()
    return values


def component_event_data(component: str, name: str, version: str) -> bytes:
    """The event data of a measured component: compact, key-sorted UTF-8 JSON."""
    doc = {"component": component, "name": name, "version": version}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def measurement_event(
    component: str, name: str, version: str, image: bytes, banks: Sequence[str] = ("sha256",)
) -> Event:
    """The event measuring ``image`` as ``component`` into its ``COMPONENT_PCRS`` PCR."""
    if component not in COMPONENT_PCRS:
        raise ValueError(f"unknown component {component!r}, expected {sorted(COMPONENT_PCRS)}")
    return Event(
        pcr=COMPONENT_PCRS[component],
        event_type=COMPONENT_EVENT_TYPES[component],
        digests={bank: hashlib.new(bank, image).digest() for bank in banks},
        data=component_event_data(component, name, version),
    )


def component_measurement(event: Event, bank: str = "sha256") -> ComponentMeasurement | None:
    """The component an event measures, or None when its data is not component JSON.

    Data that looks like component JSON but is incomplete (no string ``name``/``version``, no
    digest in ``bank``) raises ``eventlog_malformed``: it claims to be a measurement.
    """
    if event.event_type == EV_NO_ACTION or not event.data.startswith(b"{"):
        return None
    try:
        doc = json_input.loads(event.data)
    except ValueError:  # not UTF-8, not JSON, or nested too deep: not a component event
        return None
    if not isinstance(doc, dict) or "component" not in doc:
        return None
    fields = [doc.get(key) for key in ("component", "name", "version")]
    digest = event.digests.get(bank)
    if not all(isinstance(value, str) and value for value in fields) or digest is None:
        raise PostureError(
            "eventlog_malformed",
            f"PCR {event.pcr} component event needs string component, name, version and a "
            f"{bank} digest, got {sorted(doc)} and banks {sorted(event.digests)}",
        )
    component, name, version = (str(value) for value in fields)
    return ComponentMeasurement(component, name, version, event.pcr, digest)
