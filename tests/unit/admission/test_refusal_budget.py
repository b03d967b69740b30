"""The refusal budget: a burst of lines per caller and interval, then one summary."""

from __future__ import annotations

import pytest

from ztagent.admission.refusal_budget import MAX_KINDS, RefusalBudget


def test_a_burst_then_counting_then_one_summary() -> None:
    budget = RefusalBudget(burst=3, interval_s=60)
    assert [budget.admit("dev", "policy_denied", "Put", t)[0] for t in range(5)] == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert budget.admit("other", "cert_revoked", "Get", 4.0) == (True, None)  # its own budget
    write, summary = budget.admit("dev", "policy_denied", "Put", 61.0)  # the next window
    assert write
    assert summary is not None and summary.count == 2
    assert summary.by_kind == (("policy_denied", "Put", 2),)
    assert (summary.since, summary.until) == (3.0, 4.0)


def test_quiet_callers_are_summarised_when_due() -> None:
    budget = RefusalBudget(burst=1, interval_s=10)
    budget.admit("dev", "a", "M", 0.0)
    budget.admit("dev", "a", "M", 1.0)
    budget.admit("calm", "a", "M", 1.0)  # within its budget: no summary
    assert budget.due(5.0) == []
    (summary,) = budget.due(10.0)
    assert summary.caller == "dev" and summary.count == 1
    assert budget.due(100.0) == []


def test_a_summary_names_at_most_max_kinds() -> None:
    budget = RefusalBudget(burst=1, interval_s=10)
    budget.admit("dev", "x", "M", 0.0)
    for i in range(MAX_KINDS + 5):
        budget.admit("dev", "junk", f"M{i}", 1.0)
    (summary,) = budget.due(10.0)
    assert len(summary.by_kind) == MAX_KINDS + 1
    assert summary.by_kind[-1] == ("other", "", 5)


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="expected >= 1"):
        RefusalBudget(burst=0, interval_s=1)
