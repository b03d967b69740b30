"""ztagent.toml: parsed once, validated completely, frozen.

Defaults, then the file, then command-line overrides. Relative paths are resolved against the
directory of the config file. Unknown sections or keys and bad values raise ``ConfigError``
naming the key (``tls.client_ca``, ``routes[1].upstream``) before any socket opens.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from ztagent.addresses import check_bundle_url, local_target, parse_host_port
from ztagent.admission.headers import DEFAULT_INPUT_HEADERS, InputHeaders, InputHeadersError
from ztagent.errors import ConfigError
from ztagent.pki.errors import DevicePolicyError
from ztagent.pki.policy import DevicePolicy
from ztagent.tokens.errors import TokenPolicyError
from ztagent.tokens.policy import TokenPolicy

FailureMode = Literal["closed", "open"]

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
SERVICE_NAME = rf"{IDENT}(?:\.{IDENT})*"
"""A protobuf identifier and a dotted service name (``fullmatch`` them): what a route names
and, in a gRPC path, what admission routes by (``admission.policy_input.split_method``)."""


@dataclass(frozen=True)
class ListenConfig:
    address: str = "127.0.0.1:8443"
    """host:port the sidecar binds (mTLS). Default port 8443."""
    grace_period_s: float = 10.0
    """On SIGTERM, in-flight calls get this many seconds to finish, then are cancelled."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest single gRPC message accepted or forwarded, in bytes."""
    max_connection_age_s: float = 300.0
    """Connections older than this are closed gracefully (GOAWAY) so clients re-handshake:
    a rotated server cert or a revoked device takes effect at the TLS layer too."""
    max_connection_age_grace_s: float = 30.0
    """Calls still running on an aged connection get this long before it is closed."""
    workers: int = 1
    """Sidecar processes sharing ``address`` (SO_REUSEPORT); the kernel spreads connections
    over them. Above 1, a supervisor process starts, watches and restarts the workers; attested
    posture is shared between them through ``posture.state_dir``."""
    max_concurrent_streams: int = 100
    """Concurrent calls one connection may have open (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS,
    advertised to clients); more wait for a free stream or are refused by the client."""
    stream_window_bytes: int = 1024 * 1024
    """HTTP/2 receive window per call (fixed: no BDP growth), so what a client can push
    before admission has read anything is at most ``max_concurrent_streams`` times this, per
    connection."""


@dataclass(frozen=True)
class TlsConfig:
    server_cert: Path
    """PEM: the sidecar's server certificate, followed by its issuing CA."""
    server_key: Path
    """PEM: the server certificate's private key (0600)."""
    client_ca: Path
    """PEM bundle: root and issuing CAs that device certificates chain to."""
    crl: Path | None = None
    """PEM CRL(s) from the device CAs; required unless identity.check_crl = false."""
    reload_interval_s: float = 2.0
    """How often the files above are checked for changes (seconds)."""
    crl_source: str | None = None
    """Where fresh CRLs come from: ca://host:port (the CA's GetCRL, server-auth TLS checked
    against client_ca), https://... or file:/path. Each verified CRL is written to ``crl``
    (the last good one on disk, for offline start). None: ``crl`` is maintained by others."""
    crl_refresh_interval_s: float = 60.0
    """How often ``crl_source`` is polled."""


@dataclass(frozen=True)
class IdentityConfig:
    trust_domain: str = "ztagent.dev"
    """Device SPIFFE IDs must be spiffe://<trust_domain>/device/<id>."""
    max_cert_lifetime_days: int = 90
    """Device certificates valid for longer than this are refused."""
    check_crl: bool = True
    """Refuse devices when no CRL from their issuing CA is loaded."""
    crl_failure_mode: FailureMode = "closed"
    """closed: a CRL past its nextUpdate (+ crl_grace_s) refuses every device; open: it is
    still used."""
    crl_grace_s: float = 0.0
    """A CRL stays usable this long past its nextUpdate (offline edge nodes)."""
    policy: DevicePolicy = field(default_factory=lambda: DevicePolicy("ztagent.dev"))
    """The check's own policy object, built from the settings above at load."""


@dataclass(frozen=True)
class TokensConfig:
    policy: TokenPolicy
    """What a user token must satisfy (issuer, audiences, algorithms, leeway, size, typ,
    certificate binding, lifetime cap ``max_lifetime_s``): the verifier's own policy object,
    built at load."""
    jwks_file: Path | None = None
    """JWKS of the issuer from a file (re-read when stale) ..."""
    jwks_url: str | None = None
    """... or from an https URL (exactly one of the two)."""
    jwks_ca_bundle: Path | None = None
    """PEM CA bundle for the JWKS URL's TLS (default: system trust)."""
    jwks_cache_ttl_s: float = 300.0
    """Keys are refetched after this long."""
    jwks_min_refresh_interval_s: float = 30.0
    """An unknown kid triggers at most one refetch per interval."""
    jwks_cache_file: Path | None = None
    """The last good key set fetched by URL, kept on disk (written atomically, mode 0600):
    a sidecar restarted while the issuer is unreachable starts with it."""
    jwks_max_stale_s: float = 30 * 86400.0
    """A key set not refreshed for longer than this is no longer used (token_* refusals
    become jwks_unavailable): the JWKS share of the offline budget."""
    jwks_fetch_timeout_s: float = 2.0
    """The most a call waits for a JWKS fetch it needs (no keys yet, or an unknown kid; a
    stale set is refetched in the background), and the HTTP timeout of every fetch."""


BUNDLE_KEY_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
"""JWS algorithms a bundle verification key may have (OPA's list without the HMAC ones:
a shared secret on every edge node could sign bundles). ``ztagent.policy.bundle_sign``
implements exactly these."""


@dataclass(frozen=True)
class BundleKeyConfig:
    """One ``[policy.keys.<key id>]`` table: a key that may sign OPA bundles."""

    key_id: str
    """The table name; a bundle's JWT names it in its ``kid`` header (or ``keyid`` claim)."""
    key: Path
    """PEM public key (or certificate), resolved against the config file's directory."""
    algorithm: str = "RS256"
    """The one JWS algorithm this key verifies (OPA's default is RS256)."""
    scope: str | None = None
    """When set, the JWT's ``scope`` claim must equal it; unset, the JWT must carry none."""


@dataclass(frozen=True)
class BundleConfig:
    """``[policy] bundle_*``: the policy comes from a bundle server (``ztagent.device.
    bundle_fetch``); ``policy.path`` is then the node's copy of the bundle."""

    url: str
    ca_bundle: Path | None = None
    """PEM CAs of the bundle server's TLS (default: the system trust store)."""
    token_file: Path | None = None
    """A bearer token, read on every request."""
    client_cert: Path | None = None
    """The node's own mTLS identity for the server (PEM certificate chain) ..."""
    client_key: Path | None = None
    """... and its key (a PEM file)."""
    min_delay_s: float = 60.0
    max_delay_s: float = 120.0
    """Polls are spread uniformly between the two, so a fleet does not poll in step."""
    max_bytes: int = 16 * 1024 * 1024
    timeout_s: float = 10.0


@dataclass(frozen=True)
class PolicyConfig:
    engine: Literal["embedded", "opa"] = "embedded"
    """embedded: Regorus in-process; opa: an OPA server over its REST API."""
    path: Path | None = None
    """embedded: policy directory or OPA bundle (.tar.gz); default ./policies."""
    opa_url: str = "http://127.0.0.1:8181"
    """opa: base URL of the OPA server."""
    decision_path: str = "data.ztagent.authz.decision"
    timeout_s: float = 0.25
    """opa: per-decision timeout."""
    failure_mode: FailureMode = "closed"
    """closed: an engine error, timeout or undefined decision denies (UNAVAILABLE);
    open: the call is allowed and the failure is logged. Settable per route."""
    dry_run: bool = False
    """Shadow mode: log the would-be decision, allow the call. Settable per route."""
    reload_interval_s: float = 2.0
    """How often policy files are checked for changes."""
    input_headers: InputHeaders = field(default_factory=InputHeaders)
    """The request headers copied into ``input.request.metadata`` (an allow-list)."""
    last_good_dir: Path | None = None
    """embedded: where the last policy that loaded is kept (default
    ``<posture.state_dir>/last-good-policy``); a start with a broken policy serves it."""
    decision_cache: bool = True
    """embedded: answer repeated decisions from an exact cache keyed by what the policy reads
    of its input (``ztagent.policy.decision_cache``)."""
    decision_cache_size: int = 10_000
    keys: Mapping[str, BundleKeyConfig] = field(default_factory=dict)
    """embedded: ``[policy.keys.<id>]``, the keys that may sign bundles. With keys, every
    bundle must carry a valid ``.signatures.json``; directories only when they have one or
    ``require_signature`` is set."""
    require_signature: bool = False
    """embedded: refuse unsigned policy directories too (needs ``keys``)."""
    bundle: BundleConfig | None = None
    """Download the policy from a bundle server (None: ``path`` is local only)."""


@dataclass(frozen=True)
class DecisionLogConfig:
    enabled: bool = True
    path: Path = Path("var/log/decisions.jsonl")
    """JSON lines, hash-chained; rotated by size into .1, .2, ..."""
    max_bytes: int = 50 * 1024 * 1024
    backups: int = 5
    queue_size: int = 10_000
    """Lines waiting for the writer thread."""
    on_full: Literal["drop", "block"] = "drop"
    """drop: count and drop lines when the queue is full; block: make requests wait."""
    fsync: bool = False
    max_input_bytes: int = 4096
    """A line's ``input`` above this many bytes of JSON is replaced by its size and SHA-256."""
    refusal_burst: int = 100
    """Refusal lines one caller (device, or peer address) may write per
    ``refusal_interval_s``; further refusals are counted into one summary line."""
    refusal_interval_s: float = 60.0
    checkpoint_every: int = 1000
    """A signed checkpoint line after at most this many decision lines (and at every
    rotation and clean stop); one signature per N lines on the writer thread."""
    checkpoint_key: Path | None = None
    """PEM private key (EC P-256 / P-384 or Ed25519) that signs the checkpoints; none: the
    sidecar's ``tls.server_key`` (verify with ``tls.server_cert``)."""
    writer: Literal["thread", "process"] = "thread"
    """thread: a writer thread in the sidecar (shares its GIL); process: a child process
    writes the file and the sidecar only hands it batches (``sidecar.log_writer``)."""


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    """Serve Prometheus metrics over plain HTTP at ``address`` (``/metrics``)."""
    address: str = "127.0.0.1:9464"
    """host:port of the metrics endpoint; it has no authentication, so keep it on loopback or
    a management network."""


@dataclass(frozen=True)
class HealthConfig:
    address: str | None = None
    """host:port of a plain (no TLS, no client certificate) ``grpc.health.v1`` listener with
    the same statuses as the mTLS port, for probes without a device certificate (the kubelet's
    gRPC probe). Off by default; it reveals only SERVING / NOT_SERVING per service, so keep it
    on loopback or behind a network policy."""


LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: how the long-running commands write their log (stderr)."""

    format: LogFormat = "text"
    """``text`` (``time LEVEL logger: message``) or ``json`` (one object per line, see
    ``ztagent.logs``); a ``--log-format`` flag overrides it."""


@dataclass(frozen=True)
class UploadConfig:
    """``[upload]``: what ``ztagent ship`` sends upstream (``ztagent.upload``)."""

    decision_log_url: str | None = None
    """OPA decision-log collector (``https://``, or ``http://`` to loopback)."""
    decision_log_ca_bundle: Path | None = None
    decision_log_token_file: Path | None = None
    client_cert: Path | None = None
    """The node's mTLS identity for the collector (PEM chain) ..."""
    client_key: Path | None = None
    """... and its key (a PEM file)."""
    batch_max_bytes: int = 256 * 1024
    batch_max_age_s: float = 5.0
    timeout_s: float = 10.0
    node_id: str | None = None
    """``labels.id`` of every event and ``{node}`` of the MQTT topic (default: host name)."""
    mqtt: Mapping[str, Any] = field(default_factory=dict)
    """The ``mqtt_*`` and outbox keys, checked by ``ztagent.upload.mqtt`` when it starts."""


UPLOAD_DECISION_KEYS = (
    "decision_log_url", "decision_log_ca_bundle", "decision_log_token_file", "client_cert",
    "client_key", "batch_max_bytes", "batch_max_age_s", "timeout_s", "node_id",
)  # fmt: skip
UPLOAD_MQTT_KEYS = (
    "mqtt_url", "mqtt_ca_bundle", "mqtt_topic", "mqtt_client_id", "device_dir",
    "storage_data_dir", "max_spool_records", "max_spool_bytes", "poll_interval_s",
    "retry_initial_s", "retry_max_s",
)  # fmt: skip


@dataclass(frozen=True)
class AssertionConfig:
    signing_key: Path | None = None
    """PEM EC P-256 private key the sidecar signs identity assertions with (default
    ``<posture.state_dir>/assertion.key``, generated at first start, its public key written
    beside it as ``assertion.pub`` for the workloads' ``--trust-key``)."""
    public_key: Path | None = None
    """Where the sidecar writes the public key for the workloads' ``--trust-key`` (default
    beside the signing key, ``.pub``); e.g. a directory the workloads share with the sidecar
    while the private key stays in one only the sidecar mounts."""
    lifetime_s: int = 30
    """Seconds an assertion is valid: how long a captured one is worth anything."""

    def key_path(self, state_dir: Path) -> Path:
        return self.signing_key or state_dir / "assertion.key"

    def public_path(self, state_dir: Path) -> Path:
        return self.public_key or self.key_path(state_dir).with_suffix(".pub")


@dataclass(frozen=True)
class PostureConfig:
    enabled: bool = True
    """Serve the ztagent.v1.Attestation service and fill input.posture from attestations."""
    max_age_s: float = 600.0
    """An attested posture is used for this long, then the device must attest again."""
    reference_values: Path | None = None
    """Reference boot measurements (JSON); default policies/data/reference-values.json."""
    firmware_keys: tuple[Path, ...] = ()
    """PEM public keys (Ed25519 or ECDSA P-256) of trusted firmware vendors."""
    pcrs: tuple[int, ...] = (0, 4, 7)
    """PCR selection (sha256 bank) every quote must cover."""
    state_dir: Path = Path("var/state")
    """AK bindings and the highest firmware security version seen per device (persisted)."""
    nonce_ttl_s: float = 60.0
    """A challenge nonce expires after this long (at most 60 s)."""
    ek_ca_bundle: Path | None = None
    """TPM-manufacturer CA certificates (PEM). When set, AK binding requires the device's EK
    certificate to chain to them; when unset, the EK is trusted on first use."""


@dataclass(frozen=True)
class Route:
    service: str
    """Fully-qualified gRPC service name, e.g. ztagent.workloads.v1.Storage."""
    upstream: str
    """unix:/path/to.sock or host:port (loopback) of the local service."""
    timeout_s: float | None = None
    """Deadline applied when the caller sets none (seconds); None = no deadline."""
    failure_mode: FailureMode | None = None
    """Overrides policy.failure_mode for this service."""
    dry_run: bool | None = None
    """Overrides policy.dry_run for this service."""


@dataclass(frozen=True)
class Config:
    tls: TlsConfig
    listen: ListenConfig = field(default_factory=ListenConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    routes: tuple[Route, ...] = ()
    tokens: TokensConfig | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    decision_log: DecisionLogConfig = field(default_factory=DecisionLogConfig)
    posture: PostureConfig = field(default_factory=PostureConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    assertion: AssertionConfig = field(default_factory=AssertionConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path | None = None

    def route_for(self, service: str) -> Route | None:
        for route in self.routes:
            if route.service == service:
                return route
        return None


# ---------------------------------------------------------------------------------------------
# parsing helpers


def _type_name(value: object) -> str:
    return type(value).__name__


def _expect_table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a table, got {_type_name(value)}")
    return value


def _check_keys(table: Mapping[str, Any], section: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{section}.{key}", f"unknown key (expected one of: {', '.join(sorted(allowed))})"
            )


def _str(table: Mapping[str, Any], key: str, name: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(name, "is required")
    if not isinstance(value, str) or not value:
        raise ConfigError(name, f"expected a non-empty string, got {value!r}")
    return value


def _number(
    table: Mapping[str, Any], key: str, name: str, default: float, *, minimum: float | None
) -> float:
    """``minimum=None``: the range is the domain object's to check."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"expected >= {minimum}, got {value}")
    return float(value)


def _int(
    table: Mapping[str, Any], key: str, name: str, default: int, *, minimum: int | None
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"expected >= {minimum}, got {value}")
    return value


def _bool(table: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(name, f"expected true or false, got {value!r}")
    return value


def _choice(
    table: Mapping[str, Any], key: str, name: str, default: str, choices: tuple[str, ...]
) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _failure_mode(table: Mapping[str, Any], key: str, name: str) -> FailureMode:
    return "open" if _choice(table, key, name, "closed", ("closed", "open")) == "open" else "closed"


def _str_list(
    table: Mapping[str, Any], key: str, name: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    value = table.get(key, list(default))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, f"expected a string or a non-empty list of strings, got {value!r}")
    return tuple(value)


def _path(
    table: Mapping[str, Any], key: str, name: str, base: Path, *, required: bool = True
) -> Path | None:
    if key not in table and not required:
        return None
    path = Path(_str(table, key, name))
    return path if path.is_absolute() else base / path


# ---------------------------------------------------------------------------------------------
# sections


def _listen(raw: Mapping[str, Any]) -> ListenConfig:
    _check_keys(
        raw,
        "listen",
        {
            "address", "grace_period_s", "max_message_bytes", "max_connection_age_s",
            "max_connection_age_grace_s", "workers", "max_concurrent_streams",
            "stream_window_bytes",
        },
    )  # fmt: skip
    d = ListenConfig()
    address = _str(raw, "address", "listen.address", d.address)
    parse_host_port(address, "listen.address")
    return ListenConfig(
        address=address,
        grace_period_s=_number(
            raw, "grace_period_s", "listen.grace_period_s", d.grace_period_s, minimum=0
        ),
        max_message_bytes=_int(
            raw, "max_message_bytes", "listen.max_message_bytes", d.max_message_bytes, minimum=1024
        ),
        max_connection_age_s=_number(
            raw, "max_connection_age_s", "listen.max_connection_age_s", 300.0, minimum=1
        ),
        max_connection_age_grace_s=_number(
            raw, "max_connection_age_grace_s", "listen.max_connection_age_grace_s", 30.0, minimum=0
        ),
        workers=_workers(raw),
        max_concurrent_streams=_bounded_int(
            raw, "max_concurrent_streams", "listen.max_concurrent_streams",
            d.max_concurrent_streams, 1, MAX_CONCURRENT_STREAMS,
        ),
        stream_window_bytes=_bounded_int(
            raw, "stream_window_bytes", "listen.stream_window_bytes",
            d.stream_window_bytes, 64 * 1024, 64 * 1024 * 1024,
        ),
    )  # fmt: skip


MAX_WORKERS = 64
MAX_CONCURRENT_STREAMS = 10_000


def _bounded_int(
    raw: Mapping[str, Any], key: str, name: str, default: int, low: int, high: int
) -> int:
    value = _int(raw, key, name, default, minimum=low)
    if value > high:
        raise ConfigError(name, f"expected <= {high}, got {value}")
    return value


def _workers(raw: Mapping[str, Any]) -> int:
    return _bounded_int(raw, "workers", "listen.workers", ListenConfig.workers, 1, MAX_WORKERS)


def _tls(raw: Mapping[str, Any], base: Path) -> TlsConfig:
    keys = {
        "server_cert", "server_key", "client_ca", "crl", "reload_interval_s", "crl_source",
        "crl_refresh_interval_s",
    }  # fmt: skip
    _check_keys(raw, "tls", keys)
    crl_source = None
    if "crl_source" in raw:
        crl_source = _str(raw, "crl_source", "tls.crl_source")
        if not re.match(r"^(ca://[^/\s]+:\d+|https://\S+|file:\S+)$", crl_source):
            raise ConfigError(
                "tls.crl_source",
                f"expected ca://host:port, https://... or file:/path, got {crl_source!r}",
            )
        if "crl" not in raw:
            raise ConfigError("tls.crl", "is required with tls.crl_source (the on-disk copy)")
    server_cert = _path(raw, "server_cert", "tls.server_cert", base)
    server_key = _path(raw, "server_key", "tls.server_key", base)
    client_ca = _path(raw, "client_ca", "tls.client_ca", base)
    assert server_cert and server_key and client_ca
    return TlsConfig(
        server_cert=server_cert,
        server_key=server_key,
        client_ca=client_ca,
        crl=_path(raw, "crl", "tls.crl", base, required=False),
        reload_interval_s=_number(
            raw, "reload_interval_s", "tls.reload_interval_s", 2.0, minimum=0.05
        ),
        crl_source=crl_source,
        crl_refresh_interval_s=_number(
            raw, "crl_refresh_interval_s", "tls.crl_refresh_interval_s", 60.0, minimum=0.05
        ),
    )


def _identity(raw: Mapping[str, Any]) -> IdentityConfig:
    keys = {
        "trust_domain",
        "max_cert_lifetime_days",
        "check_crl",
        "crl_failure_mode",
        "crl_grace_s",
    }
    _check_keys(raw, "identity", keys)
    td = _str(raw, "trust_domain", "identity.trust_domain", "ztagent.dev")
    mode = _failure_mode(raw, "crl_failure_mode", "identity.crl_failure_mode")
    days = _int(raw, "max_cert_lifetime_days", "identity.max_cert_lifetime_days", 90, minimum=1)
    check_crl = _bool(raw, "check_crl", "identity.check_crl", True)
    grace = _number(raw, "crl_grace_s", "identity.crl_grace_s", 0.0, minimum=0)
    try:
        policy = DevicePolicy(
            trust_domain=td,
            max_lifetime=timedelta(days=days),
            check_crl=check_crl,
            crl_fail_open=mode == "open",
            crl_grace=timedelta(seconds=grace),
        )
    except DevicePolicyError as err:
        raise ConfigError(f"identity.{err.key}", err.reason) from None
    return IdentityConfig(
        trust_domain=td,
        max_cert_lifetime_days=days,
        check_crl=check_crl,
        crl_failure_mode=mode,
        crl_grace_s=grace,
        policy=policy,
    )


def _tokens(raw: Mapping[str, Any], base: Path) -> TokensConfig:
    keys = {
        "issuer", "audience", "jwks_file", "jwks_url", "jwks_ca_bundle", "algorithms",
        "leeway_s", "max_token_bytes", "typ", "require_cert_binding", "jwks_cache_ttl_s",
        "jwks_min_refresh_interval_s", "jwks_cache_file", "jwks_max_stale_s",
        "jwks_fetch_timeout_s", "max_lifetime_s",
    }  # fmt: skip
    _check_keys(raw, "tokens", keys)
    if ("jwks_file" in raw) == ("jwks_url" in raw):
        raise ConfigError(
            "tokens.jwks_file", "set exactly one of tokens.jwks_file, tokens.jwks_url"
        )
    jwks_url = None
    if "jwks_url" in raw:
        jwks_url = _str(raw, "jwks_url", "tokens.jwks_url")
        if not jwks_url.startswith("https://"):
            raise ConfigError("tokens.jwks_url", f"expected an https:// URL, got {jwks_url!r}")
    d = TokenPolicy(issuer="-", audiences=("-",))
    try:
        policy = TokenPolicy(
            issuer=_str(raw, "issuer", "tokens.issuer"),
            audiences=_str_list(raw, "audience", "tokens.audience", ()),
            algorithms=_str_list(raw, "algorithms", "tokens.algorithms", d.algorithms),
            leeway_s=_number(raw, "leeway_s", "tokens.leeway_s", d.leeway_s, minimum=None),
            max_token_bytes=_int(
                raw, "max_token_bytes", "tokens.max_token_bytes", d.max_token_bytes, minimum=None
            ),
            typ=_str(raw, "typ", "tokens.typ") if "typ" in raw else None,
            require_cert_binding=_bool(
                raw, "require_cert_binding", "tokens.require_cert_binding", False
            ),
            max_lifetime_s=(
                _number(raw, "max_lifetime_s", "tokens.max_lifetime_s", 0.0, minimum=None)
                if "max_lifetime_s" in raw
                else None
            ),
        )
    except TokenPolicyError as err:
        raise ConfigError(f"tokens.{err.key}", err.reason) from None
    dc = TokensConfig(policy=policy)
    return TokensConfig(
        policy=policy,
        jwks_file=_path(raw, "jwks_file", "tokens.jwks_file", base, required=False),
        jwks_url=jwks_url,
        jwks_ca_bundle=_path(raw, "jwks_ca_bundle", "tokens.jwks_ca_bundle", base, required=False),
        jwks_cache_ttl_s=_number(
            raw, "jwks_cache_ttl_s", "tokens.jwks_cache_ttl_s", dc.jwks_cache_ttl_s, minimum=1
        ),
        jwks_min_refresh_interval_s=_number(
            raw,
            "jwks_min_refresh_interval_s",
            "tokens.jwks_min_refresh_interval_s",
            dc.jwks_min_refresh_interval_s,
            minimum=0,
        ),
        jwks_cache_file=_path(
            raw, "jwks_cache_file", "tokens.jwks_cache_file", base, required=False
        ),
        jwks_max_stale_s=_number(
            raw, "jwks_max_stale_s", "tokens.jwks_max_stale_s", dc.jwks_max_stale_s, minimum=1
        ),
        jwks_fetch_timeout_s=_number(
            raw,
            "jwks_fetch_timeout_s",
            "tokens.jwks_fetch_timeout_s",
            dc.jwks_fetch_timeout_s,
            minimum=0.05,
        ),
    )


def _policy(raw: Mapping[str, Any], base: Path) -> PolicyConfig:
    keys = {
        "engine", "path", "opa_url", "decision_path", "timeout_ms", "failure_mode", "dry_run",
        "reload_interval_s", "input_headers", "decision_cache", "decision_cache_size",
        "last_good_dir", "keys", "require_signature", *BUNDLE_KEYS,
    }  # fmt: skip
    _check_keys(raw, "policy", keys)
    d = PolicyConfig()
    engine = _choice(raw, "engine", "policy.engine", "embedded", ("embedded", "opa"))
    bundle = _bundle(raw, base)
    path = _path(raw, "path", "policy.path", base, required=False)
    if bundle is None:
        path = path or base / "policies"
    elif path is not None and not path.name.endswith((".tar.gz", ".tgz")):
        raise ConfigError(
            "policy.path", f"{path}: with policy.bundle_url it is the bundle's copy (a .tar.gz)"
        )
    opa_url = _str(raw, "opa_url", "policy.opa_url", d.opa_url)
    if not re.match(r"^https?://[^/\s]+", opa_url):
        raise ConfigError("policy.opa_url", f"expected http(s)://host:port, got {opa_url!r}")
    decision_path = _str(raw, "decision_path", "policy.decision_path", d.decision_path)
    if not re.fullmatch(r"data(\.[A-Za-z_][A-Za-z0-9_]*)+", decision_path):
        raise ConfigError(
            "policy.decision_path", f"expected data.<package>.<rule>, got {decision_path!r}"
        )
    bundle_keys = _policy_keys(raw.get("keys", {}), base)
    require_signature = _bool(raw, "require_signature", "policy.require_signature", False)
    if require_signature and not bundle_keys:
        raise ConfigError(
            "policy.require_signature", "needs at least one [policy.keys.<key id>] table"
        )
    if bundle_keys and engine == "opa":
        raise ConfigError(
            "policy.keys",
            "bundle keys apply to the embedded engine (configure an OPA server's own keys)",
        )
    return PolicyConfig(
        engine="opa" if engine == "opa" else "embedded",
        path=path,
        opa_url=opa_url.rstrip("/"),
        decision_path=decision_path,
        timeout_s=_number(raw, "timeout_ms", "policy.timeout_ms", 250, minimum=1) / 1000,
        failure_mode=_failure_mode(raw, "failure_mode", "policy.failure_mode"),
        dry_run=_bool(raw, "dry_run", "policy.dry_run", False),
        reload_interval_s=_number(
            raw, "reload_interval_s", "policy.reload_interval_s", 2.0, minimum=0.05
        ),
        input_headers=_input_headers(raw),
        last_good_dir=_path(raw, "last_good_dir", "policy.last_good_dir", base, required=False),
        decision_cache=_bool(raw, "decision_cache", "policy.decision_cache", True),
        decision_cache_size=_int(
            raw, "decision_cache_size", "policy.decision_cache_size", 10_000, minimum=1
        ),
        keys=bundle_keys,
        require_signature=require_signature,
        bundle=bundle,
    )


BUNDLE_KEYS = (
    "bundle_url", "bundle_ca_bundle", "bundle_token_file", "bundle_client_cert",
    "bundle_client_key", "bundle_min_delay_s", "bundle_max_delay_s", "bundle_max_bytes",
    "bundle_timeout_s",
)  # fmt: skip


def _bundle(raw: Mapping[str, Any], base: Path) -> BundleConfig | None:
    if "bundle_url" not in raw:
        stray = [k for k in BUNDLE_KEYS if k in raw]
        if stray:
            raise ConfigError(f"policy.{stray[0]}", "is set but policy.bundle_url is not")
        return None
    url = _str(raw, "bundle_url", "policy.bundle_url", "")
    check_bundle_url(url)
    d = BundleConfig(url)
    cert = _path(raw, "bundle_client_cert", "policy.bundle_client_cert", base, required=False)
    key = _path(raw, "bundle_client_key", "policy.bundle_client_key", base, required=False)
    if (cert is None) != (key is None):
        raise ConfigError(
            "policy.bundle_client_key" if key is None else "policy.bundle_client_cert",
            "give both policy.bundle_client_cert and policy.bundle_client_key",
        )
    low = _number(
        raw, "bundle_min_delay_s", "policy.bundle_min_delay_s", d.min_delay_s, minimum=0.05
    )
    high = _number(
        raw, "bundle_max_delay_s", "policy.bundle_max_delay_s", d.max_delay_s, minimum=0.05
    )
    if high < low:
        raise ConfigError(
            "policy.bundle_max_delay_s", f"{high} is below policy.bundle_min_delay_s ({low})"
        )
    return BundleConfig(
        url=url,
        ca_bundle=_path(raw, "bundle_ca_bundle", "policy.bundle_ca_bundle", base, required=False),
        token_file=_path(
            raw, "bundle_token_file", "policy.bundle_token_file", base, required=False
        ),
        client_cert=cert,
        client_key=key,
        min_delay_s=low,
        max_delay_s=high,
        max_bytes=_int(
            raw, "bundle_max_bytes", "policy.bundle_max_bytes", d.max_bytes, minimum=1024
        ),
        timeout_s=_number(
            raw, "bundle_timeout_s", "policy.bundle_timeout_s", d.timeout_s, minimum=0.1
        ),
    )


def _policy_keys(raw: object, base: Path) -> dict[str, BundleKeyConfig]:
    """``[policy.keys.<key id>]`` tables: ``key`` (PEM path), ``algorithm``, ``scope``."""
    tables = _expect_table(raw, "policy.keys")
    found: dict[str, BundleKeyConfig] = {}
    for key_id, table in tables.items():
        name = f"policy.keys.{key_id}"
        if not key_id or not key_id.isprintable():
            raise ConfigError(name, f"expected a printable, non-empty key id, got {key_id!r}")
        entry = _expect_table(table, name)
        _check_keys(entry, name, {"key", "algorithm", "scope"})
        path = _path(entry, "key", f"{name}.key", base)
        assert path is not None
        algorithm = _str(entry, "algorithm", f"{name}.algorithm", "RS256")
        if algorithm not in BUNDLE_KEY_ALGORITHMS:
            raise ConfigError(
                f"{name}.algorithm",
                f"expected one of {', '.join(BUNDLE_KEY_ALGORITHMS)}, got {algorithm!r}"
                + (" (HMAC keys are not accepted)" if algorithm.startswith("HS") else ""),
            )
        scope = _str(entry, "scope", f"{name}.scope") if "scope" in entry else None
        found[key_id] = BundleKeyConfig(key_id, path, algorithm, scope)
    return found


def _input_headers(raw: Mapping[str, Any]) -> InputHeaders:
    names = _str_list(raw, "input_headers", "policy.input_headers", DEFAULT_INPUT_HEADERS)
    try:
        return InputHeaders(frozenset(names))
    except InputHeadersError as err:
        raise ConfigError("policy.input_headers", err.message) from None


def _decision_log(raw: Mapping[str, Any], base: Path) -> DecisionLogConfig:
    keys = {
        "enabled", "path", "max_bytes", "backups", "queue_size", "on_full", "fsync",
        "max_input_bytes", "refusal_burst", "refusal_interval_s", "checkpoint_every",
        "checkpoint_key", "writer",
    }  # fmt: skip
    _check_keys(raw, "decision_log", keys)
    d = DecisionLogConfig()
    path = _path(raw, "path", "decision_log.path", base, required=False) or base / d.path
    checkpoint_key = _path(
        raw, "checkpoint_key", "decision_log.checkpoint_key", base, required=False
    )
    if checkpoint_key is not None and not checkpoint_key.is_file():
        raise ConfigError("decision_log.checkpoint_key", f"{checkpoint_key}: no such file")
    on_full = _choice(raw, "on_full", "decision_log.on_full", "drop", ("drop", "block"))
    writer = _choice(raw, "writer", "decision_log.writer", "thread", ("thread", "process"))
    return DecisionLogConfig(
        writer="process" if writer == "process" else "thread",
        enabled=_bool(raw, "enabled", "decision_log.enabled", True),
        path=path,
        max_bytes=_int(raw, "max_bytes", "decision_log.max_bytes", d.max_bytes, minimum=4096),
        backups=_int(raw, "backups", "decision_log.backups", d.backups, minimum=0),
        queue_size=_int(raw, "queue_size", "decision_log.queue_size", d.queue_size, minimum=1),
        on_full="block" if on_full == "block" else "drop",
        fsync=_bool(raw, "fsync", "decision_log.fsync", False),
        max_input_bytes=_int(
            raw, "max_input_bytes", "decision_log.max_input_bytes", d.max_input_bytes, minimum=256
        ),
        refusal_burst=_int(
            raw, "refusal_burst", "decision_log.refusal_burst", d.refusal_burst, minimum=1
        ),
        refusal_interval_s=_number(
            raw,
            "refusal_interval_s",
            "decision_log.refusal_interval_s",
            d.refusal_interval_s,
            minimum=0.001,
        ),
        checkpoint_every=_bounded_int(
            raw,
            "checkpoint_every",
            "decision_log.checkpoint_every",
            d.checkpoint_every,
            1,
            1_000_000,
        ),
        checkpoint_key=checkpoint_key,
    )


def _metrics(raw: Mapping[str, Any]) -> MetricsConfig:
    _check_keys(raw, "metrics", {"enabled", "address"})
    address = _str(raw, "address", "metrics.address", MetricsConfig.address)
    parse_host_port(address, "metrics.address")
    return MetricsConfig(enabled=_bool(raw, "enabled", "metrics.enabled", False), address=address)


def _assertion(raw: Mapping[str, Any], base: Path) -> AssertionConfig:
    _check_keys(raw, "assertion", {"signing_key", "public_key", "lifetime_s"})
    lifetime = _int(
        raw, "lifetime_s", "assertion.lifetime_s", AssertionConfig.lifetime_s, minimum=1
    )
    if not 1 <= lifetime <= 300:
        raise ConfigError("assertion.lifetime_s", f"expected 1 to 300 seconds, got {lifetime}")
    return AssertionConfig(
        signing_key=_path(raw, "signing_key", "assertion.signing_key", base, required=False),
        public_key=_path(raw, "public_key", "assertion.public_key", base, required=False),
        lifetime_s=lifetime,
    )


def _upload(raw: Mapping[str, Any], base: Path) -> UploadConfig:
    _check_keys(raw, "upload", {*UPLOAD_DECISION_KEYS, *UPLOAD_MQTT_KEYS})
    d = UploadConfig()
    url = (
        _str(raw, "decision_log_url", "upload.decision_log_url")
        if "decision_log_url" in raw
        else None
    )
    if url is not None:
        check_bundle_url(url, "upload.decision_log_url")
    cert = _path(raw, "client_cert", "upload.client_cert", base, required=False)
    key = _path(raw, "client_key", "upload.client_key", base, required=False)
    if (cert is None) != (key is None):
        raise ConfigError(
            "upload.client_key" if key is None else "upload.client_cert",
            "give both upload.client_cert and upload.client_key",
        )
    node = _str(raw, "node_id", "upload.node_id") if "node_id" in raw else None
    return UploadConfig(
        decision_log_url=url,
        decision_log_ca_bundle=_path(
            raw, "decision_log_ca_bundle", "upload.decision_log_ca_bundle", base, required=False
        ),
        decision_log_token_file=_path(
            raw, "decision_log_token_file", "upload.decision_log_token_file", base, required=False
        ),
        client_cert=cert,
        client_key=key,
        batch_max_bytes=_int(
            raw, "batch_max_bytes", "upload.batch_max_bytes", d.batch_max_bytes, minimum=1024
        ),
        batch_max_age_s=_number(
            raw, "batch_max_age_s", "upload.batch_max_age_s", d.batch_max_age_s, minimum=0
        ),
        timeout_s=_number(raw, "timeout_s", "upload.timeout_s", d.timeout_s, minimum=0.1),
        node_id=node,
        mqtt={k: v for k, v in raw.items() if k in UPLOAD_MQTT_KEYS},
    )


def _health(raw: Mapping[str, Any]) -> HealthConfig:
    _check_keys(raw, "health", {"address"})
    if "address" not in raw:
        return HealthConfig()
    address = _str(raw, "address", "health.address", "")
    parse_host_port(address, "health.address")
    return HealthConfig(address=address)


def _logging(raw: Mapping[str, Any]) -> LoggingConfig:
    _check_keys(raw, "logging", {"format"})
    value = _choice(raw, "format", "logging.format", "text", ("text", "json"))
    return LoggingConfig(format="json" if value == "json" else "text")


def _posture(raw: Mapping[str, Any], base: Path) -> PostureConfig:
    keys = {
        "enabled", "max_age_s", "reference_values", "firmware_keys", "pcrs", "state_dir",
        "nonce_ttl_s", "ek_ca_bundle",
    }  # fmt: skip
    _check_keys(raw, "posture", keys)
    d = PostureConfig()
    refs = _path(raw, "reference_values", "posture.reference_values", base, required=False)
    keys_raw = raw.get("firmware_keys", [])
    if not isinstance(keys_raw, list) or not all(isinstance(k, str) and k for k in keys_raw):
        raise ConfigError("posture.firmware_keys", f"expected a list of paths, got {keys_raw!r}")
    firmware_keys = tuple(p if p.is_absolute() else base / p for p in map(Path, keys_raw))
    pcrs = raw.get("pcrs", list(d.pcrs))
    if (
        not isinstance(pcrs, list)
        or not pcrs
        or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 23 for p in pcrs)
        or len(set(pcrs)) != len(pcrs)
    ):
        raise ConfigError("posture.pcrs", f"expected distinct PCR indexes 0-23, got {pcrs!r}")
    state_dir = _path(raw, "state_dir", "posture.state_dir", base, required=False)
    nonce_ttl = _number(raw, "nonce_ttl_s", "posture.nonce_ttl_s", d.nonce_ttl_s, minimum=1)
    if nonce_ttl > 60:
        raise ConfigError("posture.nonce_ttl_s", f"expected at most 60 seconds, got {nonce_ttl}")
    return PostureConfig(
        enabled=_bool(raw, "enabled", "posture.enabled", True),
        max_age_s=_number(raw, "max_age_s", "posture.max_age_s", d.max_age_s, minimum=1),
        reference_values=refs or base / "policies" / "data" / "reference-values.json",
        firmware_keys=firmware_keys,
        pcrs=tuple(sorted(pcrs)),
        state_dir=state_dir or base / d.state_dir,
        nonce_ttl_s=nonce_ttl,
        ek_ca_bundle=_path(raw, "ek_ca_bundle", "posture.ek_ca_bundle", base, required=False),
    )


def _routes(raw: object, base: Path) -> tuple[Route, ...]:
    if not isinstance(raw, list):
        raise ConfigError("routes", f"expected [[routes]] tables, got {_type_name(raw)}")
    routes: list[Route] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        name = f"routes[{i}]"
        table = _expect_table(item, name)
        _check_keys(table, name, {"service", "upstream", "timeout_s", "failure_mode", "dry_run"})
        service = _str(table, "service", f"{name}.service")
        if not re.fullmatch(SERVICE_NAME, service):
            raise ConfigError(
                f"{name}.service", f"expected a gRPC service name like pkg.v1.Svc, got {service!r}"
            )
        if service in seen:
            raise ConfigError(f"{name}.service", f"duplicate route for {service!r}")
        seen.add(service)
        upstream = local_target(
            _str(table, "upstream", f"{name}.upstream"), f"{name}.upstream", base
        )
        timeout: float | None = None
        if "timeout_s" in table:
            timeout = _number(table, "timeout_s", f"{name}.timeout_s", 0, minimum=0.001)
        mode: FailureMode | None = None
        if "failure_mode" in table:
            mode = _failure_mode(table, "failure_mode", f"{name}.failure_mode")
        dry_run = _bool(table, "dry_run", f"{name}.dry_run", False) if "dry_run" in table else None
        routes.append(
            Route(
                service=service,
                upstream=upstream,
                timeout_s=timeout,
                failure_mode=mode,
                dry_run=dry_run,
            )
        )
    return tuple(routes)


def parse_config(raw: Mapping[str, Any], base: Path, source: Path | None = None) -> Config:
    """Builds a validated Config from an already-decoded TOML document."""
    allowed = {
        "listen", "tls", "identity", "routes", "tokens", "policy", "decision_log", "posture",
        "metrics", "health", "assertion", "upload", "logging",
    }  # fmt: skip
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                key, f"unknown section (expected one of: {', '.join(sorted(allowed))})"
            )
    if "tls" not in raw:
        raise ConfigError("tls", "section is required (server_cert, server_key, client_ca)")
    listen = _listen(_expect_table(raw.get("listen", {}), "listen"))
    tls = _tls(_expect_table(raw["tls"], "tls"), base)
    identity = _identity(_expect_table(raw.get("identity", {}), "identity"))
    if identity.check_crl and tls.crl is None:
        raise ConfigError("tls.crl", "is required while identity.check_crl = true")
    routes = _routes(raw.get("routes", []), base)
    tokens = _tokens(_expect_table(raw["tokens"], "tokens"), base) if "tokens" in raw else None
    policy = _policy(_expect_table(raw.get("policy", {}), "policy"), base)
    posture = _posture(_expect_table(raw.get("posture", {}), "posture"), base)
    if policy.bundle is not None and policy.path is None:  # the downloaded bundle's copy
        policy = dataclasses.replace(policy, path=posture.state_dir / "policy-bundle.tar.gz")
    return Config(
        listen=listen,
        tls=tls,
        identity=identity,
        routes=routes,
        tokens=tokens,
        policy=policy,
        decision_log=_decision_log(
            _expect_table(raw.get("decision_log", {}), "decision_log"), base
        ),
        posture=posture,
        metrics=_metrics(_expect_table(raw.get("metrics", {}), "metrics")),
        health=_health(_expect_table(raw.get("health", {}), "health")),
        assertion=_assertion(_expect_table(raw.get("assertion", {}), "assertion"), base),
        upload=_upload(_expect_table(raw.get("upload", {}), "upload"), base),
        logging=_logging(_expect_table(raw.get("logging", {}), "logging")),
        source=source,
    )


def load_config(path: Path, *, listen_address: str | None = None) -> Config:
    """Reads and validates ``path``; ``listen_address`` overrides listen.address."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from exc
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    if listen_address is not None:
        raw.setdefault("listen", {})
        _expect_table(raw["listen"], "listen")["address"] = listen_address  # type: ignore[index]
    return parse_config(raw, path.resolve().parent, source=path)


def check_files(config: Config) -> None:
    """Every file the config names must exist and be readable before start-up goes on."""
    tls = config.tls
    named = {
        "tls.server_cert": tls.server_cert,
        "tls.server_key": tls.server_key,
        "tls.client_ca": tls.client_ca,
    }
    if tls.crl is not None:
        named["tls.crl"] = tls.crl
    if config.tokens is not None:
        if config.tokens.jwks_file is not None:
            named["tokens.jwks_file"] = config.tokens.jwks_file
        if config.tokens.jwks_ca_bundle is not None:
            named["tokens.jwks_ca_bundle"] = config.tokens.jwks_ca_bundle
    for key, path in named.items():
        if not path.is_file():
            raise ConfigError(key, f"file not found: {path}")
    if config.posture.enabled:
        assert config.posture.reference_values is not None
        named_posture = {"posture.reference_values": config.posture.reference_values}
        for i, key_path in enumerate(config.posture.firmware_keys):
            named_posture[f"posture.firmware_keys[{i}]"] = key_path
        if config.posture.ek_ca_bundle is not None:
            named_posture["posture.ek_ca_bundle"] = config.posture.ek_ca_bundle
        for key, path in named_posture.items():
            if not path.is_file():
                raise ConfigError(key, f"file not found: {path}")
    policy = config.policy
    # A downloaded bundle's copy may be missing: the first download makes it, or the engine
    # serves the last good policy (and health says so).
    downloaded = policy.bundle is not None
    if (
        policy.engine == "embedded"
        and not downloaded
        and (policy.path is None or not policy.path.exists())
    ):
        raise ConfigError("policy.path", f"policy directory or bundle not found: {policy.path}")
