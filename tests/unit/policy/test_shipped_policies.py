"""The shipped policies (``policies/``): their Rego tests pass, their schemas hold.

The policies are loaded into Regorus directly (the embedded engine's interpreter), so a
failing ``test_*`` rule in ``policies/*_test.rego`` fails ``make test``. The agreement of OPA
with Regorus on the same files is in ``tests/integration/test_opa_agreement.py``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
import regorus

from tests.fixtures.opa_standin import PolicySources, all_test_refs, read_policy_dir
from tests.fixtures.policy_inputs import INFERENCE, POLICIES, STORAGE, make_input

DECISION = "data.ztagent.authz.decision"

SOURCES = read_policy_dir(POLICIES)
TEST_REFS = all_test_refs(SOURCES)


def regorus_engine(sources: PolicySources, *, with_tests: bool) -> regorus.Engine:
    engine = regorus.Engine()
    modules = sources.with_tests() if with_tests else sources.modules
    for name, text in modules.items():
        engine.add_policy(name, text)
    engine.add_data(sources.data)
    return engine


@pytest.fixture(scope="module")
def engine() -> regorus.Engine:
    return regorus_engine(SOURCES, with_tests=True)


def _schema(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((POLICIES / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


INPUT_SCHEMA = _schema("input.schema.json")
DECISION_SCHEMA = _schema("decision.schema.json")

# (id, input, expected allow, a reason that must be present)
MATRIX: list[tuple[str, dict[str, Any], bool, str]] = [
    ("reader_get", make_input(roles=["reader"]), True, "role_granted:reader"),
    ("reader_list", make_input(roles=["reader"], method="List"), True, "allowed"),
    ("scope_read_watch", make_input(scope=["storage.read"], method="Watch"), True, "allowed"),
    ("writer_put", make_input(roles=["writer"], method="Put"), True, "role_granted:writer"),
    ("writer_bulkput", make_input(roles=["writer"], method="BulkPut"), True, "allowed"),
    ("reader_put", make_input(roles=["reader"], method="Put"), False, "role_required:writer"),
    ("reader_delete", make_input(roles=["reader"], method="Delete"), False, "role_required:writer"),
    ("no_user", make_input(anonymous=True), False, "user_unauthenticated"),
    ("unknown_method", make_input(roles=["writer"], method="Drop"), False, "method_not_allowed"),
    (
        "unknown_service",
        make_input(service="x.v1.Shell", method="Exec"),
        False,
        "method_not_allowed",
    ),
    (
        "inference_scope",
        make_input(scope=["inference"], service=INFERENCE, method="Predict"),
        True,
        "scope_granted:inference",
    ),
    (
        "inference_no_scope",
        make_input(roles=["writer"], service=INFERENCE, method="ListModels"),
        False,
        "scope_required:inference",
    ),
    (
        "critical_model_no_posture",
        make_input(
            scope=["inference"],
            service=INFERENCE,
            method="Predict",
            metadata={"x-model": "critical-demo"},
        ),
        False,
        "posture_required",
    ),
    (
        "critical_model_with_posture",
        make_input(
            scope=["inference"],
            service=INFERENCE,
            method="Predict",
            posture=True,
            metadata={"x-model": "critical-demo"},
        ),
        True,
        "scope_granted:inference",
    ),
    (
        "health_open_anonymous",
        make_input(anonymous=True, service="grpc.health.v1.Health", method="Check"),
        True,
        "open_method",
    ),
]


# --- Rego tests --------------------------------------------------------------------------


def test_shipped_tests_are_found() -> None:
    packages = {ref.rsplit(".", 1)[0] for ref in TEST_REFS}
    assert packages == {"data.ztagent.authz_test", "data.ztagent.posture_test"}
    assert len(TEST_REFS) >= 30


@pytest.mark.parametrize("ref", TEST_REFS, ids=[r.removeprefix("data.") for r in TEST_REFS])
def test_shipped_rego_test_passes(engine: regorus.Engine, ref: str) -> None:
    assert engine.eval_rule(ref) is True, f"{ref} failed (undefined or false) in Regorus"


def test_a_broken_policy_fails_its_rego_tests() -> None:
    """The Rego tests can fail: drop the writer role from Put and they catch it."""
    modules = dict(SOURCES.modules)
    broken = copy.deepcopy(SOURCES.data)
    broken["ztagent"]["config"]["services"][STORAGE]["methods"]["Put"]["roles"] = ["reader"]
    engine = regorus_engine(PolicySources(modules, SOURCES.tests, broken), with_tests=True)
    failed = [ref for ref in TEST_REFS if engine.eval_rule(ref) is not True]
    assert "data.ztagent.authz_test.test_reader_put_denied" in failed


# --- the decision --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inp", "allow", "reason"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX]
)
def test_matrix_decision(
    engine: regorus.Engine, inp: dict[str, Any], allow: bool, reason: str
) -> None:
    INPUT_SCHEMA.validate(inp)
    engine.set_input(inp)
    decision = engine.eval_rule(DECISION)
    DECISION_SCHEMA.validate(decision)
    assert decision["allow"] is allow
    assert reason in decision["reasons"]
    assert decision["headers"]["x-ztagent-decision"] == ("allow" if allow else "deny")
    assert ("allowed" in decision["reasons"]) is allow


def test_user_header_only_when_authenticated(engine: regorus.Engine) -> None:
    engine.set_input(make_input(roles=["reader"]))
    assert engine.eval_rule(DECISION)["headers"]["x-ztagent-user"] == "alice"
    engine.set_input(make_input(anonymous=True))
    assert "x-ztagent-user" not in engine.eval_rule(DECISION)["headers"]


def test_default_data_requires_no_posture_for_storage(engine: regorus.Engine) -> None:
    for method, role in [("Get", "reader"), ("Put", "writer")]:
        engine.set_input(make_input(roles=[role], method=method))
        assert engine.eval_rule(DECISION)["allow"] is True


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inp",
    [
        make_input(roles=["reader"]),
        make_input(anonymous=True),
        make_input(roles=["writer"], posture=True),
        make_input(anonymous=True, posture=True, metadata={}),
    ],
    ids=["authenticated", "anonymous", "with_posture", "anonymous_with_posture"],
)
def test_realistic_inputs_validate(inp: dict[str, Any]) -> None:
    INPUT_SCHEMA.validate(inp)


def _without(inp: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(inp)
    del out[key]
    return out


def _patched(inp: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(inp)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


GOOD = make_input(roles=["reader"])


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (_without(GOOD, "device"), "'device' is a required property"),
        ({**GOOD, "extra": 1}, "Additional properties are not allowed"),
        (_patched(GOOD, ["user", "authenticated"], "yes"), "is not of type 'boolean'"),
        (_patched(GOOD, ["user", "roles"], "reader"), "is not of type 'array'"),
        (_patched(GOOD, ["device", "fingerprint_sha256"], "AB"), "does not match"),
        (_patched(GOOD, ["posture", "age_s"], "old"), "is not of type 'number', 'null'"),
        (_patched(GOOD, ["request", "metadata"], {"x-a": 1}), "is not of type 'string'"),
        (_patched(GOOD, ["request", "peer2"], "x"), "Additional properties are not allowed"),
        (_patched(GOOD, ["context", "time"], "yesterday"), "does not match"),
        (_patched(make_input(anonymous=True), ["user", "sub"], "alice"), "is not of type 'null'"),
    ],
    ids=[
        "missing_device",
        "extra_top_key",
        "authenticated_wrong_type",
        "roles_wrong_type",
        "bad_fingerprint",
        "age_wrong_type",
        "metadata_value_not_string",
        "extra_request_key",
        "bad_time",
        "anonymous_with_sub",
    ],
)
def test_malformed_input_is_rejected(bad: dict[str, Any], needle: str) -> None:
    with pytest.raises(jsonschema.ValidationError, match=needle):
        INPUT_SCHEMA.validate(bad)


def test_open_objects_stay_open() -> None:
    inp = _patched(GOOD, ["user", "claims"], {"anything": {"nested": [1, 2]}})
    inp = _patched(inp, ["posture", "host"], {"psutil": {"cpu": 4}})
    inp = _patched(inp, ["request", "metadata"], {"x-anything": "v"})
    INPUT_SCHEMA.validate(inp)


@pytest.mark.parametrize(
    "bad",
    [
        {"allow": True, "reasons": ["allowed"]},
        {"allow": "true", "reasons": ["allowed"], "headers": {}},
        {"allow": False, "reasons": [], "headers": {}},
        {"allow": False, "reasons": ["x"], "headers": {"x-a": 1}},
        {"allow": False, "reasons": ["x"], "headers": {}, "why": "?"},
    ],
    ids=["no_headers", "allow_string", "no_reasons", "header_not_string", "extra_key"],
)
def test_decision_schema_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        DECISION_SCHEMA.validate(bad)
