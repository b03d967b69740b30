"""The soak's oracle catches each kind of wrong decision and loss it is there to catch.

Histories are built by hand; the policy replay is the real one (``ztagent policy replay``'s
library call on the shipped policy), so a logged decision the policy would not make is
found by evaluating it, not by a stub.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from soak.history import CallRecord, FaultEvent, History, ReadBack, Write
from soak.oracle import Bounds, LogCheck, Replay, check, percentiles
from tests.fixtures.policy_inputs import POLICIES, make_input
from ztagent.policy.authoring import replay

BOUNDS = Bounds(revocation_s=5.0, policy_s=4.0)
T = 1_800_000_000.0
PUT = "/ztagent.workloads.v1.Storage/Put"


def _time(t: float) -> str:
    moment = datetime.fromtimestamp(t, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def call(cid: str, t: float, *, device: str = "dev", status: str = "OK", **kw: Any) -> CallRecord:
    return CallRecord(cid, device, kw.pop("user", "alice"), PUT, "unary", t, t + 0.01, status, **kw)


def line(
    cid: str, t: float, *, revision: str = "r1", allow: bool = True, **kw: Any
) -> dict[str, Any]:
    """A decision-log line as the sidecar writes it, for alice (writer) putting."""
    doc = make_input(device=kw.pop("device", "dev"), roles=["writer"], method="Put",
                     metadata={"x-soak-call": cid})  # fmt: skip
    return {
        "decision_id": f"d-{cid}",
        "time": _time(t),
        "device_id": doc["device"]["id"],
        "allow": allow,
        "enforced": allow,
        "reasons": kw.pop("reasons", ["allowed", "role_granted:writer"]),
        "refusal": None,
        "policy_revision": revision,
        "input": doc,
        **kw,
    }


@pytest.fixture
def real_replay(tmp_path: Path) -> Replay:
    """Every revision is the shipped policy directory, replayed for real."""

    def run(revision: str, lines: Sequence[Mapping[str, Any]]) -> list[str]:
        path = tmp_path / f"{revision}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        report = replay(path, POLICIES)
        return [str(c.decision_id) for c in report.changed]

    return run


def base_history() -> History:
    history = History()
    history.faults.append(FaultEvent(T - 100, "policy_publish", revision="r1"))
    return history


def kinds(report: Any) -> list[str]:
    return sorted(v.kind for v in report.violations)


def test_a_clean_history_passes(real_replay: Replay) -> None:
    history = base_history()
    history.calls.append(call("c1", T))
    history.writes.append(Write("k", "v", "dev", T))
    history.reads.append(ReadBack("k", "dev", "v"))
    report = check(history, [line("c1", T)], real_replay, BOUNDS)
    assert report.ok, report.violations
    assert report.calls == 1 and report.allowed == 1 and report.replayed_lines == 1
    assert report.writes_read_back == 1


def test_allowed_after_revocation_plus_bound_is_a_wrong_decision(real_replay: Replay) -> None:
    history = base_history()
    history.faults.append(FaultEvent(T, "revoke", device="victim"))
    history.calls += [
        call("early", T + 1.0, device="victim"),  # inside the propagation bound: fine
        call("cut", T + 2.0, device="victim", status="UNAUTHENTICATED", code="cert_revoked"),
        call("late", T + 6.0, device="victim"),  # after T + 5 s: wrong
    ]
    lines = [line(c, t, device="victim") for c, t in (("early", T + 1.0), ("late", T + 6.0))]
    report = check(history, lines, real_replay, BOUNDS)
    assert [v.kind for v in report.wrong_decisions] == ["allowed_after_revocation"]
    assert report.wrong_decisions[0].call_id == "late"
    assert report.revocation_propagation_s == [pytest.approx(2.01)]
    assert report.refusals_by_code["cert_revoked"] == 1


def test_a_revocation_while_the_ca_is_down_counts_from_its_return(real_replay: Replay) -> None:
    history = base_history()
    history.faults += [
        FaultEvent(T - 1, "ca_down"),
        FaultEvent(T, "revoke", device="victim"),
        FaultEvent(T + 20, "ca_up"),
    ]
    history.calls.append(call("c", T + 10, device="victim"))  # the sidecar cannot know yet
    report = check(history, [line("c", T + 10, device="victim")], real_replay, BOUNDS)
    assert report.ok, report.violations


def test_a_decision_its_revision_would_not_make_is_found_by_replay(real_replay: Replay) -> None:
    history = base_history()
    history.calls.append(call("c1", T))
    # the shipped policy allows a writer's Put: a line saying it was denied did not come from it
    wrong = line("c1", T, allow=False, reasons=["role_required:writer"])
    wrong["enforced"] = True  # the call went through, as the log line says
    report = check(history, [wrong], real_replay, BOUNDS)
    assert kinds(report) == ["replay_mismatch"]
    assert report.violations[0].call_id == "c1"


def test_broken_and_stale_revisions_are_wrong_decisions(real_replay: Replay) -> None:
    history = base_history()
    history.faults += [
        FaultEvent(T, "policy_publish", revision="r2"),
        FaultEvent(T + 10, "policy_broken", revision="broken-3"),
    ]
    history.calls += [call(c, T + dt) for c, dt in (("a", 1), ("b", 8), ("c", 12), ("d", 13))]
    lines = [
        line("a", T + 1, revision="r1"),  # r2 just published, within the bound: fine
        line("b", T + 8, revision="r1"),  # r2 published 8 s ago: stale
        line("c", T + 12, revision="r2"),  # the broken one was refused: r2 serves on
        line("d", T + 13, revision="broken-3"),
    ]
    report = check(history, lines, real_replay, BOUNDS)
    assert kinds(report) == ["broken_revision_served", "stale_revision"]
    assert {v.call_id for v in report.violations} == {"b", "d"}
    assert report.policy_propagation_s == [pytest.approx(12.0)]


def test_outcome_and_log_must_agree_and_refusals_must_hold(real_replay: Replay) -> None:
    history = base_history()
    history.calls += [
        call("ok-but-denied", T),
        call("forged", T + 1, user="forged", expect="refuse"),  # allowed: wrong
        call("refused", T + 2, status="PERMISSION_DENIED", code="policy_denied"),
    ]
    denied = line("ok-but-denied", T, allow=False, reasons=["role_required:writer"])
    lines = [denied, line("forged", T + 1), line("refused", T + 2)]
    report = check(history, lines, lambda r, ls: [], BOUNDS)
    assert kinds(report) == [
        "allowed_but_logged_refused",
        "must_refuse_allowed",
        "refused_but_logged_allowed",
    ]


def test_lost_writes_unlogged_calls_and_broken_logs_are_losses(real_replay: Replay) -> None:
    history = base_history()
    history.calls += [call("c1", T), call("c2", T + 1), call("c3", T + 2)]
    history.writes += [Write("k1", "v1", "dev", T), Write("k2", "v2", "dev", T)]
    history.reads.append(ReadBack("k2", "dev", "something else"))
    report = check(
        history,
        [line("c1", T)],
        real_replay,
        BOUNDS,
        counted_lost=1,  # the sidecar counted one lost line; two calls have none
        log_checks=[LogCheck("decisions.worker0.jsonl", False, "checkpoint_head_mismatch")],
    )
    assert sorted(v.kind for v in report.losses) == [
        "log_verify_failed",
        "lost_write",
        "lost_write",
        "unlogged_beyond_counted",
    ]
    assert report.unlogged_allowed == 2
    assert not report.wrong_decisions


def test_a_valid_token_refused_for_its_key_is_reported(real_replay: Replay) -> None:
    history = base_history()
    history.calls.append(
        call("c", T, status="UNAUTHENTICATED", code="token_kid_unknown", details="kid 'x'")
    )
    report = check(history, [], real_replay, BOUNDS)
    assert kinds(report) == ["refused_valid_token"]


def test_percentiles() -> None:
    assert percentiles([]) is None
    assert percentiles([3.0, 1.0, 2.0]) == (2.0, 3.0, 3.0)
