"""The one schedule rule of ztagent's refresh loops: refresh at 2/3 of a lifetime, and back
off exponentially with jitter while the other side is unreachable.

Used by certificate renewal (``device.enroll``) and re-attestation (``device.attest``); a new
loop that refreshes something with a lifetime, or retries a dependency, uses these too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

REFRESH_FRACTION = 2 / 3
"""Refresh when this much of a lifetime has passed: a third is left for retries."""


def refresh_at(start: datetime, end: datetime) -> datetime:
    """When something valid from ``start`` to ``end`` is refreshed: 2/3 of the way."""
    return start + (end - start) * REFRESH_FRACTION


def refresh_in(remaining_s: float, floor_s: float = 1.0) -> float:
    """Seconds to wait when ``remaining_s`` are left: 2/3 of them, at least ``floor_s``."""
    return max(floor_s, remaining_s * REFRESH_FRACTION)


@dataclass(frozen=True)
class Backoff:
    """Retry delay after ``failures`` consecutive failures: ``min(cap_s, initial_s *
    2**(failures-1))`` seconds, times a random factor in ``[1 - jitter, 1]``; never later than
    half of ``remaining_s`` (the time left before what is being refreshed expires, so attempts
    go on until then), and at least ``floor_s``."""

    initial_s: float = 1.0
    cap_s: float = 300.0
    jitter: float = 0.5
    floor_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.cap_s or not 0 <= self.jitter <= 1:
            raise ValueError(
                f"got initial_s={self.initial_s}, cap_s={self.cap_s}, jitter={self.jitter}; "
                "expected 0 < initial_s <= cap_s and 0 <= jitter <= 1"
            )

    def delay(
        self,
        failures: int,
        remaining_s: float = math.inf,
        rng: Callable[[], float] = random.random,
    ) -> float:
        base = min(self.cap_s, self.initial_s * 2 ** max(0, min(failures, 64) - 1))
        jittered = base * (1 - self.jitter * rng())
        return float(max(self.floor_s, min(jittered, remaining_s / 2)))
