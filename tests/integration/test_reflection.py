"""gRPC server reflection (what ``grpcurl list`` / ``describe`` use) on every ztagent server.

The workloads and the CA serve it directly; the sidecar answers it itself after admission
(identity, posture, user, the shipped policy), so a refused device gets the usual status and
code, and every listing call is in the decision log.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.fixtures.ci import require_module
from tests.integration.conftest import (
    SHIPPED_POLICIES,
    Pki,
    channel,
    sidecar_assertion_pub,
    write_config,
)
from tests.integration.echo_upstream import RAW_SERVICE, EchoUpstream
from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.ca.service import start_ca_server
from ztagent.config import load_config
from ztagent.rpc_status import ERROR_CODE_HEADER
from ztagent.sidecar.server import Sidecar
from ztagent.workloads.storage.server import start_storage_server, stop_storage_server

pytestmark = pytest.mark.integration

STORAGE = "ztagent.workloads.v1.Storage"
INFERENCE = "ztagent.workloads.v1.Inference"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
ATTESTATION = "ztagent.v1.Attestation"


async def list_services(ch: grpc.aio.Channel) -> list[str]:
    """The raw ``ServerReflectionInfo`` stub: one list_services request."""
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = []
    async for response in call:
        assert not response.HasField("error_response"), response.error_response
        names += [s.name for s in response.list_services_response.service]
    return names


async def file_for_symbol(
    ch: grpc.aio.Channel, symbol: str
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=10
    )
    responses = [r async for r in call]
    assert len(responses) == 1
    return responses[0]


@pytest.fixture
async def storage(tmp_path: Path, pki: Pki) -> AsyncIterator[str]:
    server, port = await start_storage_server(
        "127.0.0.1:0", tmp_path / "storage", trust_keys=[sidecar_assertion_pub(pki)]
    )
    yield f"127.0.0.1:{port}"
    await stop_storage_server(server, 0)


@pytest.fixture
async def sidecar(
    pki: Pki, storage: str, upstream: EchoUpstream, tmp_path: Path
) -> AsyncIterator[Sidecar]:
    """The shipped policy; routes to the real storage workload (a ztagent proto) and to a
    service no descriptor describes."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policy_dir)
    routes = {STORAGE: storage, RAW_SERVICE: upstream.address}
    car = Sidecar(load_config(write_config(pki, routes, policy=policy_dir)))
    await car.start()
    yield car
    await car.stop(0)


def decisions(pki: Pki) -> list[dict[str, object]]:
    path = pki.layout.dir.parent / "decisions.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if "checkpoint" not in line]


async def wait_for_decisions(
    pki: Pki, count: int, *, refused: bool = False
) -> list[dict[str, object]]:
    """The reflection lines of the log once ``count`` are there (``refused``: and one of them
    is a refusal; the writer batches, so an earlier line can arrive first)."""
    for _ in range(100):
        found = [d for d in decisions(pki) if d.get("service") == REFLECTION]
        if len(found) >= count and (not refused or any(d["allow"] is False for d in found)):
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"expected {count} reflection decisions in the log, got {decisions(pki)}")


async def test_storage_workload_lists_its_services(storage: str) -> None:
    async with grpc.aio.insecure_channel(storage) as ch:
        assert sorted(await list_services(ch)) == [HEALTH, REFLECTION, STORAGE]
        response = await file_for_symbol(ch, STORAGE)
    assert response.file_descriptor_response.file_descriptor_proto


async def test_inference_workload_lists_its_services(tmp_path: Path, pki: Pki) -> None:
    require_module("torch")
    from ztagent.workloads.inference.server import start_inference_server, stop_inference_server
    from ztagent.workloads.inference.train import build

    build(tmp_path / "models", 0, epochs=1, windows=200)
    server, port = await start_inference_server(
        "127.0.0.1:0",
        tmp_path / "models",
        storage_target=None,
        trust_keys=[sidecar_assertion_pub(pki)],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert sorted(await list_services(ch)) == [HEALTH, REFLECTION, INFERENCE]
            response = await file_for_symbol(ch, INFERENCE)
        assert response.file_descriptor_response.file_descriptor_proto
    finally:
        await stop_inference_server(server, 0)


async def test_ca_lists_its_service_on_both_ports(pki: Pki) -> None:
    running = await start_ca_server(
        pki.layout.dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0"
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.layout.bundle.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.enroll_port}", creds) as ch:
            assert sorted(await list_services(ch)) == [REFLECTION, "ztagent.v1.Enrollment"]
        device = pki.mint("ca-reflect")
        async with channel(pki, running.renew_port, device) as ch:
            assert sorted(await list_services(ch)) == [REFLECTION, "ztagent.v1.Enrollment"]
    finally:
        await running.stop(None)


async def test_sidecar_lists_routed_and_own_services_after_admission(
    pki: Pki, sidecar: Sidecar
) -> None:
    device = pki.mint("reflect-dev")
    async with channel(pki, sidecar.port, device) as ch:
        names = await list_services(ch)
        assert sorted(names) == sorted([ATTESTATION, HEALTH, REFLECTION, RAW_SERVICE, STORAGE])
        # ztagent's own workload protos: described
        described = await file_for_symbol(ch, STORAGE)
        assert described.file_descriptor_response.file_descriptor_proto
        # a routed service the sidecar has no descriptor for: listed, not described
        unknown = await file_for_symbol(ch, RAW_SERVICE)
        assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        # v1 (what grpcurl asks first) is the same service under its newer name
        v1 = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = [
            r
            async for r in v1(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        ]
        assert {s.name for s in replies[0].list_services_response.service} == set(names)
    logged = await wait_for_decisions(pki, 3)
    assert all(d["device_id"] == "reflect-dev" for d in logged)
    assert all(d["allow"] is True and d["enforced"] is True for d in logged)
    assert logged[0]["method"] == "ServerReflectionInfo"
    assert "open_method" in logged[0]["reasons"]  # type: ignore[operator]


async def test_sidecar_reflection_with_the_standard_client(pki: Pki, sidecar: Sidecar) -> None:
    """grpcio-reflection's own client (sync, so in a thread beside the server's loop)."""
    device = pki.mint("reflect-sync")
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.layout.bundle.read_bytes(),
        private_key=builders.key_pem(device.key),
        certificate_chain=builders.cert_pem(device.cert),
    )

    def describe() -> tuple[list[str], list[str]]:
        with grpc.secure_channel(f"127.0.0.1:{sidecar.port}", creds) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            pool = descriptor_pool.DescriptorPool(db)
            storage = pool.FindServiceByName(STORAGE)
            return list(db.get_services()), [m.name for m in storage.methods]

    services, methods = await asyncio.to_thread(describe)
    assert STORAGE in services and RAW_SERVICE in services
    assert {"Get", "Put", "Delete", "Watch"} <= set(methods)


async def test_sidecar_refuses_reflection_to_a_revoked_device(pki: Pki, sidecar: Sidecar) -> None:
    cert_path = pki.layout.dir / "reflect-revoked.pem"
    ca_store.issue_device_cert(pki.layout.dir, "reflect-revoked", cert_path)
    ca_store.revoke(pki.layout.dir, cert_path=cert_path)
    key = serialization.load_pem_private_key(cert_path.with_suffix(".key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pair = builders.KeyPair(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
    for _ in range(50):  # reload_interval_s = 0.1
        try:
            async with channel(pki, sidecar.port, pair) as ch:
                await list_services(ch)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (err.details() or "").startswith("cert_revoked: ")
            assert dict(err.trailing_metadata() or ())[ERROR_CODE_HEADER] == "cert_revoked"
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("a revoked device was allowed to list services")
    logged = await wait_for_decisions(pki, 1, refused=True)
    refused = [d for d in logged if d["allow"] is False]
    assert refused, logged
    assert refused[-1]["refusal"]["code"] == "cert_revoked"  # type: ignore[index]


async def test_sidecar_refuses_reflection_to_a_device_of_another_domain(
    pki: Pki, sidecar: Sidecar
) -> None:
    stranger = pki.mint("x", uris=["spiffe://evil.example/device/x"])
    async with channel(pki, sidecar.port, stranger) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_services(ch)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (info.value.details() or "").startswith("spiffe_id_wrong_trust_domain: ")


async def test_sidecar_refuses_reflection_without_a_certificate(pki: Pki, sidecar: Sidecar) -> None:
    async with channel(pki, sidecar.port, None) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_services(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake


async def test_another_method_of_the_reflection_service_is_no_route(
    pki: Pki, upstream: EchoUpstream
) -> None:
    """Only ServerReflectionInfo is answered by the sidecar; under a policy that allows every
    call, any other method of the reflection services is refused ``no_route`` with its code,
    and its decision-log line says it was not let through (it was logged as admitted, then
    refused without a code)."""
    car = Sidecar(load_config(write_config(pki, {RAW_SERVICE: upstream.address})))  # allow all
    await car.start()
    try:
        for service in (REFLECTION, "grpc.reflection.v1.ServerReflection"):
            async with channel(pki, car.port, pki.mint("cam-r")) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary(f"/{service}/Other")(b"", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert (info.value.details() or "").startswith("no_route: no route for service ")
            assert dict(info.value.trailing_metadata() or ())[ERROR_CODE_HEADER] == "no_route"
    finally:
        await car.stop(0)
    other = [d for d in decisions(pki) if d.get("method") == "Other"]
    assert len(other) == 2 and not any(d["enforced"] for d in other)
    assert {d["refusal"]["code"] for d in other} == {"no_route"}  # type: ignore[index]
