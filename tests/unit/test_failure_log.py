"""FailureLog: one line when a dependency starts failing, a summary per interval, one on
recovery; every attempt counted."""

from __future__ import annotations

import logging

import pytest

from ztagent.failure_log import FailureLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_failure_streak_is_one_line_then_summaries_then_one_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    flog = FailureLog(logging.getLogger("t.flog"), "CRL fetch from ca://x", clock=clock)
    with caplog.at_level(logging.DEBUG, "t.flog"):
        for _ in range(150):  # every 2 s for 300 s
            flog.failed("crl_unavailable: connection refused")
            clock.now += 2
        assert _lines(caplog) == [
            "CRL fetch from ca://x failing: crl_unavailable: connection refused"
        ]
        flog.failed("crl_unavailable: timed out")
        assert _lines(caplog)[-1] == (
            "CRL fetch from ca://x still failing after 151 attempts over 300 s: "
            "crl_unavailable: timed out"
        )
        assert flog.failing and flog.failures == 151
        clock.now += 10
        flog.succeeded()
        flog.succeeded()  # nothing more to say
        assert (
            _lines(caplog)[-1]
            == "CRL fetch from ca://x recovered after 151 failed attempts over 310 s"
        )
        assert len(_lines(caplog)) == 3 and not flog.failing
        flog.failed("again")  # a new streak starts with its own first line
        assert _lines(caplog)[-1] == "CRL fetch from ca://x failing: again"
        assert flog.failures == 152
    assert not any(r.exc_info for r in caplog.records)  # never a traceback
