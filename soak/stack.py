"""Starts the soak's stack in its own temporary directory, on ephemeral loopback ports.

The dev CA (``ztagent ca serve``, a process so a fault can stop it), the storage and inference
workloads (``ztagent workload ...``), the sidecar (``ztagent serve`` with ``listen.workers =
2``, the shipped policy as a bundle it hot-reloads, the CRL fetched from the CA, the JWKS
file of the dev issuer); devices enrolled through the real enrollment service with a file
key, a PKCS#11 key (SoftHSM2, when installed) and a TPM key (swtpm, which also attests).
Every process is started here and stopped here, by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.dev import tpm_manufacturer as dev_manufacturer
from ztagent.dev.boot_sim import demo_components, simulate_boot
from ztagent.dev.demo_enroll import wait_for_ca
from ztagent.dev.issuer import init_dev_issuer
from ztagent.dev.pki import (
    dev_model_publisher,
    ensure_dev_firmware_vendor,
    ensure_dev_tpm_manufacturer,
)
from ztagent.dev.swtpm import SwtpmProcess, start_swtpm
from ztagent.device.enroll import enroll
from ztagent.device.keystores import DEFAULT_PKCS11_MODULE
from ztagent.device.tpm import DeviceTpm
from ztagent.device.transport import device_credentials
from ztagent.posture.firmware import sign_manifest
from ztagent.tokens.assertion import ensure_signing_key

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
TRUST_DOMAIN = "ztagent.dev"
STORAGE = "ztagent.workloads.v1.Storage"
INFERENCE = "ztagent.workloads.v1.Inference"
HSM_PIN = "1234"
WORKERS = 2
REFRESH_S = 1
"""``tls.crl_refresh_interval_s``, ``tls.reload_interval_s`` and ``policy.reload_interval_s``."""
JWKS_TTL_S = 2
"""``tokens.jwks_cache_ttl_s`` and ``jwks_min_refresh_interval_s`` (the TTL refetch is rate
limited by the latter too, 30 s by default): the JWKS file is re-read this often; a rotated
key is used by the soak's tokens only after twice this, as an issuer publishes keys before
it signs with them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Device:
    name: str
    dir: Path
    key_store: str
    """``file``, ``pkcs11`` or ``tpm``."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while its files change (renewal): channels are built from whole pairs."""
    generation: int = 0
    """Bumped on every renewal: the driver rebuilds its channels."""
    tpm: DeviceTpm | None = None
    evidence: tuple[bytes, bytes, bytes] | None = None
    """(event log, firmware manifest, signature) of its measured boot."""

    @property
    def cert(self) -> Path:
        return self.dir / "device.pem"


@dataclass
class Stack:
    root: Path
    ca_dir: Path
    config: Path
    sidecar_port: int
    ca_port: int
    renew_port: int
    metrics_port: int
    policy_bundle: Path
    decision_log: Path
    devices: dict[str, Device] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    swtpms: list[SwtpmProcess] = field(default_factory=list)
    hsm_conf: Path | None = None
    fsize_limit: int | None = None

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "ca-bundle.pem"

    @property
    def sidecar_address(self) -> str:
        return f"127.0.0.1:{self.sidecar_port}"

    @property
    def ca_address(self) -> str:
        return f"127.0.0.1:{self.ca_port}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.hsm_conf is not None:
            env["SOFTHSM2_CONF"] = str(self.hsm_conf)
        env["ZTAGENT_PKCS11_PIN"] = HSM_PIN
        return env

    # --- processes -------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztagent", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=self.env(),
            start_new_session=True,  # a SIGINT to the soak does not reach them first
        )
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 15) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_ca(self) -> None:
        ek_ca = ensure_dev_tpm_manufacturer(self.ca_dir)
        self.spawn(
            "ca",
            ["ca", "serve", "--dir", str(self.ca_dir), "--listen", self.ca_address,
             "--renew-listen", f"127.0.0.1:{self.renew_port}", "--ek-ca-bundle", str(ek_ca)],
        )  # fmt: skip
        proc = self.procs["ca"]
        wait_for_ca(self.ca_address, self.bundle, lambda: proc.poll() is None)

    def start_storage(self) -> None:
        self.spawn(
            "storage",
            ["workload", "storage", "--listen", f"unix:{self.root / 'run' / 'storage.sock'}",
             "--data", str(self.root / "storage"),
             "--trust-key", str(self.state_dir / "assertion.pub")],
        )  # fmt: skip
        _wait_healthy(self.procs["storage"], f"unix:{self.root / 'run' / 'storage.sock'}", None)

    def start_inference(self, models: Path, model_pub: Path) -> None:
        self.spawn(
            "inference",
            ["workload", "inference", "--listen", f"unix:{self.root / 'run' / 'inference.sock'}",
             "--models", str(models), "--model-keys", str(model_pub),
             "--trust-key", str(self.state_dir / "assertion.pub")],
        )  # fmt: skip
        _wait_healthy(
            self.procs["inference"], f"unix:{self.root / 'run' / 'inference.sock'}", None, 120
        )

    def start_sidecar(self) -> None:
        proc = self.spawn("sidecar", ["serve", "--config", str(self.config)])
        creds = device_credentials(self.devices["soak-file"].cert, self.bundle.read_bytes())
        _wait_healthy(proc, self.sidecar_address, creds)

    def worker_pids(self) -> list[int]:
        """The sidecar supervisor's worker processes (its children)."""
        return list(self.workers().values())

    def workers(self) -> dict[int, int]:
        """Worker index (its ``--worker-index``) -> pid."""
        import psutil  # type: ignore[import-untyped]

        proc = self.procs.get("sidecar")
        out: dict[int, int] = {}
        if proc is None:
            return out
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children():
                with contextlib.suppress(psutil.Error, ValueError, IndexError):
                    args = child.cmdline()
                    out[int(args[args.index("--worker-index") + 1])] = child.pid
        return out

    def close(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)
        for tpm in self.swtpms:
            tpm.stop()


def _wait_healthy(
    proc: subprocess.Popen[bytes],
    target: str,
    creds: grpc.ChannelCredentials | None,
    timeout_s: float = 60,
) -> None:
    channel = (
        grpc.secure_channel(target, creds) if creds is not None else grpc.insecure_channel(target)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited ({proc.returncode})")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"{target} not SERVING after {timeout_s:.0f} s")


def _config_text(st: Stack, issuer_url: str, audience: str, vendor_pub: Path) -> str:
    run = st.root / "run"
    return f"""
[listen]
address = "{st.sidecar_address}"
grace_period_s = 2
workers = {WORKERS}
max_connection_age_s = 60

[tls]
server_cert = "{st.ca_dir / "server.pem"}"
server_key = "{st.ca_dir / "server.key"}"
client_ca = "{st.bundle}"
crl = "{st.state_dir / "crl.pem"}"
crl_source = "ca://{st.ca_address}"
crl_refresh_interval_s = {REFRESH_S}
reload_interval_s = {REFRESH_S}

[identity]
trust_domain = "{TRUST_DOMAIN}"
crl_grace_s = 86400

[[routes]]
service = "{STORAGE}"
upstream = "unix:{run / "storage.sock"}"
timeout_s = 10

[[routes]]
service = "{INFERENCE}"
upstream = "unix:{run / "inference.sock"}"
timeout_s = 10

[tokens]
issuer = "{issuer_url}"
audience = "{audience}"
jwks_file = "{st.ca_dir / "jwks.json"}"
algorithms = ["ES256"]
leeway_s = 30
jwks_cache_ttl_s = {JWKS_TTL_S}
jwks_min_refresh_interval_s = {JWKS_TTL_S}

[policy]
engine = "embedded"
path = "{st.policy_bundle}"
reload_interval_s = {REFRESH_S}
input_headers = ["x-model", "x-soak-call"]

[decision_log]
path = "{st.decision_log}"
max_bytes = 1048576
backups = 10000
checkpoint_every = 200
refusal_burst = 1000000

[posture]
max_age_s = 600
reference_values = "{POLICIES / "data" / "reference-values.json"}"
firmware_keys = ["{vendor_pub}"]
pcrs = [0, 4, 7]
state_dir = "{st.state_dir}"
ek_ca_bundle = "{st.ca_dir / "tpm-manufacturer" / "ek-ca.pem"}"

[metrics]
enabled = true
address = "127.0.0.1:{st.metrics_port}"
"""


def _init_hsm(root: Path) -> Path | None:
    """A SoftHSM2 token of the soak's own (``SOFTHSM2_CONF`` in its dir), or None."""
    if shutil.which("softhsm2-util") is None or not Path(DEFAULT_PKCS11_MODULE).exists():
        return None
    tokens = root / "hsm" / "tokens"
    tokens.mkdir(parents=True)
    conf = root / "hsm" / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjects.backend = file\n")
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "soak", "--pin", HSM_PIN,
         "--so-pin", "5678"],
        check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )  # fmt: skip
    return conf


def enroll_device(st: Stack, name: str, key_store: str = "file") -> Device:
    """A bootstrap token, then ``enroll`` at the running CA (the real enrollment service)."""
    device = Device(name, st.root / "devices" / name, key_store)
    token = issue_bootstrap_token(st.ca_dir, name, ttl_s=900)
    spec = "file"
    pin: str | None = None
    if key_store == "pkcs11":
        spec = f"pkcs11:token=soak;object={name}?module-path={DEFAULT_PKCS11_MODULE}"
        pin = HSM_PIN
    if key_store == "tpm":
        proc = start_swtpm(st.root / "tpm" / name)
        st.swtpms.append(proc)
        device.tpm = DeviceTpm(proc.tcti)
        dev_manufacturer.provision(device.tpm, ensure_dev_tpm_manufacturer(st.ca_dir).parent)
        components = demo_components()
        event_log = simulate_boot(device.tpm, components)
        firmware = components[0]
        manifest, sig = sign_manifest(
            ensure_dev_firmware_vendor(st.ca_dir), firmware.image, name=firmware.name,
            version=firmware.version, svn=3,
        )  # fmt: skip
        device.evidence = (event_log, manifest, sig)
        spec = "tpm"
    asyncio.run(
        enroll(
            st.ca_address, token, st.bundle, device.dir, spec, pin=pin, force=True,
            renew_server=f"127.0.0.1:{st.renew_port}", tpm=device.tpm,
        )
    )  # fmt: skip
    st.devices[name] = device
    return device


def _models(st: Stack) -> tuple[Path, Path]:
    """The shipped model (``make model``'s output when present, else trained here, ~10 s),
    its manifests signed by the dev model publisher; (models dir, publisher public key)."""
    from ztagent.workloads.inference.manifest import MANIFEST_SUFFIX
    from ztagent.workloads.inference.models import sign_manifest_file

    models = st.root / "models"
    shipped = REPO / "var" / "models"
    if (shipped / "vibration-anomaly.pt").exists():
        models.mkdir()
        for path in shipped.iterdir():
            if path.suffix in (".pt", ".json"):
                shutil.copy2(path, models / path.name)
    else:
        subprocess.run(
            [sys.executable, "-m", "ztagent.workloads.inference.train", "--out", str(models),
             "--seed", "0"],
            check=True, cwd=REPO, capture_output=True,
        )  # fmt: skip
    key = dev_model_publisher(st.ca_dir)
    for manifest in sorted(models.glob(f"*{MANIFEST_SUFFIX}")):
        sign_manifest_file(manifest, key)
    return models, key.with_suffix(".pub")


@contextlib.contextmanager
def running_stack(root: Path, publish_first_policy: Callable[[Stack], None]) -> Iterator[Stack]:
    """``publish_first_policy(stack)`` writes the first policy bundle before the sidecar
    starts (the fault schedule owns every later one)."""
    for sub in ("logs", "run", "state", "devices", "storage"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ca_dir = ca_store.init_ca(root / "ca", TRUST_DOMAIN).dir
    issuer = init_dev_issuer(ca_dir, TRUST_DOMAIN, force=True)
    vendor_pub = ensure_dev_firmware_vendor(ca_dir).with_suffix(".pub")
    st = Stack(
        root=root,
        ca_dir=ca_dir,
        config=root / "soak.toml",
        sidecar_port=free_port(),
        ca_port=free_port(),
        renew_port=free_port(),
        metrics_port=free_port(),
        policy_bundle=root / "policy" / "current.tar.gz",
        decision_log=root / "logs" / "decisions.jsonl",
    )
    st.hsm_conf = _init_hsm(root)
    if st.hsm_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(st.hsm_conf)  # this process's PKCS#11 key store
    ensure_signing_key(st.state_dir / "assertion.key")
    shutil.copy2(ca_dir / "crl.pem", st.state_dir / "crl.pem")
    st.config.write_text(_config_text(st, issuer.issuer, issuer.audience, vendor_pub))
    publish_first_policy(st)
    try:
        st.start_ca()
        enroll_device(st, "soak-file")
        enroll_device(st, "soak-denied")
        enroll_device(st, "soak-tpm", "tpm")
        if st.hsm_conf is not None:
            enroll_device(st, "soak-hsm", "pkcs11")
        models, model_pub = _models(st)
        st.start_storage()
        st.start_inference(models, model_pub)
        st.start_sidecar()
        yield st
    finally:
        st.close()
