"""Log a dependency that keeps failing without flooding the log.

A fetcher polling an unreachable CA or issuer every few seconds used to print one WARNING per
attempt. ``FailureLog`` prints one line when the dependency starts failing (with the reason),
one summary per ``summary_interval_s`` while it keeps failing (attempts so far and the latest
reason), and one line when it recovers. Every attempt in between goes to DEBUG. ``failures``
counts every failed attempt, for a metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DEFAULT_SUMMARY_INTERVAL_S = 300.0


class FailureLog:
    """The failure state of one dependency, named ``what`` in every line."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        summary_interval_s: float = DEFAULT_SUMMARY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._interval = summary_interval_s
        self._clock = clock
        self.failures = 0
        """Failed attempts since start (never reset: a counter)."""
        self._streak = 0
        self._since: float | None = None
        self._last_line = 0.0

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, reason: str) -> None:
        now = self._clock()
        self.failures += 1
        self._streak += 1
        if self._since is None:
            self._since = self._last_line = now
            self._log.warning("%s failing: %s", self._what, reason)
        elif now - self._last_line >= self._interval:
            self._last_line = now
            self._log.warning(
                "%s still failing after %d attempts over %.0f s: %s",
                self._what,
                self._streak,
                now - self._since,
                reason,
            )
        else:
            self._log.debug("%s failed again: %s", self._what, reason)

    def succeeded(self) -> None:
        if self._since is not None:
            self._log.warning(
                "%s recovered after %d failed attempts over %.0f s",
                self._what,
                self._streak,
                self._clock() - self._since,
            )
        self._since = None
        self._streak = 0
