"""The pure token check: every attack refused with its stable code, and the accept cases."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey, KeySet, RSAKey

from ztagent.tokens.errors import TokenError, TokenPolicyError
from ztagent.tokens.verify import (
    TokenPolicy,
    anonymous_user_input,
    cert_thumbprint,
    verify_token,
)

from ._support import (
    AUDIENCE,
    ISSUER,
    NOW,
    POLICY,
    T,
    b64,
    b64json,
    claims,
    new_key,
    public_set,
    sign,
)


@pytest.fixture(scope="module")
def key() -> ECKey:
    return new_key()


@pytest.fixture(scope="module")
def keys(key: ECKey) -> KeySet:
    return public_set(key)


def refused(
    code: str, token: str, keys: KeySet, policy: TokenPolicy = POLICY, **kw: Any
) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_token(token, keys, policy, kw.pop("now", NOW), kw.pop("thumbprint", None))
    assert info.value.code == code, info.value
    return info.value


# --- accept --------------------------------------------------------------------------------


def test_es256_token_is_accepted_and_becomes_policy_input(key: ECKey, keys: KeySet) -> None:
    user = verify_token(sign(key), keys, POLICY, NOW, None)
    assert (user.sub, user.iss, user.aud) == ("alice", ISSUER, (AUDIENCE,))
    assert user.scope == ("storage.read",) and user.roles == ("reader",)
    assert user.cert_bound is False
    assert user.expires_at == NOW + timedelta(seconds=600)
    doc = user.as_input()
    assert doc == {
        "authenticated": True,
        "sub": "alice",
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "scope": ["storage.read"],
        "roles": ["reader"],
        "cert_bound": False,
        "claims": claims(),
    }
    doc["claims"]["roles"].append("admin")  # the input is a copy
    assert user.claims["roles"] == ["reader"]


def test_anonymous_input_has_every_key() -> None:
    assert anonymous_user_input() == {
        "authenticated": False,
        "sub": None,
        "iss": None,
        "aud": [],
        "scope": [],
        "roles": [],
        "cert_bound": False,
        "claims": {},
    }


def test_anonymous_and_authenticated_inputs_have_the_same_keys(key: ECKey, keys: KeySet) -> None:
    user = verify_token(sign(key), keys, POLICY, NOW, None)
    assert set(anonymous_user_input()) == set(user.as_input())


def test_aud_as_list_matches_any_configured_audience(key: ECKey, keys: KeySet) -> None:
    policy = replace(POLICY, audiences=("other", AUDIENCE))
    token = sign(key, claims(aud=["storage", AUDIENCE]))
    assert verify_token(token, keys, policy, NOW, None).aud == ("storage", AUDIENCE)


def test_leeway_accepts_slightly_expired_and_early_tokens(key: ECKey, keys: KeySet) -> None:
    token = sign(key, claims(exp=T - 20, nbf=T + 20, iat=T + 20))
    assert verify_token(token, keys, POLICY, NOW, None).sub == "alice"  # leeway 30 s
    refused("token_expired", token, keys, replace(POLICY, leeway_s=10))


def test_scp_list_and_no_roles(key: ECKey, keys: KeySet) -> None:
    user = verify_token(
        sign(key, claims(scope=None, roles=None, scp=["a", "b"])), keys, POLICY, NOW, None
    )
    assert user.scope == ("a", "b") and user.roles == ()


def test_single_key_set_accepts_a_token_without_kid(key: ECKey, keys: KeySet) -> None:
    assert verify_token(sign(key, kid=None), keys, POLICY, NOW, None).sub == "alice"


def test_typ_checked_when_configured(key: ECKey, keys: KeySet) -> None:
    policy = replace(POLICY, typ="at+jwt")
    assert verify_token(sign(key, typ="application/AT+JWT"), keys, policy, NOW, None)
    refused("token_typ_mismatch", sign(key, typ="JWT"), keys, policy)
    refused("token_typ_mismatch", sign(key, typ=None), keys, policy)


# --- attacks ------------------------------------------------------------------------------


def test_alg_none_is_refused(keys: KeySet) -> None:
    token = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(claims())}."
    err = refused("token_alg_not_allowed", token, keys)
    assert "'none'" in err.message and "ES256" in err.message
    refused("token_alg_not_allowed", f"{b64json({'alg': 'None'})}.{b64json(claims())}.", keys)


@pytest.mark.parametrize("form", ["pem", "jwk"])
def test_hs256_signed_with_the_issuers_public_key_is_refused(
    key: ECKey, keys: KeySet, form: str
) -> None:
    """The classic key-confusion attack: HMAC keyed with the public key the verifier holds."""
    pub = key.as_dict(private=False)
    if form == "pem":
        secret = (
            ECKey.import_key(pub)
            .get_op_key("verify")
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    else:
        secret = json.dumps(pub).encode()
    signing_input = f"{b64json({'alg': 'HS256', 'kid': key.kid})}.{b64json(claims(sub='root'))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    refused("token_alg_not_allowed", token, keys)
    # even a policy that lists every allowed algorithm never reaches a MAC
    refused("token_alg_not_allowed", token, keys, replace(POLICY, algorithms=("ES256", "RS256")))


def test_rs256_refused_when_only_es256_allowed(keys: KeySet) -> None:
    rsa = RSAKey.generate_key(2048, auto_kid=True)
    token = sign(rsa, alg="RS256")
    refused("token_alg_not_allowed", token, public_set(rsa))
    refused("token_alg_not_allowed", token, keys)


def test_alg_must_fit_the_key_family(key: ECKey, keys: KeySet) -> None:
    """RS256 allowed, but the kid names an EC key: the key type decides, not the header."""
    rsa = RSAKey.generate_key(2048, auto_kid=True)
    token = sign(rsa, alg="RS256", kid=key.kid)
    err = refused(
        "token_alg_not_allowed", token, keys, replace(POLICY, algorithms=("ES256", "RS256"))
    )
    assert "kty EC" in err.message


def test_key_with_other_alg_or_curve_does_not_fit(key: ECKey) -> None:
    pinned = KeySet([ECKey.import_key({**key.as_dict(private=False), "alg": "ES384"})])
    refused("token_alg_not_allowed", sign(key), pinned)
    p384 = ECKey.generate_key("P-384", auto_kid=True)
    token = sign(p384, alg="ES384", kid=key.kid)
    refused(
        "token_alg_not_allowed",
        token,
        public_set(key),
        replace(POLICY, algorithms=("ES256", "ES384")),
    )


def test_expired(key: ECKey, keys: KeySet) -> None:
    err = refused("token_expired", sign(key, claims(exp=T - 31)), keys)
    assert "exp 2026-11-26T11:59:29Z" in err.message


def test_nbf_in_the_future(key: ECKey, keys: KeySet) -> None:
    refused("token_not_yet_valid", sign(key, claims(nbf=T + 31)), keys)


def test_iat_in_the_future(key: ECKey, keys: KeySet) -> None:
    refused("token_iat_in_future", sign(key, claims(iat=T + 31, nbf=None)), keys)


def test_wrong_issuer(key: ECKey, keys: KeySet) -> None:
    err = refused("token_wrong_issuer", sign(key, claims(iss="https://evil.example")), keys)
    assert "'https://evil.example'" in err.message and ISSUER in err.message
    refused("token_wrong_issuer", sign(key, claims(iss=None)), keys)


def test_wrong_audience(key: ECKey, keys: KeySet) -> None:
    refused("token_wrong_audience", sign(key, claims(aud="other")), keys)
    refused("token_wrong_audience", sign(key, claims(aud=["a", "b"])), keys)
    refused("token_wrong_audience", sign(key, claims(aud=None)), keys)


def test_unknown_kid(key: ECKey, keys: KeySet) -> None:
    other = new_key()
    err = refused("token_kid_unknown", sign(other), keys)
    assert str(key.kid) in err.message


def test_kid_missing_with_two_keys(key: ECKey) -> None:
    refused("token_kid_missing", sign(key, kid=None), public_set(key, new_key()))


def test_tampered_payload_keeps_signature(key: ECKey, keys: KeySet) -> None:
    header, _, sig = sign(key).split(".")
    forged = b64json(claims(sub="admin", roles=["admin"]))
    refused("token_bad_signature", f"{header}.{forged}.{sig}", keys)


def test_signature_by_another_key_with_the_same_kid(key: ECKey, keys: KeySet) -> None:
    refused("token_bad_signature", sign(new_key(), kid=key.kid), keys)


def test_oversized_token_is_refused_before_parsing(keys: KeySet) -> None:
    refused("token_too_large", "x" * (POLICY.max_token_bytes + 1), keys)
    refused("token_too_large", "é" * (POLICY.max_token_bytes // 2 + 1), keys)  # counted in bytes


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d.e",
        "!!!.e30.e30",
        f"{b64(b'not json')}.e30.sig",
        f"{b64(b'[1]')}.e30.sig",
        b64(b'{"alg":"ES256","alg":"none"}') + ".e30.sig",
        f"{b64json({'kid': 'x'})}.e30.sig",
    ],
)
def test_malformed(token: str, keys: KeySet) -> None:
    refused("token_malformed", token, keys)


def test_crit_header_is_refused(key: ECKey, keys: KeySet) -> None:
    header = b64json({"alg": "ES256", "kid": key.kid, "crit": ["x-ext"], "x-ext": 1})
    refused("token_malformed", f"{header}.{b64json(claims())}.c2ln", keys)


@pytest.mark.parametrize(
    "override",
    [
        {"exp": None},
        {"exp": "tomorrow"},
        {"exp": True},
        {"sub": None},
        {"sub": ""},
        {"sub": 7},
        {"scope": ["a"]},
        {"roles": "admin"},
        {"aud": [1]},
        {"cnf": "x"},
        {"nbf": "now"},
    ],
)
def test_claims_invalid(key: ECKey, keys: KeySet, override: dict[str, Any]) -> None:
    refused("token_claims_invalid", sign(key, claims(**override)), keys)


def test_payload_with_duplicate_claims_is_refused(key: ECKey, keys: KeySet) -> None:
    from joserfc import jws

    body = f'{{"iss":"{ISSUER}","sub":"alice","sub":"admin","aud":"ztagent","exp":{T + 60}}}'
    token = jws.serialize_compact({"alg": "ES256", "kid": key.kid}, body, key)
    refused("token_claims_invalid", token, keys)


# --- certificate binding (RFC 8705) ---------------------------------------------------------

THUMB = cert_thumbprint(b"client cert DER")


def test_cert_thumbprint_is_unpadded_base64url_sha256() -> None:
    digest = hashlib.sha256(b"client cert DER").digest()
    assert base64.urlsafe_b64encode(digest).decode().rstrip("=") == THUMB
    assert len(THUMB) == 43


def test_cnf_match_sets_cert_bound(key: ECKey, keys: KeySet) -> None:
    token = sign(key, claims(cnf={"x5t#S256": THUMB}))
    assert verify_token(token, keys, POLICY, NOW, THUMB).cert_bound is True


def test_cnf_mismatch(key: ECKey, keys: KeySet) -> None:
    token = sign(key, claims(cnf={"x5t#S256": THUMB}))
    other = cert_thumbprint(b"another cert")
    err = refused("token_cnf_mismatch", token, keys, thumbprint=other)
    assert other in err.message and THUMB in err.message
    refused("token_cnf_mismatch", token, keys, thumbprint=None)


def test_cnf_with_unsupported_method_is_refused(key: ECKey, keys: KeySet) -> None:
    refused("token_cnf_mismatch", sign(key, claims(cnf={"jkt": "abc"})), keys, thumbprint=THUMB)


def test_cnf_required_but_absent(key: ECKey, keys: KeySet) -> None:
    policy = replace(POLICY, require_cert_binding=True)
    refused("token_cnf_required", sign(key), keys, policy, thumbprint=THUMB)
    refused(
        "token_cnf_required", sign(key, claims(cnf={"jkt": "a"})), keys, policy, thumbprint=THUMB
    )
    token = sign(key, claims(cnf={"x5t#S256": THUMB}))
    assert verify_token(token, keys, policy, NOW, THUMB).cert_bound is True


# --- policy -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512", "ES999", ""])
def test_policy_refuses_none_and_hmac(alg: str) -> None:
    with pytest.raises(TokenPolicyError, match=r"^token_policy_invalid: algorithms: "):
        TokenPolicy(issuer=ISSUER, audiences=(AUDIENCE,), algorithms=("ES256", alg))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"issuer": ""}, "issuer"),
        ({"audiences": ()}, "audience"),
        ({"algorithms": ()}, "algorithms"),
        ({"leeway_s": -1}, "leeway_s"),
        ({"leeway_s": float("nan")}, "leeway_s"),
        ({"leeway_s": 301}, "leeway_s"),
        ({"max_token_bytes": 255}, "max_token_bytes"),
        ({"typ": " "}, "typ"),
    ],
)
def test_policy_validates(kwargs: dict[str, Any], key: str) -> None:
    args: dict[str, Any] = {"issuer": ISSUER, "audiences": (AUDIENCE,), **kwargs}
    with pytest.raises(TokenPolicyError) as info:
        TokenPolicy(**args)
    assert info.value.key == key


def test_naive_time_is_a_programming_error(key: ECKey, keys: KeySet) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_token(sign(key), keys, POLICY, NOW.replace(tzinfo=None), None)


# --- hostile input: a clear refusal, never an exception the caller did not ask for ---------


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -1, 10**13, 1e308])
def test_numeric_dates_out_of_range_are_refused(
    key: ECKey, keys: KeySet, claim: str, value: float
) -> None:
    """exp = 10**400 used to end in OverflowError (a traceback, UNKNOWN at the sidecar)."""
    with pytest.raises(TokenError, match=rf"^token_claims_invalid: {claim} is ") as info:
        verify_token(sign(key, claims(**{claim: value})), keys, POLICY, NOW, None)
    assert "0 to 253402300799" in info.value.message


def test_deeply_nested_json_is_refused_before_parsing(key: ECKey, keys: KeySet) -> None:
    """A header nested 3,000 deep used to raise RecursionError before the signature check,
    so any certificate holder could fill the log with tracebacks; a signed payload as deep
    is refused the same way (it is parsed only after the signature verified)."""
    from joserfc import jws

    deep = "[" * 3000 + "]" * 3000
    header = '{"alg":"ES256","kid":"k","x":' + deep + "}"
    token = ".".join([b64(header.encode()), b64(b'{"sub":"a"}'), b64(b"sig")])
    roomy = replace(POLICY, max_token_bytes=65536)
    with pytest.raises(TokenError, match=r"header nests 3001 levels deep \(expected at most 16\)"):
        verify_token(token, keys, roomy, NOW, None)
    body = json.dumps(claims())[:-1] + ', "x": ' + deep + "}"
    signed = jws.serialize_compact({"alg": "ES256", "kid": key.kid}, body, key)
    with pytest.raises(TokenError, match=r"nests 3001 levels deep"):
        verify_token(signed, keys, roomy, NOW, None)


def test_nesting_inside_strings_does_not_count(key: ECKey, keys: KeySet) -> None:
    user = verify_token(sign(key, claims(note="[[[[[[[[[[[[[[[[[[[[[[[[")), keys, POLICY, NOW, None)
    assert user.claims["note"].startswith("[[[")
