"""The exact decision cache: the read set comes from the policy's AST, and a replay of
varied inputs gives the very same decisions through the cache as without it."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.policy_inputs import INFERENCE, POLICIES, STORAGE, make_input
from ztagent.policy.decision_cache import CachedEngine, project, read_set
from ztagent.policy.embedded import EmbeddedEngine
from ztagent.policy.errors import PolicyError
from ztagent.policy.types import Decision


def _ast(text: str) -> str:
    import regorus

    engine = regorus.Engine()
    engine.add_policy("t.rego", text)
    return str(engine.get_ast_as_json())


def test_read_set_of_the_shipped_policy() -> None:
    engine = EmbeddedEngine.load(POLICIES)
    read = read_set(engine.ast_json())
    assert read.cacheable
    assert read.paths is not None
    assert ("user", "sub") in read.paths and ("request", "method") in read.paths
    # the shipped policy never reads the time or the peer: they are not in the key
    assert not any(p[0] == "context" or p == ("request", "peer") for p in read.paths)


@pytest.mark.parametrize(
    ("text", "paths", "reason"),
    [
        ('package t\nx := input.a.b\ny := input.c["d"]\n', (("a", "b"), ("c", "d")), ""),
        ("package t\nx := input.m[k] if { k := data.k }\n", (("m",),), ""),
        ("package t\nx := data.q[input.d.id]\n", (("d", "id"),), ""),
        ("package t\nx := input.a\ny := input.a.b\n", (("a",),), ""),
        ('package t\nx := object.get(input, "a", 1)\n', None, "reads the whole input"),
        ("package t\nx := time.now_ns()\n", None, "time.now_ns(), which is not deterministic"),
        ('package t\nx := rand.intn("s", 10)\n', None, "rand.intn()"),
    ],
)
def test_read_sets(text: str, paths: Any, reason: str) -> None:
    read = read_set(_ast(text))
    assert read.paths == paths
    assert reason in read.reason


def _varied_inputs(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """A recorded-log-like stream: devices, users, roles, methods, posture, model headers,
    and fields the policy does not read (time, peer, claims) changing on every call."""
    rng = random.Random(seed)
    devices = ["demo-device", "cam-17", "blocked-device", "demo-tampered"]
    roles = [[], ["reader"], ["writer"], ["admin"]]
    scopes = [[], ["storage.read"], ["storage.write"], ["inference"]]
    calls = [
        (STORAGE, "Get"), (STORAGE, "Put"), (STORAGE, "Delete"), (STORAGE, "Watch"),
        (INFERENCE, "Predict"), (INFERENCE, "ListModels"), ("nobody.v1.X", "Y"),
    ]  # fmt: skip
    out = []
    for i in range(n):
        service, method = rng.choice(calls)
        doc = make_input(
            device=rng.choice(devices),
            roles=rng.choice(roles),
            scope=rng.choice(scopes),
            anonymous=rng.random() < 0.2,
            service=service,
            method=method,
            posture=rng.random() < 0.5,
            metadata={"x-model": rng.choice(["vibration-anomaly", "critical-demo", "x"])}
            if service == INFERENCE
            else {},
        )
        doc["context"]["time"] = f"2026-12-01T21:00:{i % 60:02d}.{i % 1000:03d}Z"
        doc["request"]["peer"] = f"ipv4:10.0.0.{i % 250}:{40000 + i}"
        if doc["posture"]["verified"]:
            doc["posture"]["age_s"] = rng.choice([1, 2, 30, 599, 601])
        out.append(doc)
    return out


async def test_replaying_varied_inputs_gives_identical_decisions() -> None:
    plain = EmbeddedEngine.load(POLICIES)
    inner = EmbeddedEngine.load(POLICIES)
    cached = CachedEngine(inner, inner.ast_json)
    inputs = _varied_inputs(3000)
    for doc in inputs:
        want = await plain.evaluate(copy.deepcopy(doc))
        got = await cached.evaluate(copy.deepcopy(doc))
        assert (got.allow, got.reasons, dict(got.headers), got.revision) == (
            want.allow,
            want.reasons,
            dict(want.headers),
            want.revision,
        ), doc
    # the stream repeats what the policy reads (about 1,700 distinct keys in 3,000 calls)
    assert cached.hits > 1000 and cached.hits + cached.misses == len(inputs)
    allows = {d.allow for d in [await plain.evaluate(x) for x in inputs[:200]]}
    assert allows == {True, False}  # the stream is mixed


async def test_errors_are_never_cached_and_a_reload_empties_the_cache(tmp_path: Path) -> None:
    class Flaky:
        revision = "r1"

        def __init__(self) -> None:
            self.calls = 0

        async def evaluate(self, input_doc: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise PolicyError("policy_engine_error", "once")
            from ztagent.policy.types import Decision

            return Decision(True, (), {}, self.revision)

        def health(self) -> Any: ...
        def maybe_reload(self) -> bool:
            return False

        async def close(self) -> None: ...

    inner = Flaky()
    engine = CachedEngine(inner, lambda: _ast("package t\nx := input.a\n"))  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        await engine.evaluate({"a": 1})
    assert (await engine.evaluate({"a": 1})).allow and inner.calls == 2
    assert (await engine.evaluate({"a": 1, "b": 2})).cached and inner.calls == 2
    inner.revision = "r2"  # a reload: new revision, empty cache
    assert not (await engine.evaluate({"a": 1})).cached and inner.calls == 3


def test_projection_marks_missing_fields() -> None:
    paths = (("a", "b"), ("c",))
    assert project({"a": {"b": 1}, "c": None, "z": 9}, paths) == project(
        {"a": {"b": 1}, "c": None}, paths
    )
    assert project({"a": {}}, paths) != project({"a": {"b": None}}, paths)
    for a, b in itertools.combinations([{"a": {"b": 1}}, {"a": {"b": 2}}, {"c": 1}], 2):
        assert project(a, paths) != project(b, paths)
    # a missing field is no value at all: not null, not any marker object a token could carry
    for value in (None, {"__ztagent_missing__": True}, "", 0, False, [], {}):
        assert project({"a": {"b": value}}, paths) != project({"a": {}}, paths)
        assert project({"c": value}, paths) != project({}, paths)


async def test_an_input_json_cannot_hold_is_evaluated_every_time() -> None:
    class Counting:
        revision = "r1"
        calls = 0

        async def evaluate(self, input_doc: dict[str, Any]) -> Decision:
            self.calls += 1
            return Decision(allow=True, revision=self.revision)

    inner = Counting()
    engine = CachedEngine(inner, lambda: _ast("package t\nx := input.a\n"))  # type: ignore[arg-type]
    assert project({"a": b"raw"}, (("a",),)) is None
    for _ in range(3):
        assert not (await engine.evaluate({"a": b"raw"})).cached
    assert inner.calls == 3 and engine.hits == 0
