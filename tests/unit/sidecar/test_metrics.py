"""Metrics labels stay bounded and never name callers."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from ztagent.sidecar import metrics as metrics_mod
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


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body: bytes = reply.read()
        return body


def test_the_endpoint_holds_no_thread_per_idle_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idle connections past MAX_SCRAPE_CONNECTIONS are closed at once (no thread each), an
    idle one within the cap is closed after SCRAPE_TIMEOUT_S, and a scrape gets through once
    the idle ones are gone."""
    monkeypatch.setattr(metrics_mod, "MAX_SCRAPE_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_mod, "SCRAPE_TIMEOUT_S", 2.0)
    registry = CollectorRegistry()
    Metrics(registry, [])
    endpoint = metrics_mod.MetricsEndpoint("127.0.0.1:0", registry)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(30)]
    try:
        started = time.monotonic()
        closed_at_once = 0
        for sock in idle[4:]:  # past the cap: the server closes them without reading
            closed_at_once += sock.recv(1) == b""
        assert closed_at_once == 26
        assert time.monotonic() - started < 1.5  # at accept, not after SCRAPE_TIMEOUT_S
        assert threading.active_count() <= before + 4
        started = time.monotonic()
        for sock in idle[:4]:  # within the cap: closed once idle for SCRAPE_TIMEOUT_S
            assert sock.recv(1) == b""
        assert time.monotonic() - started < 8
        assert b"ztagent_refused_total" in _scrape(endpoint.port)
    finally:
        for sock in idle:
            sock.close()
        endpoint.close()
