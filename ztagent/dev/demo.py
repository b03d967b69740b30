"""`make run`: the whole stack on the embedded defaults, with allowed and refused calls.

Starts the storage workload and the sidecar as child processes (logs in var/log/), then a
demo client shows: a device + user allowed to write and read, a user denied by policy with the
reason, a forged token refused, a device with no user denied, a revoked device refused and a
client without a certificate refused; finally the decision log's hash chain is verified.
Everything it starts is stopped before it returns; exit 0 only when every outcome is the
expected one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ztagent.addresses import local_target, parse_host_port
from ztagent.config import Config, load_config
from ztagent.dev.demo_enroll import (
    enroll_device,
    reuse_token,
    revoke_and_wait,
    wait_for_ca,
)
from ztagent.dev.demo_inference import CONFIDENCE_THRESHOLD, INFERENCE
from ztagent.dev.demo_inference import scenarios as inference_scenarios
from ztagent.dev.demo_mqtt import Subscriber, broker, mosquitto_installed
from ztagent.dev.demo_posture import (
    DemoDevice,
    attest,
    booted_devices,
)
from ztagent.dev.demo_proxyless import PROXYLESS_ADDRESS, proxyless_call, proxyless_config
from ztagent.dev.demo_upload import DemoCollector, upload_outcome
from ztagent.dev.issuer import mint_token
from ztagent.dev.pki import (
    dev_model_publisher,
    ensure_dev_firmware_vendor,
    ensure_dev_tpm_manufacturer,
)
from ztagent.device.transport import device_credentials
from ztagent.files import KEY_MODE, make_private_dir
from ztagent.pki.device_check import cert_ak_name
from ztagent.rpc_status import ERROR_CODE_HEADER
from ztagent.tokens.assertion import public_key_path

STORAGE = "ztagent.workloads.v1.Storage"
DEMO_DEVICE = "demo-device"
REVOKED_DEVICE = "demo-revoked"
TAMPERED_DEVICE = "demo-tampered"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    line: str


def _channel(config: Config, device_cert: Path | None) -> grpc.Channel:
    roots = config.tls.client_ca.read_bytes()
    if device_cert is None:
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
    else:
        creds = device_credentials(device_cert, roots)
    return grpc.secure_channel(config.listen.address, creds)


def _wait_healthy(channel: grpc.Channel, what: str, proc: subprocess.Popen[bytes]) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not report SERVING within 30 s")


@contextlib.contextmanager
def _process(args: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    make_private_dir(log_path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(log_path, flags, KEY_MODE), "wb") as log:  # never through a link
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztagent", *args], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def _optional_process(
    args: list[str] | None, log_path: Path
) -> Iterator[subprocess.Popen[bytes] | None]:
    if args is None:
        yield None
        return
    with _process(args, log_path) as proc:
        yield proc


def _storage_call(
    channel: grpc.Channel, method: str, request: bytes, token: str | None = None
) -> bytes:
    call = channel.unary_unary(f"/{STORAGE}/{method}")
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    reply: bytes = call(request, timeout=10, metadata=metadata)
    return reply


def _scenario_allowed(config: Config, device_cert: Path, token: str) -> Outcome:
    from ztagent._proto.workloads.v1 import storage_pb2

    value = b"hello from the edge"
    with _channel(config, device_cert) as channel:
        put = storage_pb2.PutRequest(key="greeting", value=value).SerializeToString()
        storage_pb2.PutResponse.FromString(_storage_call(channel, "Put", put, token))
        get = storage_pb2.GetRequest(key="greeting").SerializeToString()
        got = storage_pb2.GetResponse.FromString(_storage_call(channel, "Get", get, token))
    ok = got.value == value
    return Outcome(
        ok,
        f"(a) device {DEMO_DEVICE!r} + user 'alice' (role writer, token bound to the device "
        f"cert) stored 'greeting' and read it back: {got.value!r} (revision {got.revision})",
    )


def _scenario_refused(
    config: Config,
    device_cert: Path | None,
    label: str,
    expect: grpc.StatusCode,
    *,
    method: str = "Get",
    token: str | None = None,
) -> Outcome:
    with _channel(config, device_cert) as channel:
        try:
            _storage_call(channel, method, _request(method), token)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
            first_line = (details or "").splitlines()[0] if details else ""
            return Outcome(code == expect, f"{label} refused: {code.name} {first_line}")
    return Outcome(False, f"{label} was NOT refused (expected {expect.name})")


def _request(method: str) -> bytes:
    from ztagent._proto.workloads.v1 import storage_pb2

    if method == "Put":
        return storage_pb2.PutRequest(key="greeting", value=b"overwrite").SerializeToString()
    if method == "Delete":
        return storage_pb2.DeleteRequest(key="greeting").SerializeToString()
    return storage_pb2.GetRequest(key="greeting").SerializeToString()


def _scenario_posture(
    config: Config, good: DemoDevice, tampered: DemoDevice, token: str, tampered_token: str
) -> list[Outcome]:
    """Delete needs attested posture (shipped policy): refused, attest, allowed; a device
    whose measured kernel is not in the reference values is refused with the reason."""
    outcomes = [
        _scenario_refused(
            config,
            good.cert,
            f"(g) device {good.name!r} deleting before it attested",
            grpc.StatusCode.PERMISSION_DENIED,
            method="Delete",
            token=token,
        )
    ]
    verdict = attest(config, good)
    outcomes.append(
        Outcome(
            verdict.verified,
            f"(h) device {good.name!r} attested with its TPM (quote over a fresh nonce, "
            f"measured boot, signed firmware): "
            + ("VERIFIED " + verdict.attestation_id if verdict.verified else str(verdict.failures)),
        )
    )
    with _channel(config, good.cert) as channel:
        try:
            reply = _storage_call(channel, "Delete", _request("Delete"), token)
            from ztagent._proto.workloads.v1 import storage_pb2

            deleted = storage_pb2.DeleteResponse.FromString(reply).deleted
            outcomes.append(
                Outcome(
                    True,
                    f"(i) device {good.name!r} deleting after it attested: allowed "
                    f"(deleted={deleted})",
                )
            )
        except grpc.RpcError as err:
            outcomes.append(
                Outcome(
                    False, f"(i) delete after attesting failed: {err.code().name} {err.details()}"
                )
            )
    bad = attest(config, tampered)
    failures = ", ".join(f"{f.code}: {f.message}" for f in bad.failures)
    outcomes.append(
        Outcome(
            not bad.verified and any(f.code == "boot_not_reference" for f in bad.failures),
            f"(j) device {tampered.name!r} with a tampered kernel refused at attestation: "
            + failures,
        )
    )
    outcomes.append(
        _scenario_refused(
            config,
            tampered.cert,
            f"(k) device {tampered.name!r} + user 'alice' deleting",
            grpc.StatusCode.PERMISSION_DENIED,
            method="Delete",
            token=tampered_token,
        )
    )
    return outcomes


def _forge(token: str) -> str:
    """Alice's token with its payload edited to claim role admin; signature left as it was."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin", "writer"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def _ensure_dev_issuer(ca_dir: Path, trust_domain: str) -> None:
    from ztagent.dev.issuer import init_dev_issuer, load_dev_issuer
    from ztagent.errors import ZtagentError

    try:
        load_dev_issuer(ca_dir)
    except ZtagentError:
        init_dev_issuer(ca_dir, trust_domain, force=True)


def _verify_decision_log(config: Config) -> Outcome:
    from ztagent.policy.log_checkpoint import CheckpointKey, verify_checkpoints
    from ztagent.policy.log_verify import log_files, verify_files

    path = config.decision_log.path
    if not config.decision_log.enabled or not path.exists():
        return Outcome(True, "(r) decision log disabled")
    files = log_files(path)
    report = verify_files(files)
    if not report.ok:
        return Outcome(False, f"(r) decision log {path}: BROKEN: {report.reason}")
    # the sidecar has stopped: its log ends with a close checkpoint signed by its server key
    cert = config.tls.server_cert
    key = CheckpointKey.from_pem(cert.read_bytes(), str(cert))
    anchors = verify_checkpoints(files, [key])
    if not anchors.ok:
        return Outcome(False, f"(r) decision log {path}: checkpoints refused: {anchors.reason}")
    return Outcome(
        True,
        f"(r) decision log {path}: {report.lines} lines, hash chain intact, "
        f"{anchors.checkpoints} signed checkpoints verified with {cert.name}"
        + (f" ({anchors.rotated_away} older lines rotated away)" if anchors.rotated_away else ""),
    )


def _sign_models(ca_dir: Path, models: Path) -> Path:
    """The publisher signs the trained manifests (``make model`` output) whose signature is
    missing or not its own; the workload then serves only manifests it signed. Returns the
    publisher's public key."""
    from ztagent.posture.firmware import load_trusted_keys
    from ztagent.workloads.inference.errors import ModelLoadError
    from ztagent.workloads.inference.manifest import MANIFEST_SUFFIX
    from ztagent.workloads.inference.models import check_signature, sign_manifest_file

    key = ca_dir / "models" / "publisher.key"
    if not key.exists():
        key = dev_model_publisher(ca_dir)
    public = key.with_suffix(".pub")
    trusted = load_trusted_keys([public], "model_keys")
    for manifest in sorted(models.glob(f"*{MANIFEST_SUFFIX}")):
        try:
            check_signature(manifest.read_bytes(), manifest, trusted)
        except ModelLoadError:
            sign_manifest_file(manifest, key)
    return public


def _mqtt_plan(config: Config) -> tuple[int, Path] | None:
    """(broker port, the node identity's device directory) when ``[upload]`` ships the
    outbox over MQTT to a loopback broker (the demo runs that broker itself)."""
    url = config.upload.mqtt.get("mqtt_url")
    device_dir = config.upload.mqtt.get("device_dir")
    if not isinstance(url, str) or not isinstance(device_dir, str):
        return None
    host_port = url.split("://", 1)[-1].split("/", 1)[0]
    host, port = parse_host_port(host_port, "upload.mqtt_url")
    if host != "127.0.0.1":
        return None
    base = config.source.parent if config.source is not None else Path.cwd()
    return port, base / device_dir


cloud_seen: list[dict[str, object]] = []


@contextlib.contextmanager
def _subscriber(mqtt: tuple[int, Path] | None, ca_dir: Path) -> Iterator[Subscriber | None]:
    """The cloud side on the demo broker, with ``ca init``'s demo device certificate."""
    if mqtt is None:
        yield None
        return
    sub = Subscriber(
        mqtt[0],
        ca_dir / "ca-bundle.pem",
        ca_dir / "devices" / "demo-device.pem",
        ca_dir / "devices" / "demo-device.key",
        "ztagent/+/+/escalations",
    )
    sub.wait_ready()
    try:
        yield sub
    finally:
        time.sleep(1.0)  # what ztagent ship sent on its way out
        cloud_seen[:] = sub.received()
        sub.close()


def _mqtt_outcome(seen: list[dict[str, object]], node: str) -> Outcome:
    records = [m for m in seen if str(m.get("key", "")).startswith("outbox/")]
    if not records:
        return Outcome(
            False,
            f"(v) escalation over MQTT: the subscriber received {len(seen)} messages, no outbox "
            "record (see var/log/ship.log, var/log/mosquitto.log)",
        )
    first = records[-1]
    return Outcome(
        True,
        f"(v) escalation published by `ztagent ship` over MQTT (QoS 1, TLS 1.3, client "
        f"certificate of node {node!r}) and received upstream: {len(records)} record(s), "
        f"latest id {first.get('id')!s} (removed from the outbox after the broker's PUBACK)",
    )


def _start_collector(config: Config) -> tuple[DemoCollector | None, Outcome | None]:
    """The demo's decision-log collector at ``upload.decision_log_url``; (None, None) when
    the config ships nowhere, (None, a failed outcome) when it cannot listen."""
    url = config.upload.decision_log_url
    if url is None:
        return None, None
    address = url.split("://", 1)[1].split("/", 1)[0]
    try:
        return DemoCollector(address).start(), None
    except OSError as exc:
        return None, Outcome(False, f"(u) no decision-log collector on {address}: {exc}")


def _direct_to_workload(upstream: str) -> Outcome:
    """A local process going around the sidecar: straight to the storage socket, claiming to
    be the demo device with the header the workload used to trust."""
    from ztagent._proto.workloads.v1 import storage_pb2

    request = storage_pb2.PutRequest(key="greeting", value=b"forged").SerializeToString()
    forged = (("x-ztagent-device-id", DEMO_DEVICE),)
    with grpc.insecure_channel(upstream) as channel:
        try:
            channel.unary_unary(f"/{STORAGE}/Put")(request, timeout=10, metadata=forged)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
            trailers = dict(err.trailing_metadata() or ())
            stable = trailers.get(ERROR_CODE_HEADER, "")
            return Outcome(
                code is grpc.StatusCode.UNAUTHENTICATED and stable == "assertion_missing",
                f"(t) a direct call to the storage workload ({upstream}) as {DEMO_DEVICE!r} "
                f"with a forged x-ztagent-device-id refused: {code.name} {stable}: {details}",
            )
    return Outcome(False, f"(t) a direct call to the storage workload ({upstream}): ACCEPTED")


def _metrics_outcome(config: Config) -> Outcome:
    """What the sidecar's Prometheus endpoint counted during the demo."""
    if not config.metrics.enabled:
        return Outcome(True, "(s) metrics disabled")
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{config.metrics.address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return Outcome(False, f"(s) metrics at {url} unreachable: {exc}")
    outcomes: dict[str, float] = {}
    refused: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ztagent_decisions_total":
                key = sample.labels["outcome"]
                outcomes[key] = outcomes.get(key, 0) + sample.value
            elif sample.name == "ztagent_refused_total":
                refused[sample.labels["code"]] = sample.value
    total = sum(outcomes.values())
    by_outcome = ", ".join(f"{k} {v:.0f}" for k, v in sorted(outcomes.items()))
    by_code = ", ".join(f"{k} {v:.0f}" for k, v in sorted(refused.items(), key=lambda i: -i[1]))
    return Outcome(
        outcomes.get("allow", 0) > 0 and outcomes.get("deny", 0) > 0,
        f"(s) metrics at {url}: {total:.0f} decisions ({by_outcome}); refused by code: {by_code}",
    )


def _scenario_revocation(config: Config, ca_dir: Path, cert: Path, token: str) -> Outcome:
    """A connected, working device is revoked at the CA; the sidecar fetches the new CRL
    (tls.crl_source) and refuses the next call on the same open connection."""
    with _channel(config, cert) as channel:
        get = _request("Get")

        def call() -> None:
            try:
                _storage_call(channel, "Get", get, token)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        call()  # connected and allowed
        elapsed, refusal = revoke_and_wait(ca_dir, cert, call)
    first_line = refusal.splitlines()[0] if refusal else "NOT refused"
    return Outcome(
        refusal.startswith("UNAUTHENTICATED cert_revoked"),
        f"(e) device {REVOKED_DEVICE!r} connected and reading, then revoked at the CA: its open "
        f"connection refused {elapsed:.1f} s later: {first_line}",
    )


def run_demo(config_path: Path, ca_dir: Path) -> int:
    config = load_config(config_path)
    logging.getLogger("ztagent.device").setLevel(logging.WARNING)  # the demo prints outcomes
    route = config.route_for(STORAGE)
    if route is None:
        print(f"demo: {config_path} has no [[routes]] entry for {STORAGE}", file=sys.stderr)
        return 2
    root = config_path.resolve().parent
    _ensure_dev_issuer(ca_dir, config.identity.trust_domain)
    ensure_dev_firmware_vendor(ca_dir)
    ek_ca = ensure_dev_tpm_manufacturer(ca_dir)
    logs = root / "var" / "log"
    (root / "var" / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    devices = root / "var" / "devices"
    ca_address = "127.0.0.1:8444"
    # Who the workloads accept calls from: the sidecar's assertion key (made by the sidecar at
    # its first start) and, for storage, the inference workload's (its outbox writes).
    sidecar_pub = config.assertion.public_path(config.posture.state_dir)
    inference_key = config.posture.state_dir / "inference-assertion.key"
    storage_args = ["workload", "storage", "--listen", local_target(route.upstream, "listen")]
    storage_args += ["--data", str(root / "var" / "storage"), "--trust-key", str(sidecar_pub)]
    storage_args += ["--trust-key", str(public_key_path(inference_key))]
    inference_route = config.route_for(INFERENCE)
    models = root / "var" / "models"
    if inference_route is not None and not (models / "vibration-anomaly.manifest.json").exists():
        print(f"demo: no model in {models}: run `make model` first", file=sys.stderr)
        return 2
    model_pub = _sign_models(ca_dir, models) if inference_route is not None else None
    outcomes: list[Outcome] = []
    collector, collector_problem = _start_collector(config)
    if collector_problem is not None:
        outcomes.append(collector_problem)
    ca_args = ["ca", "serve", "--dir", str(ca_dir), "--ek-ca-bundle", str(ek_ca)]
    ship_args = ["ship", "--config", str(config_path)]
    mqtt = _mqtt_plan(config)
    if mqtt is not None and not mosquitto_installed():
        outcomes.append(Outcome(False, "(v) MQTT: mosquitto is not installed (make installs it)"))
        mqtt = None
    ships = collector is not None or mqtt is not None
    with (
        broker(mqtt[0], ca_dir, logs / "mosquitto.log") if mqtt else contextlib.nullcontext(),
        _process(ca_args, logs / "ca.log") as ca_proc,
    ):
        try:
            wait_for_ca(ca_address, ca_dir / "ca-bundle.pem", lambda: ca_proc.poll() is None)
        except RuntimeError as err:
            print(f"demo: {err}; see {logs}/ca.log", file=sys.stderr)
            return 1
        print(f"dev CA serving enrollment on {ca_address} (renewal on 127.0.0.1:8445)")
        enrolled: dict[str, Path] = {}
        for device_id in (REVOKED_DEVICE, TAMPERED_DEVICE):
            result, _ = enroll_device(ca_address, ca_dir, devices / device_id, device_id)
            enrolled[device_id] = result.dir / "device.pem"
        if mqtt is not None:  # the node's own identity for the broker (a file key)
            enroll_device(ca_address, ca_dir, mqtt[1], mqtt[1].name)
        enrolled[DEMO_DEVICE] = devices / DEMO_DEVICE / "device.pem"
        device_cert = enrolled[DEMO_DEVICE]
        print(
            f"starting storage workload on {route.upstream} and sidecar on {config.listen.address}"
        )
        with (
            _subscriber(mqtt, ca_dir),  # exits after ztagent ship: sees its last publishes
            booted_devices(
                root,
                ca_dir,
                (DEMO_DEVICE, device_cert),
                (TAMPERED_DEVICE, enrolled[TAMPERED_DEVICE]),
            ) as (good, tampered),
            _process(storage_args, logs / "storage.log") as storage,
            # after storage (it makes the outbox's store), before the sidecar (which stops
            # first, so the shipper still sends the log's closing lines)
            _optional_process(ship_args if ships else None, logs / "ship.log"),
            _optional_process(
                None
                if inference_route is None
                else [
                    "workload",
                    "inference",
                    "--listen",
                    local_target(inference_route.upstream, "listen"),
                    "--models",
                    str(models),
                    "--storage",
                    local_target(route.upstream, "listen"),
                    "--model-keys",
                    str(model_pub),
                    "--confidence-threshold",
                    str(CONFIDENCE_THRESHOLD),
                    "--trust-key",
                    str(sidecar_pub),
                    "--assertion-key",
                    str(inference_key),
                ],
                logs / "inference.log",
            ) as inference,
            _process(["serve", "--config", str(config_path)], logs / "sidecar.log") as sidecar,
            _process(
                [
                    "workload",
                    "storage",
                    "--protect",
                    str(proxyless_config(config, root)),
                    "--listen",
                    PROXYLESS_ADDRESS,
                    "--data",
                    str(root / "var" / "storage-proxyless"),
                ],
                logs / "storage-proxyless.log",
            ),  # fmt: skip
        ):
            # The demo device enrolls with its TPM: the CA proves the TPM (MakeCredential /
            # ActivateCredential) and binds its attestation key into the certificate.
            result, token = enroll_device(
                ca_address,
                ca_dir,
                devices / DEMO_DEVICE,
                DEMO_DEVICE,
                tpm=good.tpm,
                key_store="tpm",
            )
            ak_name = cert_ak_name(
                x509.load_pem_x509_certificate((result.dir / "device.pem").read_bytes())
            )
            outcomes.append(
                Outcome(
                    ak_name is not None,
                    f"(0) device {DEMO_DEVICE!r} made its key inside its TPM and enrolled with a "
                    f"one-time bootstrap token; its TPM's EK certificate (dev TPM manufacturer) "
                    f"was checked, the TPM proved and its AK {(ak_name or '')[:16]}... "
                    f"bound into the certificate (serial {result.serial[:16]}..., valid until "
                    f"{result.not_after:%Y-%m-%d})",
                )
            )
            refusal = reuse_token(ca_address, ca_dir, devices / "replay-attempt", token)
            outcomes.append(
                Outcome(
                    refusal.startswith("token_reused"),
                    f"(0) the same bootstrap token used again refused: {refusal or 'ACCEPTED'}",
                )
            )
            try:
                with grpc.insecure_channel(route.upstream) as upstream:
                    _wait_healthy(upstream, "storage workload", storage)
                if inference is not None and inference_route is not None:
                    with grpc.insecure_channel(inference_route.upstream) as upstream:
                        _wait_healthy(upstream, "inference workload", inference)
                with _channel(config, device_cert) as channel:
                    _wait_healthy(channel, "sidecar", sidecar)
            except RuntimeError as err:
                print(f"demo: {err}; see {logs}/", file=sys.stderr)
                return 1
            alice = mint_token(ca_dir, sub="alice", roles=["writer"], bind_cert=device_cert)
            bob = mint_token(ca_dir, sub="bob", roles=["reader"])
            outcomes += [
                _scenario_allowed(config, device_cert, alice),
                _scenario_refused(
                    config,
                    device_cert,
                    "(b) user 'bob' (role reader) writing",
                    grpc.StatusCode.PERMISSION_DENIED,
                    method="Put",
                    token=bob,
                ),
                _scenario_refused(
                    config,
                    device_cert,
                    "(c) forged token (alice's, payload edited to role admin)",
                    grpc.StatusCode.UNAUTHENTICATED,
                    token=_forge(alice),
                ),
                _scenario_refused(
                    config,
                    device_cert,
                    f"(d) device {DEMO_DEVICE!r} with no user token",
                    grpc.StatusCode.PERMISSION_DENIED,
                ),
                _scenario_revocation(config, ca_dir, enrolled[REVOKED_DEVICE], bob),
                _scenario_refused(
                    config,
                    None,
                    "(f) client without a certificate (TLS handshake)",
                    grpc.StatusCode.UNAVAILABLE,
                ),
            ]
            alice_on_tampered = mint_token(
                ca_dir, sub="alice", roles=["writer"], bind_cert=enrolled[TAMPERED_DEVICE]
            )
            outcomes += _scenario_posture(config, good, tampered, alice, alice_on_tampered)
            if inference_route is not None:
                tokens = {
                    "operator": mint_token(
                        ca_dir, sub="carol", scope=["inference"], bind_cert=device_cert
                    ),
                    "reader": alice,
                    "no_scope": bob,
                    "tampered_operator": mint_token(
                        ca_dir,
                        sub="carol",
                        scope=["inference"],
                        bind_cert=enrolled[TAMPERED_DEVICE],
                    ),
                }
                outcomes += [
                    Outcome(r.ok, r.line)
                    for r in inference_scenarios(
                        lambda cert: _channel(config, cert),  # type: ignore[arg-type]
                        device_cert,
                        enrolled[TAMPERED_DEVICE],
                        tokens,
                    )
                ]
            outcomes.append(_direct_to_workload(route.upstream))
            outcomes.append(Outcome(*proxyless_call(config.tls.client_ca, device_cert, alice, bob)))
            outcomes.append(_metrics_outcome(config))
    outcomes.append(_verify_decision_log(config))
    if collector is not None:  # ztagent ship flushed what was left when it stopped
        outcomes.append(Outcome(*upload_outcome(collector, config.decision_log.path)))
        collector.stop()
    if mqtt is not None:
        outcomes.append(_mqtt_outcome(cloud_seen, mqtt[1].name))
    for outcome in outcomes:
        print(("[ok]   " if outcome.ok else "[FAIL] ") + outcome.line)
    failed = [o for o in outcomes if not o.ok]
    print(f"demo finished: {len(outcomes) - len(failed)}/{len(outcomes)} outcomes as expected")
    return 1 if failed else 0
