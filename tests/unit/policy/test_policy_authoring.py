from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.policy._rego import AUTHZ, authz_dir, input_for, write_tree
from ztagent.policy.authoring import check, evaluate_input, list_rules, replay, run_tests
from ztagent.policy.embedded import new_engine
from ztagent.policy.errors import PolicyError, PolicyLoadError
from ztagent.policy.sources import load_dir


def test_run_tests_counts_and_names_failures(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p", tests=True)
    report = run_tests(root)
    by_name = {r.name: r for r in report.results}
    assert set(by_name) == {
        "test_alice_allowed",
        "test_bob_denied",
        "test_data_override",
        "test_wrong",
        "test_boom",
    }
    assert (report.count("PASS"), report.count("FAIL"), report.count("ERROR")) == (3, 1, 1)
    assert by_name["test_wrong"].status == "FAIL"
    assert by_name["test_wrong"].message == "undefined"
    assert by_name["test_wrong"].package == "data.ztagent.authz_test"
    assert by_name["test_wrong"].file.endswith("authz_test.rego")
    assert by_name["test_data_override"].status == "PASS"  # `with data.x as` works
    assert by_name["test_boom"].status == "ERROR"
    assert "authz_test.rego:10:" in by_name["test_boom"].message
    assert not report.ok
    assert report.coverage is None


def test_run_tests_coverage(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "lib.rego": (
                "package lib\nimport rego.v1\n\n"
                "double(x) := y if {\n  y := x * 2\n}\n\n"
                "triple(x) := y if {\n  y := x * 3\n}\n"
            ),
            "lib_test.rego": "package lib_test\nimport rego.v1\nimport data.lib\n\n"
            "test_double if lib.double(2) == 4\n",
        },
    )
    report = run_tests(root, coverage=True)
    assert report.ok and report.count("PASS") == 1
    assert report.coverage is not None
    files = {Path(f.file).name: f for f in report.coverage.files}
    lib = files["lib.rego"]
    assert 5 in lib.covered and 9 in lib.not_covered
    assert 0 < lib.percent < 100
    assert files["lib_test.rego"].percent == 100.0
    assert 0 < report.coverage.percent < 100


def test_run_tests_refuses_unparsable_file(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "p", {"x_test.rego": "package x\ntest_a if {\n"})
    with pytest.raises(PolicyLoadError, match=r"x_test\.rego:\d+:\d+"):
        run_tests(root)


def test_list_rules_from_ast(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p")
    rules = list_rules(new_engine(root, load_dir(root)))
    summary = [(r.path, r.kind, r.line) for r in rules]
    assert ("data.ztagent.authz.allow", "default", 4) in summary
    assert ("data.ztagent.authz.allow", "rule", 6) in summary
    assert ("data.ztagent.authz.decision", "rule", 13) in summary
    allow = next(r for r in rules if r.line == 6)
    assert allow.end_line == 9


def test_check_clean(tmp_path: Path) -> None:
    assert check(authz_dir(tmp_path / "clean")) == ()
    # with the tests, the one problem is the constant division by zero in test_boom
    (problem,) = check(authz_dir(tmp_path / "tests", tests=True))
    assert Path(problem.file).name == "authz_test.rego"
    assert (problem.line, problem.message) == (10, "divide by zero")


def test_check_reports_syntax_and_compile_errors(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "authz.rego": AUTHZ,
            "syntax.rego": "package s\nimport rego.v1\n\nallow if {\n  input.x ==\n}\n",
            "unsafe.rego": "package u\nimport rego.v1\n\nallow if {\n  x == 1\n}\n",
            "unknown.rego": (
                "package k\nimport rego.v1\n\nallow if {\n  input.x == 1\n  nosuch.fn(input.x)\n}\n"
            ),
        },
    )
    problems = check(root)
    found = {(Path(p.file).name, p.line, p.column): p.message for p in problems}
    assert found[("syntax.rego", 6, 1)] == "expecting expression"
    assert "unsafe" in found[("unsafe.rego", 5, 3)]
    unknown = [m for (f, line, _), m in found.items() if f == "unknown.rego" and line == 6]
    assert unknown and "nosuch.fn" in unknown[0]
    assert not any(Path(p.file).name == "authz.rego" for p in problems)
    assert str(problems[0]).count(":") >= 3


def test_check_reports_data_errors(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "p", {"a.rego": "package a\n", "d/data.json": "{\n bad"})
    (problem,) = check(root)
    assert problem.file.endswith("d/data.json") and problem.line == 2


def test_evaluate_input_with_explain(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p")
    result = evaluate_input(root, input_for("alice"), explain=True)
    assert result.decision is not None and result.decision.allow
    assert isinstance(result.raw, dict) and result.raw["allow"] is True
    assert any(p.endswith("allowed alice") for p in result.prints)
    text = "\n".join(result.explanation)
    assert "authz.rego:6: data.ztagent.authz.allow => true" in text
    assert "data.ztagent.authz.decision => " in text
    denied = evaluate_input(root, input_for("bob"), explain=False)
    assert denied.decision is not None and not denied.decision.allow
    assert denied.explanation == () and denied.prints == ()


def test_evaluate_input_extra_data_and_undefined(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "a.rego": (
                "package ztagent.authz\nimport rego.v1\n"
                'decision := {"allow": input.user.sub in data.extra.users} if data.extra\n'
            )
        },
    )
    undefined = evaluate_input(root, input_for("bob"))
    assert undefined.decision is None and undefined.raw is None
    assert undefined.error is not None and "policy_undefined" in undefined.error
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"extra": {"users": ["bob"]}}))
    result = evaluate_input(root, input_for("bob"), data_path=extra)
    assert result.decision is not None and result.decision.allow
    with pytest.raises(PolicyError, match="not defined"):
        evaluate_input(root, input_for("bob"), decision_path="data.nope.decision")


def _log_line(decision_id: str, sub: str, allow: bool, reasons: list[str]) -> str:
    return json.dumps(
        {"decision_id": decision_id, "allow": allow, "reasons": reasons, "input": input_for(sub)}
    )


def test_replay_reports_exactly_the_flipped_decisions(tmp_path: Path) -> None:
    old_policy = authz_dir(tmp_path / "old", users=["alice", "bob", "carol"])
    new_policy = authz_dir(tmp_path / "new", users=["alice", "dave"])  # bob, carol lose access
    log = tmp_path / "decisions.jsonl"
    lines = []
    for i, sub in enumerate(["alice", "bob", "eve", "carol", "alice", "mallory"], start=1):
        decision = evaluate_input(old_policy, input_for(sub)).decision
        assert decision is not None
        lines.append(_log_line(f"d{i}", sub, decision.allow, list(decision.reasons)))
    lines.insert(3, "not json at all")
    lines.insert(5, json.dumps({"decision_id": "d-noinput", "allow": True, "reasons": []}))
    lines.insert(6, "")
    lines.append("[" * 5000 + "]" * 5000)  # an edited line past the parser: reported
    log.write_text("\n".join(lines) + "\n")

    unchanged = replay(log, old_policy)
    assert unchanged.changed == ()

    report = replay(log, new_policy)
    assert report.total == 9
    assert [(c.decision_id, c.old_allow, c.new_allow) for c in report.changed] == [
        ("d2", True, False),
        ("d4", True, False),
    ]
    bob = report.changed[0]
    assert bob.line_no == 2
    assert bob.old_reasons == () and bob.new_reasons == ("user not allowed",)
    assert [(e.line_no, e.decision_id) for e in report.errors] == [
        (4, None),
        (6, "d-noinput"),
        (10, None),
    ]
    assert report.errors[2].message == "JSON nested too deeply to parse"
    assert report.revision == load_dir(new_policy).revision
