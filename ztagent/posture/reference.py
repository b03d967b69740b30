"""Reference values for measured boot: which component images a device may boot.

File format (JSON, ``policies/data/reference-values.json`` ships a placeholder)::

    {"version": 1, "bank": "sha256",
     "components": {
       "firmware":   {"pcr": 0, "allowed": [{"name": "edge-fw", "version": "1.2.0",
                                             "sha256": "<64 hex>"}, ...]},
       "bootloader": {"pcr": 4, "allowed": [...]},
       "kernel":     {"pcr": 7, "allowed": [...]}}}

Each entry's digest key is the bank's name. Several allowed entries per component let a staged
update roll out without failing the devices that have not updated yet. Every component in the
file is required: a boot that does not measure it is refused. ``check_boot`` is pure;
``ReferenceValues.load`` and ``write_reference_values`` are the file edges.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztagent import json_input
from ztagent.errors import ConfigError
from ztagent.files import write_atomic
from ztagent.posture.errors import PostureError, short_hex
from ztagent.posture.eventlog import (
    COMPONENT_PCRS,
    DIGEST_SIZES,
    ComponentMeasurement,
    Event,
    component_measurement,
)

CONFIG_KEY = "posture.reference_values"
FORMAT_VERSION = 1
MAX_REFERENCE_BYTES = 1024 * 1024
_REPLAYABLE_BANKS = ("sha1", "sha256", "sha384", "sha512")


@dataclass(frozen=True)
class AllowedImage:
    """One allowed image of a component: its name, version and digest (lower-case hex)."""

    name: str
    version: str
    digest: str


@dataclass(frozen=True)
class ComponentReference:
    """The PCR a component is measured into and the images it may be."""

    pcr: int
    allowed: tuple[AllowedImage, ...]

    def find(self, digest_hex: str) -> AllowedImage | None:
        return next((image for image in self.allowed if image.digest == digest_hex), None)

    def versions(self) -> str:
        return ", ".join(f"{i.name} {i.version} ({short_hex(i.digest)})" for i in self.allowed)


@dataclass(frozen=True)
class ReferenceValues:
    """Validated reference values; build with ``load`` or ``from_dict``."""

    bank: str
    components: Mapping[str, ComponentReference]

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(sorted({ref.pcr for ref in self.components.values()}))

    @classmethod
    def load(cls, path: Path) -> ReferenceValues:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(CONFIG_KEY, f"cannot read {path}: {exc.strerror}") from exc
        if len(raw) > MAX_REFERENCE_BYTES:
            raise ConfigError(
                CONFIG_KEY, f"{path} is {len(raw)} bytes, limit {MAX_REFERENCE_BYTES}"
            )
        try:
            data = json_input.loads(raw, max_depth=None)
        except ValueError as exc:  # also not UTF-8, nested too deep to parse
            raise ConfigError(CONFIG_KEY, f"{path} is not JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "reference values") -> ReferenceValues:
        def bad(message: str) -> ConfigError:
            return ConfigError(CONFIG_KEY, f"{source}: {message}")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"version", "bank", "components"}
        if unknown:
            raise bad(f"unknown keys {sorted(unknown)}, expected version, bank, components")
        if data.get("version") != FORMAT_VERSION:
            raise bad(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
        bank = data.get("bank")
        if bank not in _REPLAYABLE_BANKS:
            raise bad(f"bank {bank!r}, expected one of {list(_REPLAYABLE_BANKS)}")
        components = data.get("components")
        if not isinstance(components, dict) or not components:
            raise bad("components must be a non-empty object")
        parsed: dict[str, ComponentReference] = {}
        for component, spec in components.items():
            parsed[component] = _component(component, spec, bank, bad)
        return cls(bank=bank, components=parsed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "bank": self.bank,
            "components": {
                component: {
                    "pcr": ref.pcr,
                    "allowed": [
                        {"name": i.name, "version": i.version, self.bank: i.digest}
                        for i in ref.allowed
                    ],
                }
                for component, ref in sorted(self.components.items())
            },
        }


def _component(component: str, spec: Any, bank: str, bad: Any) -> ComponentReference:
    where = f"components.{component}"
    if not isinstance(spec, dict) or set(spec) != {"pcr", "allowed"}:
        raise bad(f"{where} must be an object with exactly pcr and allowed")
    pcr = spec["pcr"]
    if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
        raise bad(f"{where}.pcr is {pcr!r}, expected an integer 0..23")
    expected_pcr = COMPONENT_PCRS.get(component)
    if expected_pcr is not None and pcr != expected_pcr:
        raise bad(f"{where}.pcr is {pcr}, ztagent measures {component} into PCR {expected_pcr}")
    allowed = spec["allowed"]
    if not isinstance(allowed, list) or not allowed:
        raise bad(f"{where}.allowed must be a non-empty list")
    images = []
    for n, entry in enumerate(allowed):
        at = f"{where}.allowed[{n}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "version", bank}:
            raise bad(f"{at} must have exactly name, version, {bank}")
        name, version, digest = entry["name"], entry["version"], entry[bank]
        if not (isinstance(name, str) and name and isinstance(version, str) and version):
            raise bad(f"{at}: name and version must be non-empty strings")
        if not _is_hex(digest, DIGEST_SIZES[bank]):
            raise bad(f"{at}.{bank} is {digest!r}, expected {DIGEST_SIZES[bank] * 2} hex digits")
        images.append(AllowedImage(name, version, digest.lower()))
    return ComponentReference(pcr=pcr, allowed=tuple(images))


def _is_hex(value: Any, size: int) -> bool:
    if not isinstance(value, str) or len(value) != size * 2:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class BootResult:
    """The boot that matched: component -> (version, digest hex); and component -> image name."""

    components: Mapping[str, tuple[str, str]]
    names: Mapping[str, str]


def _measurements(events: Iterable[Event], bank: str) -> list[ComponentMeasurement]:
    return [m for m in (component_measurement(e, bank) for e in events) if m is not None]


def check_boot(events: Iterable[Event], refs: ReferenceValues) -> BootResult:
    """Every measured component is an allowed image for its PCR; every required one is there.

    The event log must already have been replayed against the quoted PCRs; this check only
    reads what the log says was measured. Refusals are ``boot_not_reference``.
    """
    components: dict[str, tuple[str, str]] = {}
    names: dict[str, str] = {}
    for m in _measurements(events, refs.bank):
        ref = refs.components.get(m.component)
        digest_hex = m.digest.hex()
        if ref is None:
            raise PostureError(
                "boot_not_reference",
                f"{m.component} {m.name} {m.version} ({short_hex(digest_hex)}) in PCR {m.pcr} "
                f"is not a known component, expected one of {sorted(refs.components)}",
            )
        if m.pcr != ref.pcr:
            raise PostureError(
                "boot_not_reference",
                f"{m.component} measured into PCR {m.pcr}, expected PCR {ref.pcr}",
            )
        if m.component in components:
            raise PostureError(
                "boot_not_reference", f"{m.component} is measured twice, expected once"
            )
        image = ref.find(digest_hex)
        if image is None:
            raise PostureError(
                "boot_not_reference",
                f"{m.component} digest {short_hex(digest_hex)} (claims {m.name} {m.version}) "
                f"is not allowed, expected one of: {ref.versions()}",
            )
        components[m.component] = (image.version, digest_hex)
        names[m.component] = image.name
    missing = sorted(set(refs.components) - set(components))
    if missing:
        raise PostureError(
            "boot_not_reference",
            f"required components {missing} were not measured, measured {sorted(components)}",
        )
    return BootResult(components=components, names=names)


def reference_from_event_log(
    events: Iterable[Event], existing: Mapping[str, Any] | None = None, bank: str = "sha256"
) -> dict[str, Any]:
    """Reference values accepting the components a known-good log measures.

    With ``existing`` (a reference document), its allowed lists are kept and the new images
    appended when their digest is not there yet, so a staged update accepts old and new.
    """
    base = (
        ReferenceValues.from_dict(existing, source="existing reference values")
        if existing is not None
        else None
    )
    if base is not None and base.bank != bank:
        raise ConfigError(CONFIG_KEY, f"existing file uses bank {base.bank}, not {bank}")
    merged: dict[str, ComponentReference] = dict(base.components) if base else {}
    measured = _measurements(events, bank)
    if not measured:
        raise ConfigError(CONFIG_KEY, "the event log measures no components")
    for m in measured:
        ref = merged.get(m.component, ComponentReference(pcr=m.pcr, allowed=()))
        if ref.pcr != m.pcr:
            raise ConfigError(
                CONFIG_KEY, f"{m.component} measured into PCR {m.pcr}, the file says {ref.pcr}"
            )
        if ref.find(m.digest.hex()) is None:
            image = AllowedImage(m.name, m.version, m.digest.hex())
            ref = ComponentReference(pcr=ref.pcr, allowed=(*ref.allowed, image))
        merged[m.component] = ref
    document = ReferenceValues(bank=bank, components=merged).as_dict()
    ReferenceValues.from_dict(document)  # what we write must load
    return document


def write_reference_values(path: Path, data: Mapping[str, Any]) -> None:
    """Validate ``data`` as reference values and write it atomically (sorted, indented)."""
    ReferenceValues.from_dict(dict(data), source=str(path))
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(Path(path), text.encode())
