"""The development-only issuer: files, tokens it mints, rotation, certificate binding."""

from __future__ import annotations

import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from joserfc.jwk import ECKey

from tests.unit.tokens._support import NOW
from ztagent.ca import builders
from ztagent.dev.issuer import (
    init_dev_issuer,
    load_dev_issuer,
    mint_token,
    rotate_dev_issuer,
)
from ztagent.tokens.errors import DevIssuerError, TokenError
from ztagent.tokens.jwks import parse_jwks
from ztagent.tokens.policy import TokenPolicy
from ztagent.tokens.verify import cert_thumbprint, verify_token

POLICY = TokenPolicy(issuer="https://ztagent.dev/dev-issuer", audiences=("ztagent",), typ="at+jwt")


def _keys(ca_dir: Path):  # type: ignore[no-untyped-def]
    return parse_jwks((ca_dir / "jwks.json").read_bytes())


def test_init_writes_key_jwks_and_settings(tmp_path: Path) -> None:
    issuer = init_dev_issuer(tmp_path, "ztagent.dev")
    assert issuer.issuer == "https://ztagent.dev/dev-issuer" and issuer.audience == "ztagent"
    assert stat.S_IMODE(issuer.key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(issuer.key_path.read_bytes(), None)
    assert b"BEGIN PRIVATE KEY" in issuer.key_path.read_bytes()  # PKCS#8
    jwk = json.loads(issuer.jwks_path.read_text())["keys"][0]
    assert jwk["alg"] == "ES256" and jwk["use"] == "sig" and "d" not in jwk
    assert jwk["kid"] == ECKey.import_key(key.public_key()).thumbprint() == issuer.kid  # type: ignore[arg-type]
    assert json.loads(issuer.config_path.read_text()) == {
        "issuer": issuer.issuer,
        "audience": "ztagent",
        "kid": issuer.kid,
    }
    assert load_dev_issuer(tmp_path) == issuer


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = init_dev_issuer(tmp_path, "ztagent.dev")
    with pytest.raises(DevIssuerError) as info:
        init_dev_issuer(tmp_path, "ztagent.dev")
    assert info.value.code == "dev_issuer_exists"
    assert init_dev_issuer(tmp_path, "ztagent.dev", force=True).kid != first.kid
    with pytest.raises(DevIssuerError) as info:
        init_dev_issuer(tmp_path / "x", "Not A Domain")
    assert info.value.code == "dev_issuer_invalid"


def test_minted_token_verifies_with_its_claims(tmp_path: Path) -> None:
    init_dev_issuer(tmp_path, "ztagent.dev")
    token = mint_token(
        tmp_path, sub="alice", scope=("storage.read", "storage.write"), roles=("reader",), now=NOW
    )
    user = verify_token(token, _keys(tmp_path), POLICY, NOW, None)
    assert user.scope == ("storage.read", "storage.write") and user.roles == ("reader",)
    assert user.expires_at == NOW + timedelta(seconds=900)
    assert {"iat", "nbf", "exp", "jti"} <= set(user.claims)
    with pytest.raises(TokenError) as info:
        verify_token(token, _keys(tmp_path), POLICY, NOW + timedelta(seconds=931), None)
    assert info.value.code == "token_expired"


def test_bound_token_checks_the_certificate(tmp_path: Path) -> None:
    init_dev_issuer(tmp_path, "ztagent.dev")
    _, issuing = builders.new_ca("t", now=NOW)
    leaf = builders.build_leaf(
        issuing,
        subject_cn="dev-1",
        uris=["spiffe://ztagent.dev/device/dev-1"],
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
    )
    pem = tmp_path / "dev-1.pem"
    pem.write_bytes(builders.cert_pem(leaf.cert, issuing.cert))
    token = mint_token(tmp_path, sub="alice", bind_cert=pem, now=NOW)
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    user = verify_token(token, _keys(tmp_path), POLICY, NOW, cert_thumbprint(der))
    assert user.cert_bound
    other = issuing.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(TokenError) as info:
        verify_token(token, _keys(tmp_path), POLICY, NOW, cert_thumbprint(other))
    assert info.value.code == "token_cnf_mismatch"
    assert isinstance(x509.load_pem_x509_certificates(pem.read_bytes())[0], x509.Certificate)


def test_rotation_keeps_old_and_new_keys(tmp_path: Path) -> None:
    first = init_dev_issuer(tmp_path, "ztagent.dev")
    old_token = mint_token(tmp_path, sub="alice", now=NOW)
    second = rotate_dev_issuer(tmp_path)
    new_token = mint_token(tmp_path, sub="bob", now=NOW)
    kids = [k.kid for k in _keys(tmp_path)]
    assert kids == [second.kid, first.kid]
    assert verify_token(old_token, _keys(tmp_path), POLICY, NOW, None).sub == "alice"
    assert verify_token(new_token, _keys(tmp_path), POLICY, NOW, None).sub == "bob"
    third = rotate_dev_issuer(tmp_path)
    assert [k.kid for k in _keys(tmp_path)] == [third.kid, second.kid]
    with pytest.raises(TokenError) as info:
        verify_token(old_token, _keys(tmp_path), POLICY, NOW, None)
    assert info.value.code == "token_kid_unknown"


def test_mint_errors(tmp_path: Path) -> None:
    with pytest.raises(DevIssuerError) as info:
        mint_token(tmp_path, sub="alice")
    assert info.value.code == "dev_issuer_missing"
    init_dev_issuer(tmp_path, "ztagent.dev")
    with pytest.raises(DevIssuerError) as info:
        mint_token(tmp_path, sub="alice", ttl_s=0)
    assert info.value.code == "ttl_invalid"
    with pytest.raises(DevIssuerError) as info:
        mint_token(tmp_path, sub="alice", bind_cert=tmp_path / "jwks.json")
    assert info.value.code == "bind_cert_invalid"
