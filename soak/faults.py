"""The fault schedule: one cycle of faults, repeated with a gap between steps until the run
ends. Every step is a real change made with the project's own building blocks (the CA store,
the dev issuer, ``build_bundle``, the enrollment service, signals and resource limits on the
real processes) and leaves a ``FaultEvent`` with the moment it took effect.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from soak.history import FaultEvent, History
from soak.stack import JWKS_TTL_S, POLICIES, Stack, enroll_device
from soak.traffic import Tokens, Traffic
from ztagent.ca import store as ca_store
from ztagent.ca.builders import BACKDATE, SERVER_LIFETIME, build_leaf, cert_pem, key_pem
from ztagent.dev.issuer import rotate_dev_issuer
from ztagent.device.enroll import renew
from ztagent.files import write_atomic
from ztagent.policy.authoring import build_bundle
from ztagent.policy.decision_log import worker_log_path

JWKS_BOUND_S = 2 * JWKS_TTL_S + 1.0
BROKEN_REGO = "package ztagent.authz\n\nthis is not rego {\n"


class Policies:
    """Publishes policy bundles atomically (``os.replace`` of ``policy.path``); keeps a copy
    of every good revision for the oracle's replay."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.dir = stack.root / "policy"
        self.revisions = self.dir / "revisions"
        self.revisions.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def bundle_of(self, revision: str) -> Path:
        return self.revisions / f"{revision}.tar.gz"

    def _build(self, deny: list[str], broken: bool) -> tuple[str, bytes]:
        self.count += 1
        revision = f"soak-{'broken' if broken else 'r'}{self.count}"
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            src = Path(tmp) / "src"
            shutil.copytree(POLICIES, src)
            data = json.loads((src / "data.json").read_text())
            data["ztagent"]["config"]["devices"]["deny"] = deny
            (src / "data.json").write_text(json.dumps(data))
            if broken:
                (src / "broken.rego").write_text(BROKEN_REGO)
            return revision, build_bundle(src, revision=revision).content

    def publish(self, deny: list[str], *, broken: bool = False) -> FaultEvent:
        revision, content = self._build(deny, broken)
        if not broken:
            write_atomic(self.bundle_of(revision), content, 0o644)
        write_atomic(self.stack.policy_bundle, content, 0o644)
        kind = "policy_broken" if broken else "policy_publish"
        return FaultEvent(time.time(), kind, revision=revision, detail=f"deny={deny}")


class Faults:
    def __init__(
        self,
        stack: Stack,
        history: History,
        traffic: Traffic,
        tokens: Tokens,
        gap_s: float,
        policies: Policies,
    ) -> None:
        self.stack = stack
        self.history = history
        self.traffic = traffic
        self.tokens = tokens
        self.gap_s = gap_s
        self.policies = policies
        self.server_certs: list[Path] = []
        self._victims = 0
        self._kills = 0
        self._pending: list[str] = []
        """Victims enrolled and not yet revoked."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []
        self.keep_server_cert()

    def keep_server_cert(self) -> None:
        """A copy of every server certificate the sidecar used (checkpoint keys)."""
        copy = self.stack.root / "policy" / f"server-{len(self.server_certs)}.pem"
        shutil.copy2(self.stack.ca_dir / "server.pem", copy)
        self.server_certs.append(copy)

    def _event(self, event: FaultEvent) -> None:
        self.history.faults.append(event)

    # --- the faults ------------------------------------------------------------------------

    def enroll_victims(self) -> None:
        for _ in range(2):
            self._victims += 1
            name = f"soak-victim-{self._victims}"
            enroll_device(self.stack, name)
            self._pending.append(name)
            self.traffic.add_victim(name)
            self._event(FaultEvent(time.time(), "enroll", device=name))

    def revoke(self) -> None:
        if not self._pending:
            return
        name = self._pending.pop(0)
        ca_store.revoke(self.stack.ca_dir, cert_path=self.stack.devices[name].cert)
        self._event(FaultEvent(time.time(), "revoke", device=name))

    def policy(self, deny: list[str]) -> None:
        self._event(self.policies.publish(deny))

    def policy_broken(self) -> None:
        self._event(self.policies.publish([], broken=True))

    def renew(self, name: str) -> None:
        device = self.stack.devices.get(name)
        if device is None:
            return
        pin = "1234" if device.key_store == "pkcs11" else None
        with device.lock:
            asyncio.run(renew(device.dir, pin=pin, rotate_key=device.key_store == "file"))
            device.generation += 1
        self._event(FaultEvent(time.time(), "renew", device=name))

    def server_rotate(self) -> None:
        layout = ca_store.CaLayout(self.stack.ca_dir)
        issuing = ca_store.load_issuing(layout)
        now = datetime.now(UTC)
        pair = build_leaf(
            issuing, subject_cn="ztagent sidecar", uris=[],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH], not_before=now - BACKDATE,
            not_after=now + SERVER_LIFETIME, dns=["localhost"],
            ips=["127.0.0.1", "::1"],
        )  # fmt: skip
        # key first, then the certificate: the sidecar reloads a pair only when they match
        write_atomic(layout.server_key, key_pem(pair.key), 0o600)
        write_atomic(layout.server_cert, cert_pem(pair.cert, issuing.cert), 0o644)
        self.keep_server_cert()
        self._event(FaultEvent(time.time(), "server_rotate"))

    def jwks_rotate(self) -> None:
        rotate_dev_issuer(self.stack.ca_dir)
        self._event(FaultEvent(time.time(), "jwks_rotate"))
        # publish the key before tokens use it: the sidecar re-reads the file within its TTL
        time.sleep(JWKS_BOUND_S)
        self.tokens.refresh()
        self._event(FaultEvent(time.time(), "jwks_in_use"))

    def clock_step(self, seconds: float) -> None:
        """The issuer's clock steps against the node's, within ``tokens.leeway_s``: tokens are
        minted ``seconds`` in the future (nbf/iat ahead of the sidecar) or in the past."""
        self.tokens.skew_s = seconds
        self.tokens.refresh()
        self._event(FaultEvent(time.time(), "clock_step", detail=f"{seconds:+.0f} s"))

    def crl_resign(self) -> None:
        ca_store.write_crl(self.stack.ca_dir)
        self._event(FaultEvent(time.time(), "crl_resign"))

    def ca_down(self) -> None:
        self.stack.stop("ca")
        self._event(FaultEvent(time.time(), "ca_down"))

    def ca_up(self) -> None:
        self.stack.start_ca()
        self._event(FaultEvent(time.time(), "ca_up"))

    def workload_restart(self) -> None:
        self.stack.stop("storage")
        self._event(FaultEvent(time.time(), "workload_restart", detail="storage stopped"))
        self.stack.start_storage()
        self._event(FaultEvent(time.time(), "workload_restart", detail="storage serving"))

    def worker_kill(self) -> None:
        workers = self.stack.workers()
        if not workers:
            return
        self._kills += 1
        index = sorted(workers)[self._kills % len(workers)]  # each worker in turn
        os.kill(workers[index], signal.SIGKILL)
        self._event(FaultEvent(time.time(), "worker_kill", detail=f"worker {index}"))

    def disk_full(self) -> None:
        """Every worker's decision log stops growing (RLIMIT_FSIZE at its current size, set
        from outside with prlimit; Python ignores SIGXFSZ, so writes fail with EFBIG)."""
        limits = []
        for index, pid in sorted(self.stack.workers().items()):
            path = worker_log_path(self.stack.decision_log, index)
            size = path.stat().st_size if path.exists() else 0
            try:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
            except (ProcessLookupError, PermissionError):
                continue
            limits.append(f"{pid}:{size}")
        self._event(FaultEvent(time.time(), "disk_full", detail=" ".join(limits)))

    def disk_ok(self) -> None:
        for pid in self.stack.worker_pids():
            try:
                resource.prlimit(
                    pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                )
            except (ProcessLookupError, PermissionError):
                continue
        self._event(FaultEvent(time.time(), "disk_ok"))

    # --- the schedule ----------------------------------------------------------------------

    def cycle(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("enroll victims", self.enroll_victims),
            ("policy: deny soak-denied", lambda: self.policy(["soak-denied"])),
            ("revoke a victim", self.revoke),
            ("JWKS key rotation", self.jwks_rotate),
            ("broken policy", self.policy_broken),
            ("sidecar worker SIGKILL", self.worker_kill),
            ("policy: allow soak-denied", lambda: self.policy([])),
            ("renew soak-file (new key)", lambda: self.renew("soak-file")),
            ("server certificate rotation", self.server_rotate),
            ("CRL re-signed", self.crl_resign),
            ("issuer clock +20 s", lambda: self.clock_step(20)),
            ("decision log disk full", self.disk_full),
            ("decision log disk ok", self.disk_ok),
            ("CA down", self.ca_down),
            ("revoke a victim while the CA is down", self.revoke),
            ("CA up", self.ca_up),
            ("storage workload restart", self.workload_restart),
            ("issuer clock -20 s", lambda: self.clock_step(-20)),
            ("renew soak-hsm (PKCS#11 key)", lambda: self.renew("soak-hsm")),
            ("renew soak-tpm (TPM key)", lambda: self.renew("soak-tpm")),
            ("issuer clock back in step", lambda: self.clock_step(0)),
        ]

    def _run(self, until: float) -> None:
        while not self._stop.is_set():
            for name, step in self.cycle():
                if self._stop.wait(self.gap_s) or time.time() >= until:
                    return  # stop() brings the CA back and lifts the disk limit
                try:
                    step()
                except Exception as exc:  # a fault that could not be made is reported
                    self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def start(self, until: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(until,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if "ca" not in self.stack.procs:
            self.ca_up()
        self.disk_ok()
