"""Proxyless mode against the sidecar: the same refusal suite, the same answers.

The same config, certificates, tokens and policy drive (1) the sidecar in front of an echo
upstream and (2) the same echo service served proxyless (``protected_server``). Every
refusal — revoked device, certificate for another trust domain, malformed and forged
tokens, a policy denial, an unrouted service — must give the same status, the same details
and the same ``x-ztagent-error-code``; allowed calls of all four RPC kinds reach the handler
with the verified device from ``admitted()``, never from a header.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.ca import builders
from ztagent.config import load_config
from ztagent.rpc_status import ERROR_CODE_HEADER
from ztagent.sidecar.proxyless import (
    NotAdmittedError,
    admitted,
    protected_server,
    protected_sync_server,
)
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

POLICY = """package ztagent.authz

default decision := {"allow": true, "reasons": ["ok"], "headers": {}}

decision := {"allow": false, "reasons": ["no_denied_method"], "headers": {}} if {
	input.request.method == "Denied"
}
"""


def _echo_service(
    unary: Any, server_stream: Any, client_stream: Any, bidi: Any
) -> grpc.GenericRpcHandler:
    """The echo service's methods, one per RPC kind (aio or sync behaviours alike)."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Denied": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


def _echo_handlers() -> grpc.GenericRpcHandler:
    """The echo service, answering with the admitted device (proxyless mode)."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request + b"|" + admitted().device_id.encode()

    async def server_stream(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield admitted().device_id.encode()

    async def client_stream(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        return b"".join([r async for r in requests]) + b"|" + admitted().device_id.encode()

    async def bidi(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r + b"|" + admitted().method.encode()

    return _echo_service(unary, server_stream, client_stream, bidi)


def _sync_echo_handlers() -> grpc.GenericRpcHandler:
    """The echo service as synchronous handlers (a ``grpc.server`` workload)."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request + b"|" + admitted().device_id.encode()

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in range(3):
            yield admitted().device_id.encode()

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests) + b"|" + admitted().device_id.encode()

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield r + b"|" + admitted().method.encode()

    return _echo_service(unary, server_stream, client_stream, bidi)


class _Started:
    """Either kind of protected server (or the sidecar), started and stopped alike."""

    def __init__(self, mode: str, config: Any) -> None:
        self.mode = mode
        if mode == "sidecar":
            self.server: Any = Sidecar(config)
        elif mode == "proxyless":
            self.server = protected_server(
                config, add_services=lambda s: s.add_generic_rpc_handlers((_echo_handlers(),))
            )
        else:
            self.server = protected_sync_server(
                config,
                add_services=lambda s: s.add_generic_rpc_handlers((_sync_echo_handlers(),)),
            )
        self.port = 0

    async def __aenter__(self) -> _Started:
        if self.mode == "proxyless-sync":
            self.port = await asyncio.to_thread(self.server.start)
        else:
            self.port = await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.mode == "proxyless-sync":
            await asyncio.to_thread(self.server.stop, 0)
        else:
            await self.server.stop(0)


MODES = ("sidecar", "proxyless", "proxyless-sync")


def _config(pki: Pki, upstream: EchoUpstream, tmp_path: Path) -> Path:
    policy = tmp_path / "policy"
    policy.mkdir(exist_ok=True)
    (policy / "authz.rego").write_text(POLICY)
    return write_config(pki, {SERVICE: upstream.address}, policy=policy)


async def _outcome(pki: Pki, port: int, pair: builders.KeyPair, method: str, **kw: Any) -> str:
    async with channel(pki, port, pair) as ch:
        try:
            await ch.unary_unary(method)(b"x", timeout=10, **kw)
        except grpc.aio.AioRpcError as err:
            code = dict(err.trailing_metadata() or ()).get(ERROR_CODE_HEADER, "")
            return f"{err.code().name} {code} {err.details()}"
    return "OK"


async def test_the_refusal_suite_answers_the_same_in_both_modes(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    config = load_config(_config(pki, upstream, tmp_path))
    good, revoked = pki.mint("cam-1"), pki.mint("cam-revoked")
    pki.revoke(revoked, number=900)
    foreign = pki.mint("cam-2", uris=["spiffe://other.example/device/cam-2"])
    cases = [
        (good, f"/{SERVICE}/Unary", {}),
        (revoked, f"/{SERVICE}/Unary", {}),
        (foreign, f"/{SERVICE}/Unary", {}),
        (good, f"/{SERVICE}/Unary", {"metadata": (("authorization", "Bearer not-a-jwt"),)}),
        (good, f"/{SERVICE}/Unary", {"metadata": (("authorization", "Basic abc"),)}),
        (good, f"/{SERVICE}/Denied", {}),
        (good, "/other.v1.Nowhere/Get", {}),
    ]
    answers: dict[str, list[str]] = {}
    for mode in MODES:
        async with _Started(mode, config) as car:
            answers[mode] = [await _outcome(pki, car.port, pair, m, **kw) for pair, m, kw in cases]
    side = answers["sidecar"]
    assert side[0] == "OK"
    for mode in MODES[1:]:
        other = answers[mode]
        assert other[0] == "OK", mode
        assert side[1:] == other[1:], (mode, list(zip(side, other, strict=True)))
    assert [a.split(" ")[1] for a in side[1:]] == [
        "cert_revoked", "spiffe_id_wrong_trust_domain", "token_unverifiable", "token_unverifiable",
        "policy_denied", "no_route",
    ]  # fmt: skip


@pytest.mark.parametrize("mode", MODES[1:])
async def test_handlers_read_the_admitted_caller_for_every_rpc_kind(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path, mode: str
) -> None:
    config = load_config(_config(pki, upstream, tmp_path))
    forged = (("x-ztagent-device-id", "admin"),)

    async def two() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    async with (
        _Started(mode, config) as guard,
        channel(pki, guard.port, pki.mint("cam-7")) as ch,
    ):
        m = f"/{SERVICE}/"
        assert await ch.unary_unary(m + "Unary")(b"x", metadata=forged, timeout=5) == b"x|cam-7"
        got = [r async for r in ch.unary_stream(m + "ServerStream")(b"", timeout=5)]
        assert got == [b"cam-7"] * 3
        assert await ch.stream_unary(m + "ClientStream")(two(), timeout=5) == b"ab|cam-7"
        bidi = [r async for r in ch.stream_stream(m + "Bidi")(two(), timeout=5)]
        assert bidi == [b"a|/test.v1.Echo/Bidi", b"b|/test.v1.Echo/Bidi"]
    # read once stopped: stop drains the decision-log writer, which may still be lingering
    lines = (pki.layout.dir.parent / "decisions.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"cam-7"' in line]) >= 4  # logged like the sidecar's
    with pytest.raises(NotAdmittedError):
        admitted()  # outside a call


@pytest.mark.parametrize("mode", MODES[:2])
async def test_an_open_stream_of_a_device_revoked_later_is_ended(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path, mode: str
) -> None:
    """A Bidi stream admitted before its device's revocation is ended with the refusal,
    through the proxy and proxyless alike (the credentials are checked again every
    tls.reload_interval_s)."""
    config = load_config(_config(pki, upstream, tmp_path))
    late = pki.mint("cam-late")
    async with _Started(mode, config) as car, channel(pki, car.port, late) as ch:
        stream = ch.stream_stream(f"/{SERVICE}/Bidi")(timeout=30)
        await stream.write(b"before")
        assert await stream.read() not in (None, grpc.aio.EOF)
        pki.revoke(late, number=902)
        with pytest.raises(grpc.aio.AioRpcError):  # idle, as a Watch is: the sidecar ends it
            await asyncio.wait_for(stream.read(), 5)  # the CRL reload and recheck take 0.2 s
        assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers = dict(await stream.trailing_metadata() or ())
        assert trailers[ERROR_CODE_HEADER] == "cert_revoked"


async def test_a_sync_servers_open_stream_of_a_device_revoked_later_ends_when_it_moves(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """A sync handler's thread cannot be ended from outside: the credentials are checked
    again in it, before a message passes. Once the revocation is loaded, the next message
    ends the stream with the refusal instead of reaching the handler."""
    config = load_config(_config(pki, upstream, tmp_path))
    late = pki.mint("cam-late-sync")
    async with _Started("proxyless-sync", config) as car, channel(pki, car.port, late) as ch:
        stream = ch.stream_stream(f"/{SERVICE}/Bidi")(timeout=30)
        await stream.write(b"before")
        assert await stream.read() not in (None, grpc.aio.EOF)
        pki.revoke(late, number=903)
        echoed = 0
        with pytest.raises(grpc.aio.AioRpcError):
            for _ in range(50):  # the CRL reload and the recheck interval: 0.2 s each
                await asyncio.sleep(0.1)
                await stream.write(b"after")
                await asyncio.wait_for(stream.read(), 5)
                echoed += 1
        assert echoed < 50
        assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
        trailers = dict(await stream.trailing_metadata() or ())
        assert trailers[ERROR_CODE_HEADER] == "cert_revoked"


async def test_a_sync_server_serves_health_and_reflection_through_the_same_checks(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """On a ``grpc.server`` workload the sidecar's aio health and reflection services are
    bridged onto the sync server: a valid device gets SERVING and the service list, a
    revoked one the sidecar's refusal (status, code and trailers through the bridge), and a
    health Watch stream delivers its first status and ends when the client cancels."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    config = load_config(_config(pki, upstream, tmp_path))
    revoked = pki.mint("cam-gone")
    pki.revoke(revoked, number=901)
    async with _Started("proxyless-sync", config) as guard:
        async with channel(pki, guard.port, pki.mint("cam-8")) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            got = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            answers = [r async for r in stub.ServerReflectionInfo(ask(), timeout=5)]
            names = {s.name for s in answers[0].list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names
        async with channel(pki, guard.port, revoked) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert dict(info.value.trailing_metadata() or ())[ERROR_CODE_HEADER] == "cert_revoked"
            assert info.value.details().startswith("cert_revoked: ")


def test_a_sync_guard_that_cannot_start_leaves_no_thread(pki: Pki, tmp_path: Path) -> None:
    """A bad [listen] address is the config error the sidecar gives, and the admission
    loop's thread is gone afterwards."""
    import threading

    from ztagent.errors import ConfigError

    config = load_config(write_config(pki, {}), listen_address="256.0.0.1:1")
    guard = protected_sync_server(config, add_services=lambda s: None)
    with pytest.raises(ConfigError) as info:
        guard.start()
    assert info.value.key == "listen.address"
    assert "ztagent-admission" not in {t.name for t in threading.enumerate()}


async def test_the_storage_workload_serves_proxyless_from_the_cli(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """``ztagent workload storage --protect CONFIG``: its own mTLS port, the sidecar's
    admission in its process; the namespace is the admitted device, a forged header changes
    nothing, a revoked device is refused as the sidecar refuses it."""
    import asyncio
    import socket
    import subprocess
    import sys

    from ztagent._proto.workloads.v1 import storage_pb2, storage_pb2_grpc

    storage = "ztagent.workloads.v1.Storage"
    config = write_config(pki, {storage: upstream.address})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztagent", "workload", "storage", "--protect", str(config),
         "--listen", f"127.0.0.1:{port}", "--data", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(200):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        forged = (("x-ztagent-device-id", "cam-b"), ("x-ztagent-assertion", "x.y.z"))
        async with channel(pki, port, pki.mint("cam-a")) as ch:
            stub = storage_pb2_grpc.StorageStub(ch)
            await stub.Put(storage_pb2.PutRequest(key="k", value=b"a"), metadata=forged, timeout=10)
        async with channel(pki, port, pki.mint("cam-b")) as ch:
            stub = storage_pb2_grpc.StorageStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:  # cam-a's key is not cam-b's
                await stub.Get(storage_pb2.GetRequest(key="k"), timeout=10)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        async with channel(pki, port, pki.mint("cam-a")) as ch:
            got = await storage_pb2_grpc.StorageStub(ch).Get(
                storage_pb2.GetRequest(key="k"), timeout=10
            )
            assert got.value == b"a"
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stderr is not None:
            proc.stderr.close()
