"""Metrics labels stay bounded and never name callers."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from tests.fixtures.sockets import closed_by_server, still_open
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
    """Idle connections past MAX_SCRAPE_CONNECTIONS are closed at accept, without a thread
    each; the ones within the cap stay open (their timeout is longer than the test), and a
    scrape gets through once they are gone. Which connections win the slots is the kernel's
    accept order, not the order of connect, so the test counts rather than names them."""
    monkeypatch.setattr(metrics_mod, "MAX_SCRAPE_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_mod, "SCRAPE_TIMEOUT_S", 120.0)
    registry = CollectorRegistry()
    Metrics(registry, [])
    endpoint = metrics_mod.MetricsEndpoint("127.0.0.1:0", registry)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(30)]
    try:
        closed = closed_by_server(idle, 26)
        assert len(closed) == 26  # past the cap: closed by the server without reading
        held = [sock for i, sock in enumerate(idle) if i not in closed]
        assert still_open(held)
        assert threading.active_count() <= before + 4
        for sock in held:
            sock.close()
        for _ in range(100):  # their threads see the close and free the slots
            try:
                body = _scrape(endpoint.port)
                break
            except (ConnectionError, http.client.HTTPException):
                time.sleep(0.05)
        else:
            pytest.fail("no scrape served after the idle connections closed")
        assert b"ztagent_refused_total" in body
    finally:
        for sock in idle:
            sock.close()
        endpoint.close()


def test_an_idle_connection_is_closed_after_the_scrape_timeout(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Closed by the server once silent for SCRAPE_TIMEOUT_S, and quietly: socketserver's
    default prints a traceback for each timed-out connection."""
    monkeypatch.setattr(metrics_mod, "SCRAPE_TIMEOUT_S", 0.5)
    registry = CollectorRegistry()
    endpoint = metrics_mod.MetricsEndpoint("127.0.0.1:0", registry)
    try:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as idle:
            assert closed_by_server([idle], 1) == {0}  # without the timeout: never closed
    finally:
        endpoint.close()
    assert "Traceback" not in capfd.readouterr().err
