"""Metrics labels stay bounded and never name callers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ztagent.sidecar.metrics import MAX_LABEL_VALUES, OTHER, UNROUTED, Metrics


def _value(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


def test_reasons_past_the_cap_count_as_other() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["a.v1.S"])
    for i in range(MAX_LABEL_VALUES + 5):
        metrics.decision("a.v1.S", "deny", [f"reason-{i}"], 0.0001)
    assert _value(registry, "ztagent_denial_reasons_total", {"reason": "reason-0"}) == 1
    assert _value(registry, "ztagent_denial_reasons_total", {"reason": OTHER}) == 5
    assert (
        _value(registry, "ztagent_decisions_total", {"service": "a.v1.S", "outcome": "deny"})
        == MAX_LABEL_VALUES + 5
    )


def test_unrouted_services_share_one_label_and_allows_have_no_reasons() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["a.v1.S"])
    metrics.decision("evil.v1.Random123", "allow", ["ok"], 0.0001)
    metrics.decision("evil.v1.Random456", "allow", ["ok"], 0.0001)
    assert (
        _value(registry, "ztagent_decisions_total", {"service": UNROUTED, "outcome": "allow"}) == 2
    )
    assert _value(registry, "ztagent_denial_reasons_total", {"reason": "ok"}) is None
    metrics.attestation(False, "boot_not_reference")
    metrics.attestation(True)
    assert (
        _value(
            registry,
            "ztagent_attestations_total",
            {"result": "refused", "code": "boot_not_reference"},
        )
        == 1
    )
    assert _value(registry, "ztagent_attestations_total", {"result": "verified", "code": ""}) == 1


def test_decision_log_lost_follows_the_writers_total() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["a.v1.S"])
    assert _value(registry, "ztagent_decision_log_lost_total", {}) == 0
    metrics.decision_log_lost(3)
    metrics.decision_log_lost(3)  # reported again by the next health round: no change
    metrics.decision_log_lost(5)
    assert _value(registry, "ztagent_decision_log_lost_total", {}) == 5
