"""The demo's search for an uncertain window: found through whatever model answers, bounded."""

from __future__ import annotations

import math

from ztagent._proto.workloads.v1 import inference_pb2
from ztagent.dev.demo_inference import (
    BISECT_STEPS,
    CONFIDENCE_THRESHOLD,
    SCAN_STEPS,
    find_uncertain_window,
)


def sigmoid_model(boundary: float, sharpness: float):  # type: ignore[no-untyped-def]
    """A two-class stand-in for the served model: 'normal' below ``boundary``, 'overheating'
    above, with confidence falling to 0.5 at the boundary."""
    calls: list[float] = []

    def predict_at(step: float) -> inference_pb2.PredictResponse:
        calls.append(step)
        p_hot = 1 / (1 + math.exp(min(700.0, -sharpness * (step - boundary))))
        label = "overheating" if p_hot >= 0.5 else "normal"
        confidence = max(p_hot, 1 - p_hot)
        return inference_pb2.PredictResponse(
            label=label, confidence=confidence, escalate=confidence < CONFIDENCE_THRESHOLD
        )

    return predict_at, calls


def test_a_gentle_boundary_is_found_by_the_scan() -> None:
    predict_at, calls = sigmoid_model(boundary=0.5, sharpness=8)
    found = find_uncertain_window(predict_at)
    assert found.step is not None
    assert found.response.confidence < CONFIDENCE_THRESHOLD
    assert found.calls == len(calls) <= SCAN_STEPS + 1


def test_a_sharp_boundary_between_scan_points_is_found_by_bisection() -> None:
    # Confidence is above 0.8 at every scanned point (0.0, 0.1, ... 1.0).
    predict_at, calls = sigmoid_model(boundary=0.537, sharpness=2000)
    scanned = [predict_at(i / SCAN_STEPS).confidence for i in range(SCAN_STEPS + 1)]
    assert min(scanned) >= CONFIDENCE_THRESHOLD
    calls.clear()
    found = find_uncertain_window(predict_at)
    assert found.step is not None
    assert abs(found.step - 0.537) < 0.01
    assert found.response.confidence < CONFIDENCE_THRESHOLD
    assert len(calls) > SCAN_STEPS + 1


def test_a_model_that_is_always_sure_is_reported_not_assumed() -> None:
    def always_sure(step: float) -> inference_pb2.PredictResponse:
        return inference_pb2.PredictResponse(label="normal", confidence=0.93 - step / 100)

    found = find_uncertain_window(always_sure)
    assert found.step is None
    assert found.calls == SCAN_STEPS + 1
    assert found.response.confidence == inference_pb2.PredictResponse(confidence=0.92).confidence


def test_a_boundary_that_never_gets_uncertain_stops_after_bounded_calls() -> None:
    def jump(step: float) -> inference_pb2.PredictResponse:  # a step function: always sure
        return inference_pb2.PredictResponse(
            label="normal" if step < 0.45 else "overheating", confidence=0.99
        )

    found = find_uncertain_window(jump)
    assert found.step is None
    assert found.calls == SCAN_STEPS + 1 + BISECT_STEPS
