"""Reference values: loading, checking a boot, building from a known-good log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.posture._support import boot_events
from ztagent.errors import ConfigError
from ztagent.posture.errors import PostureError
from ztagent.posture.eventlog import measurement_event
from ztagent.posture.reference import (
    ReferenceValues,
    check_boot,
    reference_from_event_log,
    write_reference_values,
)


def refs_for(events) -> ReferenceValues:
    return ReferenceValues.from_dict(reference_from_event_log(events))


def test_known_good_boot_passes() -> None:
    events = boot_events()
    result = check_boot(events, refs_for(events))
    assert set(result.components) == {"firmware", "bootloader", "kernel"}
    assert result.components["kernel"][0] == "6.6.30-edge"
    assert result.names["firmware"] == "edge-fw"


def test_unlisted_digest_names_component_digest_and_allowed_versions() -> None:
    events = boot_events()
    refs = refs_for(events)
    events[2] = measurement_event("bootloader", "edge-boot", "2.0.1", b"patched loader")
    with pytest.raises(PostureError, match=r"bootloader digest [0-9a-f]{16}.*edge-boot 2.0.1"):
        check_boot(events, refs)


def test_missing_required_component() -> None:
    events = boot_events()
    refs = refs_for(events)
    with pytest.raises(PostureError, match=r"required components \['kernel'\]"):
        check_boot([e for e in events if b'"kernel"' not in e.data], refs)


def test_component_measured_twice() -> None:
    events = boot_events()
    refs = refs_for(events)
    with pytest.raises(PostureError, match="measured twice"):
        check_boot([*events, events[3]], refs)


def test_merge_keeps_old_versions(tmp_path: Path) -> None:
    events = boot_events()
    path = tmp_path / "refs.json"
    write_reference_values(path, reference_from_event_log(events))
    events[1] = measurement_event("firmware", "edge-fw", "1.4.0", b"new firmware")
    existing = json.loads(path.read_text())
    merged = reference_from_event_log(events, existing=existing)
    write_reference_values(path, merged)
    refs = ReferenceValues.load(path)
    assert [i.version for i in refs.components["firmware"].allowed] == ["1.3.0", "1.4.0"]
    assert len(refs.components["kernel"].allowed) == 1  # same digest not repeated


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "expected a JSON object"),
        ({"version": 2, "bank": "sha256", "components": {}}, "version 2"),
        ({"version": 1, "bank": "md5", "components": {"a": {}}}, "bank 'md5'"),
        ({"version": 1, "bank": "sha256", "components": {}}, "non-empty"),
        (
            {"version": 1, "bank": "sha256", "components": {"kernel": {"pcr": 4, "allowed": []}}},
            "ztagent measures kernel into PCR 7",
        ),
        (
            {
                "version": 1,
                "bank": "sha256",
                "components": {
                    "firmware": {
                        "pcr": 0,
                        "allowed": [{"name": "f", "version": "1", "sha256": "abc"}],
                    }
                },
            },
            "expected 64 hex digits",
        ),
    ],
)
def test_bad_reference_documents(doc: object, match: str) -> None:
    with pytest.raises(ConfigError, match=f"posture.reference_values: .*{match}"):
        ReferenceValues.from_dict(doc)


def test_load_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"posture.reference_values: cannot read"):
        ReferenceValues.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        ReferenceValues.load(tmp_path / "bad.json")
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply to parse"):
        ReferenceValues.load(tmp_path / "deep.json")


def test_shipped_placeholder_loads() -> None:
    refs = ReferenceValues.load(Path("policies/data/reference-values.json"))
    assert set(refs.components) == {"firmware", "bootloader", "kernel"}
