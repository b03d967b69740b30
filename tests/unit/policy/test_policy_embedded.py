from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from tests.unit.policy._rego import AUTHZ, authz_dir, input_for, make_bundle, write_tree
from ztagent.policy.embedded import EmbeddedEngine, parse_engine_error
from ztagent.policy.errors import PolicyError, PolicyLoadError
from ztagent.policy.sources import load_dir
from ztagent.policy.types import PolicyEngine


def _touch_later(path: Path) -> None:
    """Rewrites keep the size sometimes; bump mtime so the signature surely changes."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_allow_and_deny(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p")
    engine: PolicyEngine = EmbeddedEngine.load(root)
    allowed = await engine.evaluate(input_for("alice"))
    assert allowed.allow is True
    assert allowed.reasons == ()
    assert allowed.headers == {"x-policy": "fixture"}
    assert allowed.revision == load_dir(root).revision == engine.revision
    denied = await engine.evaluate(input_for("bob"))
    assert denied.allow is False
    assert denied.reasons == ("user not allowed",)
    assert engine.health().ok
    await engine.close()


async def test_loads_a_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path / "b.tar.gz",
        {
            ".manifest": '{"revision": "r1"}',
            "authz.rego": AUTHZ,
            "ztagent/authz/data.json": '{"users": ["alice"]}',
        },
    )
    engine = EmbeddedEngine.load(bundle)
    decision = await engine.evaluate(input_for("alice"))
    assert decision.allow and decision.revision == "r1"


async def test_undefined_decision(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "a.rego": (
                "package ztagent.authz\nimport rego.v1\n"
                'decision := {"allow": true} if input.user.sub == "alice"\n'
            )
        },
    )
    engine = EmbeddedEngine.load(root)
    assert (await engine.evaluate(input_for("alice"))).allow
    with pytest.raises(PolicyError) as err:
        await engine.evaluate(input_for("bob"))
    assert err.value.code == "policy_undefined"


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ('decision := "yes"', "expected an object"),
        ('decision := {"allow": "true"}', "'allow' must be a boolean"),
        ('decision := {"allow": true, "reasons": [1]}', "'reasons' must be a list of strings"),
        ('decision := {"allow": true, "headers": {"a": 1}}', "'headers' must map strings"),
    ],
)
async def test_bad_shape_decision(tmp_path: Path, rule: str, expected: str) -> None:
    root = write_tree(
        tmp_path / "p", {"a.rego": f"package ztagent.authz\nimport rego.v1\n{rule}\n"}
    )
    engine = EmbeddedEngine.load(root)
    with pytest.raises(PolicyError, match=expected) as err:
        await engine.evaluate(input_for("alice"))
    assert err.value.code == "policy_bad_decision"


async def test_set_of_objects_is_converted(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "a.rego": (
                "package ztagent.authz\nimport rego.v1\n"
                'extra contains {"k": 1}\n'
                'decision := {"allow": count(extra) == 1, "reasons": {"b", "a"}}\n'
            )
        },
    )
    decision = await EmbeddedEngine.load(root).evaluate(input_for("alice"))
    assert decision.allow and decision.reasons == ("a", "b")


async def test_engine_error_is_policy_engine_error(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "a.rego": (
                "package ztagent.authz\nimport rego.v1\n"
                "n := to_number(input.context.node)\n"
                'decision := {"allow": n > 0}\n'
            )
        },
    )
    with pytest.raises(PolicyLoadError, match="could not parse"):  # fails on the sample input
        EmbeddedEngine.load(root)
    root2 = write_tree(
        tmp_path / "q",
        {
            "a.rego": (
                "package ztagent.authz\nimport rego.v1\n"
                'n := to_number(input.user.sub) if input.user.sub != ""\n'
                'default decision := {"allow": false}\n'
                'decision := {"allow": n > 0} if n\n'
            )
        },
    )
    engine = EmbeddedEngine.load(root2)
    assert (await engine.evaluate(input_for("12"))).allow
    with pytest.raises(PolicyError, match=r"a\.rego:3:\d+: could not parse") as err:
        await engine.evaluate(input_for("not-a-number"))
    assert err.value.code == "policy_engine_error"
    bad_input = input_for("alice")
    bad_input["posture"]["age_s"] = float("nan")
    with pytest.raises(PolicyError) as err2:
        await engine.evaluate(bad_input)
    assert err2.value.code == "policy_engine_error"


def test_load_refuses_syntax_error_with_file_and_line(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "authz.rego": AUTHZ,
            "sub/bad.rego": ("package bad\nimport rego.v1\n\nallow if {\n  input.x ==\n}\n"),
        },
    )
    with pytest.raises(PolicyLoadError, match=r"sub/bad\.rego:6:1: expecting expression") as err:
        EmbeddedEngine.load(root)
    assert err.value.code == "policy_parse_error"


def test_load_refuses_compile_error_and_missing_decision(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {"a.rego": ('package ztagent.authz\nimport rego.v1\ndecision := {"allow": x}\n')},
    )
    with pytest.raises(PolicyLoadError, match=r"a\.rego:3:\d+: var x is unsafe") as err:
        EmbeddedEngine.load(root)
    assert err.value.code == "policy_compile_error"
    other = write_tree(tmp_path / "q", {"a.rego": "package other\nimport rego.v1\nx := 1\n"})
    with pytest.raises(PolicyLoadError, match="not defined by any loaded module"):
        EmbeddedEngine.load(other)


def test_parse_engine_error_drops_backtrace() -> None:
    text = (
        "\n--> /p/a.rego:5:3\n  |\n5 |   nosuch(1)\n  |   ^\nerror: could not find function nosuch"
        "\n\nStack backtrace:\n   0: <unknown>\n"
    )
    info = parse_engine_error(RuntimeError(text))
    assert (info.file, info.line, info.column) == ("/p/a.rego", 5, 3)
    assert str(info) == "/p/a.rego:5:3: could not find function nosuch"


async def test_hot_reload_good_broken_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = authz_dir(tmp_path / "p", users=["alice"])
    engine = EmbeddedEngine.load(root)
    first = engine.revision
    assert engine.maybe_reload() is False  # nothing changed
    assert not (await engine.evaluate(input_for("bob"))).allow

    data = root / "ztagent/authz/data.json"
    data.write_text('{"users": ["alice", "bob"]}')
    _touch_later(data)
    assert engine.maybe_reload() is True
    assert (await engine.evaluate(input_for("bob"))).allow
    second = engine.revision
    assert second != first and engine.health().ok

    broken = root / "authz.rego"
    broken.write_text(AUTHZ.replace("default allow := false", "default allow := "))
    _touch_later(broken)
    with caplog.at_level(logging.ERROR, logger="ztagent.policy"):
        assert engine.maybe_reload() is False
    assert "refused" in caplog.text
    health = engine.health()
    assert health.ok is False
    assert health.revision == second
    assert health.last_error is not None and "authz.rego:" in health.last_error
    assert (await engine.evaluate(input_for("bob"))).allow  # the old policy still serves
    assert engine.maybe_reload() is False  # not retried until the files change again
    assert engine.health().ok is False

    broken.write_text(AUTHZ.replace('"x-policy": "fixture"', '"x-policy": "fixed"'))
    _touch_later(broken)
    assert engine.maybe_reload() is True
    decision = await engine.evaluate(input_for("bob"))
    assert decision.headers == {"x-policy": "fixed"}
    assert engine.health().ok and engine.health().last_error is None


async def test_concurrent_evaluations_during_reload(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p", users=["alice"])
    engine = EmbeddedEngine.load(root)
    data = root / "ztagent/authz/data.json"
    data.write_text('{"users": []}')
    _touch_later(data)
    revisions = {engine.revision}

    async def one(i: int) -> None:
        if i == 50:
            assert engine.maybe_reload()
        decision = await engine.evaluate(input_for("alice"))
        # every decision is consistent with the revision that produced it
        assert decision.allow == (decision.revision in revisions)

    await asyncio.gather(*(one(i) for i in range(100)))
    assert engine.revision not in revisions


async def test_a_start_with_a_broken_policy_serves_the_last_good_one(tmp_path: Path) -> None:
    """A restart with a broken policy file used to exit 1 (no last good policy on disk)."""
    root = authz_dir(tmp_path / "p")
    keep = tmp_path / "state" / "last-good-policy"
    first = EmbeddedEngine.load(root, last_good_dir=keep)
    good_revision = first.revision
    assert (keep / "current" / "policy" / "authz.rego").exists()
    await first.close()

    (root / "authz.rego").write_text("package ztagent.authz\n\ndecision := {")  # broken
    restarted = EmbeddedEngine.load(root, last_good_dir=keep)
    assert restarted.revision == good_revision
    assert (await restarted.evaluate(input_for("alice"))).allow is True
    health = restarted.health()
    assert not health.ok and health.last_error is not None
    assert "serving the last good policy from" in health.last_error
    await restarted.close()

    with pytest.raises(PolicyLoadError):  # nothing saved: the error stops start-up
        EmbeddedEngine.load(root, last_good_dir=tmp_path / "empty")


async def test_a_reloaded_policy_becomes_the_last_good_one(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p")
    keep = tmp_path / "keep"
    engine = EmbeddedEngine.load(root, last_good_dir=keep)
    text = (root / "authz.rego").read_text().replace('"fixture"', '"fixture-2"')
    (root / "authz.rego").write_text(text)
    _touch_later(root / "authz.rego")
    assert engine.maybe_reload()
    saved = (keep / "current" / "policy" / "authz.rego").read_text()
    assert '"fixture-2"' in saved
    await engine.close()


async def test_a_bundle_is_kept_as_a_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b.tar.gz", {"authz.rego": AUTHZ})
    keep = tmp_path / "keep"
    engine = EmbeddedEngine.load(bundle, last_good_dir=keep)
    assert (keep / "current" / "bundle.tar.gz").read_bytes() == bundle.read_bytes()
    await engine.close()
