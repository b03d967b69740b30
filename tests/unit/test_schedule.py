"""The one refresh / backoff rule shared by renewal and re-attestation."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from ztagent.schedule import Backoff, refresh_at, refresh_in

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def test_refresh_at_two_thirds_of_the_lifetime() -> None:
    assert refresh_at(T0, T0 + timedelta(days=90)) == T0 + timedelta(days=60)
    assert refresh_in(600.0) == pytest.approx(400.0)
    assert refresh_in(0.3) == 1.0  # the floor: never a busy loop
    assert refresh_in(-5.0, floor_s=2.0) == 2.0  # already past: soon, not in the past


def test_backoff_doubles_to_its_cap_with_jitter_below_the_base() -> None:
    backoff = Backoff(initial_s=1, cap_s=8)
    assert [backoff.delay(n, rng=lambda: 0.0) for n in (1, 2, 3, 4, 5, 10_000)] == [
        1, 2, 4, 8, 8, 8,
    ]  # fmt: skip
    assert backoff.delay(3, rng=lambda: 1.0) == 2.0  # jitter 0.5: half the base at worst
    assert backoff.delay(0, rng=lambda: 0.0) == 1.0


def test_backoff_never_sleeps_past_half_the_time_left() -> None:
    backoff = Backoff(initial_s=1, cap_s=300, floor_s=1)
    assert backoff.delay(12, 100.0, lambda: 0.0) == 50.0
    assert backoff.delay(12, 0.5, lambda: 0.0) == 1.0
    assert backoff.delay(12, math.inf, lambda: 0.0) == 300.0


@pytest.mark.parametrize(
    "bad", [{"initial_s": 0}, {"initial_s": 5, "cap_s": 1}, {"jitter": 1.5}, {"jitter": -0.1}]
)
def test_backoff_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="expected 0 < initial_s <= cap_s"):
        Backoff(**bad)
