"""The inference part of `make run`: sensor windows classified through the sidecar, an
uncertain result escalated into the device's storage outbox, a user without the scope denied,
and the critical model gated by attested posture. Needs ztagent[inference] (torch)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from ztagent._proto.workloads.v1 import inference_pb2, storage_pb2

if TYPE_CHECKING:
    import torch

INFERENCE = "ztagent.workloads.v1.Inference"
FAST_MODEL = "vibration-anomaly-int8"
CRITICAL_MODEL = "vibration-anomaly"
# What the demo starts the inference workload with (`--confidence-threshold`).
CONFIDENCE_THRESHOLD = 0.8
# Bounds of the search for an uncertain window: a coarse scan, then bisection of the step
# where the served label changes (at that boundary two classes share the probability).
SCAN_STEPS = 10
BISECT_STEPS = 30


@dataclass(frozen=True)
class Result:
    ok: bool
    line: str


def _request(window: torch.Tensor, model: str) -> bytes:
    from ztagent.workloads.inference.models import encode_tensor

    shape, data = encode_tensor(window)
    tensor = inference_pb2.Tensor(dtype=inference_pb2.Tensor.FLOAT32, shape=shape, data=data)
    return inference_pb2.PredictRequest(model=model, input=tensor).SerializeToString()


def _window(kind: str) -> torch.Tensor:
    from ztagent.workloads.inference.sensors import example_window

    return example_window(kind)


def predict_window(
    channel: grpc.Channel, token: str, window: torch.Tensor, model: str
) -> inference_pb2.PredictResponse:
    call = channel.unary_unary(f"/{INFERENCE}/Predict")
    metadata = (("authorization", f"Bearer {token}"), ("x-model", model))
    reply: bytes = call(_request(window, model), timeout=30, metadata=metadata)
    return inference_pb2.PredictResponse.FromString(reply)


def predict(
    channel: grpc.Channel, token: str, kind: str, model: str
) -> inference_pb2.PredictResponse:
    return predict_window(channel, token, _window(kind), model)


def _compare(confidence: float) -> str:
    """The observed comparison with the threshold, as it came out."""
    op = "<" if confidence < CONFIDENCE_THRESHOLD else ">="
    return f"{confidence:.2f} {op} {CONFIDENCE_THRESHOLD:.2f}"


@dataclass(frozen=True)
class Uncertain:
    """The outcome of the search: the step (0 = normal, 1 = overheating) and the served answer
    there, or ``None`` with the least confident answer seen."""

    step: float | None
    response: inference_pb2.PredictResponse
    calls: int


def find_uncertain_window(
    predict_at: Callable[[float], inference_pb2.PredictResponse],
) -> Uncertain:
    """Steps from a normal towards an overheating window through the served model until its
    confidence falls below the threshold: a scan of SCAN_STEPS + 1 points, then bisection
    between neighbouring scanned points whose labels differ (where the label changes, the two
    classes split the probability, so confidence drops). Bounded: at most
    SCAN_STEPS + 1 + BISECT_STEPS calls. Depends on no particular weights."""
    calls = 0
    least: inference_pb2.PredictResponse | None = None
    scanned: list[tuple[float, inference_pb2.PredictResponse]] = []

    def ask(step: float) -> inference_pb2.PredictResponse:
        nonlocal calls, least
        calls += 1
        answer = predict_at(step)
        if least is None or answer.confidence < least.confidence:
            least = answer
        return answer

    for i in range(SCAN_STEPS + 1):
        step = i / SCAN_STEPS
        answer = ask(step)
        if answer.confidence < CONFIDENCE_THRESHOLD:
            return Uncertain(step, answer, calls)
        scanned.append((step, answer))
    budget = BISECT_STEPS
    for (lo, lo_answer), (hi, hi_answer) in itertools.pairwise(scanned):
        if lo_answer.label == hi_answer.label:
            continue
        while budget > 0:
            budget -= 1
            mid = (lo + hi) / 2
            answer = ask(mid)
            if answer.confidence < CONFIDENCE_THRESHOLD:
                return Uncertain(mid, answer, calls)
            if answer.label == lo_answer.label:
                lo = mid
            else:
                hi = mid
    assert least is not None
    return Uncertain(None, least, calls)


def _read_outbox(channel: grpc.Channel, token: str, key: str) -> bytes:
    """The escalated record, once the workload's asynchronous outbox write has landed."""
    get = storage_pb2.GetRequest(key=key).SerializeToString()
    call = channel.unary_unary("/ztagent.workloads.v1.Storage/Get")
    for _ in range(50):  # the outbox write never delays the answer
        try:
            reply = call(get, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
            value: bytes = storage_pb2.GetResponse.FromString(reply).value
            return value
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            time.sleep(0.1)
    return b""


def _uncertain_scenario(channel: grpc.Channel, tokens: dict[str, str]) -> Result:
    normal, hot = _window("normal"), _window("overheating")
    found = find_uncertain_window(
        lambda step: predict_window(
            channel, tokens["operator"], (1 - step) * normal + step * hot, FAST_MODEL
        )
    )
    answer = found.response
    if found.step is None:
        return Result(
            False,
            f"(n) no uncertain window found from normal towards overheating in {found.calls} "
            f"calls: least confident answer {answer.label!r} at {_compare(answer.confidence)}",
        )
    landed = _read_outbox(channel, tokens["reader"], answer.outbox_key) if answer.escalate else b""
    key = answer.outbox_key or "(none)"
    return Result(
        answer.escalate and bool(landed),
        f"(n) uncertain window (step {found.step:.3f} from normal towards overheating, "
        f"found in {found.calls} calls): {answer.label!r} at {_compare(answer.confidence)} -> "
        f"escalate={str(answer.escalate).lower()}, record in the device's storage outbox "
        f"{key!r} ({len(landed)} bytes)",
    )


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
                normal.label == "normal" and not normal.escalate,
                f"(m) inference through the sidecar: {FAST_MODEL} {normal.model_version} says "
                f"{normal.label!r} at {_compare(normal.confidence)}, "
                f"escalate={str(normal.escalate).lower()} (forward pass "
                f"{normal.inference_time_us} us)",
            )
        )
        out.append(_uncertain_scenario(channel, tokens))
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
