"""The proxy through the real mTLS sidecar: all four RPC kinds byte-exact, deadlines,
cancellation, status and trailers, unknown services, upstream outages, unix sockets, health
and graceful stop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import RAW_SERVICE, SERVICE, EchoUpstream
from ztagent.config import load_config
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PAYLOADS = [b"", b"\x00\xff" * 3, os.urandom(MiB), os.urandom(3 * MiB + 7)]


_service = [SERVICE]


@pytest.fixture(autouse=True, params=[SERVICE, RAW_SERVICE], ids=["fast-path", "stream-path"])
def service(request: pytest.FixtureRequest) -> str:
    """Every test runs twice: on test.v1.Echo, whose descriptor is known (unary methods take
    the proxy's unary fast path), and on test.v1.EchoRaw (everything takes the generic
    stream-stream path)."""
    _service[0] = request.param
    return str(request.param)


def m(name: str) -> str:
    return f"/{_service[0]}/{name}"


@pytest.fixture
def device(pki: Pki):  # type: ignore[no-untyped-def]
    return pki.mint("dev-1")


@pytest.mark.parametrize("payload", PAYLOADS, ids=["empty", "small", "1MiB", "3MiB"])
async def test_all_four_kinds_byte_exact(
    pki: Pki,
    sidecar: Sidecar,
    device,
    payload: bytes,  # type: ignore[no-untyped-def]
) -> None:
    async with channel(pki, sidecar.port, device) as ch:
        assert await ch.unary_unary(m("Unary"))(payload, timeout=10) == payload

        got = [r async for r in ch.unary_stream(m("ServerStream"))(payload, timeout=10)]
        assert got == [bytes([i]) + payload for i in range(3)]

        parts = [payload, b"", payload[:5]]

        async def requests():  # type: ignore[no-untyped-def]
            for part in parts:
                yield part

        reply = await ch.stream_unary(m("ClientStream"))(requests(), timeout=10)
        assert reply == (3).to_bytes(4, "big") + b"".join(parts)

        got = [r async for r in ch.stream_stream(m("Bidi"))(requests(), timeout=10)]
        assert got == [p[::-1] for p in parts]


async def test_bidi_is_interactive(pki: Pki, sidecar: Sidecar, device) -> None:  # type: ignore[no-untyped-def]
    """Each response arrives before the next request is sent (no buffering to half-close)."""
    async with channel(pki, sidecar.port, device) as ch:
        call = ch.stream_stream(m("Bidi"))(timeout=10)
        for word in (b"abc", b"de", b"f"):
            await call.write(word)
            assert await call.read() == word[::-1]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_upstream_status_details_and_trailers_pass_through(
    pki: Pki,
    sidecar: Sidecar,
    device,  # type: ignore[no-untyped-def]
) -> None:
    async with channel(pki, sidecar.port, device) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(m("Fail"))(b"because", timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "upstream says no: because"
    trailers = dict(err.trailing_metadata() or ())
    assert trailers["x-upstream-trailer"] == "kept"
    assert trailers["x-bin"] == b"\x00\x01"


async def test_deadline_reaches_upstream(
    pki: Pki,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    device,  # type: ignore[no-untyped-def]
) -> None:
    async with channel(pki, sidecar.port, device) as ch:
        assert await ch.unary_unary(m("Unary"))(b"x", timeout=7) == b"x"
        remaining = upstream.seen[-1].time_remaining
        assert remaining is not None and 0 < remaining <= 7.5
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(m("Slow"))(b"x", timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(upstream.seen[-1].cancelled.wait(), 5)


async def test_client_cancellation_reaches_upstream(
    pki: Pki,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    device,  # type: ignore[no-untyped-def]
) -> None:
    async with channel(pki, sidecar.port, device) as ch:
        call = ch.unary_unary(m("Slow"))(b"x")
        seen = await upstream.wait_for_call()
        assert seen.time_remaining is None
        call.cancel()
        await asyncio.wait_for(upstream.seen[-1].cancelled.wait(), 5)


async def test_client_identity_headers_are_replaced_not_forwarded(
    pki: Pki,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    device,  # type: ignore[no-untyped-def]
) -> None:
    forged = (
        ("x-ztagent-device-id", "admin-device"),
        ("x-ztagent-spiffe-id", "spiffe://ztagent.dev/device/admin-device"),
        ("x-ztagent-anything", "x"),
        ("x-app-header", "kept"),
    )
    async with channel(pki, sidecar.port, device) as ch:
        await ch.unary_unary(m("Unary"))(b"x", metadata=forged, timeout=5)
    seen = upstream.seen[-1].metadata
    ztagent = [(k, v) for k, v in seen if k.startswith("x-ztagent-")]
    assert sorted(k for k, _ in ztagent) == [
        "x-ztagent-assertion",  # the signed one the workload trusts (minted by the sidecar)
        "x-ztagent-device-id",
        "x-ztagent-spiffe-id",
    ]
    assert dict(ztagent)["x-ztagent-device-id"] == "dev-1"
    assert dict(ztagent)["x-ztagent-spiffe-id"] == "spiffe://ztagent.dev/device/dev-1"
    assert ("x-app-header", "kept") in seen


async def test_unknown_service_is_unimplemented(
    pki: Pki,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    device,  # type: ignore[no-untyped-def]
) -> None:
    async with channel(pki, sidecar.port, device) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/nobody.v1.Home/Call")(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no route for service 'nobody.v1.Home'" in (info.value.details() or "")
    assert upstream.seen == []


@pytest.mark.parametrize("odd", ["Unary\x00", "Un ary", "Unary\t", "Unäry"])
async def test_a_method_name_with_odd_characters_names_no_service(
    pki: Pki,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    device,  # type: ignore[no-untyped-def]
    odd: str,
) -> None:
    """Of a routed service too: a path that is not a protobuf service and method name is
    refused ``no_route`` and never forwarded (it was, with the odd name in the policy input)."""
    async with channel(pki, sidecar.port, device) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(m(odd))(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (info.value.details() or "").startswith("no_route: no route for service '/test.v1.")
    assert upstream.seen == []


async def test_unknown_service_still_requires_identity(pki: Pki, sidecar: Sidecar) -> None:
    bad = pki.mint(uris=["spiffe://evil.example/device/x"])
    async with channel(pki, sidecar.port, bad) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/nobody.v1.Home/Call")(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_upstream_down_is_unavailable(pki: Pki, tmp_path: Path, device) -> None:  # type: ignore[no-untyped-def]
    dead = EchoUpstream()
    address = await dead.start()
    await dead.stop()
    car = Sidecar(load_config(write_config(pki, {SERVICE: address, RAW_SERVICE: address})))
    await car.start()
    try:
        async with channel(pki, car.port, device) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(m("Unary"))(b"x", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await car.stop(0)


async def test_unix_socket_upstream(pki: Pki, tmp_path: Path, device) -> None:  # type: ignore[no-untyped-def]
    echo = EchoUpstream()
    address = await echo.start(f"unix:{tmp_path}/echo.sock")
    car = Sidecar(load_config(write_config(pki, {SERVICE: address, RAW_SERVICE: address})))
    await car.start()
    try:
        async with channel(pki, car.port, device) as ch:
            assert await ch.unary_unary(m("Unary"))(b"over unix", timeout=5) == b"over unix"
    finally:
        await car.stop(0)
        await echo.stop()


async def test_health_serving_then_not_serving_on_stop(
    pki: Pki, upstream: EchoUpstream, device
) -> None:  # type: ignore[no-untyped-def]
    car = Sidecar(
        load_config(write_config(pki, {SERVICE: upstream.address, RAW_SERVICE: upstream.address}))
    )
    await car.start()
    async with channel(pki, car.port, device) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        slow = asyncio.ensure_future(ch.unary_unary(m("Slow"))(b"x", timeout=60))
        await upstream.wait_for_call()
        stopping = asyncio.ensure_future(car.stop(0.3))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError):
            await slow  # cancelled once the grace period ran out
        await stopping


async def test_graceful_stop_lets_in_flight_calls_finish(
    pki: Pki, upstream: EchoUpstream, device
) -> None:  # type: ignore[no-untyped-def]
    car = Sidecar(
        load_config(write_config(pki, {SERVICE: upstream.address, RAW_SERVICE: upstream.address}))
    )
    await car.start()
    async with channel(pki, car.port, device) as ch:
        call = ch.stream_stream(m("Bidi"))(timeout=30)
        await call.write(b"one")
        assert await call.read() == b"eno"
        stopping = asyncio.ensure_future(car.stop(10))
        await asyncio.sleep(0.2)
        await call.write(b"two")  # the stream keeps working while the server drains
        assert await call.read() == b"owt"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 5)


async def test_max_concurrent_streams_is_advertised_and_holds(
    pki: Pki,
    device,  # type: ignore[no-untyped-def]
) -> None:
    """With listen.max_concurrent_streams = 2, a third call on the same connection waits for
    a free stream: the upstream never sees more than two at once."""
    echo = EchoUpstream()
    address = await echo.start()
    extra = "[listen]\nmax_concurrent_streams = 2\n"
    config = write_config(pki, {SERVICE: address, RAW_SERVICE: address})
    config.write_text(
        config.read_text().replace("grace_period_s = 5\n", "grace_period_s = 5\n" + extra[9:])
    )
    car = Sidecar(load_config(config))
    assert car.config.listen.max_concurrent_streams == 2
    await car.start()
    try:
        async with channel(pki, car.port, device) as ch:
            calls = [ch.unary_unary(m("Sleep"))(b"0.6", timeout=10) for _ in range(3)]
            await asyncio.sleep(0.4)
            assert len(echo.seen) == 2  # the third is queued by the client, not admitted
            assert await asyncio.gather(*calls) == [b"0.6"] * 3
            assert len(echo.seen) == 3
    finally:
        await car.stop(0)
        await echo.stop()
