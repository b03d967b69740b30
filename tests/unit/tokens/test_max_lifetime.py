"""``tokens.max_lifetime_s``: a user token granted for longer than the cap is refused
``token_lifetime_too_long`` (``exp - iat``; ``exp - now`` when the token has no ``iat``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, KeySet

from ztagent.config import load_config
from ztagent.errors import ConfigError
from ztagent.tokens.errors import TokenError, TokenPolicyError
from ztagent.tokens.policy import TokenPolicy
from ztagent.tokens.verify import verify_token

from ._support import AUDIENCE, ISSUER, NOW, POLICY, T, claims, new_key, public_set, sign

CAPPED = replace(POLICY, max_lifetime_s=3600)


@pytest.fixture(scope="module")
def key() -> ECKey:
    return new_key()


@pytest.fixture(scope="module")
def keys(key: ECKey) -> KeySet:
    return public_set(key)


def test_a_token_over_the_cap_is_refused(key: ECKey, keys: KeySet) -> None:
    token = sign(key, claims(iat=T - 60, exp=T - 60 + 3601))
    with pytest.raises(TokenError, match=r"^token_lifetime_too_long: token lives 3601 s") as info:
        verify_token(token, keys, CAPPED, NOW, None)
    err = info.value
    assert err.rpc_status() == "UNAUTHENTICATED"
    assert "- iat 2026-11-26T11:59:00Z" in err.message
    assert "expected at most 3600 s, tokens.max_lifetime_s" in err.message
    assert (err.received, err.expected) == (3601, 3600)


def test_a_token_at_the_cap_is_accepted(key: ECKey, keys: KeySet) -> None:
    token = sign(key, claims(iat=T - 60, exp=T - 60 + 3600))
    assert verify_token(token, keys, CAPPED, NOW, None).sub == "alice"


def test_without_a_cap_any_lifetime_is_accepted(key: ECKey, keys: KeySet) -> None:
    token = sign(key, claims(iat=T - 60, exp=T + 365 * 86400))
    assert POLICY.max_lifetime_s is None
    assert verify_token(token, keys, POLICY, NOW, None).sub == "alice"


def test_without_iat_exp_minus_now_is_used(key: ECKey, keys: KeySet) -> None:
    # exp - now = 3600: at the cap; one second more is over it
    assert verify_token(sign(key, claims(iat=None, exp=T + 3600)), keys, CAPPED, NOW, None)
    with pytest.raises(TokenError, match=r"^token_lifetime_too_long: token lives 3601 s") as info:
        verify_token(sign(key, claims(iat=None, exp=T + 3601)), keys, CAPPED, NOW, None)
    assert "- now 2026-11-26T12:00:00Z" in info.value.message
    # the same token seen later has less left: accepted then
    later = NOW.replace(second=1)
    assert verify_token(sign(key, claims(iat=None, exp=T + 3601)), keys, CAPPED, later, None)


def test_an_old_iat_is_measured_from_iat_not_now(key: ECKey, keys: KeySet) -> None:
    """Issued 2 h ago for 2 h 30 min: only 30 min left, but its lifetime is over the cap."""
    token = sign(key, claims(iat=T - 7200, nbf=T - 7200, exp=T + 1800))
    with pytest.raises(TokenError, match=r"^token_lifetime_too_long: token lives 9000 s"):
        verify_token(token, keys, CAPPED, NOW, None)


@pytest.mark.parametrize("cap", [0, 0.5, -1, float("nan"), float("inf")])
def test_the_policy_refuses_a_cap_below_one_second(cap: float) -> None:
    with pytest.raises(TokenPolicyError, match=r"^token_policy_invalid: max_lifetime_s: ") as info:
        TokenPolicy(issuer=ISSUER, audiences=(AUDIENCE,), max_lifetime_s=cap)
    assert info.value.key == "max_lifetime_s"


CONFIG = """
[tls]
server_cert = "s.pem"
server_key = "s.key"
client_ca = "ca.pem"
crl = "crl.pem"

[[routes]]
service = "ztagent.workloads.v1.Storage"
upstream = "127.0.0.1:50061"

[tokens]
issuer = "https://issuer.example"
audience = "ztagent"
jwks_file = "jwks.json"
"""


def _load(tmp_path: Path, extra: str) -> TokenPolicy:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    path = tmp_path / "ztagent.toml"
    path.write_text(CONFIG + extra)
    tokens = load_config(path).tokens
    assert tokens is not None
    return tokens.policy


def test_config_default_is_no_cap(tmp_path: Path) -> None:
    assert _load(tmp_path, "").max_lifetime_s is None


def test_config_sets_the_cap(tmp_path: Path) -> None:
    assert _load(tmp_path, "max_lifetime_s = 3600\n").max_lifetime_s == 3600
    assert _load(tmp_path, "max_lifetime_s = 1.5\n").max_lifetime_s == 1.5


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("0", "expected a number >= 1 seconds"),
        ("0.5", "expected a number >= 1 seconds"),
        ("-3600", "expected a number >= 1 seconds"),
        ("nan", "expected a number >= 1 seconds"),
        ("'1h'", "expected a number, got '1h'"),
        ("true", "expected a number, got True"),
    ],
)
def test_config_validates_the_cap(tmp_path: Path, value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^config_invalid: tokens\.max_lifetime_s: ") as info:
        _load(tmp_path, f"max_lifetime_s = {value}\n")
    assert info.value.key == "tokens.max_lifetime_s"
    assert why in info.value.message
