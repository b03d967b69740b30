"""The embedded engine (Regorus) and the remote path (OpaEngine -> OPA) agree on ``policies/``.

No OPA binary is installable here: the remote side is the OPA-REST stand-in of
``tests/fixtures/opa_standin.py``, which evaluates with real OPA code (OPA's Go ``rego``
package through ``opa-golib-python-bindings``) and is reached over HTTP on 127.0.0.1 by
``ztagent.policy.opa.OpaEngine``. Both sides load the same files with OPA bundle semantics.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import regorus
from opa_client.opa_async import AsyncOpaClient

from tests.fixtures.opa_standin import OpaStandin, all_test_refs, read_policy_dir
from tests.fixtures.policy_inputs import INFERENCE, POLICIES, STORAGE, make_input
from ztagent.policy.opa import OpaEngine
from ztagent.policy.types import DEFAULT_DECISION_PATH, Decision

pytestmark = pytest.mark.integration

SOURCES = read_policy_dir(POLICIES)
DENIED_DEVICE = "revoked-01"

DEVICES = ["demo-device", DENIED_DEVICE]
USERS: dict[str, dict[str, Any]] = {
    "anonymous": {"anonymous": True},
    "reader": {"roles": ["reader"]},
    "writer": {"roles": ["writer"]},
    "scoped": {"scope": ["storage.read", "inference"]},
}
CALLS: dict[str, dict[str, Any]] = {
    "storage_get": {"service": STORAGE, "method": "Get"},
    "storage_put": {"service": STORAGE, "method": "Put"},
    "storage_watch": {"service": STORAGE, "method": "Watch"},
    "predict_critical": {
        "service": INFERENCE,
        "method": "Predict",
        "metadata": {"x-model": "critical-demo"},
    },
    "list_models": {"service": INFERENCE, "method": "ListModels"},
    "unknown": {"service": STORAGE, "method": "Drop"},
    "health": {"service": "grpc.health.v1.Health", "method": "Check"},
}
POSTURE = [False, True]

MATRIX = [
    (f"{device}-{user}-{call}-{'posture' if posture else 'noposture'}", device, user, call, posture)
    for device, user, call, posture in itertools.product(DEVICES, USERS, CALLS, POSTURE)
]


def data_with_deny_list() -> dict[str, Any]:
    """The shipped data plus a deny list, so the device dimension matters."""
    data = copy.deepcopy(SOURCES.data)
    data["ztagent"]["config"]["devices"]["deny"] = [DENIED_DEVICE]
    return data


def build_input(device: str, user: str, call: str, posture: bool) -> dict[str, Any]:
    return make_input(device=device, posture=posture, **USERS[user], **CALLS[call])


@pytest.fixture(scope="module")
def regorus_engine() -> regorus.Engine:
    engine = regorus.Engine()
    for name, text in SOURCES.with_tests().items():
        engine.add_policy(name, text)
    engine.add_data(data_with_deny_list())
    return engine


@pytest.fixture
async def standin() -> AsyncIterator[OpaStandin]:
    server = OpaStandin()
    server.load_dir(POLICIES, include_tests=True)
    server.put_data("", data_with_deny_list())
    await server.start()
    yield server
    await server.stop()
    server.close()


@pytest.fixture
async def opa_engine(standin: OpaStandin) -> AsyncIterator[OpaEngine]:
    engine = OpaEngine(standin.url, timeout_s=5.0)
    yield engine
    await engine.close()


def test_matrix_is_large_and_mixed(regorus_engine: regorus.Engine) -> None:
    assert len(MATRIX) >= 12
    outcomes = set()
    for _, device, user, call, posture in MATRIX:
        regorus_engine.set_input(build_input(device, user, call, posture))
        decision = regorus_engine.eval_rule(DEFAULT_DECISION_PATH)
        outcomes.add(decision["allow"])
        outcomes.update(decision["reasons"])
    # every kind of outcome occurs, so agreement below is not agreement on one answer
    for reason in (
        True,
        False,
        "device_denied",
        "user_unauthenticated",
        "role_required:writer",
        "scope_required:inference",
        "posture_required",
        "method_not_allowed",
        "open_method",
        "scope_granted:inference",
    ):
        assert reason in outcomes


async def test_engines_agree(regorus_engine: regorus.Engine, opa_engine: OpaEngine) -> None:
    disagreements = []
    for case_id, device, user, call, posture in MATRIX:
        inp = build_input(device, user, call, posture)
        regorus_engine.set_input(inp)
        embedded = Decision.from_result(regorus_engine.eval_rule(DEFAULT_DECISION_PATH), "")
        remote = await opa_engine.evaluate(inp)
        mine = (embedded.allow, embedded.reasons, dict(embedded.headers))
        theirs = (remote.allow, remote.reasons, dict(remote.headers))
        if mine != theirs:
            disagreements.append((case_id, mine, theirs))
    assert disagreements == []


def test_regorus_passes_every_shipped_test(regorus_engine: regorus.Engine) -> None:
    refs = all_test_refs(SOURCES)
    assert refs
    failed = [ref for ref in refs if regorus_engine.eval_rule(ref) is not True]
    assert failed == []


async def test_opa_passes_every_shipped_test(standin: OpaStandin) -> None:
    refs = all_test_refs(SOURCES)
    assert refs
    failed = []
    async with AsyncOpaClient(host="127.0.0.1", port=standin.port, retries=0) as client:
        for ref in refs:
            body = await client.query_rule({}, ref.removeprefix("data."))
            if body.get("result") is not True:
                failed.append(ref)
    assert failed == []
