"""Bootstrap tokens: issuing, the pure check, single use across restarts, device binding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jws
from joserfc.jwk import ECKey

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import (
    LEEWAY_S,
    TOKEN_TYP,
    ReplayStore,
    issue_bootstrap_token,
    ski_hex,
    verify_bootstrap_token,
)
from ztagent.ca.db import SqliteDatabase
from ztagent.ca.issuance import check_csr_names
from ztagent.enrollment import EnrollError
from ztagent.errors import ConfigError
from ztagent.pki.errors import CaError

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
TD = "ztagent.dev"


@pytest.fixture(scope="module")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(
        tmp_path_factory.mktemp("ca") / "ca", TD, now=NOW - timedelta(days=1)
    ).dir


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(
        tmp_path_factory.mktemp("ca2") / "ca", TD, now=NOW - timedelta(days=1)
    ).dir


@pytest.fixture
def ca_dir(session_ca: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ca"
    shutil.copytree(session_ca, target)
    return target


def _issuing(ca_dir: Path) -> builders.KeyPair:
    return ca_store.load_issuing(ca_store.CaLayout(ca_dir))


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    dec = [base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in (head, body)]
    return json.loads(dec[0]), json.loads(dec[1])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    payload = json.dumps(claims).encode()
    return jws.serialize_compact(header, payload, ECKey.import_key(key), algorithms=["ES256"])


def _verify(token: str, ca_dir: Path, now: datetime = NOW) -> Any:
    return verify_bootstrap_token(token, _issuing(ca_dir).cert, TD, now)


def test_good_token_carries_the_device_and_verifies(session_ca: Path) -> None:
    token = issue_bootstrap_token(session_ca, "dev-1", ttl_s=900, now=NOW)
    header, claims = _segments(token)
    issuing = _issuing(session_ca)
    assert header == {"alg": "ES256", "typ": TOKEN_TYP, "kid": ski_hex(issuing.cert)}
    assert claims["iss"] == f"spiffe://{TD}"
    assert claims["sub"] == claims["device_id"] == "dev-1"
    assert claims["td"] == TD
    assert claims["exp"] - claims["iat"] == 900
    assert len(claims["jti"]) == 32 and int(claims["jti"], 16) >= 0
    got = _verify(token, session_ca, NOW + timedelta(seconds=10))
    assert (got.device_id, got.trust_domain, got.jti) == ("dev-1", TD, claims["jti"])
    assert got.expires_at == int(NOW.timestamp()) + 900


def test_each_token_has_its_own_jti(session_ca: Path) -> None:
    a = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))[1]["jti"]
    b = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))[1]["jti"]
    assert a != b


def test_expired_token_is_refused_after_the_leeway(session_ca: Path) -> None:
    token = issue_bootstrap_token(session_ca, "dev-1", ttl_s=60, now=NOW)
    _verify(token, session_ca, NOW + timedelta(seconds=60 + LEEWAY_S))  # still inside leeway
    with pytest.raises(EnrollError, match=r"^token_expired: token expired at 2026-11-26T12:01:00Z"):
        _verify(token, session_ca, NOW + timedelta(seconds=60 + LEEWAY_S + 1))


def test_token_signed_by_another_ca_is_refused(session_ca: Path, other_ca: Path) -> None:
    forged = issue_bootstrap_token(other_ca, "dev-1", now=NOW)
    with pytest.raises(EnrollError, match=r"^token_bad_signature: kid is .*signed by another CA"):
        _verify(forged, session_ca)


def test_token_with_this_cas_kid_but_another_key_is_refused(
    session_ca: Path, other_ca: Path
) -> None:
    header, claims = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))
    forged = _sign(header, claims, _issuing(other_ca).key)  # right kid, wrong key
    with pytest.raises(EnrollError, match=r"^token_bad_signature: signature does not verify"):
        _verify(forged, session_ca)


def test_tampered_claims_break_the_signature(session_ca: Path) -> None:
    token = issue_bootstrap_token(session_ca, "dev-1", now=NOW)
    head, _body, sig = token.split(".")
    claims = _segments(token)[1] | {"sub": "dev-2", "device_id": "dev-2"}
    tampered = ".".join((head, _b64(json.dumps(claims).encode()), sig))
    with pytest.raises(EnrollError, match=r"^token_bad_signature"):
        _verify(tampered, session_ca)


def test_alg_none_is_refused(session_ca: Path) -> None:
    header, claims = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))
    header["alg"] = "none"
    unsigned = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."
    with pytest.raises(
        EnrollError, match=r"^token_bad_signature: alg is 'none' \(expected 'ES256'"
    ):
        _verify(unsigned, session_ca)


def test_hs256_with_the_ca_public_key_as_secret_is_refused(session_ca: Path) -> None:
    header, claims = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))
    header["alg"] = "HS256"
    public_pem = (
        _issuing(session_ca)
        .cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # the classic key-confusion forgery (joserfc itself refuses such an oct key: sign by hand)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{_b64(mac)}"
    with pytest.raises(EnrollError, match=r"^token_bad_signature: alg is 'HS256'"):
        _verify(forged, session_ca)


def test_wrong_typ_is_refused(session_ca: Path) -> None:
    header, claims = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))
    header["typ"] = "JWT"
    token = _sign(header, claims, _issuing(session_ca).key)
    with pytest.raises(EnrollError, match=r"^token_malformed: typ is 'JWT' \(expected"):
        _verify(token, session_ca)


def test_token_for_another_trust_domain_is_refused(session_ca: Path) -> None:
    token = issue_bootstrap_token(session_ca, "dev-1", now=NOW)
    with pytest.raises(EnrollError, match=r"^token_malformed: iss is 'spiffe://ztagent.dev'"):
        verify_bootstrap_token(token, _issuing(session_ca).cert, "other.example", NOW)


@pytest.mark.parametrize(
    ("token", "match"),
    [
        ("", r"token is empty"),
        ("a.b", r"2 segments"),
        ("!!.b.c", r"header segment is not base64url"),
        (_b64(b"[1]") + ".e30.c2ln", r"header is a JSON list"),
        # parsed before the signature is checked: a bounded parse, not a RecursionError
        (_b64(b"[" * 1400 + b"]" * 1400) + ".e30.c2ln", r"header: JSON nested more than 32"),
    ],
)
def test_malformed_tokens_are_refused(session_ca: Path, token: str, match: str) -> None:
    with pytest.raises(EnrollError, match=rf"^token_malformed: .*{match}"):
        _verify(token, session_ca)


def test_bad_claims_are_refused(session_ca: Path) -> None:
    header, claims = _segments(issue_bootstrap_token(session_ca, "dev-1", now=NOW))
    key = _issuing(session_ca).key
    for change, match in [
        ({"jti": "short"}, r"jti is 'short'"),
        ({"exp": claims["iat"] + 30 * 86400}, r"exp - iat is 2592000 s"),
        ({"sub": "dev-2"}, r"sub is 'dev-2' but device_id is 'dev-1'"),
        ({"sub": "../x", "device_id": "../x"}, r"device id '../x'"),
        ({"iat": "now"}, r"claim iat is 'now'"),
    ]:
        with pytest.raises(EnrollError, match=rf"^token_malformed: {match}"):
            _verify(_sign(header, claims | change, key), session_ca)


def test_issue_refuses_bad_ttl_and_device_id(session_ca: Path) -> None:
    with pytest.raises(ConfigError, match=r"ttl: 0 seconds"):
        issue_bootstrap_token(session_ca, "dev-1", ttl_s=0, now=NOW)
    with pytest.raises(CaError, match=r"^device_id_invalid: device id 'a/b'"):
        issue_bootstrap_token(session_ca, "a/b", now=NOW)


# --- single use ----------------------------------------------------------------------------


def test_a_token_is_reusable_never_even_after_a_restart(ca_dir: Path) -> None:
    token = issue_bootstrap_token(ca_dir, "dev-1", now=NOW)
    claims = _verify(token, ca_dir)
    ReplayStore.for_ca(ca_dir).consume(claims.jti, claims.expires_at, NOW)
    restarted = ReplayStore.for_ca(ca_dir)  # a new process reads the persisted file
    assert restarted.is_used(claims.jti)
    with pytest.raises(EnrollError, match=r"^token_reused: token jti .* was already used"):
        restarted.consume(claims.jti, claims.expires_at, NOW + timedelta(seconds=1))


def test_replay_store_prunes_only_tokens_that_can_no_longer_verify(tmp_path: Path) -> None:
    db = SqliteDatabase(tmp_path / "ca.db")
    store = ReplayStore(db)
    t0 = int(NOW.timestamp())
    store.consume("a" * 32, t0 + 60, NOW)
    store.consume("b" * 32, t0 + 7200, NOW)
    assert db.token_used("a" * 32) and db.token_used("b" * 32)
    # a day past its expiry a token can no longer verify anyway: its entry goes
    store.consume("c" * 32, t0 + 90000, NOW + timedelta(days=1, seconds=61))
    assert not db.token_used("a" * 32)
    assert db.token_used("b" * 32) and db.token_used("c" * 32)
    assert (tmp_path / "ca.db").stat().st_mode & 0o777 == 0o600


def test_an_unreadable_database_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "ca.db").write_bytes(b"not a database at all, " * 100)
    with pytest.raises(CaError, match=r"^ca_unavailable: .*ca\.db"):
        ReplayStore.for_ca(tmp_path)


# --- device binding ------------------------------------------------------------------------


def _csr(cn: str | None, uris: list[str] = ()) -> x509.CertificateSigningRequest:  # type: ignore[assignment]
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


def test_token_for_one_device_cannot_enroll_another(session_ca: Path) -> None:
    claims = _verify(issue_bootstrap_token(session_ca, "dev-1", now=NOW), session_ca)
    with pytest.raises(EnrollError, match=r"^token_device_mismatch: CSR subject CN is 'dev-2'"):
        check_csr_names(_csr("dev-2"), claims.device_id, TD, "token_device_mismatch")
    other = f"spiffe://{TD}/device/dev-2"
    with pytest.raises(EnrollError, match=r"^token_device_mismatch: CSR asks for URI SAN"):
        check_csr_names(_csr(None, [other]), claims.device_id, TD, "token_device_mismatch")
    # naming the token's own device, or nothing at all, is fine
    check_csr_names(_csr("dev-1", [f"spiffe://{TD}/device/dev-1"]), "dev-1", TD, "x")
    check_csr_names(_csr(None), "dev-1", TD, "token_device_mismatch")
