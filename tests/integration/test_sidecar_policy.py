"""Users and policy through the running sidecar, in front of the real storage workload.

Every call is decided by the shipped Rego (a copy in tmp_path, so tests may edit it) with
tokens from the dev issuer; the decision log is read back and its chain verified.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.opa_standin import OpaStandin
from tests.integration.conftest import (
    SHIPPED_POLICIES,
    Pki,
    channel,
    sidecar_assertion_pub,
    write_config,
)
from ztagent._proto.workloads.v1 import storage_pb2
from ztagent.ca import builders
from ztagent.config import load_config
from ztagent.dev.issuer import DevIssuer, init_dev_issuer, mint_token
from ztagent.policy.log_verify import verify_log
from ztagent.sidecar.server import POLICY_HEALTH, Sidecar
from ztagent.workloads.storage.server import start_storage_server, stop_storage_server

pytestmark = pytest.mark.integration

STORAGE = "ztagent.workloads.v1.Storage"


@dataclass
class Stack:
    pki: Pki
    issuer: DevIssuer
    policy_dir: Path
    config_path: Path
    sidecar: Sidecar
    upstream: str

    @property
    def log_path(self) -> Path:
        return self.config_path.parent / "decisions.jsonl"

    def token(self, sub: str, **kw: object) -> str:
        return mint_token(self.pki.layout.dir, sub=sub, **kw)  # type: ignore[arg-type]

    def log_lines(self) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [line for line in lines if "checkpoint" not in line]  # decisions only


def tokens_section(issuer: DevIssuer, *, extra: str = "") -> str:
    return (
        f'[tokens]\nissuer = "{issuer.issuer}"\naudience = "{issuer.audience}"\n'
        f'jwks_file = "{issuer.jwks_path}"\nalgorithms = ["ES256"]\n{extra}\n'
    )


@pytest.fixture
async def storage(tmp_path: Path, pki: Pki) -> AsyncIterator[str]:
    server, port = await start_storage_server(
        "127.0.0.1:0", tmp_path / "storage", trust_keys=[sidecar_assertion_pub(pki)]
    )
    yield f"127.0.0.1:{port}"
    await stop_storage_server(server, 0)


async def start_stack(
    pki: Pki, upstream: str, tmp_path: Path, *, tokens_extra: str = "", **config_kw: str
) -> Stack:
    issuer = init_dev_issuer(pki.layout.dir, "ztagent.dev", force=True)
    policy_dir = tmp_path / "policies"
    if not policy_dir.exists():
        shutil.copytree(SHIPPED_POLICIES, policy_dir)
    extra = tokens_section(issuer, extra=tokens_extra) + config_kw.pop("extra", "")
    config_path = write_config(
        pki, {STORAGE: upstream}, extra=extra, policy=policy_dir, **config_kw
    )
    car = Sidecar(load_config(config_path))
    await car.start()
    return Stack(pki, issuer, policy_dir, config_path, car, upstream)


@pytest.fixture
async def stack(pki: Pki, storage: str, tmp_path: Path) -> AsyncIterator[Stack]:
    st = await start_stack(pki, storage, tmp_path)
    yield st
    await st.sidecar.stop(0)


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


async def storage_call(
    st: Stack, pair: builders.KeyPair, method: str, token: str | None, *, port: int | None = None
) -> bytes:
    if method in ("Put", "BulkPut"):
        request = storage_pb2.PutRequest(key="k", value=b"v").SerializeToString()
    elif method == "List":
        request = storage_pb2.ListRequest(prefix="").SerializeToString()
    else:
        request = storage_pb2.GetRequest(key="k").SerializeToString()
    async with channel(st.pki, port or st.sidecar.port, pair) as ch:
        reply: bytes = await ch.unary_unary(f"/{STORAGE}/{method}")(
            request, metadata=bearer(token), timeout=10
        )
        return reply


async def outcome(st: Stack, pair: builders.KeyPair, method: str, token: str | None) -> str:
    """'OK', 'NOT_FOUND' (allowed, nothing stored) or 'CODE: details'."""
    try:
        await storage_call(st, pair, method, token)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return "NOT_FOUND"
        return f"{err.code().name}: {err.details()}"
    return "OK"


def deny_device(policy_dir: Path, device_id: str) -> None:
    path = policy_dir / "data.json"
    data = json.loads(path.read_text())
    data["ztagent"]["config"]["devices"]["deny"] = [device_id]
    path.write_text(json.dumps(data))


MATRIX = [
    # (device, user, roles/scope, method, expected prefix)
    ("cam-1", "alice", {"roles": ["writer"]}, "Put", "OK"),
    ("cam-1", "alice", {"roles": ["writer"]}, "Get", "OK"),
    ("cam-1", "bob", {"roles": ["reader"]}, "Get", "OK"),  # reads what alice wrote
    (
        "cam-1",
        "bob",
        {"roles": ["reader"]},
        "Put",
        "PERMISSION_DENIED: policy_denied: role_required:writer",
    ),
    ("cam-1", "carol", {"scope": ["storage.read"]}, "List", "OK"),
    (
        "cam-1",
        "carol",
        {"scope": ["storage.read"]},
        "Put",
        "PERMISSION_DENIED: policy_denied: role_required:writer",
    ),
    (  # shipped data: Delete needs attested posture, and this device has not attested
        "cam-1",
        "alice",
        {"roles": ["writer"]},
        "Delete",
        "PERMISSION_DENIED: policy_denied: posture_required",
    ),
    ("cam-1", None, {}, "Get", "PERMISSION_DENIED: policy_denied: user_unauthenticated"),
    (
        "stolen-cam",
        "alice",
        {"roles": ["writer"]},
        "Get",
        "PERMISSION_DENIED: policy_denied: device_denied",
    ),
    (
        "cam-1",
        "alice",
        {"roles": ["writer"]},
        "Compact",
        "PERMISSION_DENIED: policy_denied: method_not_allowed",
    ),
]


async def run_matrix(st: Stack) -> list[str]:
    results = []
    for device, user, claims, method, _ in MATRIX:
        token = st.token(user, **claims) if user else None
        results.append(await outcome(st, st.pki.mint(device), method, token))
    return results


async def test_allow_deny_matrix_through_the_sidecar(stack: Stack) -> None:
    deny_device(stack.policy_dir, "stolen-cam")
    await wait_for_reload(stack)
    results = await run_matrix(stack)
    for (device, user, _, method, expected), got in zip(MATRIX, results, strict=True):
        assert got.startswith(expected), (device, user, method, got)


async def wait_for_reload(st: Stack) -> None:
    """Policy files are polled every 0.1 s; wait until the engine's revision changes."""
    before = st.sidecar.pipeline.engine.revision  # type: ignore[union-attr]
    for _ in range(100):
        await asyncio.sleep(0.05)
        if st.sidecar.pipeline.engine.revision != before:  # type: ignore[union-attr]
            return
    pytest.fail("policy was not reloaded")


async def test_same_matrix_through_the_opa_engine(pki: Pki, storage: str, tmp_path: Path) -> None:
    """engine = "opa": the sidecar asks an OPA-REST stand-in (real OPA Go code, no OPA binary
    is installable here) and must reach exactly the decisions of the embedded engine."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policy_dir)
    deny_device(policy_dir, "stolen-cam")
    opa = OpaStandin()
    opa.load_dir(policy_dir)
    await opa.start()
    embedded = await start_stack(pki, storage, tmp_path)
    try:
        expected = await run_matrix(embedded)
    finally:
        await embedded.sidecar.stop(0)
    st = await start_stack(
        pki, storage, tmp_path, policy_extra=f'engine = "opa"\nopa_url = "{opa.url}"\n'
    )
    try:
        assert await run_matrix(st) == expected
        assert any(
            path.startswith("/v1/data/ztagent/authz/decision") for _, path, _ in opa.requests
        )
    finally:
        await st.sidecar.stop(0)
        await opa.stop()


@pytest.mark.parametrize(
    ("make_token", "code"),
    [
        ("expired", "token_expired"),
        ("alg_none", "token_alg_not_allowed"),
        ("wrong_aud", "token_wrong_audience"),
        ("bound_to_other_cert", "token_cnf_mismatch"),
        ("garbage", "token_malformed"),
    ],
)
async def test_bad_tokens_are_unauthenticated(
    stack: Stack, tmp_path: Path, make_token: str, code: str
) -> None:
    import base64

    device = stack.pki.mint("cam-1")
    other = stack.pki.mint("cam-2")
    other_cert = tmp_path / "other.pem"
    other_cert.write_bytes(builders.cert_pem(other.cert))
    good = stack.token("alice", roles=["writer"])
    _header, payload, _ = good.split(".")
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"at+jwt"}').rstrip(b"=").decode()
    tokens = {
        "expired": stack.token(
            "alice", roles=["writer"], now=datetime.now(UTC) - timedelta(hours=2), ttl_s=60
        ),
        "alg_none": f"{none_header}.{payload}.",
        "wrong_aud": stack.token("alice", roles=["writer"], audience="someone-else"),
        "bound_to_other_cert": stack.token("alice", roles=["writer"], bind_cert=other_cert),
        "garbage": "not-a-jwt",
    }
    got = await outcome(stack, device, "Get", tokens[make_token])
    assert got.startswith(f"UNAUTHENTICATED: {code}: "), got


async def test_cert_bound_token_and_policy_headers_reach_upstream(pki: Pki, tmp_path: Path) -> None:
    """require_cert_binding: only a token bound to this connection's certificate passes; the
    upstream receives the device identity and the policy's headers, never the client's."""
    from tests.integration.echo_upstream import EchoUpstream

    echo = EchoUpstream()
    await echo.start()
    policy_dir = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policy_dir)
    data = json.loads((policy_dir / "data.json").read_text())
    data["ztagent"]["config"]["services"]["test.v1.Echo"] = {
        "methods": {"Unary": {"roles": ["writer"]}}
    }
    (policy_dir / "data.json").write_text(json.dumps(data))
    issuer = init_dev_issuer(pki.layout.dir, "ztagent.dev", force=True)
    config = write_config(
        pki,
        {"test.v1.Echo": echo.address},
        extra=tokens_section(issuer, extra="require_cert_binding = true"),
        policy=policy_dir,
    )
    car = Sidecar(load_config(config))
    await car.start()
    try:
        device = pki.mint("cam-9")
        cert = tmp_path / "cam-9.pem"
        cert.write_bytes(builders.cert_pem(device.cert))
        bound = mint_token(pki.layout.dir, sub="alice", roles=["writer"], bind_cert=cert)
        unbound = mint_token(pki.layout.dir, sub="alice", roles=["writer"])
        async with channel(pki, car.port, device) as ch:
            call = ch.unary_unary("/test.v1.Echo/Unary")
            assert await call(b"x", metadata=bearer(bound), timeout=5) == b"x"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"x", metadata=bearer(unbound), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (info.value.details() or "").startswith("token_cnf_required: ")
        seen = dict(echo.seen[-1].metadata)
        assert seen["x-ztagent-device-id"] == "cam-9"
        assert seen["x-ztagent-user"] == "alice"
        assert seen["x-ztagent-decision"] == "allow"
    finally:
        await car.stop(0)
        await echo.stop()


async def test_broken_policy_on_reload_keeps_the_old_one_serving(stack: Stack) -> None:
    device = stack.pki.mint("cam-1")
    bob = stack.token("bob", roles=["reader"])
    assert await outcome(stack, device, "Get", bob) == "NOT_FOUND"
    authz = stack.policy_dir / "authz.rego"
    good_text = authz.read_text()
    authz.write_text(good_text + "\nthis is { not rego\n")
    health = stack.sidecar.health
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not stack.sidecar.pipeline.engine.health().ok:  # type: ignore[union-attr]
            break
    else:
        pytest.fail("broken policy was not noticed")
    async with channel(stack.pki, stack.sidecar.port, device) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(50):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=POLICY_HEALTH))
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        overall = await stub.Check(health_pb2.HealthCheckRequest())
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
    # The old policy still decides.
    assert await outcome(stack, device, "Get", bob) == "NOT_FOUND"
    assert (await outcome(stack, device, "Put", bob)).startswith("PERMISSION_DENIED")
    del health
    # A fixed policy is picked up and clears the flag.
    authz.write_text(good_text + "\n# fixed\n")
    for _ in range(100):
        await asyncio.sleep(0.05)
        if stack.sidecar.pipeline.engine.health().ok:  # type: ignore[union-attr]
            break
    else:
        pytest.fail("fixed policy was not picked up")


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_engine_failure_follows_failure_mode(
    pki: Pki, storage: str, tmp_path: Path, mode: str
) -> None:
    """An OPA engine nobody answers: closed -> UNAVAILABLE, open -> allowed, logged."""
    st = await start_stack(
        pki,
        storage,
        tmp_path,
        policy_extra=f'engine = "opa"\nopa_url = "http://127.0.0.1:9"\nfailure_mode = "{mode}"\n',
    )
    try:
        got = await outcome(st, pki.mint("cam-1"), "Get", st.token("bob", roles=["reader"]))
    finally:
        await st.sidecar.stop(0)
    last = st.log_lines()[-1]
    assert last["failure"] == "policy_engine_error"
    if mode == "closed":
        assert got.startswith("UNAVAILABLE: policy_engine_error: "), got
        assert last["allow"] is False and last["enforced"] is False
    else:
        assert got == "NOT_FOUND"
        assert last["allow"] is True and last["enforced"] is True
        assert last["reasons"] == ["failure_mode_open:policy_engine_error"]


async def test_dry_run_allows_and_logs_the_would_be_denial(
    pki: Pki, storage: str, tmp_path: Path
) -> None:
    st = await start_stack(pki, storage, tmp_path, policy_extra="dry_run = true\n")
    try:
        got = await outcome(st, pki.mint("cam-1"), "Put", st.token("bob", roles=["reader"]))
    finally:
        await st.sidecar.stop(0)
    assert got == "OK"
    last = st.log_lines()[-1]
    assert last["allow"] is False and last["enforced"] is True and last["dry_run"] is True
    assert "role_required:writer" in last["reasons"]


async def test_a_sidecar_with_a_writer_process_logs_every_call_and_seals_at_stop(
    pki: Pki, storage: str, tmp_path: Path
) -> None:
    from ztagent.sidecar.log_writer import ProcessDecisionLog

    stack = await start_stack(pki, storage, tmp_path, log_extra='writer = "process"')
    try:
        log = stack.sidecar.pipeline.decision_log if stack.sidecar.pipeline else None
        assert isinstance(log, ProcessDecisionLog)
        writer = log._proc
        assert writer is not None and writer.poll() is None
        device = stack.pki.mint("cam-1")
        alice = stack.token("alice", roles=["writer"])
        for method, token in [("Put", alice), ("Get", alice), ("Get", None)]:
            await outcome(stack, device, method, token)
    finally:
        await stack.sidecar.stop(0)
    assert writer.poll() == 0  # the stop closed the pipe; the writer wrote all and exited
    assert verify_log(stack.log_path).ok
    assert [(e["user_sub"], e["method"], e["allow"]) for e in stack.log_lines()] == [
        ("alice", "Put", True),
        ("alice", "Get", True),
        (None, "Get", False),
    ]
    last = json.loads(stack.log_path.read_text().splitlines()[-1])
    assert last["checkpoint"]["reason"] == "close"


async def test_decision_log_chain_inputs_and_replay(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = stack.pki.mint("cam-1")
    alice = stack.token("alice", roles=["writer"])
    bob = stack.token("bob", roles=["reader"])
    for method, token in [("Put", alice), ("Get", bob), ("Put", bob), ("Get", None)]:
        await outcome(stack, device, method, token)
    await stack.sidecar.stop(0)  # drains the log writer

    assert verify_log(stack.log_path).ok
    lines = stack.log_lines()
    assert [(entry["user_sub"], entry["method"], entry["allow"]) for entry in lines] == [
        ("alice", "Put", True),
        ("bob", "Get", True),
        ("bob", "Put", False),
        (None, "Get", False),
    ]
    schema = json.loads((SHIPPED_POLICIES / "input.schema.json").read_text())
    raw = stack.log_path.read_text()
    assert alice not in raw and bob not in raw  # credentials never logged
    for entry in lines:
        jsonschema.validate(entry["input"], schema)  # real inputs match the published schema
        assert "authorization" not in entry["input"]["request"]["metadata"]

    # An edited line is found.
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text(raw.replace('"allow":false', '"allow":true', 1))
    report = verify_log(tampered)
    assert not report.ok and report.first_bad_line == 4

    # Replay against a candidate policy where readers may also write: exactly bob's Put flips.
    from ztagent.cli import main

    candidate = tmp_path / "candidate"
    shutil.copytree(stack.policy_dir, candidate)
    data = json.loads((candidate / "data.json").read_text())
    data["ztagent"]["config"]["services"][STORAGE]["methods"]["Put"]["roles"].append("reader")
    (candidate / "data.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert (
        main(
            ["policy", "replay", "--log", str(stack.log_path), "--policy", str(candidate), "--json"]
        )
        == 0
    )
    report_json = json.loads(capsys.readouterr().out)
    assert report_json["total"] == 4
    assert [(c["line_no"], c["old_allow"], c["new_allow"]) for c in report_json["changed"]] == [
        (3, False, True)
    ]
