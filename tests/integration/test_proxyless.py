"""Proxyless mode against the sidecar: the same refusal suite, the same answers.

The same config, certificates, tokens and policy drive (1) the sidecar in front of an echo
upstream and (2) the same echo service served proxyless (``protected_server``). Every
refusal — revoked device, certificate for another trust domain, malformed and forged
tokens, a policy denial, an unrouted service — must give the same status, the same details
and the same ``x-ztagent-error-code``; allowed calls of all four RPC kinds reach the handler
with the verified device from ``admitted()``, never from a header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.ca import builders
from ztagent.config import load_config
from ztagent.rpc_status import ERROR_CODE_HEADER
from ztagent.sidecar.proxyless import NotAdmittedError, admitted, protected_server
from ztagent.sidecar.server import Sidecar

pytestmark = pytest.mark.integration

POLICY = """package ztagent.authz

default decision := {"allow": true, "reasons": ["ok"], "headers": {}}

decision := {"allow": false, "reasons": ["no_denied_method"], "headers": {}} if {
	input.request.method == "Denied"
}
"""


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
    now = datetime.now(UTC)
    crl = builders.build_crl(
        pki.issuing, {revoked.cert.serial_number: now - timedelta(minutes=1)}, number=900,
        this_update=now - timedelta(minutes=1), next_update=now + timedelta(days=7),
    )  # fmt: skip
    pki.layout.crl.write_bytes(crl.public_bytes(Encoding.PEM))
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
    for mode in ("sidecar", "proxyless"):
        car = (
            Sidecar(config)
            if mode == "sidecar"
            else protected_server(
                config, add_services=lambda s: s.add_generic_rpc_handlers((_echo_handlers(),))
            )
        )
        await car.start()
        try:
            answers[mode] = [await _outcome(pki, car.port, pair, m, **kw) for pair, m, kw in cases]
        finally:
            await car.stop(0)
    side, proxyless = answers["sidecar"], answers["proxyless"]
    assert side[0] == "OK" and proxyless[0] == "OK"
    assert side[1:] == proxyless[1:], list(zip(side, proxyless, strict=True))
    assert [a.split(" ")[1] for a in proxyless[1:]] == [
        "cert_revoked", "spiffe_id_wrong_trust_domain", "token_unverifiable", "token_unverifiable",
        "policy_denied", "no_route",
    ]  # fmt: skip


async def test_handlers_read_the_admitted_caller_for_every_rpc_kind(
    pki: Pki, upstream: EchoUpstream, tmp_path: Path
) -> None:
    config = load_config(_config(pki, upstream, tmp_path))
    guard = protected_server(
        config, add_services=lambda s: s.add_generic_rpc_handlers((_echo_handlers(),))
    )
    await guard.start()
    forged = (("x-ztagent-device-id", "admin"),)

    async def two() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    try:
        async with channel(pki, guard.port, pki.mint("cam-7")) as ch:
            m = f"/{SERVICE}/"
            assert await ch.unary_unary(m + "Unary")(b"x", metadata=forged, timeout=5) == b"x|cam-7"
            got = [r async for r in ch.unary_stream(m + "ServerStream")(b"", timeout=5)]
            assert got == [b"cam-7"] * 3
            assert await ch.stream_unary(m + "ClientStream")(two(), timeout=5) == b"ab|cam-7"
            bidi = [r async for r in ch.stream_stream(m + "Bidi")(two(), timeout=5)]
            assert bidi == [b"a|/test.v1.Echo/Bidi", b"b|/test.v1.Echo/Bidi"]
        lines = (pki.layout.dir.parent / "decisions.jsonl").read_text().splitlines()
        assert len([line for line in lines if '"cam-7"' in line]) >= 4  # logged like the sidecar's
    finally:
        await guard.stop(0)
    with pytest.raises(NotAdmittedError):
        admitted()  # outside a call


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
