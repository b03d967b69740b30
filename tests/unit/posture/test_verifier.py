"""verify_evidence end to end in software: the good path and every refusal, by its code."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.ci import require_module
from tests.unit.posture._support import (
    DEVICE,
    FP,
    IMAGES,
    NOW,
    OTHER_FP,
    SELECTION,
    Device,
    SoftAK,
    make_attest,
)
from ztagent.errors import ConfigError
from ztagent.posture.errors import PostureError
from ztagent.posture.eventlog import Event, encode_event_log, measurement_event
from ztagent.posture.firmware import generate_firmware_key
from ztagent.posture.nonces import NonceStore
from ztagent.posture.quote import pcr_composite_digest
from ztagent.posture.reference import ReferenceValues, reference_from_event_log
from ztagent.posture.state import AkRegistry, RollbackStore
from ztagent.posture.verifier import (
    AttestationContext,
    AttestedPosture,
    PostureCache,
    verify_evidence,
)


class World:
    """The verifier's side: stores and a context, plus one software device."""

    def __init__(self, tmp: Path) -> None:
        self.device = Device(tmp)
        self.nonces = NonceStore()
        self.registry = AkRegistry(tmp / "ak.json")
        self.rollback = RollbackStore(tmp / "svn.json")
        self.registry.bind(DEVICE, self.device.ak.name)
        self.refs = self.device.references()

    def ctx(self, now=NOW, fingerprint=FP, refs=None, selection=SELECTION) -> AttestationContext:
        return AttestationContext(
            device_id=DEVICE,
            cert_fingerprint=fingerprint,
            pcr_selection=selection,
            references=refs or self.refs,
            trusted_firmware_keys=self.device.trusted_keys(),  # type: ignore[arg-type]
            max_age_s=600,
            now=now,
        )

    def nonce(self, fingerprint: str = FP, now=NOW) -> bytes:
        return self.nonces.issue(fingerprint, now)[0]

    def verify(self, evidence, **ctx_args) -> AttestedPosture:
        return verify_evidence(
            evidence,
            self.ctx(**ctx_args),
            nonces=self.nonces,
            registry=self.registry,
            rollback=self.rollback,
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def refused(world: World, evidence, code: str, match: str | None = None, **ctx_args) -> None:
    with pytest.raises(PostureError, match=match or code) as info:
        world.verify(evidence, **ctx_args)
    assert info.value.code == code


def test_good_evidence_gives_posture_in_policy_input_shape(world: World) -> None:
    posture = world.verify(world.device.evidence(world.nonce()))
    assert posture.device_id == DEVICE and posture.cert_fingerprint == FP
    assert posture.ak_name == world.device.ak.name
    assert posture.expires_at == NOW + timedelta(seconds=600)
    assert posture.firmware_svn == 3
    doc = posture.as_input(NOW + timedelta(seconds=30))
    assert set(doc) == {"verified", "age_s", "firmware", "boot", "host"}
    assert doc["verified"] is True and doc["age_s"] == 30.0
    assert doc["firmware"] == {
        "name": "edge-fw",
        "version": "1.3.0",
        "signed": True,
        "signer": next(iter(world.device.trusted_keys())),
    }
    pcrs = world.device.pcrs()
    assert doc["boot"] == {"verified": True, "pcrs": {str(i): pcrs[i].hex() for i in SELECTION}}
    assert doc["host"] == {"os": "linux", "uptime_s": 12, "self_reported": True}
    assert posture.as_input(posture.expires_at)["verified"] is False
    assert world.rollback.highest(DEVICE) == 3


def test_policy_input_matches_the_published_schema(world: World) -> None:
    jsonschema = require_module("jsonschema")
    import json

    schema = json.loads(Path("policies/input.schema.json").read_text())
    posture_schema = schema["properties"]["posture"]
    doc = world.verify(world.device.evidence(world.nonce())).as_input(NOW)
    jsonschema.validate(doc, posture_schema)


def test_quote_signed_by_another_ak(world: World) -> None:
    evidence = world.device.evidence(world.nonce())
    evidence.quote_signature = SoftAK().sign(evidence.quote)
    refused(world, evidence, "quote_bad_signature")


def test_ak_not_bound(world: World) -> None:
    stranger = SoftAK()
    world.device.ak = stranger
    refused(world, world.device.evidence(world.nonce()), "ak_not_bound", match="is bound to")


def test_device_without_binding(world: World, tmp_path: Path) -> None:
    world.registry = AkRegistry(tmp_path / "empty.json")
    refused(world, world.device.evidence(world.nonce()), "ak_not_bound", match="no bound AK")


def test_replayed_nonce(world: World) -> None:
    evidence = world.device.evidence(world.nonce())
    world.verify(evidence)
    refused(world, evidence, "nonce_reused")


def test_nonce_of_another_certificate(world: World) -> None:
    evidence = world.device.evidence(world.nonce(fingerprint=OTHER_FP))
    refused(world, evidence, "nonce_mismatch", match="issued to certificate bbbb")


def test_nonce_never_issued(world: World) -> None:
    refused(world, world.device.evidence(b"\x07" * 32), "nonce_mismatch", match="not issued")


def test_expired_nonce(world: World) -> None:
    evidence = world.device.evidence(world.nonce())
    refused(world, evidence, "nonce_expired", now=NOW + timedelta(seconds=61))


def test_pcr_value_altered_after_the_quote(world: World) -> None:
    values = world.device.pcrs()
    values[4] = hashlib.sha256(b"tampered").digest()
    evidence = world.device.evidence(world.nonce(), pcr_values=values)
    refused(world, evidence, "pcr_digest_mismatch")


def test_quote_over_another_selection(world: World) -> None:
    values = {i: v for i, v in world.device.pcrs().items() if i != 7}
    attest = make_attest(world.nonce(), pcr_composite_digest(values, (0, 4)), (0, 4))
    evidence = world.device.evidence(b"unused")
    evidence.quote, evidence.quote_signature = attest, world.device.ak.sign(attest)
    evidence.pcr_values.clear()
    evidence.pcr_values.update(values)
    refused(world, evidence, "pcr_selection_mismatch", match=r"expected sha256:\[0, 4, 7\]")


def test_pcr_values_not_the_quoted_selection_is_malformed(world: World) -> None:
    evidence = world.device.evidence(world.nonce())
    del evidence.pcr_values[7]
    refused(world, evidence, "evidence_malformed", match="pcr_values")


def test_edited_event_log_does_not_replay(world: World) -> None:
    quoted = world.device.pcrs()
    world.device.events[2] = measurement_event(
        "bootloader", "edge-boot", "2.0.1", b"a different bootloader"
    )
    evidence = world.device.evidence(world.nonce(), quoted_values=quoted)
    refused(world, evidence, "eventlog_replay_mismatch", match="PCR 4")


def test_malformed_event_log(world: World) -> None:
    good = encode_event_log(world.device.events)
    evidence = world.device.evidence(world.nonce(), event_log=good[:-3])
    refused(world, evidence, "eventlog_malformed")


def test_boot_measurement_not_in_reference_values(world: World, tmp_path: Path) -> None:
    world.device.events[3] = measurement_event("kernel", "linux", "6.7-rc1", b"unknown kernel")
    refused(world, world.device.evidence(world.nonce()), "boot_not_reference", match="kernel")


def test_reference_values_with_two_allowed_versions_accept_both(world: World) -> None:
    old_events = list(world.device.events)
    old_events[1] = measurement_event("firmware", "edge-fw", "1.2.0", b"edge-fw 1.2.0 image")
    refs = ReferenceValues.from_dict(
        reference_from_event_log(old_events, existing=world.refs.as_dict())
    )
    assert [i.version for i in refs.components["firmware"].allowed] == ["1.3.0", "1.2.0"]
    # the device on 1.3.0 passes
    assert world.verify(world.device.evidence(world.nonce()), refs=refs)
    # the device still on 1.2.0 passes too (its own signed manifest, same svn)
    world.device.events = old_events
    world.device.sign_firmware(b"edge-fw 1.2.0 image", svn=3)
    posture = world.verify(world.device.evidence(world.nonce()), refs=refs)
    assert posture.boot["verified"] is True


def test_firmware_signed_by_untrusted_key(world: World, tmp_path: Path) -> None:
    rogue, _ = generate_firmware_key(tmp_path / "rogue", "rogue")
    world.device.sign_firmware(IMAGES["firmware"], svn=3, key=rogue)
    refused(world, world.device.evidence(world.nonce()), "firmware_untrusted_key")


def test_bad_firmware_signature(world: World) -> None:
    world.device.manifest = world.device.manifest.replace(b'"svn":3', b'"svn":9')
    refused(world, world.device.evidence(world.nonce()), "firmware_bad_signature")


def test_firmware_digest_mismatch(world: World) -> None:
    world.device.sign_firmware(b"some other image", svn=3)
    refused(world, world.device.evidence(world.nonce()), "firmware_digest_mismatch")


def test_rollback(world: World) -> None:
    world.verify(world.device.evidence(world.nonce()))
    world.device.sign_firmware(IMAGES["firmware"], svn=2)
    refused(world, world.device.evidence(world.nonce()), "firmware_rollback", match=">= 3")
    # equal svn is fine
    world.device.sign_firmware(IMAGES["firmware"], svn=3)
    assert world.verify(world.device.evidence(world.nonce()))


def test_svn_is_recorded_only_when_everything_passed(world: World) -> None:
    world.device.sign_firmware(b"some other image", svn=7)
    refused(world, world.device.evidence(world.nonce()), "firmware_digest_mismatch")
    assert world.rollback.highest(DEVICE) is None


def test_host_facts_must_be_an_object(world: World) -> None:
    refused(world, world.device.evidence(world.nonce(), host=b"[1]"), "evidence_malformed")


@pytest.mark.parametrize("host", [b"[" * 1500, b'{"a":' * 40 + b"1" + b"}" * 40, b'{"t": NaN}'])
def test_deep_or_non_json_host_facts_are_malformed_not_a_crash(world: World, host: bytes) -> None:
    """Host facts nested 1,500 deep fit the 64 KiB limit and ended in RecursionError (UNKNOWN
    and a traceback per Attest); nested too deep for the policy input or NaN: refused."""
    refused(world, world.device.evidence(world.nonce(), host=host), "evidence_malformed")


def test_context_refuses_a_selection_that_leaves_reference_pcrs_unquoted(world: World) -> None:
    with pytest.raises(ConfigError, match=r"unquoted"):
        world.ctx(selection=(0, 4))


def test_posture_cache_drops_expired_and_is_bounded(world: World) -> None:
    posture = world.verify(world.device.evidence(world.nonce()))
    cache = PostureCache(max_entries=2)
    cache.put(posture)
    assert cache.get(FP, NOW + timedelta(seconds=599)) is posture
    assert cache.get(FP, NOW + timedelta(seconds=600)) is None
    assert len(cache) == 0
    for n in range(3):
        cache.put(AttestedPosture(**{**posture.__dict__, "cert_fingerprint": f"{n:02x}" * 32}))
    assert len(cache) == 2 and cache.get("00" * 32, NOW) is None


def test_unknown_component_event_in_log(world: World) -> None:
    world.device.events.append(
        Event(
            4,
            0xD,
            {"sha256": hashlib.sha256(b"x").digest()},
            b'{"component":"initrd","name":"i","version":"1"}',
        )
    )
    refused(world, world.device.evidence(world.nonce()), "boot_not_reference", match="initrd")


_BYTE_FIELDS = (
    "quote",
    "quote_signature",
    "event_log",
    "ak_public",
    "firmware_manifest",
    "firmware_signature",
    "host_facts",
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(_BYTE_FIELDS),
    edit=st.one_of(
        st.binary(max_size=400),  # replaced outright
        st.tuples(st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),  # bytes overwritten
        st.integers(0, 2**16),  # truncated there
    ),
)
def test_whatever_a_device_sends_is_a_posture_error_at_worst(
    world: World, field: str, edit: bytes | tuple[int, bytes] | int
) -> None:
    """One field of good evidence replaced, overwritten in place or cut short: verification
    passes or refuses with a PostureError (a code the device is told), never anything else."""
    evidence = world.device.evidence(world.nonce())
    value: bytes = getattr(evidence, field)
    if isinstance(edit, bytes):
        value = edit
    elif isinstance(edit, tuple):
        at = edit[0] % (len(value) + 1)
        value = value[:at] + edit[1] + value[at + len(edit[1]) :]
    else:
        value = value[: edit % (len(value) + 1)]
    setattr(evidence, field, value)
    try:
        world.verify(evidence)
    except PostureError as err:
        assert err.code  # a stable code, not an accident
