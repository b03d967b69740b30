"""Renewal timing and the retry schedule of ``renew_watch``: pure, with fake sleep and clock."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztagent.device import enroll as client
from ztagent.device.enroll import (
    RENEW_BACKOFF,
    WALL_CLOCK_RECHECK_S,
    default_renew_server,
    renew_at,
    renew_due,
    renew_watch,
    token_device_id,
)
from ztagent.device.errors import CaUnreachable, EnrollClientError
from ztagent.device.keystores import FileKeyStore
from ztagent.enrollment import EnrollError

T0 = datetime(2026, 11, 1, tzinfo=UTC)
LIFETIME = timedelta(days=3)


def _cert(key: ec.EllipticCurvePrivateKey, device_id: str = "dev-1") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0xABC)
        .not_valid_before(T0)
        .not_valid_after(T0 + LIFETIME)
        .sign(key, hashes.SHA256())
    )


def _device_dir(tmp_path: Path) -> tuple[Path, x509.Certificate]:
    """A minimal enrolled directory (self-signed cert): enough for the watch's timing."""
    out = tmp_path / "dev"
    out.mkdir()
    store = FileKeyStore.create(out / "device.key")
    key = serialization.load_pem_private_key(store.private_key_pem(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = _cert(key)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (out / "device.pem").write_bytes(pem)
    (out / "ca-bundle.pem").write_bytes(pem)
    (out / "keystore.json").write_text('{"type": "file"}')
    (out / "enrollment.json").write_text(
        json.dumps({"device_id": "dev-1", "server": "ca:8444", "renew_server": "ca:8445"})
    )
    return out, cert


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)


# --- pure pieces -------------------------------------------------------------------------


def test_backoff_schedule_doubles_to_the_cap() -> None:
    backoff = RENEW_BACKOFF
    far = 10 * 86400.0
    assert [backoff.delay(n, far, lambda: 0.0) for n in range(1, 12)] == [
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0,
    ]  # fmt: skip
    # full jitter factor: half the base at worst, never more than the base
    assert backoff.delay(4, far, lambda: 1.0) == 4.0
    assert backoff.delay(4, far, lambda: 0.5) == 6.0


def test_backoff_never_sleeps_past_half_the_time_left() -> None:
    backoff = RENEW_BACKOFF
    assert backoff.delay(12, remaining_s=100.0, rng=lambda: 0.0) == 50.0
    assert backoff.delay(12, remaining_s=0.5, rng=lambda: 0.0) == 1.0  # the floor


def test_renew_due_at_two_thirds(tmp_path: Path) -> None:
    _, cert = _device_dir(tmp_path)
    assert renew_at(cert) == T0 + timedelta(days=2)
    assert not renew_due(cert, T0 + timedelta(days=2) - timedelta(seconds=1))
    assert renew_due(cert, T0 + timedelta(days=2))


def test_default_renew_server() -> None:
    assert default_renew_server("ca.example:8444") == "ca.example:8445"
    assert default_renew_server("[::1]:8444") == "[::1]:8445"
    assert default_renew_server("ca.example") == "ca.example:8445"


def _b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def test_token_device_id_is_read_without_verifying() -> None:
    token = f"{_b64({'alg': 'ES256'})}.{_b64({'device_id': 'dev-9', 'sub': 'dev-9'})}.sig"
    assert token_device_id(token) == "dev-9"
    with pytest.raises(EnrollClientError, match="token_unreadable"):
        token_device_id("not-a-token")
    with pytest.raises(EnrollClientError, match="token_unreadable"):
        token_device_id(f"{_b64({})}.{_b64({'sub': 'x'})}.sig")


# --- the watch, with the RPC replaced --------------------------------------------------


async def _unreachable(*_: Any, **__: Any) -> Any:
    raise CaUnreachable("Renew", "UNAVAILABLE", "connection refused")


async def test_watch_sleeps_until_due_then_retries_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cert = _device_dir(tmp_path)
    monkeypatch.setattr(client, "call_ca", _unreachable)
    fake = FakeTime(T0 + timedelta(hours=1))
    results = await renew_watch(
        out, sleep=fake.sleep, clock=fake.clock, rng=lambda: 0.0, max_attempts=5
    )
    assert results == []
    first_wait = (renew_at(cert) - (T0 + timedelta(hours=1))).total_seconds()
    waiting, retries = fake.sleeps[:-5], fake.sleeps[-5:]
    assert sum(waiting) == pytest.approx(first_wait)  # in slices that re-read the clock
    assert max(waiting) <= WALL_CLOCK_RECHECK_S
    assert retries == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert not (out / ".device.key.new").exists()  # each failed attempt dropped its new key


async def test_watch_renews_at_once_after_a_forward_clock_jump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock jumps past the renewal point while the watch waits (a suspended node,
    a corrected clock): it renews within one recheck, not after the old computed wait."""
    out, cert = _device_dir(tmp_path)
    monkeypatch.setattr(client, "call_ca", _unreachable)
    fake = FakeTime(T0 + timedelta(hours=1))
    jumped: list[bool] = []

    async def sleep(seconds: float) -> None:
        await fake.sleep(seconds)
        if not jumped:  # after the first slice: the clock steps to just past renewal time
            jumped.append(True)
            fake.now = renew_at(cert) + timedelta(seconds=5)

    await renew_watch(out, sleep=sleep, clock=fake.clock, rng=lambda: 0.0, max_attempts=1)
    # one slice, then at once the attempt (the CA is down: then the first backoff, 1 s),
    # not the ~2 days the wait was computed to be
    assert fake.sleeps == [WALL_CLOCK_RECHECK_S, 1.0]


async def test_watch_keeps_trying_until_expiry_then_reports_cert_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cert = _device_dir(tmp_path)
    monkeypatch.setattr(client, "call_ca", _unreachable)
    fake = FakeTime(renew_at(cert))
    with pytest.raises(EnrollClientError, match=r"cert_expired: .*fresh bootstrap token"):
        await renew_watch(out, sleep=fake.sleep, clock=fake.clock, rng=lambda: 0.0)
    assert fake.now >= cert.not_valid_after_utc
    assert max(fake.sleeps) == 300.0  # the cap
    # it went on until the certificate expired: the last tries came ever closer together
    assert fake.sleeps[-1] == 1.0
    assert len(fake.sleeps) > 24 * 3600 / 300


async def test_watch_stops_on_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, cert = _device_dir(tmp_path)

    async def revoked(*_: Any, **__: Any) -> Any:
        raise EnrollError("renew_cert_revoked", "serial abc is revoked")

    monkeypatch.setattr(client, "call_ca", revoked)
    fake = FakeTime(renew_at(cert))
    with pytest.raises(EnrollError, match="renew_cert_revoked"):
        await renew_watch(out, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


async def test_watch_logs_a_failing_ca_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Five failed attempts: one WARNING with the reason (no traceback), the rest at DEBUG."""
    out, cert = _device_dir(tmp_path)
    monkeypatch.setattr(client, "call_ca", _unreachable)
    fake = FakeTime(renew_at(cert))
    caplog.set_level("DEBUG", logger="ztagent.device.enroll")
    await renew_watch(out, sleep=fake.sleep, clock=fake.clock, rng=lambda: 0.0, max_attempts=5)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "failing: " in warnings[0].getMessage()
    assert "connection refused" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
    assert sum("failed again" in r.getMessage() for r in caplog.records) == 4
