"""``OpaEngine`` (the remote engine) against an OPA-REST stand-in.

No OPA binary is installable here: ``tests/fixtures/opa_standin.py`` serves the few OPA REST
endpoints ztagent uses and evaluates with real OPA code (OPA's Go ``rego`` package through
``opa-golib-python-bindings``). The stand-in binds 127.0.0.1 port 0 and is stopped in the
fixture finalizer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.opa_standin import OpaStandin
from tests.fixtures.policy_inputs import POLICIES, STORAGE, make_input
from ztagent.errors import ConfigError
from ztagent.policy.errors import PolicyError
from ztagent.policy.opa import OpaEngine
from ztagent.policy.types import PolicyEngine

ALLOW_ALL = (
    'package ztagent.authz\n\ndecision := {"allow": true, "reasons": ["ok"], "headers": {}}\n'
)


@pytest.fixture
async def standin() -> AsyncIterator[OpaStandin]:
    server = OpaStandin()
    server.load_dir(POLICIES)
    await server.start()
    yield server
    await server.stop()
    server.close()


@pytest.fixture
async def engine(standin: OpaStandin) -> AsyncIterator[OpaEngine]:
    eng = OpaEngine(standin.url, timeout_s=2.0)
    yield eng
    await eng.close()


def test_implements_the_protocol() -> None:
    engine: PolicyEngine = OpaEngine()
    assert engine.maybe_reload() is False
    assert engine.revision == "opa"
    assert engine.health().ok is True


async def test_reader_get_allowed(engine: OpaEngine, standin: OpaStandin) -> None:
    decision = await engine.evaluate(make_input(roles=["reader"]))
    assert decision.allow is True
    assert decision.reasons == ("allowed", "role_granted:reader")
    assert decision.headers == {"x-ztagent-decision": "allow", "x-ztagent-user": "alice"}
    assert decision.revision == standin.revision
    assert engine.revision == standin.revision
    assert ("POST", "/v1/data/ztagent/authz/decision") in [r[:2] for r in standin.requests]


async def test_reader_put_denied(engine: OpaEngine) -> None:
    decision = await engine.evaluate(make_input(roles=["reader"], method="Put"))
    assert decision.allow is False
    assert "role_required:writer" in decision.reasons
    assert engine.health().ok is True


async def test_anonymous_denied(engine: OpaEngine) -> None:
    decision = await engine.evaluate(make_input(anonymous=True))
    assert decision.allow is False
    assert decision.reasons == ("user_unauthenticated",)


async def test_connection_is_reused(engine: OpaEngine, standin: OpaStandin) -> None:
    for method in ("Get", "List", "Watch"):
        await engine.evaluate(make_input(roles=["reader"], method=method))
    peers = {peer for _, _, peer in standin.requests}
    assert len(standin.requests) == 3
    assert len(peers) == 1


async def test_timeout(standin: OpaStandin) -> None:
    # the budget also covers the recovery call below: 50 ms was missed on a busy host
    standin.delay_s = 1.0
    engine = OpaEngine(standin.url, timeout_s=0.25)
    try:
        with pytest.raises(PolicyError, match="did not answer within 250 ms") as info:
            await engine.evaluate(make_input(roles=["reader"]))
        assert info.value.code == "policy_timeout"
        health = engine.health()
        assert health.ok is False
        assert health.last_error is not None and "policy_timeout" in health.last_error
        standin.delay_s = 0.0
        assert (await engine.evaluate(make_input(roles=["reader"]))).allow is True
        assert engine.health().ok is True
        assert engine.health().last_error is None
    finally:
        await engine.close()


@pytest.mark.parametrize("status", [500, 503, 400])
async def test_http_error(engine: OpaEngine, standin: OpaStandin, status: int) -> None:
    standin.fail_with_status = status
    with pytest.raises(PolicyError, match=f"answered HTTP {status}") as info:
        await engine.evaluate(make_input(roles=["reader"]))
    assert info.value.code == "policy_engine_error"
    assert engine.health().ok is False
    assert len(standin.requests) == 1, "no retries"


async def test_bad_json(engine: OpaEngine, standin: OpaStandin) -> None:
    standin.raw_reply = '{"result": '
    with pytest.raises(PolicyError, match="invalid JSON") as info:
        await engine.evaluate(make_input(roles=["reader"]))
    assert info.value.code == "policy_engine_error"


async def test_json_not_an_object(engine: OpaEngine, standin: OpaStandin) -> None:
    standin.raw_reply = "[1, 2]"
    with pytest.raises(PolicyError, match="expected an object") as info:
        await engine.evaluate(make_input(roles=["reader"]))
    assert info.value.code == "policy_engine_error"


async def test_stopped_standin(standin: OpaStandin) -> None:
    engine = OpaEngine(standin.url, timeout_s=2.0)
    try:
        assert (await engine.evaluate(make_input(roles=["reader"]))).allow is True
        await standin.stop()
        with pytest.raises(PolicyError) as info:
            await engine.evaluate(make_input(roles=["reader"]))
        assert info.value.code == "policy_engine_error"
        assert "OPA at" in info.value.message or "cannot reach OPA" in info.value.message
        assert engine.health().ok is False
    finally:
        await engine.close()


async def test_nothing_listening() -> None:
    standin = OpaStandin()
    await standin.start()
    url = standin.url
    await standin.stop()
    standin.close()
    engine = OpaEngine(url, timeout_s=2.0)
    try:
        with pytest.raises(PolicyError, match="cannot reach OPA") as info:
            await engine.evaluate(make_input())
        assert info.value.code == "policy_engine_error"
        assert isinstance(info.value, PolicyError)
    finally:
        await engine.close()


async def test_undefined(engine: OpaEngine, standin: OpaStandin) -> None:
    standin.put_policy("authz.rego", "package ztagent.authz\n\nother := 1\n")
    with pytest.raises(PolicyError, match="without a result") as info:
        await engine.evaluate(make_input(roles=["reader"]))
    assert info.value.code == "policy_undefined"
    assert engine.health().last_error is not None


async def test_bad_decision_shape(engine: OpaEngine, standin: OpaStandin) -> None:
    standin.put_policy("authz.rego", 'package ztagent.authz\n\ndecision := {"allow": "yes"}\n')
    with pytest.raises(PolicyError, match="'allow' must be a boolean") as info:
        await engine.evaluate(make_input(roles=["reader"]))
    assert info.value.code == "policy_bad_decision"


async def test_policies_loaded_over_rest(standin: OpaStandin, tmp_path: Path) -> None:
    """The stand-in's PUT endpoints, driven by opa-python-client like an OPA server."""
    from opa_client.opa_async import AsyncOpaClient

    async with AsyncOpaClient(host="127.0.0.1", port=standin.port, retries=0) as client:
        assert await client.check_health() is True
        assert await client.update_policy_from_string(ALLOW_ALL, "authz.rego") is True
        assert await client.update_or_create_data({"deny": ["x"]}, "ztagent/config/devices")
    engine = OpaEngine(standin.url, timeout_s=2.0)
    try:
        decision = await engine.evaluate(make_input(anonymous=True, service=STORAGE))
        assert decision.allow is True
        assert decision.reasons == ("ok",)
    finally:
        await engine.close()


async def test_custom_decision_path(standin: OpaStandin) -> None:
    standin.put_policy(
        "other.rego", 'package acme.gate\n\nverdict := {"allow": false, "reasons": ["no"]}\n'
    )
    engine = OpaEngine(standin.url, decision_path="data.acme.gate.verdict", timeout_s=2.0)
    try:
        decision = await engine.evaluate(make_input())
        assert (decision.allow, decision.reasons, dict(decision.headers)) == (False, ("no",), {})
    finally:
        await engine.close()


async def test_closed_engine_refuses(engine: OpaEngine) -> None:
    await engine.evaluate(make_input(roles=["reader"]))
    await engine.close()
    with pytest.raises(PolicyError, match="closed") as info:
        await engine.evaluate(make_input(roles=["reader"]))
    assert info.value.code == "policy_engine_error"


async def test_concurrent_calls(engine: OpaEngine) -> None:
    inputs = [make_input(roles=["reader"], method=m) for m in ("Get", "Put", "List", "Delete")]
    decisions = await asyncio.gather(*(engine.evaluate(i) for i in inputs))
    assert [d.allow for d in decisions] == [True, False, True, False]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ftp://opa:8181", "expected http"),
        ("http://opa:8181/v1", "without a path"),
        ("http://opa:99999", "bad port"),
        ("opa:8181", "expected http"),
    ],
)
def test_bad_url(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        OpaEngine(url)


@pytest.mark.parametrize("path", ["ztagent.authz.decision", "data.", "data..x", "data"])
def test_bad_decision_path(path: str) -> None:
    with pytest.raises(ConfigError, match=r"policy\.decision_path"):
        OpaEngine(decision_path=path)


def test_bad_timeout() -> None:
    with pytest.raises(ConfigError, match="positive timeout"):
        OpaEngine(timeout_s=0)


def test_url_forms() -> None:
    assert OpaEngine("http://127.0.0.1:8181/").url == (
        "http://127.0.0.1:8181/v1/data/ztagent/authz/decision"
    )
    assert OpaEngine("https://opa.internal").url.startswith("https://opa.internal/v1/data/")


def test_from_config() -> None:
    from ztagent.config import PolicyConfig

    cfg = PolicyConfig(engine="opa", opa_url="http://127.0.0.1:9", timeout_s=0.5)
    engine = OpaEngine.from_config(cfg)
    assert engine.url == "http://127.0.0.1:9/v1/data/ztagent/authz/decision"


def _provenance(body: dict[str, Any]) -> str:
    from ztagent.policy.opa import _revision_of

    return _revision_of(body)


def test_revision_from_provenance() -> None:
    assert _provenance({"result": {}}) == "opa"
    assert _provenance({"provenance": {"revision": "r7"}}) == "r7"
    assert _provenance({"provenance": {"bundles": {"main": {"revision": "abc"}}}}) == "abc"
    two = {"provenance": {"bundles": {"b": {"revision": "2"}, "a": {"revision": "1"}}}}
    assert _provenance(two) == '{"a":"1","b":"2"}'
