"""Prometheus metrics of the sidecar (``[metrics]``, default port 9464, path ``/metrics``).

What is counted, per call and per attestation:

- ``ztagent_decisions_total{service, outcome}``: every policy decision. ``outcome`` is
  ``allow``, ``deny``, ``dry_run`` (a deny let through by shadow mode), ``failure_open`` or
  ``failure_closed`` (the engine failed and the failure mode decided). ``service`` is a routed
  service or ``unrouted``.
- ``ztagent_denial_reasons_total{reason}``: the policy's reasons on denied calls.
- ``ztagent_refused_total{code}``: calls refused, by stable error code (``cert_revoked``,
  ``token_expired``, ``policy_denied``, ``no_route``...).
- ``ztagent_upstream_errors_total{service, code}``: gRPC status of failed upstream calls.
- ``ztagent_attestations_total{result, code}``: ``verified`` or ``refused`` with its code.
- ``ztagent_decision_log_dropped_total``: decision-log lines dropped (queue full).
- ``ztagent_decision_log_lost_total``: decision-log lines lost to a failed write (full disk).
- ``ztagent_trust_fetch_failures_total{source}``: failed CRL / JWKS fetches.
- ``ztagent_admission_seconds`` and ``ztagent_policy_evaluation_seconds``: histograms.

Labels never carry device ids, users or other per-caller values, and label sets that come
from outside (reasons written by policy authors, method names) are capped: past
``MAX_LABEL_VALUES`` distinct values, new ones are counted as ``other``.

One process: each ``Sidecar`` has its own registry and endpoint. With ``listen.workers > 1``
the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for the workers, which write their values
there, and serves the sum at ``metrics.address`` itself.

The endpoint (``MetricsEndpoint``) serves at most ``MAX_SCRAPE_CONNECTIONS`` connections at
once, one thread each, and closes one idle for ``SCRAPE_TIMEOUT_S``: prometheus_client's own
server starts a thread per connection and waits for its request without a timeout, so
anyone who could reach the port could hold a thread of the sidecar's process per open socket.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from ztagent.addresses import parse_host_port
from ztagent.connection_cap import CappedThreadingMixIn
from ztagent.errors import ConfigError

MAX_LABEL_VALUES = 200
MAX_SCRAPE_CONNECTIONS = 16
"""Connections the metrics endpoint serves at once; one more is closed at once."""
SCRAPE_TIMEOUT_S = 10.0
"""A metrics connection that sends nothing for this long is closed."""
UNROUTED = "unrouted"
OTHER = "other"

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
)  # fmt: skip


class _Capped:
    """Label values seen so far; past the cap, new ones become ``other``."""

    def __init__(self, cap: int = MAX_LABEL_VALUES) -> None:
        self._seen: set[str] = set()
        self._cap = cap
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self._cap:
                return OTHER
            self._seen.add(value)
            return value


class _Children:
    """The labelled children of the per-call counters, looked up once: ``labels()`` costs
    about 2.5 µs per call (it validates and joins the label values under a lock) against a
    dict lookup here. Keyed by label values already capped (``_Capped``, the routed
    services), so it is bounded like the metric itself."""

    def __init__(self) -> None:
        self._children: dict[tuple[object, ...], Counter] = {}

    def get(self, counter: Counter, *values: str) -> Counter:
        key = (counter, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*values)
        return child


class Metrics:
    """The sidecar's counters and histograms, registered in ``registry`` (None: not
    registered anywhere, as in a worker whose supervisor collects the values)."""

    def __init__(
        self, registry: CollectorRegistry | None, routed_services: Iterable[str] = ()
    ) -> None:
        self.registry = registry
        self._routed = frozenset(routed_services)
        self._reason = _Capped()
        self._code = _Capped()
        self._children = _Children()
        r = registry
        self.decisions = Counter(
            "ztagent_decisions", "Policy decisions", ["service", "outcome"], registry=r
        )
        self.denial_reasons = Counter(
            "ztagent_denial_reasons", "Reasons of denied calls", ["reason"], registry=r
        )
        self.refused = Counter("ztagent_refused", "Calls refused, by code", ["code"], registry=r)
        self.upstream_errors = Counter(
            "ztagent_upstream_errors", "Failed upstream calls", ["service", "code"], registry=r
        )
        self.attestations = Counter(
            "ztagent_attestations", "Attestation results", ["result", "code"], registry=r
        )
        self.trust_expiry = Gauge(
            "ztagent_trust_expiry_timestamp_seconds",
            "When each piece of trust stops being usable (Unix seconds): crl (nextUpdate + "
            "grace), jwks (last fetch + jwks_max_stale_s), server_cert (notAfter)",
            ["source"],
            registry=r,
            multiprocess_mode="min",
        )
        self.trust_last_sync = Gauge(
            "ztagent_trust_last_sync_timestamp_seconds",
            "When each piece of trust was last refreshed (Unix seconds): crl, jwks, policy, "
            "server_cert",
            ["source"],
            registry=r,
            multiprocess_mode="max",
        )
        self.trust_fetch_failures = Counter(
            "ztagent_trust_fetch_failures",
            "Failed refreshes of a piece of trust: crl (CRL fetch), jwks (key set fetch)",
            ["source"],
            registry=r,
        )
        self._fetch_failures_seen: dict[str, int] = {}
        self.upload = {
            name: Gauge(
                f"ztagent_upload_{name}",
                f"ztagent ship, per shipper kind (decision_log, mqtt): {doc}",
                ["kind"],
                registry=r,
                multiprocess_mode="max",
            )
            for name, doc in (
                ("pending_records", "records waiting on disk for the uplink"),
                ("pending_bytes", "bytes waiting on disk for the uplink"),
                ("oldest_pending_seconds", "age of the oldest record waiting"),
                ("delivered", "records the upstream acknowledged since the shipper started"),
                ("retried", "failed deliveries that will be retried, since start"),
                ("dropped", "records dropped (spool full or rotated away), since start"),
            )
        }
        self.log_dropped = Counter(
            "ztagent_decision_log_dropped", "Decision-log lines dropped", registry=r
        )
        self.log_lost = Counter(
            "ztagent_decision_log_lost", "Decision-log lines lost to failed writes", registry=r
        )
        self._log_lost_seen = 0
        self.admission_seconds = Histogram(
            "ztagent_admission_seconds",
            "Identity, token, posture and policy checks of one call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_seconds = Histogram(
            "ztagent_policy_evaluation_seconds",
            "One policy evaluation",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def service(self, service: str) -> str:
        return service if service in self._routed else UNROUTED

    def decision(self, service: str, outcome: str, reasons: Sequence[str], policy_s: float) -> None:
        self._children.get(self.decisions, self.service(service), outcome).inc()
        self.policy_seconds.observe(policy_s)
        if outcome in ("deny", "dry_run"):
            for reason in reasons:
                self._children.get(self.denial_reasons, self._reason(reason)).inc()

    def fetch_failures(self, source: str, total: int) -> None:
        """Bring the ``source`` fetch-failure counter up to ``total`` (the fetcher's own
        count since start)."""
        seen = self._fetch_failures_seen.get(source, 0)
        if total > seen:
            self.trust_fetch_failures.labels(source).inc(total - seen)
            self._fetch_failures_seen[source] = total

    def decision_log_lost(self, total: int) -> None:
        """Bring the lost-lines counter up to ``total`` (the log writer's count since start)."""
        if total > self._log_lost_seen:
            self.log_lost.inc(total - self._log_lost_seen)
            self._log_lost_seen = total

    def refusal(self, code: str) -> None:
        self._children.get(self.refused, self._code(code)).inc()

    def observe_admission(self, seconds: float, logged: bool) -> None:
        """All checks of one call; ``logged`` False when its decision-log line was dropped."""
        self.admission_seconds.observe(seconds)
        if not logged:
            self.log_dropped.inc()

    def upstream_error(self, service: str, code: str) -> None:
        self.upstream_errors.labels(self.service(service), code).inc()

    def attestation(self, verified: bool, code: str = "") -> None:
        result = "verified" if verified else "refused"
        self.attestations.labels(result, self._code(code) if code else "").inc()


class _ScrapeHandler(WSGIRequestHandler):
    """Serves one connection; its socket times out after ``SCRAPE_TIMEOUT_S`` of silence."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(SCRAPE_TIMEOUT_S)  # read per connection: tests shorten it

    def log_message(self, format: str, *args: Any) -> None:
        """Logs nothing (a scrape every few seconds is not news)."""


class _ScrapeServer(CappedThreadingMixIn, ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server with a cap on connections served at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.cap_connections(MAX_SCRAPE_CONNECTIONS)
        super().__init__(*args, **kwargs)


class MetricsEndpoint:
    """``/metrics`` over HTTP on a daemon thread; ``close()`` stops it."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, port = parse_host_port(address, "metrics.address")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            class Server(_ScrapeServer):
                address_family = family

            self._server = make_server(
                host, port, make_wsgi_app(registry), Server, handler_class=_ScrapeHandler
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError("metrics.address", f"cannot bind {address}: {reason}") from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
