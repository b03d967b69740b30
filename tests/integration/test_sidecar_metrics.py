"""``[metrics]``: the Prometheus endpoint of a real sidecar counts what it decided and refused,
and a two-worker ``ztagent serve`` serves the sum of its workers at one address."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from tests.integration.test_sidecar_workers import Served, _calls_on_fresh_connections
from ztagent.config import load_config
from ztagent.errors import ConfigError
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

# Allows everything but the method "Denied", which it denies with a reason.
POLICY = """package ztagent.authz

default decision := {"allow": true, "reasons": ["ok"], "headers": {}}

decision := {"allow": false, "reasons": ["no_denied_method"], "headers": {}} if {
	input.request.method == "Denied"
}
"""

METRICS = '[metrics]\nenabled = true\naddress = "127.0.0.1:0"\n'


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name + sorted labels -> value, of every sample on /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _policy(tmp_path: Path) -> Path:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "authz.rego").write_text(POLICY)
    return policy


async def test_metrics_count_decisions_refusals_and_upstream_errors(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    config = write_config(pki, {SERVICE: upstream.address}, policy=_policy(tmp_path), extra=METRICS)
    car = Sidecar(load_config(config))
    await car.start()
    try:
        assert car.metrics_endpoint is not None
        port = car.metrics_endpoint.port
        async with channel(pki, port=car.port, pair=pki.mint("dev-metrics")) as ch:
            for _ in range(3):
                assert await ch.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10) == b"x"
            for method, code in (
                (f"/{SERVICE}/Denied", grpc.StatusCode.PERMISSION_DENIED),
                (f"/{SERVICE}/Fail", grpc.StatusCode.FAILED_PRECONDITION),
                ("/other.v1.Nowhere/Get", grpc.StatusCode.UNIMPLEMENTED),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary(method)(b"x", timeout=10)
                assert info.value.code() is code
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/Unary")(
                    b"x", metadata=(("authorization", "Bearer not-a-jwt"),), timeout=10
                )
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        m = await asyncio.to_thread(scrape, port)
    finally:
        await car.stop(0)
    decisions = "ztagent_decisions_total"
    assert m[(decisions, (("outcome", "allow"), ("service", SERVICE)))] == 4  # 3 Unary + Fail
    assert m[(decisions, (("outcome", "deny"), ("service", SERVICE)))] == 1
    assert m[(decisions, (("outcome", "allow"), ("service", "unrouted")))] == 1
    assert m[("ztagent_denial_reasons_total", (("reason", "no_denied_method"),))] == 1
    assert m[("ztagent_refused_total", (("code", "policy_denied"),))] == 1
    assert m[("ztagent_refused_total", (("code", "no_route"),))] == 1
    assert m[("ztagent_refused_total", (("code", "token_unverifiable"),))] == 1
    upstream_errors = "ztagent_upstream_errors_total"
    assert m[(upstream_errors, (("code", "FAILED_PRECONDITION"), ("service", SERVICE)))] == 1
    # every call admission looked at: the 6 decided ones and the refused token
    assert m[("ztagent_admission_seconds_count", ())] == 7
    assert m[("ztagent_policy_evaluation_seconds_count", ())] == 6
    # staleness: when each piece of trust was refreshed and when it stops being usable
    import time

    now = time.time()
    expiry, synced = (
        "ztagent_trust_expiry_timestamp_seconds",
        "ztagent_trust_last_sync_timestamp_seconds",
    )
    assert now < m[(expiry, (("source", "crl"),))] < now + 63 * 86400
    assert now + 86400 < m[(expiry, (("source", "server_cert"),))]
    for source in ("crl", "policy", "server_cert"):
        assert now - 3600 < m[(synced, (("source", source),))] <= now
    # no per-caller values in labels
    assert not any("dev-metrics" in str(labels) for _, labels in m)


async def test_metrics_address_in_use_names_the_key(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        extra = f'[metrics]\nenabled = true\naddress = "127.0.0.1:{busy}"\n'
        car = Sidecar(load_config(write_config(pki, {SERVICE: upstream.address}, extra=extra)))
        with pytest.raises(ConfigError, match=r"metrics\.address: cannot bind"):
            await car.start()
        await car.stop(0)


async def test_workers_metrics_are_summed_by_the_supervisor(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    extra = f'[metrics]\nenabled = true\naddress = "127.0.0.1:{metrics_port}"\n'
    config = write_config(pki, {SERVICE: upstream.address}, extra=extra)
    config.write_text(
        config.read_text().replace("grace_period_s = 5", "grace_period_s = 5\nworkers = 2")
    )
    run = Served(config)
    try:
        port = await asyncio.to_thread(run.port)
        await _calls_on_fresh_connections(pki, port, 16)
        m = await asyncio.to_thread(scrape, metrics_port)
        assert m[("ztagent_decisions_total", (("outcome", "allow"), ("service", SERVICE)))] == 16
        # both workers answered some of them (16 connections over two sockets)
        logs = [pki.layout.dir.parent / f"decisions.worker{i}.jsonl" for i in (0, 1)]
        assert all(len(p.read_text().splitlines()) > 0 for p in logs)
    finally:
        assert await asyncio.to_thread(run.stop) == 0
