"""How many refusal lines one caller may write: a budget per interval, then one summary.

Without it, one device sending junk as fast as it can (each call refused) would fill the
decision log and rotate every other device's history away. Each caller (its device id, or
its peer address when no certificate was verified) may write ``burst`` refusal lines per
``interval_s``; further refusals in that interval are counted by code and method, and one
summary line says how many there were ("N further refusals ..."), so the chain stays whole
and nothing is silently lost. Allowed calls are never limited. Pure: the caller passes the
time (monotonic seconds).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_CALLERS = 10_000
"""Callers tracked at once; beyond it the oldest windows are summarised and dropped."""
MAX_KINDS = 20
"""Distinct (code, method) pairs a summary names; the rest are counted as ``other``."""


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: Counter[tuple[str, str]] = field(default_factory=Counter)
    first_suppressed: float | None = None
    last_suppressed: float | None = None


@dataclass(frozen=True)
class RefusalSummary:
    """Refusals of one caller that were counted instead of written, in one window."""

    caller: str
    count: int
    by_kind: tuple[tuple[str, str, int], ...]
    """(code, method, count), most frequent first; ('other', '', n) for the rest."""
    since: float
    until: float


class RefusalBudget:
    def __init__(self, burst: int, interval_s: float) -> None:
        if burst < 1 or interval_s <= 0:
            raise ValueError(f"got burst={burst}, interval_s={interval_s}; expected >= 1, > 0")
        self.burst = burst
        self.interval_s = interval_s
        self._windows: dict[str, _Window] = {}

    def admit(
        self, caller: str, code: str, method: str, now: float
    ) -> tuple[bool, RefusalSummary | None]:
        """Whether this refusal gets its own line, and the summary of the caller's previous
        window when it has just ended (write that one first)."""
        window = self._windows.get(caller)
        summary = None
        if window is not None and now - window.start >= self.interval_s:
            summary = self._summary(caller, window)
            window = None
        if window is None:
            if len(self._windows) >= MAX_CALLERS:
                self._evict()
            window = self._windows[caller] = _Window(now)
        if window.written < self.burst:
            window.written += 1
            return True, summary
        window.suppressed[(code, method)] += 1
        if window.first_suppressed is None:
            window.first_suppressed = now
        window.last_suppressed = now
        return False, summary

    def due(self, now: float) -> list[RefusalSummary]:
        """Summaries of windows that have ended (callers that went quiet); they are closed."""
        out = []
        for caller, window in list(self._windows.items()):
            if now - window.start >= self.interval_s:
                del self._windows[caller]
                summary = self._summary(caller, window)
                if summary is not None:
                    out.append(summary)
        return out

    def _evict(self) -> None:
        oldest = min(self._windows, key=lambda c: self._windows[c].start)
        del self._windows[oldest]  # its suppressed count is lost only past MAX_CALLERS

    @staticmethod
    def _summary(caller: str, window: _Window) -> RefusalSummary | None:
        count = sum(window.suppressed.values())
        if count == 0:
            return None
        kinds = window.suppressed.most_common()
        named = tuple((code, method, n) for (code, method), n in kinds[:MAX_KINDS])
        rest = sum(n for _, n in kinds[MAX_KINDS:])
        if rest:
            named = (*named, ("other", "", rest))
        assert window.first_suppressed is not None and window.last_suppressed is not None
        return RefusalSummary(caller, count, named, window.first_suppressed, window.last_suppressed)
