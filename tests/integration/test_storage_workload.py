"""The storage workload as a real gRPC server on loopback and on a unix socket.

Calls go through real grpc.aio channels carrying the identity assertion the sidecar would add
(``tests.fixtures.assertions``: a real key, a fresh assertion per call); the attacks on the
workload itself (a bare device-id header, no assertion, an expired one, one for another
method, one by another key, a replay) use plain channels. The crash test runs the workload as
a separate process and kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.assertions import SidecarKey, asserting_channel
from ztagent._proto.workloads.v1 import storage_pb2, storage_pb2_grpc
from ztagent.errors import ConfigError, TransportError
from ztagent.rpc_status import ERROR_CODE_HEADER
from ztagent.workloads.storage.server import (
    DEVICE_ID_HEADER,
    SERVICE_NAME,
    start_storage_server,
    stop_storage_server,
)
from ztagent.workloads.storage.store import DB_FILE

pytestmark = pytest.mark.integration

MAX_VALUE = 64 * 1024
DEV_A = ((DEVICE_ID_HEADER, "device-a"),)
DEV_B = ((DEVICE_ID_HEADER, "device-b"),)


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a shorter directory when a unix socket path would exceed 107 bytes."""
    if len(str(tmp_path / "storage.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="zt-") as short:
        yield Path(short)


@pytest.fixture
def key(tmp_path: Path) -> SidecarKey:
    """The sidecar's assertion key, as the sidecar would have made it."""
    return SidecarKey(tmp_path / "sidecar-state")


@pytest.fixture(params=["tcp", "unix"])
async def target(
    request: pytest.FixtureRequest, tmp_path: Path, short_dir: Path, key: SidecarKey
) -> AsyncIterator[str]:
    """A running storage server (stopped in the finalizer); yields the channel target."""
    if request.param == "tcp":
        server, port = await start_storage_server(
            "127.0.0.1:0", tmp_path / "data", trust_keys=[key.pub], max_value_bytes=MAX_VALUE
        )
        assert port > 0
        address = f"127.0.0.1:{port}"
    else:
        sock = short_dir / "storage.sock"
        server, port = await start_storage_server(
            f"unix:{sock}", tmp_path / "data", trust_keys=[key.pub], max_value_bytes=MAX_VALUE
        )
        assert port == 0
        assert sock.exists()
        address = f"unix:{sock}"
    try:
        yield address
    finally:
        await stop_storage_server(server, grace=None)


@pytest.fixture
async def stub(target: str, key: SidecarKey) -> AsyncIterator[storage_pb2_grpc.StorageAsyncStub]:
    async with asserting_channel(key, target) as channel:
        yield storage_pb2_grpc.StorageStub(channel)  # type: ignore[misc]


@pytest.fixture
async def narrow_stub(
    target: str, key: SidecarKey
) -> AsyncIterator[storage_pb2_grpc.StorageAsyncStub]:
    """A client whose HTTP/2 receive window stays at 64 KiB.

    By default gRPC grows the window by BDP probing, and its core then reads megabytes from
    the socket that the application never asked for; a watcher behind such a client may never
    fall behind. With probing off, what a client does not read stays in the server's queue.
    """
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65535)]
    async with asserting_channel(key, target, options) as channel:
        yield storage_pb2_grpc.StorageStub(channel)  # type: ignore[misc]


async def _error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_put_get_delete_list(stub: storage_pb2_grpc.StorageAsyncStub) -> None:
    put = await stub.Put(storage_pb2.PutRequest(key="cfg/a", value=b"alpha"), metadata=DEV_A)
    assert put.key == "cfg/a" and put.revision > 0
    got = await stub.Get(storage_pb2.GetRequest(key="cfg/a"), metadata=DEV_A)
    assert (got.key, got.value, got.revision) == ("cfg/a", b"alpha", put.revision)

    for i in range(5):
        await stub.Put(storage_pb2.PutRequest(key=f"cfg/{i}", value=b"v"), metadata=DEV_A)
    await stub.Put(storage_pb2.PutRequest(key="other", value=b"v"), metadata=DEV_A)
    first = await stub.List(storage_pb2.ListRequest(prefix="cfg/", page_size=4), metadata=DEV_A)
    assert list(first.keys) == ["cfg/0", "cfg/1", "cfg/2", "cfg/3"]
    second = await stub.List(
        storage_pb2.ListRequest(prefix="cfg/", page_size=4, page_token=first.next_page_token),
        metadata=DEV_A,
    )
    assert list(second.keys) == ["cfg/4", "cfg/a"]
    assert second.next_page_token == ""

    deleted = await stub.Delete(storage_pb2.DeleteRequest(key="cfg/a"), metadata=DEV_A)
    assert deleted.deleted
    again = await stub.Delete(storage_pb2.DeleteRequest(key="cfg/a"), metadata=DEV_A)
    assert not again.deleted
    err = await _error(stub.Get(storage_pb2.GetRequest(key="cfg/a"), metadata=DEV_A))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert "cfg/a" in (err.details() or "")


async def test_namespaces_isolated(stub: storage_pb2_grpc.StorageAsyncStub) -> None:
    await stub.Put(storage_pb2.PutRequest(key="k", value=b"from-a"), metadata=DEV_A)
    err = await _error(stub.Get(storage_pb2.GetRequest(key="k"), metadata=DEV_B))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert list((await stub.List(storage_pb2.ListRequest(), metadata=DEV_B)).keys) == []
    await stub.Put(storage_pb2.PutRequest(key="k", value=b"from-b"), metadata=DEV_B)
    assert (await stub.Get(storage_pb2.GetRequest(key="k"), metadata=DEV_A)).value == b"from-a"
    assert (await stub.Get(storage_pb2.GetRequest(key="k"), metadata=DEV_B)).value == b"from-b"


async def test_missing_device_id_is_unauthenticated(
    stub: storage_pb2_grpc.StorageAsyncStub,
) -> None:
    calls = [
        stub.Put(storage_pb2.PutRequest(key="k", value=b"v")),
        stub.Get(storage_pb2.GetRequest(key="k")),
        stub.Delete(storage_pb2.DeleteRequest(key="k")),
        stub.List(storage_pb2.ListRequest()),
    ]
    for call in calls:
        err = await _error(call)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == (
            "no x-ztagent-assertion (call this workload through the ztagent sidecar)"
        )
        assert dict(err.trailing_metadata() or ())[ERROR_CODE_HEADER] == "assertion_missing"
    watch = stub.Watch(storage_pb2.WatchRequest())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch.read()
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_oversized_value_is_invalid_argument(
    stub: storage_pb2_grpc.StorageAsyncStub,
) -> None:
    err = await _error(
        stub.Put(storage_pb2.PutRequest(key="big", value=b"x" * (MAX_VALUE + 1)), metadata=DEV_A)
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"is {MAX_VALUE + 1} bytes; maximum is {MAX_VALUE} bytes" in (err.details() or "")
    trailing = dict(_trailing(err))
    assert trailing.get(ERROR_CODE_HEADER) == "value_too_large"


def _trailing(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    return [(k, v) for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)]


async def test_bad_requests_are_invalid_argument(
    stub: storage_pb2_grpc.StorageAsyncStub,
) -> None:
    bad_key = await _error(stub.Put(storage_pb2.PutRequest(key=""), metadata=DEV_A))
    assert bad_key.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad_token = await _error(
        stub.List(storage_pb2.ListRequest(page_token="garbage!"), metadata=DEV_A)
    )
    assert bad_token.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad_size = await _error(stub.List(storage_pb2.ListRequest(page_size=1001), metadata=DEV_A))
    assert bad_size.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_tampered_row_is_data_loss(
    stub: storage_pb2_grpc.StorageAsyncStub, tmp_path: Path
) -> None:
    await stub.Put(storage_pb2.PutRequest(key="ledger", value=b"balance=10"), metadata=DEV_A)
    db = sqlite3.connect(tmp_path / "data" / DB_FILE, isolation_level=None)
    try:
        (ct,) = db.execute("SELECT ciphertext FROM records WHERE key = 'ledger'").fetchone()
        db.execute(
            "UPDATE records SET ciphertext = ? WHERE key = 'ledger'",
            (bytes([ct[0] ^ 0x01]) + ct[1:],),
        )
    finally:
        db.close()
    err = await _error(stub.Get(storage_pb2.GetRequest(key="ledger"), metadata=DEV_A))
    assert err.code() is grpc.StatusCode.DATA_LOSS
    assert "'ledger'" in (err.details() or "")
    assert "balance" not in (err.details() or "")


async def test_watch_streams_changes_and_ends_on_cancel(
    stub: storage_pb2_grpc.StorageAsyncStub,
) -> None:
    await stub.Put(storage_pb2.PutRequest(key="w/old", value=b"0"), metadata=DEV_A)
    await stub.Put(storage_pb2.PutRequest(key="x/skip", value=b"0"), metadata=DEV_A)
    watch = stub.Watch(storage_pb2.WatchRequest(prefix="w/", include_existing=True), metadata=DEV_A)
    await watch.initial_metadata()  # the server has subscribed
    existing = await watch.read()
    assert (existing.kind, existing.key, existing.value) == (
        storage_pb2.WatchEvent.PUT,
        "w/old",
        b"0",
    )

    async def writer() -> None:
        await stub.Put(storage_pb2.PutRequest(key="x/ignored", value=b"1"), metadata=DEV_A)
        await stub.Put(storage_pb2.PutRequest(key="w/other-device", value=b"1"), metadata=DEV_B)
        await stub.Put(storage_pb2.PutRequest(key="w/new", value=b"1"), metadata=DEV_A)
        await stub.Delete(storage_pb2.DeleteRequest(key="w/old"), metadata=DEV_A)

    writing = asyncio.create_task(writer())
    put = await asyncio.wait_for(watch.read(), 5)
    deleted = await asyncio.wait_for(watch.read(), 5)
    await writing
    assert (put.kind, put.key, put.value) == (storage_pb2.WatchEvent.PUT, "w/new", b"1")
    assert (deleted.kind, deleted.key) == (storage_pb2.WatchEvent.DELETE, "w/old")
    assert deleted.revision > put.revision > existing.revision

    watch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watch.read()
    # the server is still healthy and serving after the cancelled stream
    await stub.Put(storage_pb2.PutRequest(key="w/after", value=b"2"), metadata=DEV_A)


async def test_slow_watcher_is_dropped_and_writers_do_not_wait(
    narrow_stub: storage_pb2_grpc.StorageAsyncStub,
) -> None:
    stub = narrow_stub
    watch = stub.Watch(storage_pb2.WatchRequest(prefix="s/"), metadata=DEV_A)
    await watch.initial_metadata()
    value = b"x" * (MAX_VALUE - 1024)

    async def requests() -> AsyncIterator[storage_pb2.PutRequest]:
        for i in range(40):  # ~2.5 MB: twice the watcher's queue, 40x the client's window
            yield storage_pb2.PutRequest(key=f"s/{i:02d}", value=value)

    # the watcher reads nothing meanwhile; the writer must still finish (30 s: a hang guard for
    # a loaded CI machine, not a timing assertion)
    reply = await asyncio.wait_for(stub.BulkPut(requests(), metadata=DEV_A), 30)
    assert reply.count == 40
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            event = await asyncio.wait_for(watch.read(), 30)
            assert event is not grpc.aio.EOF
            received += 1
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "watcher fell behind" in (info.value.details() or "")
    assert received < 40


async def test_bulk_put_is_all_or_nothing(stub: storage_pb2_grpc.StorageAsyncStub) -> None:
    async def requests(*items: tuple[str, bytes]) -> AsyncIterator[storage_pb2.PutRequest]:
        for key, value in items:
            yield storage_pb2.PutRequest(key=key, value=value)

    bad = stub.BulkPut(
        requests(("b/1", b"1"), ("b/2", b"x" * (MAX_VALUE + 1)), ("b/3", b"3")),
        metadata=DEV_A,
    )
    err = await _error(bad)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert list((await stub.List(storage_pb2.ListRequest(prefix="b/"), metadata=DEV_A)).keys) == []

    ok = await stub.BulkPut(requests(("b/1", b"1"), ("b/2", b"2")), metadata=DEV_A)
    assert ok.count == 2
    assert (await stub.Get(storage_pb2.GetRequest(key="b/2"), metadata=DEV_A)).revision == (
        ok.last_revision
    )


async def test_health_is_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_bind_failure_and_non_loopback_are_refused(tmp_path: Path, key: SidecarKey) -> None:
    trust = [key.pub]
    with pytest.raises(ConfigError, match=r"listen: got '0\.0\.0\.0:0'"):
        await start_storage_server("0.0.0.0:0", tmp_path / "data", trust_keys=trust)
    with pytest.raises(ConfigError, match="no --trust-key"):
        await start_storage_server("127.0.0.1:0", tmp_path / "data", trust_keys=[])
    server, port = await start_storage_server("127.0.0.1:0", tmp_path / "data", trust_keys=trust)
    try:
        with pytest.raises(TransportError, match=rf"cannot bind 127\.0\.0\.1:{port}"):
            await start_storage_server(f"127.0.0.1:{port}", tmp_path / "data2", trust_keys=trust)
    finally:
        await stop_storage_server(server, grace=None)


# -- a real process, killed -----------------------------------------------------------------


class _Workload:
    """``python -m ztagent.workloads.storage`` on a unix socket, always reaped."""

    def __init__(self, sock: Path, data_dir: Path, trust: Path) -> None:
        self.sock = sock
        self.data_dir = data_dir
        self.trust = trust
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ztagent.workloads.storage",
                "--listen",
                f"unix:{self.sock}",
                "--data-dir",
                str(self.data_dir),
                "--trust-key",
                str(self.trust),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def wait_serving(self, limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        async with grpc.aio.insecure_channel(f"unix:{self.sock}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.stderr()
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=0.5
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workload not serving after {limit_s}s")
                await asyncio.sleep(0.05)

    def stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture
def workloads(short_dir: Path, tmp_path: Path) -> Iterator[list[_Workload]]:
    started: list[_Workload] = []
    yield started
    for workload in started:
        workload.stop()


async def test_put_survives_kill_9(
    workloads: list[_Workload], short_dir: Path, tmp_path: Path, key: SidecarKey
) -> None:
    sock = short_dir / "crash.sock"
    first = _Workload(sock, tmp_path / "data", key.pub)
    workloads.append(first)
    first.start()
    await first.wait_serving()
    async with asserting_channel(key, f"unix:{sock}") as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        await stub.Put(storage_pb2.PutRequest(key="durable", value=b"yes"), metadata=DEV_A)
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGKILL)
    assert first.proc.wait(timeout=10) == -signal.SIGKILL

    second = _Workload(sock, tmp_path / "data", key.pub)
    workloads.append(second)
    second.start()
    await second.wait_serving()
    async with asserting_channel(key, f"unix:{sock}") as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        got = await stub.Get(storage_pb2.GetRequest(key="durable"), metadata=DEV_A)
    assert got.value == b"yes"


async def test_sigterm_stops_cleanly(
    workloads: list[_Workload], short_dir: Path, tmp_path: Path, key: SidecarKey
) -> None:
    workload = _Workload(short_dir / "term.sock", tmp_path / "data", key.pub)
    workloads.append(workload)
    workload.start()
    await workload.wait_serving()
    assert workload.proc is not None
    workload.proc.send_signal(signal.SIGTERM)
    assert workload.proc.wait(timeout=10) == 0


# -- only the sidecar: every way around the assertion, on TCP and on the unix socket ---------


async def test_direct_calls_without_a_valid_assertion_are_refused(
    target: str, key: SidecarKey, tmp_path: Path
) -> None:
    """What a local attacker can send straight to the workload, each refused UNAUTHENTICATED
    with its code, and nothing written into the device's namespace."""
    put = f"/{SERVICE_NAME}/Put"
    other = SidecarKey(tmp_path / "attacker")
    # the right key, minted 40 s ago (lifetime 30 s)
    expired = SidecarKey(tmp_path / "sidecar-state", clock=lambda: time.time() - 40)
    replayed = key.mint("device-b", put)
    cases = {
        "forged header": (((DEVICE_ID_HEADER, "device-b"),), "assertion_missing"),
        "no assertion": ((), "assertion_missing"),
        "expired": (expired.metadata("device-b", put), "assertion_expired"),
        "another method": (
            key.metadata("device-b", f"/{SERVICE_NAME}/Get"),
            "assertion_wrong_method",
        ),
        "another key": (other.metadata("device-b", put), "assertion_bad_signature"),
        "garbage": ((("x-ztagent-assertion", "a.b.c"),), "assertion_malformed"),
    }
    async with grpc.aio.insecure_channel(target) as channel:
        stub = storage_pb2_grpc.StorageStub(channel)
        request = storage_pb2.PutRequest(key="k", value=b"attacker")
        for name, (metadata, code) in cases.items():
            err = await _error(stub.Put(request, metadata=metadata))
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED, name
            assert dict(err.trailing_metadata() or ())[ERROR_CODE_HEADER] == code, name
        # one valid assertion admits one call: captured and replayed, it is refused
        replay = (("x-ztagent-assertion", replayed),)
        await stub.Put(storage_pb2.PutRequest(key="k", value=b"sidecar"), metadata=replay)
        err = await _error(stub.Put(request, metadata=replay))
        assert dict(err.trailing_metadata() or ())[ERROR_CODE_HEADER] == "assertion_replayed"
    async with asserting_channel(key, target) as channel:
        got = await storage_pb2_grpc.StorageStub(channel).Get(
            storage_pb2.GetRequest(key="k"), metadata=DEV_B
        )
    assert got.value == b"sidecar"


async def test_the_unix_socket_is_private_whatever_the_umask(
    short_dir: Path, tmp_path: Path, key: SidecarKey
) -> None:
    previous = os.umask(0)
    try:
        sock = short_dir / "private.sock"
        server, _ = await start_storage_server(
            f"unix:{sock}", tmp_path / "data", trust_keys=[key.pub]
        )
        try:
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
        finally:
            await stop_storage_server(server, grace=None)
        shared = short_dir / "group.sock"
        group = str(os.getgid())
        server, _ = await start_storage_server(
            f"unix:{shared}", tmp_path / "data2", trust_keys=[key.pub], socket_group=group
        )
        try:
            st = shared.stat()
            assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == os.getgid()
        finally:
            await stop_storage_server(server, grace=None)
        with pytest.raises(ConfigError, match="socket_group: no group 'no-such-group-zt'"):
            await start_storage_server(
                f"unix:{short_dir / 'x.sock'}", tmp_path / "data3", trust_keys=[key.pub],
                socket_group="no-such-group-zt",
            )  # fmt: skip
    finally:
        os.umask(previous)
