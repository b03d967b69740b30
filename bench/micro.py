"""Per-stage micro-benchmarks, in this process, with the stack's real material.

Each row: the stage, p50 and p99 per operation (microseconds) and operations per second on
one core. Timing is per call with ``perf_counter_ns`` (about 0.1 us of its own).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.stack import POLICIES, Stack

Row = tuple[str, float, float, float, str]
"""(stage, p50 us, p99 us, ops/s, note)"""


@dataclass
class Timing:
    p50_us: float
    p99_us: float
    ops: float


def measure(fn: Callable[[], object], *, seconds: float = 0.6, max_n: int = 200_000) -> Timing:
    for _ in range(min(200, max_n)):
        fn()
    times: list[int] = []
    perf = time.perf_counter_ns
    deadline = perf() + int(seconds * 1e9)
    while len(times) < max_n:
        t0 = perf()
        fn()
        t1 = perf()
        times.append(t1 - t0)
        if t1 > deadline:
            break
    times.sort()
    p50 = times[len(times) // 2] / 1e3
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] / 1e3
    return Timing(p50, p99, 1e9 / (sum(times) / len(times)))


def row(name: str, t: Timing, note: str = "") -> Row:
    return (name, t.p50_us, t.p99_us, t.ops, note)


def leaf_pem(cert_path: Path) -> bytes:
    text = cert_path.read_bytes()
    end = b"-----END CERTIFICATE-----"
    return text[: text.index(end) + len(end)] + b"\n"


# --- 1 identity ------------------------------------------------------------------------------


def assertion_rows(st: Stack) -> list[Row]:
    """The identity assertion every forwarded call carries: minted by the sidecar, verified
    (and its jti remembered) by the workload."""
    from ztagent.tokens.assertion import (
        ASSERTION_HEADER,
        AssertionSigner,
        AssertionVerifier,
        public_key_path,
    )

    signer = AssertionSigner.from_file(st.assertion_key)
    verifier = AssertionVerifier([public_key_path(st.assertion_key)])
    method = "/ztagent.workloads.v1.Storage/Get"

    def mint() -> str:
        return signer.mint(
            device_id="bench", spiffe_id="spiffe://ztagent.dev/device/bench",
            method=method, decision_id="bench",
        )  # fmt: skip

    minted = iter([mint() for _ in range(60_000)])

    def verify() -> object:
        return verifier.verify(((ASSERTION_HEADER, next(minted)),), method)

    return [
        row("identity assertion: mint (sidecar, per call)", measure(mint)),
        row(
            "identity assertion: verify + replay check (workload, per call)",
            measure(verify, max_n=50_000),
        ),
    ]


def cert_rows(st: Stack) -> list[Row]:
    from ztagent.config import load_config
    from ztagent.pki.trust_files import TrustFiles
    from ztagent.pki.verify import DeviceChecker

    config = load_config(st.config)
    trust = TrustFiles(config.tls.client_ca, config.tls.crl).load()
    checker = DeviceChecker(trust, config.identity.policy)
    pem = leaf_pem(st.device_cert)
    now = datetime.now(UTC)
    checker.check_pem(pem, now)

    def uncached() -> None:
        checker.replace_trust(trust)
        checker.check_pem(pem, now)

    return [
        row("cert check, cached (per call)", measure(lambda: checker.check_pem(pem, now))),
        row("cert check, uncached (chain, EKU, SPIFFE, CRL)", measure(uncached)),
    ]


# --- 3 user ----------------------------------------------------------------------------------


class _StaticKeys:
    def __init__(self, keys: Any) -> None:
        self._keys = keys

    async def get_keys(self) -> Any:
        return self._keys

    async def refresh_for_unknown_kid(self) -> bool:
        return False

    def health(self) -> Any:
        return None


def token_rows(st: Stack) -> list[Row]:
    import warnings

    from joserfc import jwt

    warnings.simplefilter("ignore")  # joserfc: "EdDSA is deprecated via RFC 9864"
    from cryptography import x509
    from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

    from ztagent.tokens.policy import TokenPolicy
    from ztagent.tokens.verifier import TokenVerifier
    from ztagent.tokens.verify import cert_thumbprint, verify_token

    der = x509.load_pem_x509_certificate(st.device_cert.read_bytes()).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).Encoding.DER
    )
    thumb = cert_thumbprint(der)
    keys = {
        "ES256": ECKey.generate_key("P-256", {"kid": "es"}),
        "RS256": RSAKey.generate_key(2048, {"kid": "rs"}),
        "EdDSA": OKPKey.generate_key("Ed25519", {"kid": "ed"}),
    }
    keyset = KeySet(list(keys.values()))
    policy = TokenPolicy(
        issuer="https://bench.example/issuer",
        audiences=("ztagent",),
        algorithms=tuple(keys),
        require_cert_binding=True,
    )
    now = datetime.now(UTC)
    iat = int(now.timestamp())
    rows: list[Row] = []
    for alg, key in keys.items():
        claims = {
            "iss": policy.issuer,
            "sub": "alice",
            "aud": "ztagent",
            "iat": iat,
            "nbf": iat,
            "exp": iat + 3600,
            "roles": ["writer"],
            "jti": alg,
            "cnf": {"x5t#S256": thumb},
        }
        token = jwt.encode(
            {"alg": alg, "kid": key.kid, "typ": "at+jwt"}, claims, key, algorithms=[alg]
        )
        verify_token(token, keyset, policy, now, thumb)
        rows.append(
            row(
                f"token verify {alg}, uncached",
                measure(lambda t=token: verify_token(t, keyset, policy, now, thumb), seconds=0.5),
            )  # type: ignore[misc]
        )
        verifier = TokenVerifier(_StaticKeys(keyset), policy, lambda: now)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(verifier.verify(token, thumb))
        n = 20_000

        async def many(t: str = token, v: TokenVerifier = verifier, n: int = n) -> int:
            started = time.perf_counter_ns()
            for _ in range(n):
                await v.verify(t, thumb)
            return time.perf_counter_ns() - started

        total = loop.run_until_complete(many())
        loop.close()
        per = total / n / 1e3
        rows.append(
            (
                f"token verify {alg}, cached",
                per,
                float("nan"),
                1e6 / per,
                "mean of 20k awaited calls",
            )
        )
    return rows


# --- 4 policy --------------------------------------------------------------------------------


def corpus() -> list[dict[str, Any]]:
    """Inputs covering the shipped policy's branches (allow and every denial)."""
    import sys

    sys.path.insert(0, str(POLICIES.parent))
    from tests.fixtures.policy_inputs import make_input

    out = []
    for roles, scope, anon, method, posture, device in itertools.product(
        (None, ["reader"], ["writer"], ["admin"]),
        (None, ["storage.read"], ["storage.write"]),
        (False, True),
        ("Get", "Put", "Delete", "Nope", "Watch"),
        (False, True),
        ("demo-device", "blocked"),
    ):
        out.append(
            make_input(
                roles=roles,
                scope=scope,
                anonymous=anon,
                method=method,
                posture=posture,
                device=device,
            )
        )
    for service, method in (
        ("ztagent.workloads.v1.Inference", "Predict"),
        ("grpc.health.v1.Health", "Check"),
        ("x.Y", "Z"),
    ):
        for scope, meta in itertools.product(
            (None, ["inference"]), ({}, {"x-model": "critical-demo"})
        ):
            out.append(make_input(service=service, method=method, scope=scope, metadata=meta))
    return out


def _same(d: Any) -> tuple[bool, tuple[str, ...], dict[str, str]]:
    return (d.allow, tuple(d.reasons), dict(d.headers))


class RegorusVm:
    """The shipped policy on the Regorus register VM (an experiment; see results.md)."""

    def __init__(self, root: Path) -> None:
        import regorus

        from ztagent.policy.sources import load_sources

        sources = load_sources(root)
        data = json.dumps(sources.data)
        program = regorus.Program.compile_from_modules(
            data,
            [(str(root / rel), text) for rel, text in sources.modules],
            ["data.ztagent.authz.decision"],
        )
        self.vm = regorus.Rvm()
        self.vm.load_program(program)
        self.vm.set_data_json(data)

    def evaluate(self, doc: dict[str, Any]) -> Any:
        from ztagent.policy.types import Decision

        self.vm.set_input_json(json.dumps(doc))
        return Decision.from_result(json.loads(self.vm.execute()), "")

    @staticmethod
    def error_semantics() -> str:
        """What the VM does where the interpreter raises (count() of a number)."""
        import regorus

        text = 'package t\ndefault d := "default"\nd := "value" if count(input.x) > 0\n'
        engine = regorus.Engine()
        engine.add_policy("t.rego", text)
        engine.set_input({"x": 5})
        try:
            engine.eval_rule("data.t.d")
            interp = "no error"
        except RuntimeError:
            interp = "error (-> failure_mode)"
        program = regorus.Program.compile_from_modules("{}", [("t.rego", text)], ["data.t.d"])
        vm = regorus.Rvm()
        vm.load_program(program)
        vm.set_data_json("{}")
        vm.set_input_json('{"x": 5}')
        return f"count(5): interpreter {interp}, VM {json.loads(vm.execute())!r} (undefined)"


def policy_rows(st: Stack, real_input: dict[str, Any]) -> tuple[list[Row], str]:
    """Embedded (interpreter, and the Regorus VM if it agrees), the OPA stand-in in-process
    and over its REST API. Returns the rows and a sentence on VM agreement."""
    from ztagent.policy.decision_cache import CachedEngine
    from ztagent.policy.embedded import EmbeddedEngine
    from ztagent.policy.opa import OpaEngine
    from ztagent.policy.types import Decision

    engine = EmbeddedEngine.load(POLICIES)
    cached = CachedEngine(EmbeddedEngine.load(POLICIES), engine.ast_json)
    rows = [
        row(
            "policy: embedded engine (Regorus interpreter), real request input",
            measure(lambda: engine.evaluate_sync(real_input)),
            "uncached: every evaluation",
        ),
        row(
            "policy: decision cache (the sidecar's default), real request input",
            measure(lambda: cached.evaluate_sync(real_input)),
            "the bench's traffic repeats what the policy reads",
        ),
    ]
    vm = RegorusVm(POLICIES)
    inputs = [*corpus(), real_input]
    mismatches = sum(_same(vm.evaluate(doc)) != _same(engine.evaluate_sync(doc)) for doc in inputs)
    vm_note = (
        f"Regorus VM vs interpreter on {len(inputs)} valid inputs of the shipped policy: "
        + ("identical decisions" if not mismatches else f"{mismatches} differ")
        + f"; builtin errors: {vm.error_semantics()}"
    )
    rows.append(
        row(
            "policy: Regorus VM (Program/Rvm, JSON input) - not used, see notes",
            measure(lambda: vm.evaluate(real_input)),
        )
    )
    import sys

    sys.path.insert(0, str(POLICIES.parent))
    from tests.fixtures.opa_standin import OpaStandin

    standin = OpaStandin()
    standin.load_dir(POLICIES)
    rows.append(
        row(
            "policy: OPA (Go rego, in-process bindings)",
            measure(lambda: standin.evaluate("ztagent.authz.decision", real_input)),
        )
    )

    async def over_rest() -> Timing:
        await standin.start()
        opa = OpaEngine(standin.url, timeout_s=5)
        try:
            for _ in range(50):
                await opa.evaluate(real_input)
            times = []
            deadline = time.perf_counter() + 1.5
            while time.perf_counter() < deadline:
                t0 = time.perf_counter_ns()
                await opa.evaluate(real_input)
                times.append(time.perf_counter_ns() - t0)
        finally:
            await opa.close()
            await standin.stop()
        times.sort()
        return Timing(
            times[len(times) // 2] / 1e3,
            times[int(len(times) * 0.99)] / 1e3,
            1e9 / (sum(times) / len(times)),
        )

    rows.append(
        row(
            "policy: OPA stand-in over REST (OpaEngine, loopback HTTP)",
            asyncio.run(over_rest()),
            "client + server in this process",
        )
    )
    standin.close()
    _ = Decision
    return rows, vm_note


class _ReusableNonce:
    """A NonceStore stand-in that accepts the one nonce the benchmark quote was made over
    (the real store's consume is a dict pop; a fresh TPM quote per iteration would time
    swtpm, not the verifier)."""

    def __init__(self, nonce: bytes) -> None:
        self._nonce = nonce

    def consume(self, cert_fingerprint: str, nonce: bytes, now: datetime) -> None:
        if nonce != self._nonce:
            raise AssertionError("unexpected nonce")


# --- 2 posture -------------------------------------------------------------------------------


def posture_rows(st: Stack, tmp: Path) -> list[Row]:
    from ztagent._proto.v1 import attestation_pb2 as pb
    from ztagent.posture.firmware import load_trusted_keys
    from ztagent.posture.reference import ReferenceValues
    from ztagent.posture.state import AkRegistry, RollbackStore
    from ztagent.posture.verifier import AttestationContext, PostureCache, verify_evidence

    assert st.tpm is not None and st.evidence_inputs is not None
    tpm = st.tpm
    event_log, manifest, signature = st.evidence_inputs
    nonce = bytes(range(32))
    quote = tpm.quote(nonce, [0, 4, 7], "sha256")
    evidence = pb.Evidence(
        quote=quote.attest,
        quote_signature=quote.signature,
        pcr_bank="sha256",
        pcr_values=tpm.read_pcrs([0, 4, 7], "sha256"),
        event_log=event_log,
        ak_public=tpm.ak_public(),
        firmware_manifest=manifest,
        firmware_signature=signature,
        host_facts=json.dumps({"os": "bench"}).encode(),
    )
    tmp.mkdir(parents=True, exist_ok=True)
    registry = AkRegistry(tmp / "ak.json")
    registry.bind("bench-device", tpm.ak_name().hex())
    rollback = RollbackStore(tmp / "svn.json")
    nonces = _ReusableNonce(nonce)
    fingerprint = "ab" * 32
    refs = ReferenceValues.load(POLICIES / "data" / "reference-values.json")
    trusted = dict(load_trusted_keys([st.root / "firmware" / "vendor.pub"]))
    now = datetime.now(UTC)
    ctx = AttestationContext(
        device_id="bench-device",
        cert_fingerprint=fingerprint,
        pcr_selection=(0, 4, 7),
        references=refs,
        trusted_firmware_keys=trusted,
        max_age_s=600,
        now=now,
    )

    def verify() -> object:
        return verify_evidence(
            evidence,
            ctx,
            nonces=nonces,
            registry=registry,
            rollback=rollback,  # type: ignore[arg-type]
        )

    posture = verify()
    cache = PostureCache()
    cache.put(posture)  # type: ignore[arg-type]
    later = now + timedelta(seconds=5)

    def lookup() -> object:
        p = cache.get(fingerprint, later)
        assert p is not None
        return p.as_input(later)

    rows = [
        row(
            "posture: verify evidence (quote sig, PCRs, event log, firmware sig)",
            measure(verify, seconds=1.0),
        ),
        row("posture: per-request lookup (cache + input doc)", measure(lookup)),
    ]
    if st.attestation_ms:
        ms = sorted(st.attestation_ms)
        rows.append(
            (
                "posture: full attestation round (Challenge+Attest, swtpm quote)",
                ms[len(ms) // 2] * 1e3,
                ms[-1] * 1e3,
                1e3 / ms[len(ms) // 2],
                f"{len(ms)} rounds over mTLS to the sidecar",
            )
        )
    return rows


# --- 5 decision log --------------------------------------------------------------------------


def decision_log_rows(real_input: dict[str, Any], tmp: Path) -> list[Row]:
    from ztagent import canonical_json
    from ztagent.policy.decision_log import DecisionLog
    from ztagent.policy.decision_record import GENESIS_PREV, DecisionRecord, line_sha256

    now = datetime.now(UTC)

    def record(i: int = 0) -> DecisionRecord:
        return DecisionRecord(
            decision_id=f"{i:032x}",
            time=now,
            device_id="bench-device",
            user_sub="alice",
            service="ztagent.workloads.v1.Storage",
            method="Get",
            allow=True,
            enforced=True,
            dry_run=False,
            reasons=("allowed", "role_granted:writer"),
            failure=None,
            policy_revision="sha256:0123456789abcdef",
            latency_us=80,
            attestation={"attestation_id": "ab" * 16, "quote_age_s": 5.0},
            input=real_input,
        )

    rec = record()
    standard = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    )
    rows = [
        row("decision log: build record (request path)", measure(record)),
        row(
            "decision log: serialise + hash one line (writer thread)",
            measure(lambda: line_sha256(rec.to_json_bytes(GENESIS_PREV))),
        ),
        row(
            "decision log: the input document's JSON (orjson, canonical_json.dumps)",
            measure(lambda: canonical_json.dumps(real_input)),
        ),
        row(
            "decision log: the input document's JSON, standard-library encoder (baseline)",
            measure(lambda: standard.encode(real_input).encode()),
            "what the writer used before orjson",
        ),
    ]

    log = DecisionLog(tmp / "decisions.jsonl", queue_size=100_000)
    log.start()
    n = 20_000
    records = [record(i) for i in range(n)]
    t0 = time.perf_counter_ns()
    for r in records:
        log.submit(r)
    submit_ns = time.perf_counter_ns() - t0
    while log.stats.written < n:
        time.sleep(0.005)
    total = time.perf_counter_ns() - t0
    log.close()
    rows.append(
        (
            "decision log: submit (request path)",
            submit_ns / n / 1e3,
            float("nan"),
            n / (submit_ns / 1e9),
            "mean of 20k, writer thread running",
        )
    )
    rows.append(
        (
            "decision log: end-to-end write throughput",
            total / n / 1e3,
            float("nan"),
            n / (total / 1e9),
            "records/s to disk, hash chain, no fsync",
        )
    )
    return rows
