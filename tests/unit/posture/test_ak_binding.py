"""AK binding, verifier side, with a software EK and a software ActivateCredential."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.unit.posture._support import AK_ATTRS, EK_ATTRS, FP, NOW, OTHER_FP, SoftAK, SoftEK
from ztagent.posture.ak_binding import PendingBindings, begin_binding, complete_binding
from ztagent.posture.errors import PostureError


def test_round_trip_with_software_activate_credential() -> None:
    ak, ek = SoftAK(), SoftEK()
    pending, blob, encrypted = begin_binding(ek.public, ak.public)
    assert pending.ak_name == ak.name
    secret = ek.activate_credential(ak.name, blob, encrypted)
    assert complete_binding(pending, secret) == ak.name


def test_credential_for_one_ak_does_not_open_for_another() -> None:
    ak, ek = SoftAK(), SoftEK()
    _, blob, encrypted = begin_binding(ek.public, ak.public)
    with pytest.raises(Exception):  # noqa: B017 - the HMAC check of ActivateCredential fails
        ek.activate_credential(SoftAK().name, blob, encrypted)


def test_wrong_secret_refused() -> None:
    pending, _, _ = begin_binding(SoftEK().public, SoftAK().public)
    with pytest.raises(PostureError, match="ak_binding_failed: returned secret"):
        complete_binding(pending, b"\x00" * 32)


def test_ak_must_be_restricted_signing_key() -> None:
    loose = SoftAK(attrs=int(AK_ATTRS) & ~0x10000)
    with pytest.raises(PostureError, match="ak_binding_failed: AK attributes"):
        begin_binding(SoftEK().public, loose.public)


def test_ek_must_be_restricted_decryption_key() -> None:
    signing_ek = SoftEK(attrs=int(AK_ATTRS))
    with pytest.raises(PostureError, match="ak_binding_failed: EK attributes"):
        begin_binding(signing_ek.public, SoftAK().public)
    loose_ek = SoftEK(attrs=int(EK_ATTRS) & ~0x10000)
    with pytest.raises(PostureError, match="ak_binding_failed: EK attributes"):
        begin_binding(loose_ek.public, SoftAK().public)


def test_junk_public_is_malformed() -> None:
    with pytest.raises(PostureError, match="evidence_malformed"):
        begin_binding(b"\x00\x01", SoftAK().public)


def test_pending_bindings_single_use_per_certificate_expiring() -> None:
    store = PendingBindings(ttl_s=60)
    pending, _, _ = begin_binding(SoftEK().public, SoftAK().public)
    binding_id = store.add(pending, FP, NOW)
    with pytest.raises(PostureError, match="begun by certificate aaaa"):
        store.take(binding_id, OTHER_FP, NOW)
    assert store.take(binding_id, FP, NOW) is pending
    with pytest.raises(PostureError, match="unknown or already completed"):
        store.take(binding_id, FP, NOW)
    late = store.add(pending, FP, NOW)
    with pytest.raises(PostureError, match="binding expired"):
        store.take(late, FP, NOW + timedelta(seconds=60))


def test_pending_bindings_bounded() -> None:
    store = PendingBindings(max_pending=2)
    pending, _, _ = begin_binding(SoftEK().public, SoftAK().public)
    ids = [store.add(pending, FP, NOW) for _ in range(3)]
    assert len(store) == 2
    with pytest.raises(PostureError, match="unknown"):
        store.take(ids[0], FP, NOW)
