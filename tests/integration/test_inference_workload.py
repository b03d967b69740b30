"""The inference workload as a real gRPC server, alone and behind the sidecar.

A small model pair is trained once per module (3 epochs, about 2 s) with the project's own
trainer. Direct calls carry the device-id metadata the sidecar would add. The sidecar tests
run the shipped Rego with dev-issuer tokens, mTLS device certificates, and the real storage
workload as the escalation outbox.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.fixtures.ci import require_module

torch = require_module("torch")

from tests.fixtures.assertions import SidecarKey, asserting_channel  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    SHIPPED_POLICIES,
    Pki,
    channel,
    sidecar_assertion_pub,
    write_config,
)
from ztagent._proto.workloads.v1 import (  # noqa: E402
    inference_pb2,
    inference_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)
from ztagent.config import load_config  # noqa: E402
from ztagent.dev.issuer import init_dev_issuer, mint_token  # noqa: E402
from ztagent.errors import ConfigError  # noqa: E402
from ztagent.rpc_status import ERROR_CODE_HEADER  # noqa: E402
from ztagent.sidecar.server import Sidecar  # noqa: E402
from ztagent.tokens.assertion import public_key_path  # noqa: E402
from ztagent.workloads.inference.models import LoadedModel, encode_tensor, load_model  # noqa: E402
from ztagent.workloads.inference.server import (  # noqa: E402
    SERVICE_NAME,
    outbox_of,
    servicer_of,
    start_inference_server,
    stop_inference_server,
)
from ztagent.workloads.inference.train import FLOAT_NAME, INT8_NAME, build, heldout  # noqa: E402
from ztagent.workloads.storage.server import (  # noqa: E402
    DEVICE_ID_HEADER,
    start_storage_server,
    stop_storage_server,
)

pytestmark = pytest.mark.integration

SEED = 0
DEVICE = "cam-1"
AS_DEVICE = ((DEVICE_ID_HEADER, DEVICE),)
CRITICAL = ((DEVICE_ID_HEADER, DEVICE), ("x-model", FLOAT_NAME))
STORAGE = "ztagent.workloads.v1.Storage"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    build(out, SEED, epochs=3, windows=2000)
    return out


@pytest.fixture(scope="module")
def local(trained: Path) -> dict[str, LoadedModel]:
    """The same models loaded in-process: the direct reference for every served answer."""
    return {n: load_model(trained / f"{n}.manifest.json") for n in (FLOAT_NAME, INT8_NAME)}


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return heldout(SEED)[0][:200]


@pytest.fixture
def key(tmp_path: Path) -> SidecarKey:
    """The test's stand-in for the sidecar's assertion key (direct calls to the workloads)."""
    return SidecarKey(tmp_path / "sidecar-key")


@pytest.fixture
def inference_key(tmp_path: Path) -> Path:
    """Where the inference workload keeps the key it signs its outbox writes with."""
    return tmp_path / "inference" / "assertion.key"


@pytest.fixture
async def storage(tmp_path: Path, key: SidecarKey, inference_key: Path) -> AsyncIterator[str]:
    # the inference workload's .pub appears when it starts: storage picks it up then
    trust = [key.pub, public_key_path(inference_key)]
    server, port = await start_storage_server("127.0.0.1:0", tmp_path / "storage", trust_keys=trust)
    yield f"127.0.0.1:{port}"
    await stop_storage_server(server, 0)


@dataclass
class Workload:
    server: grpc.aio.Server
    address: str


@pytest.fixture
async def workload(
    trained: Path, storage: str, key: SidecarKey, inference_key: Path, pki: Pki
) -> AsyncIterator[Workload]:
    server, port = await start_inference_server(
        "127.0.0.1:0",
        trained,
        storage_target=storage,
        max_batch=8,
        max_wait_ms=20.0,
        trust_keys=[key.pub, sidecar_assertion_pub(pki)],
        assertion_key=inference_key,
    )
    yield Workload(server, f"127.0.0.1:{port}")
    await stop_inference_server(server, 0)


@pytest.fixture
async def stub(
    workload: Workload, key: SidecarKey
) -> AsyncIterator[inference_pb2_grpc.InferenceAsyncStub]:
    async with asserting_channel(key, workload.address) as ch:
        yield inference_pb2_grpc.InferenceStub(ch)  # type: ignore[misc]


def request(model: str, window: torch.Tensor, request_id: str = "") -> inference_pb2.PredictRequest:
    shape, data = encode_tensor(window)
    return inference_pb2.PredictRequest(
        model=model,
        input=inference_pb2.Tensor(dtype=inference_pb2.Tensor.FLOAT32, shape=shape, data=data),
        request_id=request_id,
    )


def comparable(response: inference_pb2.PredictResponse) -> bytes:
    """Everything but the timing fields, deterministically serialised."""
    copy = inference_pb2.PredictResponse()
    copy.CopyFrom(response)
    copy.ClearField("inference_time_us")
    copy.ClearField("batch_size")
    copy.ClearField("outbox_key")
    return copy.SerializeToString(deterministic=True)


def f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def assert_matches_local(
    response: inference_pb2.PredictResponse, model: LoadedModel, window: torch.Tensor
) -> None:
    """The served answer is the in-process answer for this window, bit for bit (float32)."""
    probabilities = model.run([window]).probabilities[0]
    assert [s.score for s in response.scores] == [f32(p) for p in probabilities]
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    assert response.label == model.manifest.labels[best]
    assert response.confidence == f32(probabilities[best])


def pick(local: LoadedModel, windows: torch.Tensor, *, confident: bool) -> torch.Tensor:
    """A held-out window the model is (not) sure about, by the model's own output."""
    for window in windows:
        sure = max(local.run([window]).probabilities[0]) >= 0.8
        if sure == confident:
            return window
    pytest.fail(f"no held-out window with confident={confident}")


# -- direct calls --------------------------------------------------------------------------


async def test_predict_matches_the_model(
    stub: inference_pb2_grpc.InferenceAsyncStub,
    local: dict[str, LoadedModel],
    windows: torch.Tensor,
) -> None:
    for name, metadata in ((INT8_NAME, AS_DEVICE), (FLOAT_NAME, CRITICAL)):
        response = await stub.Predict(request(name, windows[0], "r-1"), metadata=metadata)
        assert response.request_id == "r-1"
        assert response.model == name
        assert response.model_version == "1.0.0"
        assert response.batch_size == 1
        assert response.inference_time_us > 0
        assert_matches_local(response, local[name], windows[0])


async def test_list_models(stub: inference_pb2_grpc.InferenceAsyncStub, trained: Path) -> None:
    reply = await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=AS_DEVICE)
    assert [(m.name, m.critical) for m in reply.models] == [(FLOAT_NAME, True), (INT8_NAME, False)]
    manifest = json.loads((trained / f"{INT8_NAME}.manifest.json").read_text())
    assert reply.models[1].sha256 == manifest["sha256"]
    assert list(reply.models[1].input_shape) == [3, 64]


def bad_tensor(kind: str) -> inference_pb2.Tensor:
    shape, data = encode_tensor(torch.zeros(3, 64))
    tensor = inference_pb2.Tensor(dtype=inference_pb2.Tensor.FLOAT32, shape=shape, data=data)
    if kind == "dtype":
        tensor.dtype = inference_pb2.Tensor.FLOAT64
        tensor.data = data * 2
    elif kind == "shape":
        tensor.shape[:] = [64, 3]
    elif kind == "bytes":
        tensor.data = data[:-1]
    elif kind == "nan":
        tensor.data = data[:8] + b"\x00\x00\xc0\x7f" + data[12:]  # NaN at [0, 2]
    elif kind == "inf":
        tensor.data = data[:-4] + b"\x00\x00\x80\x7f"  # +inf at [2, 63]
    elif kind == "huge":
        tensor.shape[:] = [1 << 31, 1 << 31]
    return tensor


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("dtype", "invalid_dtype", "tensor dtype is FLOAT64, expected FLOAT32 of shape [3, 64]"),
        ("shape", "invalid_shape", "tensor shape is [64, 3], expected FLOAT32 of shape [3, 64]"),
        ("bytes", "invalid_byte_length", "tensor data is 767 bytes, expected 768"),
        ("nan", "non_finite", "tensor value at index [0, 2] is nan;"),
        ("inf", "non_finite", "tensor value at index [2, 63] is inf;"),
        ("huge", "tensor_too_large", "exceeds the limit of 1048576 elements"),
    ],
)
async def test_bad_tensors_are_invalid_argument(
    stub: inference_pb2_grpc.InferenceAsyncStub, kind: str, code: str, message: str
) -> None:
    req = inference_pb2.PredictRequest(model=INT8_NAME, input=bad_tensor(kind))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(req, metadata=AS_DEVICE)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert (ERROR_CODE_HEADER, code) in tuple(info.value.trailing_metadata() or ())


async def test_refusals_name_what_is_wrong(
    stub: inference_pb2_grpc.InferenceAsyncStub, windows: torch.Tensor
) -> None:
    cases = [
        (request(INT8_NAME, windows[0]), None, "UNAUTHENTICATED", "no x-ztagent-assertion"),
        (request("resnet", windows[0]), AS_DEVICE, "NOT_FOUND", "model 'resnet' is not served"),
        (
            request(FLOAT_NAME, windows[0]),
            AS_DEVICE,
            "PERMISSION_DENIED",
            "model 'vibration-anomaly' is critical: name it in the x-model metadata",
        ),
        (
            request(FLOAT_NAME, windows[0]),
            (*AS_DEVICE, ("x-model", INT8_NAME)),
            "INVALID_ARGUMENT",
            "x-model metadata names 'vibration-anomaly-int8' but the request asks for",
        ),
        (
            inference_pb2.PredictRequest(model=INT8_NAME),
            AS_DEVICE,
            "INVALID_ARGUMENT",
            "request has no input tensor",
        ),
    ]
    for req, metadata, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(req, metadata=metadata)
        assert info.value.code().name == code
        assert message in info.value.details()


async def test_oversized_message_is_refused_before_parsing(
    stub: inference_pb2_grpc.InferenceAsyncStub,
) -> None:
    tensor = inference_pb2.Tensor(dtype=inference_pb2.Tensor.FLOAT32, shape=[3, 64])
    tensor.data = b"\x00" * (8 << 20)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Predict(
            inference_pb2.PredictRequest(model=INT8_NAME, input=tensor), metadata=AS_DEVICE
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_concurrent_requests_batch_without_cross_talk(
    stub: inference_pb2_grpc.InferenceAsyncStub,
    workload: Workload,
    local: dict[str, LoadedModel],
    windows: torch.Tensor,
) -> None:
    """64 different windows at once on each model: every caller gets its own window's answer."""
    calls = []
    for i, window in enumerate(windows[:64]):
        for name, metadata in ((INT8_NAME, AS_DEVICE), (FLOAT_NAME, CRITICAL)):
            calls.append(
                (
                    name,
                    window,
                    stub.Predict(request(name, window, f"{name}/{i}"), metadata=metadata),
                )
            )
    responses = await asyncio.gather(*(c for _, _, c in calls))
    assert max(r.batch_size for r in responses) > 1  # batching did happen
    assert max(r.batch_size for r in responses) <= 8
    for (name, window, _), response in zip(calls, responses, strict=True):
        expected = local[name].run([window]).probabilities[0]
        got = [s.score for s in response.scores]
        if local[name].row_by_row:  # int8: exactly the solo answer
            assert got == [f32(p) for p in expected]
        else:  # float: batching changes rounding only
            assert got == pytest.approx(expected, abs=1e-5)
        assert response.label == local[name].manifest.labels[expected.index(max(expected))]
    assert servicer_of(workload.server).counters.predictions == 128


async def test_escalated_result_lands_in_the_storage_outbox(
    stub: inference_pb2_grpc.InferenceAsyncStub,
    workload: Workload,
    storage: str,
    key: SidecarKey,
    local: dict[str, LoadedModel],
    windows: torch.Tensor,
) -> None:
    sure = await stub.Predict(
        request(INT8_NAME, pick(local[INT8_NAME], windows, confident=True)), metadata=AS_DEVICE
    )
    assert not sure.escalate
    assert sure.outbox_key == ""
    unsure = await stub.Predict(
        request(INT8_NAME, pick(local[INT8_NAME], windows, confident=False), "r-unsure"),
        metadata=AS_DEVICE,
    )
    assert unsure.escalate
    assert unsure.confidence < 0.8
    assert unsure.outbox_key.startswith(f"outbox/{INT8_NAME}/")
    await outbox_of(workload.server).close(5.0)  # type: ignore[union-attr]  # flush
    async with asserting_channel(key, storage) as ch:
        store = storage_pb2_grpc.StorageStub(ch)
        listed = await store.List(storage_pb2.ListRequest(prefix="outbox/"), metadata=AS_DEVICE)
        assert list(listed.keys) == [unsure.outbox_key]
        got = await store.Get(storage_pb2.GetRequest(key=unsure.outbox_key), metadata=AS_DEVICE)
    record = json.loads(got.value)
    assert record["device_id"] == DEVICE
    assert record["model"] == INT8_NAME
    assert record["model_version"] == "1.0.0"
    assert record["label"] == unsure.label
    assert record["confidence"] == unsure.confidence
    assert record["scores"] == {s.label: s.score for s in unsure.scores}
    assert record["request_id"] == "r-unsure"
    assert outbox_of(workload.server).stats.written == 1  # type: ignore[union-attr]


async def test_outbox_failure_never_fails_the_prediction(
    trained: Path,
    local: dict[str, LoadedModel],
    windows: torch.Tensor,
    key: SidecarKey,
    inference_key: Path,
) -> None:
    storage_server, port = await start_storage_server(
        "127.0.0.1:0", trained.parent / "gone", trust_keys=[key.pub]
    )
    await stop_storage_server(storage_server, 0)  # a storage address nobody answers on
    server, inf_port = await start_inference_server(
        "127.0.0.1:0",
        trained,
        storage_target=f"127.0.0.1:{port}",
        trust_keys=[key.pub],
        assertion_key=inference_key,
    )
    try:
        async with asserting_channel(key, f"127.0.0.1:{inf_port}") as ch:
            unsure = pick(local[INT8_NAME], windows, confident=False)
            response = await inference_pb2_grpc.InferenceStub(ch).Predict(
                request(INT8_NAME, unsure), metadata=AS_DEVICE
            )
        assert response.escalate
        outbox = outbox_of(server)
        assert outbox is not None
        await outbox.close(10.0)
        assert (outbox.stats.failed, outbox.stats.written) == (1, 0)
    finally:
        await stop_inference_server(server, 0)


async def test_tampered_model_refused_at_start(
    trained: Path, tmp_path: Path, key: SidecarKey
) -> None:
    models = Path(shutil.copytree(trained, tmp_path / "models"))
    data = bytearray((models / f"{INT8_NAME}.pt").read_bytes())
    data[-100] ^= 0xFF
    (models / f"{INT8_NAME}.pt").write_bytes(bytes(data))
    server, port = await start_inference_server(
        "127.0.0.1:0", models, storage_target=None, trust_keys=[key.pub]
    )
    try:
        async with asserting_channel(key, f"127.0.0.1:{port}") as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            reply = await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=AS_DEVICE)
            assert [m.name for m in reply.models] == [FLOAT_NAME]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Predict(request(INT8_NAME, torch.zeros(3, 64)), metadata=AS_DEVICE)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stop_inference_server(server, 0)
    (models / f"{FLOAT_NAME}.pt").write_bytes(b"replaced")
    with pytest.raises(ConfigError, match=r"models: no model can be served from .*SHA-256 is"):
        await start_inference_server(
            "127.0.0.1:0", models, storage_target=None, trust_keys=[key.pub]
        )


async def test_refuses_non_local_addresses(trained: Path, key: SidecarKey) -> None:
    trust = [key.pub]
    with pytest.raises(ConfigError, match=r"listen: got '0\.0\.0\.0:0'"):
        await start_inference_server("0.0.0.0:0", trained, storage_target=None, trust_keys=trust)
    with pytest.raises(ConfigError, match=r"storage_target: got '10\.0\.0\.1:50061'"):
        await start_inference_server(
            "127.0.0.1:0", trained, storage_target="10.0.0.1:50061", trust_keys=trust
        )
    with pytest.raises(ConfigError, match="assertion_key: the outbox writes to storage"):
        await start_inference_server(
            "127.0.0.1:0", trained, storage_target="127.0.0.1:1", trust_keys=trust
        )


# -- through the sidecar -------------------------------------------------------------------


@dataclass
class Stack:
    pki: Pki
    sidecar: Sidecar
    workload: Workload

    def token(self, sub: str, **claims: object) -> str:
        return mint_token(self.pki.layout.dir, sub=sub, **claims)  # type: ignore[arg-type]

    def channel(self, device: str = DEVICE) -> grpc.aio.Channel:
        return channel(self.pki, self.sidecar.port, self.pki.mint(device))


@pytest.fixture
async def stack(pki: Pki, workload: Workload, tmp_path: Path) -> AsyncIterator[Stack]:
    """The sidecar with the shipped policies, routing Inference to the workload."""
    issuer = init_dev_issuer(pki.layout.dir, "ztagent.dev", force=True)
    policy_dir = Path(shutil.copytree(SHIPPED_POLICIES, tmp_path / "policies"))
    tokens = (
        f'[tokens]\nissuer = "{issuer.issuer}"\naudience = "{issuer.audience}"\n'
        f'jwks_file = "{issuer.jwks_path}"\nalgorithms = ["ES256"]\n'
    )
    config = write_config(pki, {SERVICE_NAME: workload.address}, extra=tokens, policy=policy_dir)
    car = Sidecar(load_config(config))
    await car.start()
    yield Stack(pki, car, workload)
    await car.stop(0)


def bearer(token: str, model: str | None = None) -> tuple[tuple[str, str], ...]:
    model_md = (("x-model", model),) if model else ()
    return (("authorization", f"Bearer {token}"), *model_md)


async def test_sidecar_prediction_equals_direct(
    stack: Stack,
    stub: inference_pb2_grpc.InferenceAsyncStub,
    windows: torch.Tensor,
    local: dict[str, LoadedModel],
) -> None:
    token = stack.token("alice", scope=["inference"])
    async with stack.channel() as ch:
        via_sidecar = inference_pb2_grpc.InferenceStub(ch)
        for i in (0, 1, 2):
            req = request(INT8_NAME, windows[i], f"w{i}")
            proxied = await via_sidecar.Predict(req, metadata=bearer(token, INT8_NAME), timeout=10)
            direct = await stub.Predict(req, metadata=AS_DEVICE)
            assert comparable(proxied) == comparable(direct)
            assert_matches_local(proxied, local[INT8_NAME], windows[i])


async def test_sidecar_policy_scope_and_critical_posture(
    stack: Stack, windows: torch.Tensor
) -> None:
    with_scope = stack.token("alice", scope=["inference"])
    without = stack.token("bob", scope=["storage.read"])

    async def outcome(token: str, model: str, header: str | None) -> str:
        async with stack.channel() as ch:
            try:
                await inference_pb2_grpc.InferenceStub(ch).Predict(
                    request(model, windows[0]), metadata=bearer(token, header), timeout=10
                )
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {err.details()}"
        return "OK"

    assert await outcome(with_scope, INT8_NAME, INT8_NAME) == "OK"
    assert await outcome(with_scope, INT8_NAME, None) == "OK"
    assert await outcome(without, INT8_NAME, INT8_NAME) == (
        "PERMISSION_DENIED: policy_denied: scope_required:inference"
    )
    # the critical model needs verified posture, and this device never attested
    assert await outcome(with_scope, FLOAT_NAME, FLOAT_NAME) == (
        "PERMISSION_DENIED: policy_denied: posture_required"
    )
    # leaving x-model out does not get around the policy: the workload refuses instead
    got = await outcome(with_scope, FLOAT_NAME, None)
    assert got.startswith("PERMISSION_DENIED: model 'vibration-anomaly' is critical")
    got = await outcome(with_scope, FLOAT_NAME, INT8_NAME)
    assert got.startswith("INVALID_ARGUMENT: x-model metadata names 'vibration-anomaly-int8'")


async def test_sidecar_escalation_in_the_devices_outbox(
    stack: Stack,
    storage: str,
    windows: torch.Tensor,
    local: dict[str, LoadedModel],
    key: SidecarKey,
) -> None:
    token = stack.token("alice", scope=["inference"])
    unsure = pick(local[INT8_NAME], windows, confident=False)
    async with stack.channel("cam-7") as ch:
        response = await inference_pb2_grpc.InferenceStub(ch).Predict(
            request(INT8_NAME, unsure), metadata=bearer(token), timeout=10
        )
    assert response.escalate
    await outbox_of(stack.workload.server).close(5.0)  # type: ignore[union-attr]
    async with asserting_channel(key, storage) as ch:
        got = await storage_pb2_grpc.StorageStub(ch).Get(
            storage_pb2.GetRequest(key=response.outbox_key),
            metadata=((DEVICE_ID_HEADER, "cam-7"),),
        )
    assert json.loads(got.value)["device_id"] == "cam-7"  # the certificate's device, not a header


async def test_sidecar_stream_keeps_order(
    stack: Stack, windows: torch.Tensor, local: dict[str, LoadedModel]
) -> None:
    token = stack.token("alice", scope=["inference"])
    sent = windows[:40]

    async def requests() -> AsyncIterator[inference_pb2.PredictRequest]:
        for i, window in enumerate(sent):
            yield request(INT8_NAME, window, f"s{i}")

    async with stack.channel() as ch:
        call = inference_pb2_grpc.InferenceStub(ch).PredictStream(
            requests(), metadata=bearer(token, INT8_NAME), timeout=20
        )
        responses = [r async for r in call]
    assert [r.request_id for r in responses] == [f"s{i}" for i in range(len(sent))]
    for response, window in zip(responses, sent, strict=True):
        assert_matches_local(response, local[INT8_NAME], window)


async def test_sidecar_stream_bad_window_ends_after_earlier_results(
    stack: Stack, windows: torch.Tensor
) -> None:
    token = stack.token("alice", scope=["inference"])

    async def requests() -> AsyncIterator[inference_pb2.PredictRequest]:
        yield request(INT8_NAME, windows[0], "ok-0")
        yield request(INT8_NAME, windows[1], "ok-1")
        yield inference_pb2.PredictRequest(model=INT8_NAME, input=bad_tensor("nan"))
        yield request(INT8_NAME, windows[2], "never")

    got = []
    async with stack.channel() as ch:
        call = inference_pb2_grpc.InferenceStub(ch).PredictStream(
            requests(), metadata=bearer(token), timeout=20
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for response in call:
                got.append(response.request_id)
    assert got == ["ok-0", "ok-1"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is nan" in info.value.details()


async def test_sidecar_stream_client_cancellation(stack: Stack, windows: torch.Tensor) -> None:
    """A client that cancels mid-stream frees the workload's stream; others keep working."""
    token = stack.token("alice", scope=["inference"])
    servicer = servicer_of(stack.workload.server)
    async with stack.channel() as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        call = stub.PredictStream(metadata=bearer(token, INT8_NAME), timeout=20)
        await call.write(request(INT8_NAME, windows[0], "c0"))
        first = await call.read()
        assert first.request_id == "c0"
        assert servicer.counters.active_streams == 1
        await call.write(request(INT8_NAME, windows[1], "c1"))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()
        for _ in range(200):
            if servicer.counters.active_streams == 0:
                break
            await asyncio.sleep(0.01)
        assert servicer.counters.active_streams == 0
        again = await stub.Predict(
            request(INT8_NAME, windows[2], "after"), metadata=bearer(token), timeout=10
        )
        assert again.request_id == "after"


async def test_sidecar_list_models(stack: Stack) -> None:
    token = stack.token("alice", scope=["inference"])
    async with stack.channel() as ch:
        reply = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), metadata=bearer(token), timeout=10
        )
    assert {m.name for m in reply.models} == {FLOAT_NAME, INT8_NAME}


async def test_the_inference_workload_serves_proxyless_from_the_cli(
    trained: Path, local: dict[str, LoadedModel], windows: torch.Tensor, pki: Pki, tmp_path: Path
) -> None:
    """``ztagent workload inference --protect CONFIG``: its own mTLS port with the sidecar's
    admission in its process. A device's call is answered as the model answers in-process,
    with no assertion and no sidecar; a device of another trust domain and a revoked one are
    refused with the sidecar's codes before the model runs."""
    import socket
    import subprocess
    import sys

    revoked = pki.mint("cam-gone")
    pki.revoke(revoked, number=902)
    config = write_config(pki, {SERVICE_NAME: "127.0.0.1:1"})  # the route's upstream: unused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztagent", "workload", "inference", "--protect", str(config),
         "--listen", f"127.0.0.1:{port}", "--models", str(trained)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):  # torch's import takes seconds on a loaded machine
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        forged = ((DEVICE_ID_HEADER, "cam-b"),)
        async with channel(pki, port, pki.mint("cam-a")) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            listed = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=20)
            assert {m.name for m in listed.models} == {FLOAT_NAME, INT8_NAME}
            got = await stub.Predict(request(INT8_NAME, windows[0]), metadata=forged, timeout=20)
            assert_matches_local(got, local[INT8_NAME], windows[0])
        foreign = pki.mint("cam-x", uris=["spiffe://other.example/device/cam-x"])
        for pair, code in ((foreign, "spiffe_id_wrong_trust_domain"), (revoked, "cert_revoked")):
            async with channel(pki, port, pair) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await inference_pb2_grpc.InferenceStub(ch).Predict(
                        request(INT8_NAME, windows[0]), timeout=20
                    )
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert dict(info.value.trailing_metadata() or ())[ERROR_CODE_HEADER] == code
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stderr is not None:
            proc.stderr.close()
