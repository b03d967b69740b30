"""Proxyless mode: the sidecar's admission inside a Python gRPC workload.

gRPC's own answer to the cost of a second hop is "proxyless": the server takes its security
configuration itself. Here a ``grpc.aio`` workload protects itself with the same config file
and the same checks as the sidecar — device certificate + CRL, posture, user token, policy,
decision log, metrics — by serving through ``protected_server``::

    from ztagent.sidecar.proxyless import admitted, protected_server

    guard = protected_server("ztagent.toml", add_services=lambda server: (
        storage_pb2_grpc.add_StorageServicer_to_server(MyStorage(), server)))
    await guard.start()            # the mTLS port of [listen], attestation and health on it
    ...
    def Get(self, request, context):
        who = admitted()           # the verified device and user of this call
        ... who.device_id, who.user, who.decision_id ...

Everything around the checks is the sidecar itself (``Sidecar`` with its proxy replaced by
the workload's services): hot reload of the trust files, CRL fetching, JWKS refresh, policy
reload and bundle polling run in the same background tasks, so there is one implementation.
``AdmissionInterceptor`` wraps every handler of the workload's services: the admission core
decides on the call's values before the handler runs (a refusal aborts with exactly the
sidecar's status, ``code: message`` details and ``x-ztagent-error-*`` trailers), and the
verdict's ``Admitted`` is set for the handler in a context variable (``admitted()``) — the
handler reads the caller from there, never from headers. Health and attestation keep their
own checks (the identity check, the attestation protocol) and are not wrapped.

A synchronous ``grpc.server`` workload is served the same way by ``protected_sync_server``:
its servicers run in the server's thread pool behind ``SyncAdmissionInterceptor``, and the
sidecar's own asyncio parts (admission, background tasks, health, attestation, reflection)
run on an event loop in a thread of their own; the interceptor hands each decision to that
loop and waits for it, and the aio services are bridged onto the sync server
(``SyncServer``), so there is still one implementation of each.

gRPC fixes a server's interceptors when it is made, so this module makes the server (with
the sidecar's options and credentials) and takes the workload's servicers as a callback,
rather than adding an interceptor to a server the workload made.

A sidecar isolates the keys and the checks from the workload's code; proxyless trusts the
workload process with them (its server key, its decision log, the policy) in exchange for
one hop less.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from ztagent.admission.context import (
    NotAdmittedError,
    admitted,
    reset_admitted,
    set_admitted,
)
from ztagent.admission.core import AdmissionCore, Admitted
from ztagent.config import Config, load_config
from ztagent.errors import ZtagentError
from ztagent.rpc_status import error_trailers, grpc_status_for
from ztagent.sidecar.pipeline import call_of

log = logging.getLogger("ztagent.proxyless")

UNWRAPPED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "ztagent.v1.Attestation",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Services with checks of their own (or none needed): not run through admission."""


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs ``core().decide`` before every handler of the workload's services. A streaming
    call's credentials are checked again every ``recheck_s`` seconds while it is open
    (``AdmissionCore.recheck``), as the proxy does: a device revoked later loses its stream."""

    def __init__(self, core: Callable[[], AdmissionCore | None], recheck_s: float = 2.0) -> None:
        self._core = core
        self._recheck_s = recheck_s
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        """method -> (the workload's handler, its admitted wrapper): built once per method,
        not per call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler and handler is not None:
            return known[1]
        wrapped = self._wrap(handler, method)
        if handler is not None and len(self._wrapped) < 1024:  # bounded: methods are few
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler:
        service = method.lstrip("/").split("/", 1)[0]
        if service in UNWRAPPED_SERVICES:
            return handler
        admit, watch = self._admit, self._watch
        if handler is None:  # an unknown method: refused as the sidecar refuses it (no_route)

            async def unknown(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(method, context)
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no method {method}")

            return grpc.unary_unary_rpc_method_handler(unknown)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = await admit(method, context)
                try:
                    return await inner_uu(request, context)
                finally:
                    reset_admitted(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                token = await admit(method, context)
                watcher = watch(method, context)
                try:
                    async for item in inner_us(request, context):
                        yield item
                finally:
                    watcher.cancel()
                    reset_admitted(token)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                token = await admit(method, context)
                watcher = watch(method, context)
                try:
                    return await inner_su(requests, context)
                finally:
                    watcher.cancel()
                    reset_admitted(token)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            token = await admit(method, context)
            watcher = watch(method, context)
            try:
                async for item in inner_ss(requests, context):
                    yield item
            finally:
                watcher.cancel()
                reset_admitted(token)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> contextvars.Token[Admitted | None]:
        core = self._core()
        if core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting_down: not serving yet")
            raise AssertionError("unreachable")
        verdict = await core.decide(call_of(context, method))
        err: ZtagentError | None = verdict.error
        if err is not None:  # logged (within the caller's budget) by the core
            await context.abort(
                grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
            )
            raise AssertionError("unreachable")
        return set_admitted(verdict.admitted)

    def _watch(self, method: str, context: grpc.aio.ServicerContext) -> asyncio.Task[None]:
        """Checks the open call's credentials every ``recheck_s``; on a refusal, ends the call
        with it (the status goes to the client at once) and cancels the handler's task."""
        handler_task = asyncio.current_task()

        async def watch() -> None:
            while True:
                await asyncio.sleep(self._recheck_s)
                core = self._core()
                err = await core.recheck(call_of(context, method)) if core is not None else None
                if err is not None:
                    with contextlib.suppress(grpc.aio.AbortError):
                        await context.abort(
                            grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
                        )
                    if handler_task is not None:
                        handler_task.cancel()
                    return

        return asyncio.ensure_future(watch())


# -- synchronous grpc.server ----------------------------------------------------------------


class SyncAdmissionInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """``AdmissionInterceptor`` for a synchronous ``grpc.server``: the handler's thread asks
    the admission loop for the verdict and waits for it, then runs the handler (or aborts
    with the sidecar's status, details and trailers). A sync handler's thread cannot be
    ended from outside, so an open stream's credentials are checked again in that thread,
    before a message passes once ``recheck_s`` has gone by since the last check: a device
    revoked later gets no further message and its stream ends with the refusal (an idle
    stream ends only when it next moves)."""

    def __init__(
        self,
        core: Callable[[], AdmissionCore | None],
        loop: asyncio.AbstractEventLoop,
        recheck_s: float = 2.0,
    ) -> None:
        self._core = core
        self._loop = loop
        self._recheck_s = recheck_s

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method = details.method
        if method.lstrip("/").split("/", 1)[0] in UNWRAPPED_SERVICES:
            return handler
        admit = self._admit
        if handler is None:

            def unknown(request: Any, context: grpc.ServicerContext) -> Any:
                admit(method, context)
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no method {method}")

            return grpc.unary_unary_rpc_method_handler(unknown)
        de, se = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner = handler.unary_unary or handler.stream_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                token = admit(method, context)
                if handler.stream_unary is not None:  # a client stream: checked as it moves
                    request = _checked(request, self._rechecker(method, context))
                try:
                    return inner(request, context)
                finally:
                    reset_admitted(token)

            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(unary, de, se)
            return grpc.stream_unary_rpc_method_handler(unary, de, se)
        inner_stream = handler.unary_stream or handler.stream_stream

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = admit(method, context)
            recheck = self._rechecker(method, context)
            try:
                if handler.stream_stream is not None:
                    request = _checked(request, recheck)
                for response in inner_stream(request, context):
                    recheck()
                    yield response
            finally:
                reset_admitted(token)

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming, de, se)
        return grpc.stream_stream_rpc_method_handler(streaming, de, se)

    def _rechecker(self, method: str, context: grpc.ServicerContext) -> Callable[[], None]:
        """A check to run before each message of an open stream: every ``recheck_s`` it asks
        the admission loop to check the call's credentials again and aborts on a refusal."""
        checked = time.monotonic()

        def recheck() -> None:
            nonlocal checked
            if time.monotonic() - checked < self._recheck_s:
                return
            checked = time.monotonic()
            core = self._core()
            if core is None:
                return
            future = asyncio.run_coroutine_threadsafe(
                core.recheck(call_of(context, method)), self._loop
            )
            err = future.result()
            if err is not None:  # logged by the core (open_call)
                _abort(
                    context, grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
                )

        return recheck

    def _admit(
        self, method: str, context: grpc.ServicerContext
    ) -> contextvars.Token[Admitted | None]:
        core = self._core()
        if core is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "shutting_down: not serving yet")
            raise AssertionError("unreachable")
        call = call_of(context, method)
        verdict = asyncio.run_coroutine_threadsafe(core.decide(call), self._loop).result()
        err: ZtagentError | None = verdict.error
        if err is not None:  # logged (within the caller's budget) by the core
            _abort(context, grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err))
        return set_admitted(verdict.admitted)


def _checked(requests: Iterator[Any], recheck: Callable[[], None]) -> Iterator[Any]:
    for request in requests:
        recheck()
        yield request


def _abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    trailers: Sequence[tuple[str, str]] = (),
) -> NoReturn:
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    context.abort(code, details)
    raise AssertionError("unreachable")


class _Aborted(Exception):
    """An aio handler's ``await context.abort(...)``, carried back to the sync call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Sequence[Any]) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, tuple(trailers)


_END = object()


class _LoopContext:
    """What an aio handler uses of its context, over a sync call's context, on the loop:
    ``abort`` and ``write`` are coroutines there; everything else is the sync context's."""

    def __init__(
        self, context: grpc.ServicerContext, out: queue.SimpleQueue[Any] | None = None
    ) -> None:
        self._context = context
        self._out = out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> NoReturn:
        raise _Aborted(code, details, trailing_metadata)

    async def write(self, message: Any) -> None:
        if self._out is None:
            raise RuntimeError("write() on a call without a response stream")
        self._out.put(message)


async def _requests_of(requests: Iterator[Any]) -> AsyncIterator[Any]:
    """A sync request iterator, read on the loop's default executor."""
    loop = asyncio.get_running_loop()
    while (item := await loop.run_in_executor(None, next, requests, _END)) is not _END:
        yield item


def _bridged(handler: grpc.RpcMethodHandler, loop: asyncio.AbstractEventLoop) -> Any:
    """An aio ``RpcMethodHandler`` (health, attestation, reflection) as a sync one whose
    calls run on ``loop``."""

    def once(context: grpc.ServicerContext, start: Callable[[_LoopContext], Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(start(_LoopContext(context)), loop)
        context.add_callback(future.cancel)
        try:
            return future.result()
        except _Aborted as aborted:
            _abort(context, aborted.code, aborted.details, aborted.trailers)
        except concurrent.futures.CancelledError:
            return None  # the call ended first

    def stream(context: grpc.ServicerContext, start: Callable[[_LoopContext], Any]) -> Any:
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()

        async def drive() -> None:
            try:
                result = start(_LoopContext(context, out))
                if inspect.isasyncgen(result):
                    async for item in result:
                        out.put(item)
                else:
                    await result  # a handler that writes with context.write
            finally:
                out.put(_END)

        future = asyncio.run_coroutine_threadsafe(drive(), loop)
        context.add_callback(future.cancel)
        try:
            while True:
                try:
                    item = out.get(timeout=0.5)
                except queue.Empty:
                    if future.done():
                        break  # cancelled before it started: no _END comes
                    continue
                if item is _END:
                    break
                yield item
        finally:
            if not future.done():
                future.cancel()  # the client went away mid-stream
        try:
            future.result()
        except _Aborted as aborted:
            _abort(context, aborted.code, aborted.details, aborted.trailers)
        except concurrent.futures.CancelledError:
            return

    de, se = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        uu = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: once(context, lambda view: uu(request, view)), de, se
        )
    if handler.stream_unary is not None:
        su = handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: once(context, lambda view: su(_requests_of(requests), view)),
            de,
            se,
        )
    if handler.unary_stream is not None:
        us = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            lambda request, context: stream(context, lambda view: us(request, view)), de, se
        )
    ss = handler.stream_stream
    return grpc.stream_stream_rpc_method_handler(
        lambda requests, context: stream(context, lambda view: ss(_requests_of(requests), view)),
        de,
        se,
    )


class _BridgedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self._cache: dict[str, Any] = {}

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method not in self._cache:
            handler = self._inner.service(details)
            self._cache[method] = None if handler is None else _bridged(handler, self._loop)
        return self._cache[method]


class SyncServer:
    """A synchronous ``grpc.server`` that the ``Sidecar`` drives as it drives an aio one:
    the aio servicers it registers (health, attestation, reflection) are bridged to run on
    the admission loop; the workload's own sync servicers go on ``sync`` directly, behind
    ``SyncAdmissionInterceptor``."""

    def __init__(
        self,
        core: Callable[[], AdmissionCore | None],
        loop: asyncio.AbstractEventLoop,
        options: Sequence[tuple[str, Any]],
        max_workers: int,
        recheck_s: float = 2.0,
    ) -> None:
        self._loop = loop
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="ztagent-proxyless"
        )
        self.sync = grpc.server(
            self._pool,
            interceptors=[SyncAdmissionInterceptor(core, loop, recheck_s)],
            options=list(options),
        )

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.sync.add_generic_rpc_handlers(tuple(_BridgedGeneric(h, self._loop) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        bridged = {name: _bridged(h, self._loop) for name, h in handlers.items()}
        self.sync.add_registered_method_handlers(service, bridged)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return int(self.sync.add_secure_port(address, credentials))

    async def start(self) -> None:
        self.sync.start()

    async def stop(self, grace: float | None) -> None:
        stopped = self.sync.stop(grace)
        await asyncio.to_thread(stopped.wait)
        self._pool.shutdown(wait=False, cancel_futures=True)


class SyncGuard:
    """A protected synchronous server: ``start()`` runs the sidecar's asyncio parts on an
    event loop in a thread of its own and serves; ``stop()`` drains and ends the thread."""

    def __init__(self, config: Config, add_services: Callable[[grpc.Server], None], workers: int):
        from ztagent.sidecar.server import Sidecar

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ztagent-admission", daemon=True
        )
        self.sidecar = Sidecar(config, sync_services=add_services, sync_workers=workers)
        self.port = 0

    def _run(self, coroutine: Awaitable[Any]) -> Any:
        async def wrapped() -> Any:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def start(self) -> int:
        self._thread.start()
        try:
            self.port = int(self._run(self.sidecar.start()))
        except BaseException:
            with contextlib.suppress(Exception):  # what did start: the log writer, metrics
                self._run(self.sidecar.stop(0))
            self._end_loop()
            raise
        return self.port

    def stop(self, grace: float | None = None) -> None:
        try:
            self._run(self.sidecar.stop(grace))
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()


def protected_sync_server(
    config: Config | Path | str,
    *,
    add_services: Callable[[grpc.Server], None],
    max_workers: int = 32,
) -> SyncGuard:
    """``protected_server`` for a synchronous workload: ``add_services`` registers its sync
    servicers on the ``grpc.server`` (``max_workers`` handler threads; a held stream, such as
    a health Watch, keeps one); ``guard.start()`` binds ``[listen] address`` with the
    sidecar's mTLS, ``guard.stop()`` drains."""
    if max_workers < 1:
        raise ValueError(f"max_workers: got {max_workers}, expected at least 1")
    loaded = config if isinstance(config, Config) else load_config(Path(config))
    return SyncGuard(loaded, add_services, max_workers)


def protected_server(
    config: Config | Path | str, *, add_services: Callable[[grpc.aio.Server], None]
) -> Any:
    """A ``Sidecar`` that serves ``add_services``' servicers behind admission instead of
    proxying: ``await guard.start()`` binds ``[listen] address`` with the sidecar's mTLS,
    ``await guard.stop()`` drains. Returns the ``Sidecar`` (its ``port``, ``health``,
    ``metrics``, ``pipeline`` as usual)."""
    from ztagent.sidecar.server import Sidecar

    loaded = config if isinstance(config, Config) else load_config(Path(config))
    car = Sidecar(loaded, services=add_services)
    return car


__all__ = [
    "AdmissionInterceptor",
    "NotAdmittedError",
    "SyncAdmissionInterceptor",
    "SyncGuard",
    "admitted",
    "protected_server",
    "protected_sync_server",
]
