"""The sidecar process: mTLS grpc.aio server, health, hot reload of trust files, graceful stop.

IO lives here (sockets, files, timers, signals); the checks it runs are pure functions in
``ztagent.pki`` and the forwarding is in ``ztagent.sidecar.proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from ztagent._proto.v1 import attestation_pb2_grpc

# Importing the workloads' stubs registers their method kinds in protobuf's descriptor pool,
# which lets the proxy take its unary fast path for their unary methods.
from ztagent._proto.workloads.v1 import inference_pb2, storage_pb2  # noqa: F401
from ztagent.admission.call import Clock, utc_now
from ztagent.admission.refusal_budget import RefusalBudget
from ztagent.config import Config, ListenConfig, check_files
from ztagent.device.bundle_fetch import BundleFetcher
from ztagent.device.crl_fetch import CrlFetcher
from ztagent.errors import ConfigError, TransportError, ZtagentError
from ztagent.files import FileStamp, file_stamp
from ztagent.pki.trust_files import TrustFiles
from ztagent.pki.verify import DeviceChecker
from ztagent.policy.decision_cache import CachedEngine
from ztagent.policy.decision_log import DecisionLog, NullDecisionLog, worker_log_path
from ztagent.policy.types import PolicyEngine
from ztagent.sidecar.attestation import AttestationService, PostureState
from ztagent.sidecar.health import IdentityCheckedHealth
from ztagent.sidecar.heap import settle_heap
from ztagent.sidecar.log_writer import ProcessDecisionLog
from ztagent.sidecar.metrics import Metrics, MetricsEndpoint
from ztagent.sidecar.pipeline import Pipeline
from ztagent.sidecar.proxy import ProxyHandler
from ztagent.sidecar.proxyless import AdmissionInterceptor, SyncServer
from ztagent.sidecar.upstreams import Upstreams
from ztagent.signals import wait_for_stop_signal
from ztagent.timefmt import rfc3339
from ztagent.tokens.assertion import AssertionSigner
from ztagent.tokens.errors import JwksError
from ztagent.tokens.verifier import TokenVerifier
from ztagent.upload.run import STATUS_STALE_S, status_path, upload_configured

log = logging.getLogger("ztagent.sidecar")

FileSignature = tuple[FileStamp | None, ...]


def file_signature(paths: tuple[Path, ...]) -> FileSignature:
    """One ``file_stamp`` per file (None: missing or unreadable)."""
    out: list[FileStamp | None] = []
    for path in paths:
        try:
            out.append(file_stamp(path))
        except OSError:
            out.append(None)
    return tuple(out)


def _server_cert_config(config: Config) -> object:
    """grpc's certificate configuration; validates that the key belongs to the certificate."""
    tls = config.tls
    chain = tls.server_cert.read_bytes()
    key = tls.server_key.read_bytes()
    bundle = tls.client_ca.read_bytes()
    try:
        leaf = x509.load_pem_x509_certificate(chain)
    except ValueError as exc:
        raise ConfigError("tls.server_cert", f"not a PEM certificate: {exc}") from exc
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("tls.server_key", f"not an unencrypted PEM private key: {exc}") from exc
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if private.public_key().public_bytes(enc, pub) != leaf.public_key().public_bytes(enc, pub):
        raise ConfigError("tls.server_key", "does not match the public key in tls.server_cert")
    return grpc.ssl_server_certificate_configuration(((key, chain),), root_certificates=bundle)


POLICY_HEALTH = "ztagent.policy"
UPLOAD_HEALTH = "ztagent.upload"
TOKENS_HEALTH = "ztagent.tokens"
REVOCATION_HEALTH = "ztagent.revocation"


def build_engine(config: Config) -> PolicyEngine:
    """The configured policy engine; an embedded policy that fails to load stops start-up."""
    policy = config.policy
    if policy.engine == "opa":
        from ztagent.policy.opa import OpaEngine

        return OpaEngine(
            policy.opa_url, decision_path=policy.decision_path, timeout_s=policy.timeout_s
        )
    from ztagent.policy.embedded import EmbeddedEngine
    from ztagent.policy.sources import load_bundle_keys

    assert policy.path is not None
    last_good = policy.last_good_dir or config.posture.state_dir / "last-good-policy"
    engine = EmbeddedEngine.load(
        policy.path,
        policy.decision_path,
        last_good_dir=last_good,
        keys=load_bundle_keys(policy.keys) or None,
        require_signature=policy.require_signature,
    )
    if not policy.decision_cache:
        return engine
    return CachedEngine(engine, engine.ast_json, policy.decision_cache_size)


def build_tokens(config: Config) -> TokenVerifier | None:
    if config.tokens is None:
        return None
    from ztagent.sidecar.token_setup import verifier_from_config

    return verifier_from_config(config.tokens)


@dataclass(frozen=True)
class WorkerSlot:
    """This process is worker ``index`` of ``count`` sharing the listen port (SO_REUSEPORT)."""

    index: int
    count: int


def build_decision_log(
    config: Config, worker: WorkerSlot | None = None
) -> DecisionLog | ProcessDecisionLog | NullDecisionLog:
    """The decision log; its checkpoints are signed with ``decision_log.checkpoint_key``, else
    with the sidecar's ``tls.server_key`` (read once, at start: verify checkpoints written
    before a key change with the certificate of the key then in use)."""
    from ztagent.policy.log_checkpoint import CheckpointError, CheckpointSigner

    dl = config.decision_log
    if not dl.enabled:
        return NullDecisionLog()
    key_name = "decision_log.checkpoint_key" if dl.checkpoint_key else "tls.server_key"
    key_path = dl.checkpoint_key or config.tls.server_key
    try:
        pem = key_path.read_bytes()
        signer = CheckpointSigner.from_pem(pem, str(key_path))
    except OSError as exc:
        raise ConfigError(key_name, f"{key_path}: {exc.strerror or exc}") from None
    except CheckpointError as err:
        raise ConfigError(
            key_name, f"cannot sign decision-log checkpoints: {err.message}"
        ) from None
    path = dl.path if worker is None else worker_log_path(dl.path, worker.index)
    settings: dict[str, Any] = {  # DecisionLog's keyword arguments, for either writer
        "max_bytes": dl.max_bytes,
        "backups": dl.backups,
        "queue_size": dl.queue_size,
        "on_full": dl.on_full,
        "fsync": dl.fsync,
        "max_input_bytes": dl.max_input_bytes,
        "checkpoint_every": dl.checkpoint_every,
    }
    if dl.writer == "process":
        return ProcessDecisionLog(path, signer_pem=pem, **settings)
    return DecisionLog(path, signer=signer, **settings)


class Sidecar:
    """One sidecar server. ``start()`` validates everything, binds, and reports SERVING."""

    def _verify_peer(self, context: grpc.aio.ServicerContext) -> object:
        """The identity check of a call the proxy does not see (health)."""
        if self.pipeline is None:
            raise TransportError("shutting_down", "the sidecar is not serving")
        return self.pipeline.verify_device(context.auth_context())

    def __init__(
        self,
        config: Config,
        clock: Clock = utc_now,
        *,
        worker: WorkerSlot | None = None,
        services: Callable[[grpc.aio.Server], None] | None = None,
        sync_services: Callable[[grpc.Server], None] | None = None,
        sync_workers: int = 32,
    ) -> None:
        """``services``: proxyless mode (``ztagent.sidecar.proxyless``): these servicers are
        served on the mTLS port behind ``AdmissionInterceptor`` instead of the proxy.
        ``sync_services``: the same for synchronous servicers, on a ``grpc.server`` with
        ``sync_workers`` threads (``proxyless.protected_sync_server``)."""
        if services is not None and sync_services is not None:
            raise ValueError("services and sync_services: give one")
        self.config = config
        self._clock = clock
        self.worker = worker
        self._services = services
        self._sync_services = sync_services
        self._sync_workers = sync_workers
        self.port = 0
        self.health = IdentityCheckedHealth(self._verify_peer, config.tls.reload_interval_s)
        self._server: grpc.aio.Server | SyncServer | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        """The port of the plain health listener (``health.address``; 0: none)."""
        self._upstreams: Upstreams | None = None
        self.pipeline: Pipeline | None = None
        self.attestation: AttestationService | None = None
        self._trust_files = TrustFiles(config.tls.client_ca, config.tls.crl)
        self._tls_paths = (config.tls.server_cert, config.tls.server_key, config.tls.client_ca)
        self._tls_signature: FileSignature = ()
        self._pending_tls: object | None = None
        self._policy_synced_at: float | None = None
        self._started = False
        self._refusing_logged: str | None = None
        self._server_cert_window: tuple[float, float] | None = None
        """(loaded at, notAfter) of the serving certificate, Unix seconds."""
        self.metrics: Metrics | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._crl_task: asyncio.Task[None] | None = None
        self._bundle_task: asyncio.Task[None] | None = None
        # Among workers only the first fetches CRLs; the others reload the file it writes.
        fetches = worker is None or worker.index == 0
        self.crl_fetcher = (
            CrlFetcher(config.tls.crl_source, config.tls.client_ca, config.tls.crl)
            if fetches and config.tls.crl_source is not None and config.tls.crl is not None
            else None
        )
        # Likewise only the first worker downloads bundles; the others reload the copy.
        self.bundle_fetcher = (
            _bundle_fetcher(config) if fetches and config.policy.bundle is not None else None
        )

    # -- start-up ---------------------------------------------------------------------------

    async def start(self) -> int:
        config = self.config
        if self.crl_fetcher is not None:  # freshest CRL first; else the last good one on disk
            await self.crl_fetcher.fetch_once(self._clock())
        if self.bundle_fetcher is not None and not self.bundle_fetcher.dest.exists():
            # no copy yet: try the server once (bounded by its timeout); else the last good
            await self.bundle_fetcher.fetch_once()
        check_files(config)
        self._tls_signature = file_signature(self._tls_paths)
        initial = _server_cert_config(config)
        self._note_server_cert()
        trust = self._trust_files.load()
        checker = DeviceChecker(trust, config.identity.policy)
        engine = build_engine(config)
        self._policy_synced_at = time.time()
        tokens = build_tokens(config)
        if tokens is not None:
            try:
                await tokens.prime()
            except JwksError as err:
                # Serve anyway: calls with a token are refused jwks_unavailable (logged,
                # counted) and health says NOT_SERVING, instead of a crash loop that leaves
                # no trace. Keys are fetched again on the next call with a token.
                log.error("serving without usable user-token keys: %s", err)
        decision_log = build_decision_log(config, self.worker)
        posture = (
            PostureState.load(config.posture, shared=self.worker is not None)
            if config.posture.enabled
            else None
        )
        decision_log.start()
        self.metrics = self._build_metrics()
        self.pipeline = Pipeline(
            config,
            checker,
            engine,
            tokens,
            decision_log,
            self._clock,
            posture_cache=posture.cache if posture is not None else None,
            metrics=self.metrics,
            signer=assertion_signer(config),
            local_methods=REFLECTION_METHODS,  # answered here, never forwarded
        )
        self._upstreams = Upstreams(config.routes, config.listen.max_message_bytes)

        options = server_options(config.listen, reuseport=self.worker is not None)
        server: Any  # grpc.aio.Server, or SyncServer, which bridges aio servicers onto sync
        if self._sync_services is not None:
            server = SyncServer(
                lambda: self.pipeline,
                asyncio.get_running_loop(),
                options,
                self._sync_workers,
                recheck_s=config.tls.reload_interval_s,
            )
        else:
            interceptors = []
            if self._services is not None:
                interceptors.append(
                    AdmissionInterceptor(lambda: self.pipeline, config.tls.reload_interval_s)
                )
            server = grpc.aio.server(interceptors=interceptors, options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if posture is not None:
            self.attestation = AttestationService(
                self.pipeline,
                posture,
                self._clock,
                RefusalBudget(
                    config.decision_log.refusal_burst, config.decision_log.refusal_interval_s
                ),
            )
            attestation_pb2_grpc.add_AttestationServicer_to_server(self.attestation, server)
        server.add_generic_rpc_handlers(
            admitted_reflection(self.pipeline, config, attestation=posture is not None)
        )
        if self._services is not None:
            self._services(server)  # proxyless: the workload's own servicers, admitted
        elif self._sync_services is not None:
            self._sync_services(server.sync)  # proxyless, synchronous servicers
        else:
            server.add_generic_rpc_handlers(
                (
                    ProxyHandler(
                        self.pipeline,
                        self._upstreams,
                        self.metrics,
                        recheck_s=config.tls.reload_interval_s,
                    ),
                )
            )
        credentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch_tls, require_client_authentication=True
        )
        try:
            self.port = server.add_secure_port(config.listen.address, credentials)
        except RuntimeError as exc:
            raise ConfigError(
                "listen.address", f"cannot bind {config.listen.address}: {exc}"
            ) from exc
        if self.metrics is not None and self.metrics.registry is not None:
            self.metrics_endpoint = MetricsEndpoint(config.metrics.address, self.metrics.registry)
        if config.health.address is not None:
            self._health_server = self._plain_health(config.health.address)
            await self._health_server.start()
        await server.start()
        self._server = server
        self._watcher = asyncio.create_task(self._watch_files())
        if self.crl_fetcher is not None:
            self._crl_task = asyncio.create_task(self._fetch_crls(self.crl_fetcher))
        if self.bundle_fetcher is not None:
            self._bundle_task = asyncio.create_task(self._fetch_bundles(self.bundle_fetcher))
        self._started = True
        await self._report_health()  # the overall status too: SERVING unless trust ran out
        log.info(
            "sidecar%s listening on %s (port %d), routes: %s",
            "" if self.worker is None else f" worker {self.worker.index}/{self.worker.count}",
            config.listen.address,
            self.port,
            ", ".join(f"{r.service} -> {r.upstream}" for r in config.routes) or "none",
        )
        return self.port

    def _build_metrics(self) -> Metrics | None:
        """One registry and endpoint per sidecar; a worker only records (its supervisor sets
        PROMETHEUS_MULTIPROC_DIR and serves the sum of all workers)."""
        if not self.config.metrics.enabled:
            return None
        routed = [r.service for r in self.config.routes]
        return Metrics(CollectorRegistry() if self.worker is None else None, routed)

    # -- hot reload -------------------------------------------------------------------------

    def _fetch_tls(self) -> object | None:
        """Called by grpc at each handshake: a new configuration only when files changed."""
        pending, self._pending_tls = self._pending_tls, None
        return pending

    def _note_server_cert(self) -> None:
        try:
            cert = x509.load_pem_x509_certificate(self.config.tls.server_cert.read_bytes())
        except (OSError, ValueError):
            return
        self._server_cert_window = (time.time(), cert.not_valid_after_utc.timestamp())

    def reload(self) -> bool:
        """Reloads changed trust/TLS files; a file that fails to load keeps the old one."""
        changed = False
        if self._trust_files.changed():
            try:
                trust = self._trust_files.load()
            except ZtagentError as err:
                log.error("keeping previous CA bundle/CRL: %s", err)
            else:
                assert self.pipeline is not None
                self.pipeline.checker.replace_trust(trust)
                log.info("reloaded device CA bundle and CRL")
                changed = True
        signature = file_signature(self._tls_paths)
        if signature != self._tls_signature:
            try:
                self._pending_tls = _server_cert_config(self.config)
            except (ZtagentError, OSError) as err:
                log.error("keeping previous TLS server certificate: %s", err)
            else:
                self._tls_signature = signature
                self._note_server_cert()
                log.info("reloaded TLS server certificate and client CA bundle")
                changed = True
        assert self.pipeline is not None
        if self.pipeline.engine.maybe_reload():
            self._policy_synced_at = time.time()
            log.info("policy reloaded: revision %s", self.pipeline.engine.revision)
            changed = True
        return changed

    async def _report_health(self) -> None:
        """Per-part health: ztagent.policy (last reload failed / engine unreachable) and
        ztagent.tokens (JWKS refresh failing, last good keys in use)."""
        assert self.pipeline is not None
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        policy_ok = self.pipeline.engine.health().ok and (
            self.bundle_fetcher is None or self.bundle_fetcher.health().ok
        )
        await self.health.set(POLICY_HEALTH, serving if policy_ok else not_serving)
        if self.pipeline.tokens is not None:
            tokens_ok = self.pipeline.tokens.health().ok
            await self.health.set(TOKENS_HEALTH, serving if tokens_ok else not_serving)
        if self.crl_fetcher is not None:
            crl_ok = self.crl_fetcher.health().ok
            await self.health.set(REVOCATION_HEALTH, serving if crl_ok else not_serving)
        if upload_configured(self.config):
            upload_ok = self._report_upload()
            await self.health.set(UPLOAD_HEALTH, serving if upload_ok else not_serving)
        self._report_trust()
        if self._started:
            refusing = self.trust_refusing(self._clock())
            if refusing is not None and refusing != self._refusing_logged:
                log.error("NOT_SERVING: %s", refusing)
            self._refusing_logged = refusing
            await self.health.set("", not_serving if refusing else serving)

    def _report_upload(self) -> bool:
        """``ztagent ship``'s status file into the ``ztagent_upload_*`` gauges; True when it
        is fresh and every shipper reached its upstream last time."""
        try:
            doc = json.loads(status_path(self.config).read_text(encoding="utf-8"))
            fresh = time.time() - float(doc["time"]) < STATUS_STALE_S
            entries = list(doc["shippers"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        ok = fresh and bool(entries)
        pending: dict[str, dict[str, float]] = {}
        for entry in entries:
            kind = str(entry.get("kind", "other"))
            ok = ok and bool(entry.get("connected", False))
            into = pending.setdefault(kind, {})
            for field_name, key in (
                ("pending_records", "pending_lines"), ("pending_records", "pending_records"),
                ("pending_bytes", "pending_bytes"), ("oldest_pending_seconds", "oldest_pending_s"),
                ("delivered", "delivered"), ("retried", "retried"), ("dropped", "dropped"),
            ):  # fmt: skip
                value = entry.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    into[field_name] = into.get(field_name, 0.0) + float(value)
        if self.metrics is not None:
            for kind, values in pending.items():
                for name, value in values.items():
                    self.metrics.upload[name].labels(kind).set(value)
        return ok

    def trust_refusing(self, now: datetime) -> str | None:
        """Why every device (or every token) is being refused for stale trust, or None: the
        CRL past nextUpdate + grace under crl_failure_mode closed, or the JWKS past
        jwks_max_stale_s. Only behind (a failing fetch within its bound) is not refusing."""
        policy = self.config.identity.policy
        crl_until = self._crl_usable_until()
        if policy.check_crl and not policy.crl_fail_open and crl_until and now > crl_until:
            return f"crl_expired: the CRL was usable until {rfc3339(crl_until)}"
        jwks_until = self._jwks_usable_until()
        if jwks_until is not None and now > jwks_until:
            return f"jwks_unavailable: the key set was usable until {rfc3339(jwks_until)}"
        tokens = self.pipeline.tokens if self.pipeline is not None else None
        if tokens is not None and tokens.health().fetched_at is None:
            return f"jwks_unavailable: no key set loaded ({tokens.health().last_error})"
        return None

    def _crl_usable_until(self) -> datetime | None:
        """The earliest nextUpdate + crl_grace of the loaded CRLs (None: no CRL)."""
        assert self.pipeline is not None
        crls = self.pipeline.checker.trust.crls
        nexts = [c.next_update_utc for c in crls if c.next_update_utc is not None]
        return min(nexts) + self.config.identity.policy.crl_grace if nexts else None

    def _jwks_usable_until(self) -> datetime | None:
        """The last JWKS fetch + jwks_max_stale_s (None: no URL keys fetched yet)."""
        assert self.pipeline is not None
        tokens = self.pipeline.tokens
        fetched = tokens.health().fetched_at if tokens is not None else None
        if fetched is None or self.config.tokens is None:
            return None
        return fetched + timedelta(seconds=self.config.tokens.jwks_max_stale_s)

    def _report_trust(self) -> None:
        """The staleness gauges: when each piece of trust was refreshed and when it stops
        being usable, so an operator sees an offline node's budget run down."""
        if self.metrics is None or self.pipeline is None:
            return
        expiry, synced = self.metrics.trust_expiry, self.metrics.trust_last_sync
        crls = self.pipeline.checker.trust.crls
        crl_until = self._crl_usable_until()
        if crl_until is not None:
            expiry.labels("crl").set(crl_until.timestamp())
            synced.labels("crl").set(max(c.last_update_utc for c in crls).timestamp())
        if self.crl_fetcher is not None:
            crl_health = self.crl_fetcher.health()
            self.metrics.fetch_failures("crl", crl_health.fetch_failures)
            if crl_health.fetched_at is not None:
                synced.labels("crl").set(crl_health.fetched_at.timestamp())
        self.metrics.decision_log_lost(self.pipeline.decision_log.stats.lost)
        if self.pipeline.tokens is not None:
            self.metrics.fetch_failures("jwks", self.pipeline.tokens.health().fetch_failures)
        if self.bundle_fetcher is not None:
            bundle = self.bundle_fetcher.health()
            self.metrics.fetch_failures("bundle", bundle.fetch_failures)
            if bundle.fetched_at is not None:
                synced.labels("policy").set(bundle.fetched_at.timestamp())
        jwks_until = self._jwks_usable_until()
        if jwks_until is not None and self.config.tokens is not None:
            stale = timedelta(seconds=self.config.tokens.jwks_max_stale_s)
            synced.labels("jwks").set((jwks_until - stale).timestamp())
            expiry.labels("jwks").set(jwks_until.timestamp())
        if self._policy_synced_at is not None:
            synced.labels("policy").set(self._policy_synced_at)
        if self._server_cert_window is not None:
            synced.labels("server_cert").set(self._server_cert_window[0])
            expiry.labels("server_cert").set(self._server_cert_window[1])

    def _plain_health(self, address: str) -> grpc.aio.Server:
        """The plain ``grpc.health.v1`` listener (``health.address``): the same statuses as
        the mTLS port, for probes without a device certificate. Workers share the port."""
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0 if self.worker is None else 1)],
            maximum_concurrent_rpcs=64,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.plain, server)
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError("health.address", f"cannot bind {address}: {exc}") from exc
        return server

    async def _fetch_bundles(self, fetcher: BundleFetcher) -> None:
        while True:
            await asyncio.sleep(fetcher.next_delay())
            if await fetcher.fetch_once():
                self.reload()  # at once, not at the next file poll
            await self._report_health()

    async def _fetch_crls(self, fetcher: CrlFetcher) -> None:
        while True:
            await asyncio.sleep(self.config.tls.crl_refresh_interval_s)
            if await fetcher.fetch_once(self._clock()):
                self.reload()  # at once, not at the next file poll
            await self._report_health()

    async def _watch_files(self) -> None:
        interval = min(self.config.tls.reload_interval_s, self.config.policy.reload_interval_s)
        while True:
            await asyncio.sleep(interval)
            self.reload()
            await self._report_health()
            # Callers that went quiet get their summary line.
            if self.pipeline is not None:
                await self.pipeline.flush_refusal_summaries()
            if self.attestation is not None:
                self.attestation.flush_log_summaries()

    # -- stop -------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, then in-flight calls get ``grace`` seconds before cancel."""
        if grace is None:
            grace = self.config.listen.grace_period_s
        await self.health.enter_graceful_shutdown()
        for task in (self._watcher, self._crl_task, self._bundle_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None
        if self._upstreams is not None:
            await self._upstreams.close()
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.close)
            self.metrics_endpoint = None
        if self.pipeline is not None:
            await self.pipeline.engine.close()
            await asyncio.to_thread(self.pipeline.decision_log.close)


def _bundle_fetcher(config: Config) -> BundleFetcher:
    """The bundle download of ``[policy] bundle_url`` into ``policy.path``; a bundle is
    installed only after it loaded and compiled like the engine will load it."""
    bundle = config.policy.bundle
    assert bundle is not None and config.policy.path is not None

    def validate(candidate: Path) -> str:
        """Runs in the fetcher's worker thread. Regorus engines must be dropped on the thread
        that made them, so neither the engine nor a traceback holding it leaves here."""
        import gc

        from ztagent.policy.embedded import EmbeddedEngine
        from ztagent.policy.sources import load_bundle_keys

        error: ZtagentError | None = None
        revision = ""
        try:
            engine = EmbeddedEngine.load(
                candidate,
                config.policy.decision_path,
                keys=load_bundle_keys(config.policy.keys) or None,
                require_signature=config.policy.require_signature,
            )
            revision = engine.revision
            del engine
        except ZtagentError as err:
            error = type(err)(err.code, err.message)  # no traceback, no frames, no engine
        gc.collect()
        if error is not None:
            raise error
        return revision

    return BundleFetcher(
        bundle.url,
        config.policy.path,
        validate,
        ca_bundle=bundle.ca_bundle,
        token_file=bundle.token_file,
        client_cert=(bundle.client_cert, bundle.client_key)
        if bundle.client_cert is not None and bundle.client_key is not None
        else None,
        min_delay_s=bundle.min_delay_s,
        max_delay_s=bundle.max_delay_s,
        max_bytes=bundle.max_bytes,
        timeout_s=bundle.timeout_s,
    )


REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""gRPC server reflection, answered by the sidecar itself (never forwarded): v1alpha is
what grpcio-reflection implements; v1 has the same messages and is served by the same code."""
REFLECTION_METHODS = tuple(f"/{service}/ServerReflectionInfo" for service in REFLECTION_SERVICES)
"""Their one method; any other method of theirs is refused ``no_route``."""


def admitted_reflection(
    admission: Pipeline, config: Config, *, attestation: bool
) -> tuple[grpc.GenericRpcHandler, ...]:
    """Server reflection on the mTLS port, through admission like a proxied call.

    Every ``ServerReflectionInfo`` stream is first admitted (identity, posture, user, policy;
    the decision is logged like any other call; a refusal gets the usual status, code and
    trailers). It lists the routed services, health, attestation (when served) and itself.
    Descriptors come from protobuf's default pool: ztagent's own workload protos are in it
    (imported above), so ``describe`` works for them; a routed service whose descriptor the
    sidecar does not have is listed by name only (its symbols answer NOT_FOUND)."""
    from grpc_health.v1 import health
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    from ztagent._proto.v1 import attestation_pb2
    from ztagent.rpc_status import error_trailers, grpc_status_for

    names = [r.service for r in config.routes]
    names += [health.SERVICE_NAME, reflection.SERVICE_NAME]
    if attestation:
        names.append(attestation_pb2.DESCRIPTOR.services_by_name["Attestation"].full_name)
    inner = reflection.aio.ReflectionServicer(sorted(set(names)))

    def bind(full_method: str) -> grpc.RpcMethodHandler:
        async def info(
            requests: AsyncIterator[reflection_pb2.ServerReflectionRequest],
            context: grpc.aio.ServicerContext,
        ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
            try:
                await admission.admit(context, full_method)
            except ZtagentError as err:  # counted and logged by the admission core
                await context.abort(
                    grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
                )
            async for response in inner.ServerReflectionInfo(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            info,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )

    return tuple(
        grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": bind(method)})
        for service, method in zip(REFLECTION_SERVICES, REFLECTION_METHODS, strict=True)
    )


def server_options(listen: ListenConfig, *, reuseport: bool) -> list[tuple[str, int]]:
    """The mTLS port's gRPC server options (the bench's bare proxy uses the same)."""
    limit = listen.max_message_bytes
    return [
        ("grpc.so_reuseport", 1 if reuseport else 0),
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_concurrent_streams", listen.max_concurrent_streams),
        # A fixed receive window per call: no BDP growth, so a client cannot push
        # megabytes per stream before admission has read a byte of it.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", listen.stream_window_bytes),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_connection_age_ms", int(listen.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(listen.max_connection_age_grace_s * 1000)),
    ]


def assertion_signer(config: Config) -> AssertionSigner:
    """The identity-assertion key (``[assertion] signing_key``), made at first start."""
    path = config.assertion.key_path(config.posture.state_dir)
    public = config.assertion.public_path(config.posture.state_dir)
    key = "assertion.signing_key"
    try:
        signer = AssertionSigner.from_file(path, config.assertion.lifetime_s, public)
    except OSError as exc:
        raise ConfigError(key, f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    log.info("identity assertions signed with %s (workloads trust %s)", path, public)
    return signer


async def run_sidecar(
    config: Config, *, worker: WorkerSlot | None = None, ready_fd: int | None = None
) -> None:
    """Runs until SIGTERM or SIGINT, then drains in-flight calls within the grace period.

    ``ready_fd``: a pipe to the supervisor; one line is written to it once the sidecar serves.
    """
    sidecar = Sidecar(config, worker=worker)
    await sidecar.start()
    settle_heap()
    if ready_fd is not None:
        os.write(ready_fd, f"ready {os.getpid()} {sidecar.port}\n".encode())
        os.close(ready_fd)
    await wait_for_stop_signal()
    log.info("stopping: draining in-flight calls for up to %.1f s", config.listen.grace_period_s)
    await sidecar.stop()
    log.info("stopped")
