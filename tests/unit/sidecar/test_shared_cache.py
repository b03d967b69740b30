"""The posture cache sidecar workers share through files."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ztagent.posture.verifier import AttestedPosture
from ztagent.sidecar.shared_cache import (
    SharedPostureCache,
    cache_dir,
    clear_shared_cache,
    posture_from_json,
    posture_to_json,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
FP = "ab" * 32


def _posture(fingerprint: str = FP, attestation_id: str = "att-1") -> AttestedPosture:
    return AttestedPosture(
        attestation_id=attestation_id,
        device_id="cam-1",
        cert_fingerprint=fingerprint,
        ak_name="000b" + "cd" * 32,
        verified_at=NOW,
        expires_at=NOW + timedelta(seconds=600),
        firmware={"name": "edge-fw", "version": "1.3.0", "signed": True, "signer": "k"},
        boot={"verified": True, "pcrs": {"0": "00" * 32}},
        host={"kernel": "6.1"},
        firmware_svn=3,
        quote_clock=12345,
        quote_reset_count=1,
    )


def test_round_trip() -> None:
    posture = _posture()
    assert posture_from_json(posture_to_json(posture)) == posture


def test_a_posture_one_worker_stored_is_seen_by_another(tmp_path: Path) -> None:
    one, other = SharedPostureCache(tmp_path), SharedPostureCache(tmp_path)
    assert other.get(FP, NOW) is None
    one.put(_posture())
    seen = other.get(FP, NOW + timedelta(seconds=1))
    assert seen is not None and seen.attestation_id == "att-1"
    assert other.get(FP, NOW + timedelta(seconds=600)) is None  # expired
    assert (cache_dir(tmp_path) / f"{FP}.json").stat().st_mode & 0o777 == 0o600

    one.put(_posture(attestation_id="att-2"))  # a newer attestation replaces it everywhere
    newer = other.get(FP, NOW)
    assert newer is not None and newer.attestation_id == "att-2"
    one.drop(FP)  # a refused re-attestation: every worker drops the posture
    assert other.get(FP, NOW) is None
    assert len(one) == 0


def test_a_tampered_or_foreign_record_is_not_a_posture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SharedPostureCache(tmp_path)
    path = cache_dir(tmp_path) / f"{FP}.json"
    path.write_text("{not json")
    assert cache.get(FP, NOW) is None
    path.write_bytes(posture_to_json(_posture(fingerprint="cd" * 32)))
    assert cache.get(FP, NOW) is None
    assert "names another certificate" in caplog.text
    naive = dataclasses.replace(_posture(), verified_at=NOW.replace(tzinfo=None))
    path.write_bytes(posture_to_json(naive))
    assert cache.get(FP, NOW) is None
    with pytest.raises(ValueError, match="hex SHA-256"):
        cache.get("../../etc/passwd", NOW)


def test_clear_forgets_everything(tmp_path: Path) -> None:
    SharedPostureCache(tmp_path).put(_posture())
    clear_shared_cache(tmp_path)
    assert SharedPostureCache(tmp_path).get(FP, NOW) is None
    assert cache_dir(tmp_path).is_dir()
