"""Pure parts of the storage server: listen addresses, device-id metadata, Watch fan-out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from tests.fixtures.assertions import SidecarKey
from ztagent.addresses import local_target
from ztagent.errors import ConfigError, VerificationError
from ztagent.rpc_status import grpc_status_for
from ztagent.tokens.assertion import AssertionError_, AssertionVerifier
from ztagent.workloads.storage.errors import (
    InvalidRequestError,
    StorageIntegrityError,
    WatchOverflowError,
)
from ztagent.workloads.storage.server import ChangeHub, device_namespace
from ztagent.workloads.storage.store import Change, ChangeKind


@pytest.mark.parametrize(
    ("addr", "bound"),
    [
        ("unix:/run/ztagent/storage.sock", "unix:/run/ztagent/storage.sock"),
        ("unix:///run/ztagent/storage.sock", "unix:/run/ztagent/storage.sock"),
        ("unix:storage.sock", "unix:storage.sock"),
        ("127.0.0.1:50061", "127.0.0.1:50061"),
        ("127.0.0.2:0", "127.0.0.2:0"),
        ("[::1]:50061", "[::1]:50061"),
        ("localhost:50061", "localhost:50061"),
        ("LOCALHOST:1", "localhost:1"),
    ],
)
def test_local_target_accepts_local(addr: str, bound: str) -> None:
    assert local_target(addr, "listen") == bound


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        ("0.0.0.0:50061", "0.0.0.0 is not a loopback address"),
        ("[::]:50061", ":: is not a loopback address"),
        ("192.168.1.10:50061", "is not a loopback address"),
        ("example.com:50061", "neither localhost nor an IP"),
        (":50061", "no host"),
        ("50061", "no host"),
        ("127.0.0.1", "no host"),
        ("127.0.0.1:http", "port 'http' is not 0-65535"),
        ("127.0.0.1:70000", "port '70000'"),
        ("::1:50061", "needs brackets"),
        ("unix:", "no socket path"),
        ("unix://host/sock", "needs an absolute path"),
        ("", "empty"),
        (" 127.0.0.1:1", "blank-padded"),
    ],
)
def test_local_target_refuses_non_local(addr: str, why: str) -> None:
    with pytest.raises(ConfigError, match="listen: got") as info:
        local_target(addr, "listen")
    assert info.value.key == "listen"
    assert why in info.value.message
    assert repr(addr) in info.value.message


class _Context:
    def __init__(self, metadata: list[tuple[str, str]] | None) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]] | None:
        return self._metadata


@pytest.fixture
def key(tmp_path: Path) -> SidecarKey:
    return SidecarKey(tmp_path)


def test_device_namespace_is_the_asserted_device(key: SidecarKey) -> None:
    verifier = AssertionVerifier([key.pub])
    put = "/ztagent.workloads.v1.Storage/Put"
    forged = [("x-ztagent-device-id", "dev-b"), *key.metadata("dev-1", put)]
    assert device_namespace(verifier, _Context(forged), "Put") == "dev-1"


@pytest.mark.parametrize(
    "metadata",
    [None, [], [("other", "x")], [("x-ztagent-device-id", "dev-1")]],
)
def test_device_namespace_without_an_assertion(
    key: SidecarKey, metadata: list[tuple[str, str]] | None
) -> None:
    verifier = AssertionVerifier([key.pub])
    with pytest.raises(AssertionError_) as info:
        device_namespace(verifier, _Context(metadata), "Put")
    assert info.value.code == "assertion_missing"
    assert info.value.message == (
        "no x-ztagent-assertion (call this workload through the ztagent sidecar)"
    )


def test_device_namespace_refuses_an_unusable_asserted_id(key: SidecarKey) -> None:
    verifier = AssertionVerifier([key.pub])
    md = key.metadata("a\x00b", "/ztagent.workloads.v1.Storage/Get")
    with pytest.raises(VerificationError, match=r"asserted device id: .*NUL"):
        device_namespace(verifier, _Context(list(md)), "Get")


def test_status_mapping() -> None:
    assert grpc_status_for(StorageIntegrityError("k", "x")) is grpc.StatusCode.DATA_LOSS
    assert (
        grpc_status_for(InvalidRequestError("invalid_key", "m")) is grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        grpc_status_for(WatchOverflowError("watch_overflow", "m"))
        is grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert grpc_status_for(VerificationError("c", "m")) is grpc.StatusCode.UNAUTHENTICATED


def _change(key: str, revision: int, ns: str = "d", value: bytes = b"v") -> Change:
    return Change(ns, ChangeKind.PUT, key, value, revision)


async def test_hub_routes_by_namespace_and_prefix() -> None:
    hub = ChangeHub(asyncio.get_running_loop(), max_events=10, max_bytes=1000)
    watcher = hub.subscribe("d", "a/")
    hub.publish(_change("a/1", 1))
    hub.publish(_change("b/1", 2))
    hub.publish(_change("a/2", 3, ns="other"))
    hub.publish(_change("a/3", 4))
    assert (await watcher.next()) == _change("a/1", 1)
    assert (await watcher.next()) == _change("a/3", 4)
    assert watcher.queue.empty()


async def test_hub_drops_a_watcher_that_overflows_by_count() -> None:
    hub = ChangeHub(asyncio.get_running_loop(), max_events=3, max_bytes=1000)
    slow = hub.subscribe("d", "")
    fast = hub.subscribe("d", "")
    for rev in range(1, 5):
        hub.publish(_change("k", rev))  # never blocks, whatever the watchers do
        assert (await fast.next()) is not None
    assert slow.overflowed
    assert (await slow.next()) is None
    hub.publish(_change("k", 5))  # the dropped watcher gets nothing more
    assert not fast.overflowed
    assert (await fast.next()) == _change("k", 5)


async def test_hub_drops_a_watcher_that_overflows_by_bytes() -> None:
    hub = ChangeHub(asyncio.get_running_loop(), max_events=100, max_bytes=10)
    watcher = hub.subscribe("d", "")
    hub.publish(_change("k", 1, value=b"x" * 6))
    assert not watcher.overflowed
    hub.publish(_change("k", 2, value=b"x" * 6))
    assert watcher.overflowed


async def test_hub_close_ends_watchers() -> None:
    hub = ChangeHub(asyncio.get_running_loop(), max_events=10, max_bytes=1000)
    watcher = hub.subscribe("d", "")
    hub.close()
    assert (await watcher.next()) is None
    assert not watcher.overflowed
    late = hub.subscribe("d", "")
    assert (await late.next()) is None


async def test_publish_threadsafe_keeps_order() -> None:
    hub = ChangeHub(asyncio.get_running_loop(), max_events=100, max_bytes=10**6)
    watcher = hub.subscribe("d", "")
    await asyncio.to_thread(lambda: [hub.publish_threadsafe(_change("k", r)) for r in range(50)])
    revisions = [(await watcher.next()).revision for _ in range(50)]  # type: ignore[union-attr]
    assert revisions == list(range(50))
