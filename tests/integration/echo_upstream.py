"""A real grpc.aio upstream for proxy tests: raw-bytes methods of all four RPC kinds.

Service `test.v1.Echo`; every method records what it saw (metadata, deadline, cancellation)
in `EchoUpstream.seen` so tests can check what the sidecar forwarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

SERVICE = "test.v1.Echo"
"""Registered in protobuf's descriptor pool below: the sidecar knows its method kinds and
takes the unary fast path for its unary methods."""
RAW_SERVICE = "test.v1.EchoRaw"
"""The same methods under a name no descriptor describes: every call takes the generic
stream-stream path."""

_KINDS = {  # method -> (client streaming, server streaming)
    "Unary": (False, False),
    "ServerStream": (False, True),
    "ClientStream": (True, False),
    "Bidi": (True, True),
    "Fail": (False, False),
    "Slow": (False, False),
    "Sleep": (False, False),
}


def _register_descriptor() -> None:
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/echo.proto", package="test.v1", syntax="proto3"
    )
    proto.message_type.add(name="Bytes")
    service = proto.service.add(name="Echo")
    for name, (client_streaming, server_streaming) in _KINDS.items():
        service.method.add(
            name=name,
            input_type=".test.v1.Bytes",
            output_type=".test.v1.Bytes",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    pool.Add(proto)


_register_descriptor()


@dataclass
class Seen:
    method: str
    metadata: list[tuple[str, str | bytes]]
    time_remaining: float | None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class EchoUpstream:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self._called = asyncio.Event()

    async def wait_for_call(self) -> Seen:
        async with asyncio.timeout(5):
            await self._called.wait()
        return self.seen[-1]

    def _record(self, method: str, context: grpc.aio.ServicerContext) -> Seen:
        seen = Seen(method, list(context.invocation_metadata() or ()), context.time_remaining())
        self.seen.append(seen)
        self._called.set()
        return seen

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._record("Unary", context)
        return request

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._record("ServerStream", context)
        for i in range(3):
            yield bytes([i]) + request

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        self._record("ClientStream", context)
        parts = [r async for r in requests]
        return len(parts).to_bytes(4, "big") + b"".join(parts)

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._record("Bidi", context)
        async for request in requests:
            yield request[::-1]

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._record("Fail", context)
        context.set_trailing_metadata((("x-upstream-trailer", "kept"), ("x-bin", b"\x00\x01")))
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, "upstream says no: " + request.decode()
        )
        raise AssertionError("unreachable")

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen = self._record("Slow", context)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.cancelled.set()
            raise
        return request

    async def sleep(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Sleeps float(request) seconds, then echoes: an in-flight call for drain tests."""
        self._record("Sleep", context)
        await asyncio.sleep(float(request.decode()))
        return request

    async def start(self, address: str = "127.0.0.1:0") -> str:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
        }
        limit = 16 * 1024 * 1024
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE, handlers),
                grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),
            )
        )
        port = self.server.add_insecure_port(address)
        await self.server.start()
        self.address = address if address.startswith("unix:") else f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
