"""The inference part of `make run`: sensor windows classified through the sidecar, an
uncertain result escalated into the device's storage outbox, a user without the scope denied,
and the critical model gated by attested posture. Needs ztagent[inference] (torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from ztagent._proto.workloads.v1 import inference_pb2, storage_pb2

INFERENCE = "ztagent.workloads.v1.Inference"
FAST_MODEL = "vibration-anomaly-int8"
CRITICAL_MODEL = "vibration-anomaly"


@dataclass(frozen=True)
class Result:
    ok: bool
    line: str


def window_request(kind: str, model: str) -> bytes:
    from ztagent.workloads.inference.models import encode_tensor
    from ztagent.workloads.inference.sensors import example_window

    shape, data = encode_tensor(example_window(kind))
    tensor = inference_pb2.Tensor(dtype=inference_pb2.Tensor.FLOAT32, shape=shape, data=data)
    return inference_pb2.PredictRequest(model=model, input=tensor).SerializeToString()


def predict(
    channel: grpc.Channel, token: str, kind: str, model: str
) -> inference_pb2.PredictResponse:
    call = channel.unary_unary(f"/{INFERENCE}/Predict")
    metadata = (("authorization", f"Bearer {token}"), ("x-model", model))
    reply: bytes = call(window_request(kind, model), timeout=30, metadata=metadata)
    return inference_pb2.PredictResponse.FromString(reply)


def scenarios(
    open_channel: Callable[[object], grpc.Channel],
    good_cert: object,
    tampered_cert: object,
    tokens: dict[str, str],
) -> list[Result]:
    """``tokens``: 'operator' (scope inference, bound to the good device), 'reader' (alice,
    role writer, bound to the good device: reads the outbox), 'no_scope' (bob), and
    'tampered_operator' (scope inference, bound to the tampered device)."""
    out: list[Result] = []
    with open_channel(good_cert) as channel:
        normal = predict(channel, tokens["operator"], "normal", FAST_MODEL)
        out.append(
            Result(
                not normal.escalate,
                f"(m) inference through the sidecar: {FAST_MODEL} {normal.model_version} says "
                f"{normal.label!r} ({normal.confidence:.2f}), acted on locally "
                f"(forward pass {normal.inference_time_us} us)",
            )
        )
        borderline = predict(channel, tokens["operator"], "borderline", FAST_MODEL)
        landed = b""
        if borderline.escalate and borderline.outbox_key:
            get = storage_pb2.GetRequest(key=borderline.outbox_key).SerializeToString()
            call = channel.unary_unary("/ztagent.workloads.v1.Storage/Get")
            for _ in range(50):  # the outbox write is asynchronous (never delays the answer)
                try:
                    reply = call(
                        get, timeout=10, metadata=(("authorization", f"Bearer {tokens['reader']}"),)
                    )
                    landed = storage_pb2.GetResponse.FromString(reply).value
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    import time

                    time.sleep(0.1)
        out.append(
            Result(
                borderline.escalate and bool(landed),
                f"(n) uncertain window: {borderline.label!r} at {borderline.confidence:.2f} < 0.80"
                f" -> escalate=true, record in the device's storage outbox "
                f"{borderline.outbox_key!r} ({len(landed)} bytes)",
            )
        )
        try:
            predict(channel, tokens["no_scope"], "normal", FAST_MODEL)
            out.append(Result(False, "(o) user without the inference scope was NOT refused"))
        except grpc.RpcError as err:
            out.append(
                Result(
                    err.code() == grpc.StatusCode.PERMISSION_DENIED,
                    f"(o) user 'bob' without the inference scope refused: {err.code().name} "
                    f"{err.details()}",
                )
            )
        critical = predict(channel, tokens["operator"], "normal", CRITICAL_MODEL)
        out.append(
            Result(
                critical.label == "normal",
                f"(p) critical model {CRITICAL_MODEL!r} from the attested device: allowed, "
                f"{critical.label!r} ({critical.confidence:.2f})",
            )
        )
    with open_channel(tampered_cert) as channel:
        try:
            predict(channel, tokens["tampered_operator"], "normal", CRITICAL_MODEL)
            out.append(Result(False, "(q) critical model from the tampered device NOT refused"))
        except grpc.RpcError as err:
            out.append(
                Result(
                    err.code() == grpc.StatusCode.PERMISSION_DENIED
                    and "posture_required" in (err.details() or ""),
                    f"(q) critical model from the tampered device refused: {err.code().name} "
                    f"{err.details()}",
                )
            )
    return out
