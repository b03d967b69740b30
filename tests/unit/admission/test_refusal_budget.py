"""The refusal budget: a burst of lines per caller and interval, then one summary."""

from __future__ import annotations

import pytest

from ztagent.admission import refusal_budget
from ztagent.admission.refusal_budget import MAX_KINDS, RefusalBudget


def test_a_burst_then_counting_then_one_summary() -> None:
    budget = RefusalBudget(burst=3, interval_s=60)
    assert [budget.admit("dev", "policy_denied", "Put", t)[0] for t in range(5)] == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert budget.admit("other", "cert_revoked", "Get", 4.0) == (True, ())  # its own budget
    write, (summary,) = budget.admit("dev", "policy_denied", "Put", 61.0)  # the next window
    assert write
    assert summary.count == 2
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


def test_a_renewed_window_is_due_after_older_ones() -> None:
    """``due`` walks the windows oldest first and stops at the first still open: a caller
    whose window was renewed must move behind the others, or their summaries would wait."""
    budget = RefusalBudget(burst=1, interval_s=10)
    budget.admit("early", "a", "M", 0.0)
    budget.admit("later", "a", "M", 5.0)
    budget.admit("later", "a", "M", 6.0)  # counted
    budget.admit("early", "a", "M", 11.0)  # a new window for "early", open until 21
    (summary,) = budget.due(16.0)
    assert summary.caller == "later" and summary.count == 1


def test_a_full_table_closes_the_oldest_window_with_its_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``MAX_CALLERS`` the oldest caller's window is closed early: its counted refusals
    come back as a summary to write, never dropped."""
    monkeypatch.setattr(refusal_budget, "MAX_CALLERS", 3)
    budget = RefusalBudget(burst=1, interval_s=60)
    for caller in ("a", "b", "c"):
        budget.admit(caller, "x", "M", 1.0)
    budget.admit("a", "x", "M", 2.0)  # counted
    write, (summary,) = budget.admit("d", "x", "M", 3.0)
    assert write and summary.caller == "a" and summary.count == 1
    assert budget.admit("b", "x", "M", 4.0) == (False, ())  # b's window is still open
    assert [s.caller for s in budget.due(100.0)] == ["b"]


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
