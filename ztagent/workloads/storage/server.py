"""The gRPC face of the storage workload: ``ztagent.workloads.v1.Storage`` plus health.

The caller's namespace is the device id of the identity assertion the sidecar signs for each
call it forwards (``ztagent.workloads.identity``): a call without a valid assertion minted for
that very method is refused, so callers can never pick a namespace, whatever header they
send and whatever transport they reach the workload on. A unix socket is created 0600 (0660
with ``socket_group``) whatever the umask. SQLite work runs on one worker
thread, in order, off the event loop. Watch fans committed changes out to subscribers through
bounded per-watcher queues: a watcher that falls behind is dropped with RESOURCE_EXHAUSTED
and never slows writers down. The workload binds loopback or a unix socket only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ztagent._proto.workloads.v1 import storage_pb2, storage_pb2_grpc
from ztagent.addresses import local_target
from ztagent.admission.context import admitted
from ztagent.errors import ConfigError, TransportError, VerificationError, ZtagentError
from ztagent.rpc_status import ERROR_CODE_HEADER, error_trailers, grpc_status_for
from ztagent.signals import wait_for_stop_signal
from ztagent.tokens.assertion import AssertionVerifier
from ztagent.workloads.identity import bind_local, caller, trust_verifier
from ztagent.workloads.storage.errors import (
    InvalidRequestError,
    WatchOverflowError,
)
from ztagent.workloads.storage.store import (
    DEFAULT_MAX_VALUE_BYTES,
    Change,
    ChangeKind,
    Store,
    validate_namespace,
    validate_prefix,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "ztagent.workloads.v1.Storage"
DEVICE_ID_HEADER = "x-ztagent-device-id"
"""Trailing metadata that carries the stable ztagent error code of a failed call."""
DEFAULT_LISTEN = "127.0.0.1:50061"
STOP_GRACE_S = 5.0
"""Seconds in-flight calls get to finish on SIGTERM/SIGINT."""
RECEIVE_HEADROOM_BYTES = 1024 * 1024
"""The gRPC receive limit is max_value_bytes plus this, so an oversized value reaches the
store's own check (INVALID_ARGUMENT) instead of gRPC's (RESOURCE_EXHAUSTED)."""
WATCH_MAX_EVENTS = 1024
"""Changes a watcher may have queued before it is dropped."""
WATCH_PAGE = 100
"""Existing records read per step when a Watch asks for them."""
BULK_MAX_ITEMS = 10_000
"""Most PutRequests one BulkPut may carry."""

_T = TypeVar("_T")

# -- listen addresses -----------------------------------------------------------------------


# -- watch fan-out --------------------------------------------------------------------------


class _Watcher:
    """One Watch call's bounded queue of changes."""

    def __init__(self, namespace: str, prefix: str, max_events: int, max_bytes: int) -> None:
        self.namespace = namespace
        self.prefix = prefix
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self.queued_bytes = 0
        self.overflowed = False
        self.closed = False

    def offer(self, change: Change) -> None:
        if self.overflowed or self.closed:
            return
        size = len(change.value)
        if self.queue.qsize() >= self.max_events or self.queued_bytes + size > self.max_bytes:
            self.overflowed = True
            self.queue.put_nowait(None)  # wakes the reader, which sees the flag
            return
        self.queued_bytes += size
        self.queue.put_nowait(change)

    def close(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)

    async def next(self) -> Change | None:
        """The next change; None once the watcher overflowed or the hub closed."""
        change = await self.queue.get()
        if change is None or self.overflowed:
            return None
        self.queued_bytes -= len(change.value)
        return change


class ChangeHub:
    """Fans committed changes out to the watchers of their namespace and prefix.

    ``publish_threadsafe`` is the store's ``on_change`` callback: it runs on the store's
    thread and hands the change to the loop, preserving commit order. Delivery never blocks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_events: int, max_bytes: int) -> None:
        self._loop = loop
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._watchers: dict[str, set[_Watcher]] = {}
        self._closed = False

    def subscribe(self, namespace: str, prefix: str) -> _Watcher:
        watcher = _Watcher(namespace, prefix, self._max_events, self._max_bytes)
        if self._closed:
            watcher.close()
        else:
            self._watchers.setdefault(namespace, set()).add(watcher)
        return watcher

    def unsubscribe(self, watcher: _Watcher) -> None:
        group = self._watchers.get(watcher.namespace)
        if group is not None:
            group.discard(watcher)
            if not group:
                del self._watchers[watcher.namespace]

    def publish_threadsafe(self, change: Change) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody is watching
            self._loop.call_soon_threadsafe(self.publish, change)

    def publish(self, change: Change) -> None:
        for watcher in list(self._watchers.get(change.namespace, ())):
            if change.key.startswith(watcher.prefix):
                watcher.offer(change)
                if watcher.overflowed:
                    self.unsubscribe(watcher)

    def close(self) -> None:
        """Ends every Watch (at shutdown); later subscribers end at once."""
        self._closed = True
        for group in list(self._watchers.values()):
            for watcher in group:
                watcher.close()
        self._watchers.clear()


# -- the servicer ---------------------------------------------------------------------------


def device_namespace(
    verifier: AssertionVerifier | None, context: grpc.aio.ServicerContext | Any, method: str
) -> str:
    """The caller's namespace: the device id of the call's verified identity assertion for
    ``/ztagent.workloads.v1.Storage/<method>``; in proxyless mode (``verifier`` None) the
    device the in-process admission admitted (``ztagent.admission.context.admitted``)."""
    device_id = (
        caller(verifier, context, f"/{SERVICE_NAME}/{method}").device_id
        if verifier is not None
        else admitted().device_id
    )
    try:
        validate_namespace(device_id)
    except InvalidRequestError as err:
        raise VerificationError("bad_device_id", f"asserted device id: {err.message}") from None
    return device_id


async def _abort(context: grpc.aio.ServicerContext, err: ZtagentError) -> NoReturn:
    await context.abort(grpc_status_for(err), err.message, error_trailers(err))
    raise AssertionError("context.abort returned")  # pragma: no cover


class StorageServicer(storage_pb2_grpc.StorageServicer):
    """Implements ``ztagent.workloads.v1.Storage`` over a :class:`Store`."""

    def __init__(
        self,
        store: Store,
        hub: ChangeHub,
        executor: ThreadPoolExecutor,
        verifier: AssertionVerifier | None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._executor = executor
        self._verifier = verifier

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def Put(
        self, request: storage_pb2.PutRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.PutResponse:
        try:
            ns = device_namespace(self._verifier, context, "Put")
            revision = await self._run(self._store.put, ns, request.key, request.value)
        except ZtagentError as err:
            await _abort(context, err)
        return storage_pb2.PutResponse(key=request.key, revision=revision)

    async def Get(
        self, request: storage_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.GetResponse:
        try:
            ns = device_namespace(self._verifier, context, "Get")
            record = await self._run(self._store.get, ns, request.key)
        except ZtagentError as err:
            await _abort(context, err)
        return storage_pb2.GetResponse(key=record.key, value=record.value, revision=record.revision)

    async def Delete(
        self, request: storage_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.DeleteResponse:
        try:
            ns = device_namespace(self._verifier, context, "Delete")
            revision = await self._run(self._store.delete, ns, request.key)
        except ZtagentError as err:
            await _abort(context, err)
        return storage_pb2.DeleteResponse(deleted=revision is not None)

    async def List(
        self, request: storage_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.ListResponse:
        try:
            ns = device_namespace(self._verifier, context, "List")
            page = await self._run(
                self._store.list_keys, ns, request.prefix, request.page_size, request.page_token
            )
        except ZtagentError as err:
            await _abort(context, err)
        return storage_pb2.ListResponse(keys=page.keys, next_page_token=page.next_page_token)

    async def BulkPut(
        self,
        request_iterator: AsyncIterator[storage_pb2.PutRequest],
        context: grpc.aio.ServicerContext,
    ) -> storage_pb2.BulkPutResponse:
        try:
            ns = device_namespace(self._verifier, context, "BulkPut")
            items: list[tuple[str, bytes]] = []
            async for request in request_iterator:
                self._store.check_value(request.key, request.value)  # fail before buffering more
                items.append((request.key, request.value))
                if len(items) > BULK_MAX_ITEMS:
                    raise InvalidRequestError(
                        "bulk_too_large",
                        f"BulkPut sent more than {BULK_MAX_ITEMS} values; maximum is "
                        f"{BULK_MAX_ITEMS} per call",
                    )
            revisions = await self._run(self._store.put_many, ns, items)
        except ZtagentError as err:
            await _abort(context, err)
        return storage_pb2.BulkPutResponse(
            count=len(revisions), last_revision=revisions[-1] if revisions else 0
        )

    async def Watch(
        self, request: storage_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[storage_pb2.WatchEvent]:
        try:
            ns = device_namespace(self._verifier, context, "Watch")
            validate_prefix(request.prefix)
        except ZtagentError as err:
            await _abort(context, err)
        watcher = self._hub.subscribe(ns, request.prefix)
        try:
            # Subscribed: tell the client, so it knows later writes will reach it.
            await context.send_initial_metadata(())
            start_revision = 0
            end_revision = 0
            seen: dict[str, int] = {}
            if request.include_existing:
                after: str | None = None
                first = True
                while True:
                    try:
                        page = await self._run(
                            self._store.scan, ns, request.prefix, after, WATCH_PAGE
                        )
                    except ZtagentError as err:
                        await _abort(context, err)
                    if first:
                        start_revision, first = page.revision, False
                    end_revision = page.revision
                    for record in page.records:
                        seen[record.key] = record.revision
                        yield storage_pb2.WatchEvent(
                            kind=storage_pb2.WatchEvent.PUT,
                            key=record.key,
                            value=record.value,
                            revision=record.revision,
                        )
                    if page.last_key is None:
                        break
                    after = page.last_key
            while True:
                change = await watcher.next()
                if change is None:
                    break
                if change.revision <= start_revision:
                    continue  # committed before the first read: already in the snapshot
                if change.revision <= end_revision and change.revision <= seen.get(change.key, 0):
                    continue  # a later page already carried this value
                yield storage_pb2.WatchEvent(
                    kind=(
                        storage_pb2.WatchEvent.PUT
                        if change.kind is ChangeKind.PUT
                        else storage_pb2.WatchEvent.DELETE
                    ),
                    key=change.key,
                    value=change.value,
                    revision=change.revision,
                )
            # End with a status (not context.abort, which raised inside this generator can
            # race the last queued write and leave the stream hanging).
            end: ZtagentError = TransportError("shutting_down", "storage workload is shutting down")
            if watcher.overflowed:
                end = WatchOverflowError(
                    "watch_overflow",
                    f"watcher fell behind: more than {watcher.max_events} changes or "
                    f"{watcher.max_bytes} bytes queued; reconnect with include_existing",
                )
            context.set_trailing_metadata(((ERROR_CODE_HEADER, end.code),))
            context.set_code(grpc_status_for(end))
            context.set_details(end.message)
            return
        finally:
            self._hub.unsubscribe(watcher)


# -- starting and stopping ------------------------------------------------------------------


@dataclass
class _Running:
    server: grpc.aio.Server
    store: Store
    hub: ChangeHub
    health: Any
    executor: ThreadPoolExecutor


_RUNNING: dict[int, _Running] = {}


async def start_storage_server(
    listen: str,
    data_dir: Path,
    *,
    trust_keys: Sequence[Path],
    socket_group: str | None = None,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> tuple[grpc.aio.Server, int]:
    """Opens the store in ``data_dir`` and starts serving on ``listen``, accepting calls
    whose identity assertion is signed by one of ``trust_keys`` (PEM public keys or
    certificates: the sidecar's ``assertion.pub``, the inference workload's).

    Returns the started server and its bound port (0 for a unix socket). Stop it with
    :func:`stop_storage_server`, which also closes the database.
    """
    address = local_target(listen, "listen")
    verifier = trust_verifier(trust_keys)
    if max_value_bytes < 1:
        raise ConfigError(
            "max_value_bytes", f"got {max_value_bytes}, expected a positive number of bytes"
        )
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztagent-storage")
    hub = ChangeHub(loop, max_events=WATCH_MAX_EVENTS, max_bytes=4 * max_value_bytes + 2**20)
    try:
        store = await loop.run_in_executor(
            executor,
            functools.partial(
                Store.open,
                data_dir,
                max_value_bytes=max_value_bytes,
                on_change=hub.publish_threadsafe,
            ),
        )
    except BaseException:
        executor.shutdown(wait=False)
        raise
    limit = max_value_bytes + RECEIVE_HEADROOM_BYTES
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    storage_pb2_grpc.add_StorageServicer_to_server(
        StorageServicer(store, hub, executor, verifier), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    from grpc_reflection.v1alpha import reflection

    # Reflection (grpcurl list / describe), like health without an assertion: it names only
    # the schema, and this port is loopback or a unix socket the sidecar reaches.
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    running = _Running(server, store, hub, health_servicer, executor)
    try:
        port = bind_local(server, address, group=socket_group)
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await _shutdown(running, grace=None)
        raise
    _RUNNING[id(server)] = running
    bound = port
    log.info("storage workload serving on %s (port %d), data in %s", address, bound, data_dir)
    return server, bound


async def stop_storage_server(server: grpc.aio.Server, grace: float | None = STOP_GRACE_S) -> None:
    """Reports NOT_SERVING, ends Watch streams, stops with ``grace`` seconds, closes the DB."""
    running = _RUNNING.pop(id(server), None)
    if running is None:
        await server.stop(grace)
        return
    await _shutdown(running, grace)


async def _shutdown(running: _Running, grace: float | None) -> None:
    with contextlib.suppress(Exception):
        await running.health.enter_graceful_shutdown()
    running.hub.close()
    await running.server.stop(grace)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(running.executor, running.store.close)
    running.executor.shutdown(wait=True)


async def run_storage_protected(config: Path, data_dir: Path, *, listen: str | None = None) -> None:
    """Proxyless: the storage service on ``config``'s ``[listen]`` mTLS port (or ``listen``),
    every call
    through the same admission as the sidecar's (``ztagent.sidecar.proxyless``); the caller's
    namespace is the admitted device. Serves until SIGTERM or SIGINT."""
    from ztagent.config import load_config
    from ztagent.sidecar.proxyless import protected_server

    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztagent-storage")
    hub = ChangeHub(loop, max_events=WATCH_MAX_EVENTS, max_bytes=4 * DEFAULT_MAX_VALUE_BYTES)
    store = await loop.run_in_executor(
        executor, functools.partial(Store.open, data_dir, on_change=hub.publish_threadsafe)
    )
    servicer = StorageServicer(store, hub, executor, None)
    guard = protected_server(
        load_config(config, listen_address=listen),
        add_services=lambda s: storage_pb2_grpc.add_StorageServicer_to_server(servicer, s),
    )
    try:
        await guard.start()
        log.info("storage workload serving proxyless on port %d, data in %s", guard.port, data_dir)
        await wait_for_stop_signal()
        log.info("storage workload stopping")
    finally:
        await guard.stop()
        hub.close()
        await loop.run_in_executor(executor, store.close)
        executor.shutdown(wait=True)


async def run_storage(
    listen: str,
    data_dir: Path,
    *,
    trust_keys: Sequence[Path],
    socket_group: str | None = None,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops with a 5 s grace and closes the DB."""
    server, _ = await start_storage_server(
        listen,
        data_dir,
        trust_keys=trust_keys,
        socket_group=socket_group,
        max_value_bytes=max_value_bytes,
    )
    try:
        await wait_for_stop_signal()
        log.info("storage workload stopping")
    finally:
        await stop_storage_server(server, STOP_GRACE_S)
