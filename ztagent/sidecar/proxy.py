"""The byte-exact gRPC proxy: every call, whatever its kind, is forwarded as a raw stream.

At the HTTP/2 level the four RPC kinds differ only in how many messages each side sends, so
the proxy handles every method as stream-stream with identity (de)serialisers: requests and
responses pass as the same bytes, half-close, deadlines, cancellation, status, details and
trailing metadata are carried both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pool

from ztagent.config import Route
from ztagent.errors import ZtagentError
from ztagent.rpc_status import error_trailers, grpc_status_for
from ztagent.sidecar.metrics import Metrics
from ztagent.sidecar.upstreams import Upstreams, service_of

log = logging.getLogger("ztagent.proxy")

Metadata = Sequence[tuple[str, str | bytes]]

IDENTITY_PREFIX = "x-ztagent-"
# Not forwarded: our own identity headers (a client must never set them), HTTP/2 pseudo and
# transport headers, and grpc-reserved keys the channel sets itself.
_DROP_EXACT = frozenset({"user-agent", "te", "content-type", "host", "connection"})
_DROP_PREFIXES = (IDENTITY_PREFIX, ":", "grpc-")
# Upstream trailers that grpc rebuilds itself; grpc-status-details-bin (rich errors) is kept.
_KEEP_GRPC_TRAILERS = frozenset({"grpc-status-details-bin"})


def forwardable(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """Client metadata minus identity, transport and grpc-reserved keys."""
    if not metadata:
        return []
    return [
        (key, value)
        for key, value in metadata
        if key not in _DROP_EXACT and not key.startswith(_DROP_PREFIXES)
    ]


def _returnable(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    if not metadata:
        return []
    return [
        (key, value)
        for key, value in metadata
        if not key.startswith((":", "grpc-")) or key in _KEEP_GRPC_TRAILERS
    ]


class Admission(Protocol):
    """Decides whether a call may pass; returns the identity headers to add upstream."""

    async def admit(
        self, context: grpc.aio.ServicerContext, full_method: str, *, hold_log: bool = False
    ) -> Metadata:
        """Raises a ZtagentError to refuse the call. ``hold_log``: the admitted call's
        decision-log record may wait for ``release_log()`` before the writer wakes."""
        ...

    def release_log(self) -> None:
        """Wakes the decision-log writer for what ``admit(hold_log=True)`` held."""
        ...

    async def recheck_call(
        self, context: grpc.aio.ServicerContext, full_method: str
    ) -> ZtagentError | None:
        """None while an open call's credentials still hold, else the refusal (logged)."""
        ...


def is_unary_unary(full_method: str) -> bool:
    """True when the method is known (its service's descriptor is in protobuf's default pool,
    e.g. ztagent's own workloads) and neither side streams. Unknown methods take the
    stream-stream path, which is correct for every kind; this only picks the cheaper one."""
    service, _, name = full_method.lstrip("/").partition("/")
    try:
        method = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return False
    if method is None:
        return False
    return not (method.client_streaming or method.server_streaming)


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Generic handler: admission first, then route by service name and forward.

    The decision-log writer is woken only once the call has gone upstream (``hold_log``):
    its work then overlaps the wait for the workload rather than holding the GIL while the
    call is still being read and sent on.

    Methods whose kind is known to be unary-unary take a unary fast path (grpc.aio's unary
    call costs much less than a stream-stream one); every other method is relayed as a raw
    stream-stream call, which carries all four kinds byte for byte.

    A relayed stream's credentials are checked again every ``recheck_s`` seconds
    (``Admission.recheck_call``): a device revoked, or a user token expired, while its stream
    is open loses the stream (the upstream call is cancelled) with the refusal's status.
    """

    def __init__(
        self,
        admission: Admission,
        upstreams: Upstreams,
        metrics: Metrics | None = None,
        *,
        recheck_s: float = 2.0,
    ) -> None:
        self._admission = admission
        self._recheck_s = recheck_s
        self._metrics = metrics
        self._upstreams = upstreams
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._calls: dict[tuple[str, str], grpc.aio.StreamStreamMultiCallable] = {}
        self._unary_calls: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            if is_unary_unary(method):
                # Registered as client-streaming (the same bytes on the wire) so that the
                # request body is read only after admission: a refused call never makes the
                # sidecar buffer its (up to max_message_bytes) message.
                handler = grpc.stream_unary_rpc_method_handler(self._bind_unary(method))
            else:
                handler = grpc.stream_stream_rpc_method_handler(self._bind(method))
            if len(self._handlers) < 4096:  # bounded: method names come from clients
                self._handlers[method] = handler
        return handler

    def _bind(self, method: str):  # type: ignore[no-untyped-def]
        async def handle(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
            await self.forward(method, context)

        return handle

    def _bind_unary(self, method: str):  # type: ignore[no-untyped-def]
        async def handle(request_iterator: object, context: grpc.aio.ServicerContext) -> bytes:
            return await self.forward_unary(method, context)

        return handle

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> tuple[Metadata, Route]:
        """Identity headers and route, or the call is aborted with the reason."""
        try:
            identity = await self._admission.admit(context, method, hold_log=True)
        except ZtagentError as err:  # counted and logged (within a budget) by the core
            await context.abort(
                grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
            )
            raise AssertionError("unreachable") from err
        route = self._upstreams.route(service_of(method))
        if route is None:  # admission refuses unrouted services first; kept as a safeguard
            known = ", ".join(self._upstreams.services) or "none"
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"no route for service {service_of(method) or method!r} (routed: {known})",
            )
        assert route is not None
        return identity, route

    async def forward(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            identity, route = await self._admit(method, context)
            multicallable = self._calls.get((route.upstream, method))
            if multicallable is None:
                multicallable = self._upstreams.channel(route).stream_stream(method)
                if len(self._calls) < 4096:  # bounded: method names come from clients
                    self._calls[(route.upstream, method)] = multicallable
            call = multicallable(**_upstream_call_args(route, identity, context))
        finally:  # the call is on its way (or refused): the writer may have the GIL now
            self._admission.release_log()
        relay = asyncio.ensure_future(self._relay(route, call, context))
        try:
            while not (await asyncio.wait({relay}, timeout=self._recheck_s))[0]:
                err = await self._admission.recheck_call(context, method)
                if err is not None:
                    relay.cancel()  # cancels the upstream call
                    with contextlib.suppress(asyncio.CancelledError):
                        await relay
                    await context.abort(
                        grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
                    )
            relay.result()
        finally:
            if not relay.done():
                relay.cancel()

    async def forward_unary(self, method: str, context: grpc.aio.ServicerContext) -> bytes:
        """A unary call: admission on the headers first, then the one request message."""
        try:
            identity, route = await self._admit(method, context)
            request = await _one_request(method, context)
            key = (route.upstream, method)
            multicallable = self._unary_calls.get(key)
            if multicallable is None:
                multicallable = self._upstreams.channel(route).unary_unary(method)
                if len(self._unary_calls) < 4096:  # bounded: method names come from clients
                    self._unary_calls[key] = multicallable
            call = multicallable(request, **_upstream_call_args(route, identity, context))
        finally:  # the call is on its way (or refused): the writer may have the GIL now
            self._admission.release_log()
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as err:
            if self._metrics is not None:
                self._metrics.upstream_error(route.service, err.code().name)
            await context.abort(
                err.code(), err.details() or "", tuple(_returnable(err.trailing_metadata()))
            )
            raise AssertionError("unreachable") from err
        except asyncio.CancelledError:
            call.cancel()
            raise
        initial = await call.initial_metadata()
        if initial:
            await context.send_initial_metadata(_returnable(initial))
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(_returnable(trailing))
        return response

    async def _relay(
        self, route: Route, call: grpc.aio.StreamStreamCall, context: grpc.aio.ServicerContext
    ) -> None:
        pump = asyncio.create_task(_pump_requests(context, call))
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(_returnable(initial))
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                await context.write(message)
            code = await call.code()
            details = await call.details()
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as err:
            code, details, trailing = err.code(), err.details(), err.trailing_metadata()
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            if not pump.done():
                pump.cancel()
        if trailing:
            context.set_trailing_metadata(_returnable(trailing))
        if code != grpc.StatusCode.OK:
            if self._metrics is not None:
                self._metrics.upstream_error(route.service, code.name)
            context.set_code(code)
            context.set_details(details or "")


async def _one_request(method: str, context: grpc.aio.ServicerContext) -> bytes:
    """The call's one request message; anything but exactly one is INVALID_ARGUMENT (before
    the upstream sees any of it, as grpc-java's unary server waits for the half-close)."""
    request = await context.read()
    if request is grpc.aio.EOF or await context.read() is not grpc.aio.EOF:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unary method {method} expects exactly one request message",
        )
    assert isinstance(request, bytes)
    return request


def _upstream_call_args(
    route: Route, identity: Metadata, context: grpc.aio.ServicerContext
) -> dict[str, Any]:
    """Metadata (the client's forwardable keys plus the identity headers) and the deadline
    (the client's, else the route's timeout) of the upstream call."""
    timeout = context.time_remaining()
    metadata = forwardable(context.invocation_metadata())
    metadata.extend(identity)
    return {"metadata": tuple(metadata), "timeout": route.timeout_s if timeout is None else timeout}


async def _pump_requests(
    context: grpc.aio.ServicerContext, call: grpc.aio.StreamStreamCall
) -> None:
    """Copies client messages upstream, then half-closes; stops if the upstream call ends."""
    try:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                break
            await call.write(message)
        await call.done_writing()
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError):
        pass  # the upstream call already finished; its status is relayed by the reader
