"""How many refusal lines one caller may write: a budget per interval, then one summary.

Without it, one device sending junk as fast as it can (each call refused) would fill the
decision log and rotate every other device's history away. Each caller (a key the admission
core chooses: the device id, else the certificate, else the address) may write ``burst``
refusal lines per ``interval_s``; further refusals in that interval are counted by code and
method, and one summary line says how many there were ("N further refusals ..."), so the
chain stays whole and nothing is silently lost. Allowed calls are never limited. Pure: the
caller passes the time (monotonic seconds).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_CALLERS = 10_000
"""Callers tracked at once; beyond it the oldest window is closed early and summarised."""
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
    ) -> tuple[bool, tuple[RefusalSummary, ...]]:
        """Whether this refusal gets its own line, and the summaries to write first: the
        caller's previous window when it has just ended, and the oldest caller's when the
        table was full (closed early, so its count is written, not lost)."""
        summaries: list[RefusalSummary] = []
        window = self._windows.get(caller)
        if window is not None and now - window.start >= self.interval_s:
            del self._windows[caller]  # re-inserted below: the table stays in start order
            summaries.extend(self._closed(caller, window))
            window = None
        if window is None:
            if len(self._windows) >= MAX_CALLERS:
                oldest = next(iter(self._windows))  # O(1): windows are kept in start order
                summaries.extend(self._closed(oldest, self._windows.pop(oldest)))
            window = self._windows[caller] = _Window(now)
        if window.written < self.burst:
            window.written += 1
            return True, tuple(summaries)
        window.suppressed[(code, method)] += 1
        if window.first_suppressed is None:
            window.first_suppressed = now
        window.last_suppressed = now
        return False, tuple(summaries)

    def due(self, now: float) -> list[RefusalSummary]:
        """Summaries of windows that have ended (callers that went quiet); they are closed."""
        out: list[RefusalSummary] = []
        while self._windows:
            caller, window = next(iter(self._windows.items()))
            if now - window.start < self.interval_s:
                break  # the rest started later
            del self._windows[caller]
            out.extend(self._closed(caller, window))
        return out

    @staticmethod
    def _closed(caller: str, window: _Window) -> tuple[RefusalSummary, ...]:
        """The summary of a closed window, if it counted any refusal."""
        count = sum(window.suppressed.values())
        if count == 0:
            return ()
        kinds = window.suppressed.most_common()
        named = tuple((code, method, n) for (code, method), n in kinds[:MAX_KINDS])
        rest = sum(n for _, n in kinds[MAX_KINDS:])
        if rest:
            named = (*named, ("other", "", rest))
        assert window.first_suppressed is not None and window.last_suppressed is not None
        return (
            RefusalSummary(caller, count, named, window.first_suppressed, window.last_suppressed),
        )
