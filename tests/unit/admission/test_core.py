"""The admission core driven directly, without grpc: every refusal kind gives the right
status, stable code and message, and leaves a hash-chainable decision-log record; no input
a client controls (metadata, tokens, method names, certificates) ends in anything else."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey

from tests.unit.pki._support import NOW, Mint, Pki
from tests.unit.tokens._support import AUDIENCE, ISSUER, claims, new_key, sign
from ztagent.admission.core import AdmissionCore, Call, Verdict
from ztagent.config import Config, parse_config
from ztagent.device.jwks_fetch import JwksSource
from ztagent.pki.verify import DeviceChecker
from ztagent.policy.decision_log import NullDecisionLog
from ztagent.policy.decision_record import GENESIS_PREV, DecisionRecord
from ztagent.policy.errors import PolicyError
from ztagent.policy.types import Decision, EngineHealth
from ztagent.tokens.verifier import TokenVerifier

from ..pki.conftest import mint, session_pki  # noqa: F401 (fixtures)

SERVICE = "ztagent.workloads.v1.Storage"
ALLOWED_STATUSES = {
    "OK",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "UNIMPLEMENTED",
}


class RecordingLog(NullDecisionLog):
    """The decision log's interface, keeping what it was given."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def submit(self, record: DecisionRecord) -> bool:
        self.records.append(record)
        return True

    async def asubmit(self, record: DecisionRecord) -> bool:
        return self.submit(record)


class ScriptedEngine:
    """A policy engine (the real interface) whose answer the test picks by method name:
    ``Deny`` denies, ``Broken`` fails like an engine outage, ``Crash`` raises a bug."""

    revision = "test-rev"

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        method = input_doc["request"]["method"]
        if method == "Deny":
            return Decision(False, ("role_required:writer",), {}, self.revision)
        if method == "Broken":
            raise PolicyError("policy_engine_error", "engine down")
        if method == "Crash":
            raise KeyError("a bug in an engine adapter")
        return Decision(True, (), {"x-policy": "yes"}, self.revision)

    def health(self) -> EngineHealth:
        return EngineHealth(True, None)

    def maybe_reload(self) -> bool:
        return False

    async def close(self) -> None:
        return None


def _config(tmp_path: Path, **decision_log: Any) -> Config:
    for name in ("s.pem", "s.key", "ca.pem", "crl.pem"):
        (tmp_path / name).write_text("")
    raw = {
        "tls": {
            "server_cert": "s.pem",
            "server_key": "s.key",
            "client_ca": "ca.pem",
            "crl": "crl.pem",
        },
        "routes": [{"service": SERVICE, "upstream": "127.0.0.1:1"}],
        "decision_log": decision_log,
    }
    return parse_config(raw, tmp_path)


@pytest.fixture
def key() -> ECKey:
    return new_key()


@pytest.fixture
def core(tmp_path: Path, session_pki: Pki, key: ECKey) -> AdmissionCore:  # noqa: F811
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    tokens = TokenVerifier(
        JwksSource(jwks, clock=lambda: 0.0, wall_clock=lambda: NOW),
        _policy(),
        lambda: NOW,
    )
    checker = DeviceChecker(session_pki.trust(), _device_policy())
    return AdmissionCore(
        _config(tmp_path), checker, ScriptedEngine(), tokens, RecordingLog(), lambda: NOW
    )


def _policy() -> Any:
    from ztagent.tokens.policy import TokenPolicy

    return TokenPolicy(issuer=ISSUER, audiences=(AUDIENCE,))


def _device_policy() -> Any:
    from ztagent.pki.policy import DevicePolicy

    return DevicePolicy("ztagent.dev")


def _pem(mint: Mint, **kw: Any) -> bytes:  # noqa: F811
    return mint(**kw).cert.public_bytes(Encoding.PEM)


def _call(pem: bytes | None, method: str = "Get", token: str | None = None, **md: str) -> Call:
    metadata = [(k, v) for k, v in md.items()]
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    return Call(f"/{SERVICE}/{method}", tuple(metadata), "ipv4:127.0.0.1:5", pem)


def _records(core: AdmissionCore) -> list[DecisionRecord]:
    log = core.decision_log
    assert isinstance(log, RecordingLog)
    return log.records


async def test_allowed_call_gets_identity_and_policy_headers(
    core: AdmissionCore,
    mint: Mint,  # noqa: F811
    key: ECKey,
) -> None:
    verdict = await core.decide(_call(_pem(mint), token=sign(key, claims())))
    assert verdict.allowed and verdict.error is None
    headers = dict(verdict.headers)
    assert headers["x-ztagent-device-id"] == "dev-1" and headers["x-policy"] == "yes"
    (record,) = _records(core)
    assert record.allow and record.enforced and record.refusal is None
    assert record.user_sub == "alice"


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no_cert", "UNAUTHENTICATED", "cert_missing"),
        ("garbage_cert", "UNAUTHENTICATED", "cert_malformed"),
        ("wrong_domain", "UNAUTHENTICATED", "spiffe_id_wrong_trust_domain"),
        ("bad_token", "UNAUTHENTICATED", "token_malformed"),
        ("two_tokens", "UNAUTHENTICATED", "token_malformed"),
        ("expired_token", "UNAUTHENTICATED", "token_expired"),
        ("policy_deny", "PERMISSION_DENIED", "policy_denied"),
        ("engine_down", "UNAVAILABLE", "policy_engine_error"),
        ("bug", "INTERNAL", "admission_error"),
    ],
)
async def test_every_refusal_is_a_verdict_and_a_log_record(
    core: AdmissionCore,
    mint: Mint,  # noqa: F811
    key: ECKey,
    case: str,
    status: str,
    code: str,
) -> None:
    good = _pem(mint)
    calls = {
        "no_cert": _call(None),
        "garbage_cert": _call(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        "wrong_domain": _call(_pem(mint, uris=["spiffe://evil.example/device/x"])),
        "bad_token": _call(good, token="not.a.jwt"),
        "two_tokens": Call(
            f"/{SERVICE}/Get",
            (("authorization", "Bearer a"), ("authorization", "Bearer b")),
            "",
            good,
        ),
        "expired_token": _call(good, token=sign(key, claims(exp=int(NOW.timestamp()) - 3600))),
        "policy_deny": _call(good, "Deny"),
        "engine_down": _call(good, "Broken"),
        "bug": _call(good, "Crash"),
    }
    verdict = await core.decide(calls[case])
    assert not verdict.allowed and verdict.error is not None
    assert verdict.error.rpc_status() == status
    assert verdict.error.code == code
    (record,) = _records(core)  # exactly one line per call, refused ones included
    assert not record.enforced
    if case in ("policy_deny", "engine_down"):
        assert record.refusal is None  # the policy (or its failure mode) decided
        assert record.reasons == (
            ("role_required:writer",) if case == "policy_deny" else (f"failure_mode_closed:{code}",)
        )
    else:
        assert record.reasons == (code,)
        assert record.refusal is not None and record.refusal["code"] == code
        assert record.refusal["status"] == status
    json.loads(record.to_json_bytes(GENESIS_PREV))  # a valid, chainable line
    if case == "wrong_domain":
        assert record.refusal is not None
        assert record.refusal["received"] == "evil.example"
    if case == "bug":  # the client's data never reaches the message
        assert "a bug" not in verdict.error.message


async def test_a_refused_token_still_names_the_device(
    core: AdmissionCore,
    mint: Mint,  # noqa: F811
) -> None:
    await core.decide(_call(_pem(mint), token="x.y.z"))
    (record,) = _records(core)
    assert record.device_id == "dev-1" and record.user_sub is None


_header_names = st.text("abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
_values = st.one_of(st.text(max_size=200), st.binary(max_size=100))
_tokens = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda a, b, c: f"{a}.{b}.{c}",
        st.text(max_size=80),
        st.text(max_size=80),
        st.text(max_size=20),
    ),
    st.just("e30.e30.e30"),
    st.just("W1tbW1tbW1tbW1tbW1tbW1tbW1td.e30.AA"),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.one_of(st.text(max_size=60), st.sampled_from(["Get", "Deny", "Broken"])),
    metadata=st.lists(st.tuples(_header_names, _values), max_size=8),
    token=st.one_of(st.none(), _tokens),
    with_cert=st.booleans(),
)
async def test_no_client_input_escapes_the_verdict(
    core: AdmissionCore,
    mint: Mint,  # noqa: F811
    method: str,
    metadata: list[tuple[str, str | bytes]],
    token: str | None,
    with_cert: bool,
) -> None:
    md = list(metadata)
    if token is not None:
        md.append(("authorization", f"Bearer {token}"))
    pem = _pem(mint) if with_cert else None
    verdict: Verdict = await core.decide(Call(f"/{SERVICE}/{method}", tuple(md), "p", pem))
    status = "OK" if verdict.allowed else verdict.error.rpc_status()  # type: ignore[union-attr]
    assert status in ALLOWED_STATUSES, (status, verdict.error)


async def test_an_unrouted_service_is_refused_and_logged_once(
    core: AdmissionCore,
    mint: Mint,  # noqa: F811
) -> None:
    call = Call("/nobody.v1.Home/Get", (), "p", _pem(mint))
    verdict = await core.decide(call)
    assert verdict.error is not None and verdict.error.rpc_status() == "UNIMPLEMENTED"
    assert verdict.error.message.startswith("no route for service 'nobody.v1.Home'")
    (record,) = _records(core)  # one line: the policy allowed, no route served it
    assert record.allow and not record.enforced
    assert record.refusal is not None and record.refusal["code"] == "no_route"


async def test_junk_denials_from_one_device_cannot_rotate_history_away(
    tmp_path: Path,
    session_pki: Pki,  # noqa: F811
    mint: Mint,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40,000 denied calls with 7 KB of junk metadata each, from one device: an allowed line
    written before them stays in the current log file (the issue's attack: about 37,000 such
    calls used to rotate the whole history away). The sidecar's own log gets the same budget:
    100 ``refused`` lines and the summary, not 40,000."""
    caplog.set_level(logging.INFO, logger="ztagent.pipeline")
    from ztagent.policy.decision_log import DecisionLog
    from ztagent.policy.log_verify import verify_log

    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, max_bytes=50 * 1024 * 1024, queue_size=100_000, on_full="block")
    log.start()
    mono = [0.0]
    core = AdmissionCore(
        _config(tmp_path),
        DeviceChecker(session_pki.trust(), _device_policy()),
        ScriptedEngine(),
        None,
        log,
        lambda: NOW,
        monotonic=lambda: mono[0],
    )
    good = _pem(mint)
    assert (await core.decide(_call(good, "Get"))).allowed
    junk = tuple((f"x-junk-{i}", "j" * 700) for i in range(10))
    for _ in range(40_000):  # 1 ms apart: 40 s of flood, within one 60 s window
        mono[0] += 0.001
        verdict = await core.decide(Call(f"/{SERVICE}/Deny", junk, "p", good))
        assert verdict.error is not None and verdict.error.code == "policy_denied"
    mono[0] += 61  # the window ends: the sidecar's periodic flush writes the summary
    assert await core.flush_refusal_summaries() == 1
    assert log.close(30)
    lines = path.read_text().splitlines()
    assert not (tmp_path / "decisions.jsonl.1").exists()  # nothing rotated away
    first = json.loads(lines[0])
    assert first["allow"] is True and first["enforced"] is True
    assert len(lines) < 200  # 100 refusal lines + a summary, not 40,000
    summary = json.loads(lines[-1])
    assert summary["refusal"]["code"] == "refusals_summarised"
    assert summary["refusal"]["count"] == 40_000 - 100
    assert summary["refusal"]["by"] == [
        {"code": "policy_denied", "method": "Deny", "count": 40_000 - 100}
    ]
    assert verify_log(path).ok
    said = [r.getMessage() for r in caplog.records if r.name == "ztagent.pipeline"]
    assert len(said) == 100 + 1
    assert said[0] == f"refused /{SERVICE}/Deny: policy_denied: role_required:writer"
    assert said[-1] == summary["refusal"]["message"]


async def test_a_refused_caller_cannot_escape_its_budget_by_changing_address(
    tmp_path: Path,
    session_pki: Pki,  # noqa: F811
    mint: Mint,  # noqa: F811
) -> None:
    """The budget of a certificate that fails the identity check is the certificate's, not
    its address's; without one, an IPv6 caller's is its /64's (any address in it is the
    host's to take)."""
    core = AdmissionCore(
        _config(tmp_path, refusal_burst=2),
        DeviceChecker(session_pki.trust(), _device_policy()),
        ScriptedEngine(),
        None,
        RecordingLog(),
        lambda: NOW,
        monotonic=lambda: 0.0,
    )
    foreign = _pem(mint, uris=["spiffe://evil.example/device/x"])
    for host in range(5):  # a new address for each call
        verdict = await core.decide(Call(f"/{SERVICE}/Get", (), f"ipv4:10.0.0.{host}:5", foreign))
        assert verdict.error is not None and verdict.error.code == "spiffe_id_wrong_trust_domain"
    assert len(_records(core)) == 2
    for host in range(5):  # no certificate: grpc's escaped form, then the plain one
        address = f"2001:db8::{host + 1:x}"
        peer = f"ipv6:%5B{address}%5D:443" if host % 2 else f"ipv6:[{address}]:9"
        verdict = await core.decide(Call(f"/{SERVICE}/Get", (), peer, None))
        assert verdict.error is not None and verdict.error.code == "cert_missing"
    assert len(_records(core)) == 4
    await core.decide(Call(f"/{SERVICE}/Get", (), "ipv6:[2001:db8:0:1::1]:9", None))
    assert len(_records(core)) == 5  # another /64, another budget


async def test_recheck_ends_an_open_call_when_its_credentials_lapse(
    tmp_path: Path,
    session_pki: Pki,  # noqa: F811
    mint: Mint,  # noqa: F811
    key: ECKey,
) -> None:
    """``recheck`` of an open call: nothing logged while the certificate and the token hold;
    once the token has expired, the refusal, logged with ``open_call``."""
    from datetime import timedelta

    now = [NOW]
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    tokens = TokenVerifier(
        JwksSource(jwks, clock=lambda: 0.0, wall_clock=lambda: now[0]), _policy(), lambda: now[0]
    )
    checker = DeviceChecker(session_pki.trust(), _device_policy())
    core = AdmissionCore(
        _config(tmp_path), checker, ScriptedEngine(), tokens, RecordingLog(), lambda: now[0]
    )
    call = _call(_pem(mint), "Bidi", token=sign(key, claims()))  # expires at NOW + 600 s
    assert (await core.decide(call)).allowed
    assert await core.recheck(call) is None
    assert len(_records(core)) == 1  # the admission only
    now[0] = NOW + timedelta(seconds=3600)  # past exp and the leeway
    err = await core.recheck(call)
    assert err is not None and err.code == "token_expired" and err.rpc_status() == "UNAUTHENTICATED"
    record = _records(core)[-1]
    assert not record.enforced and record.method == "Bidi" and record.device_id == "dev-1"
    assert record.refusal is not None and record.refusal["open_call"] is True
    foreign = _call(_pem(mint, uris=["spiffe://evil.example/device/x"]), "Bidi")
    err = await core.recheck(foreign)
    assert err is not None and err.code == "spiffe_id_wrong_trust_domain"
