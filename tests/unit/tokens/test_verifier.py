"""TokenVerifier: bearer extraction, the verified-token cache, unknown-kid refetch."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ztagent.device.jwks_fetch import JwksSource
from ztagent.tokens import verifier as verifier_mod
from ztagent.tokens.errors import JwksError, TokenError
from ztagent.tokens.verifier import TokenVerifier, extract_bearer
from ztagent.tokens.verify import cert_thumbprint

from ._support import POLICY, FakeMonotonic, FakeWallClock, T, claims, jwks_bytes, new_key, sign


class Counting:
    """Counts calls of the pure check made by the verifier."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = verifier_mod.verify_token

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(verifier_mod, "verify_token", counted)


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, FakeMonotonic, FakeWallClock]:
    return tmp_path / "jwks.json", FakeMonotonic(), FakeWallClock()


def _verifier(path: Path, mono: FakeMonotonic, wall: FakeWallClock, **kw: Any) -> TokenVerifier:
    return TokenVerifier(JwksSource(path, clock=mono, wall_clock=wall), POLICY, wall, **kw)


# --- extract_bearer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["Bearer abc.def.ghi", "bearer abc.def.ghi", "BEARER  abc.def.ghi"]
)
def test_extract_bearer(value: str) -> None:
    assert extract_bearer(value) == "abc.def.ghi"


@pytest.mark.parametrize(
    "value",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "abc.def.ghi", "Bearer a b", "Bearer ä"],
)
def test_extract_bearer_refuses_other_shapes(value: str) -> None:
    with pytest.raises(TokenError) as info:
        extract_bearer(value)
    assert info.value.code == "token_malformed"
    assert "dXNlcjpwYXNz" not in info.value.message


# --- cache ---------------------------------------------------------------------------------


async def test_second_verify_is_served_from_the_cache(
    env: tuple[Path, FakeMonotonic, FakeWallClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, mono, wall = env
    key = new_key()
    path.write_bytes(jwks_bytes(key))
    counting = Counting(monkeypatch)
    tv = _verifier(path, mono, wall)
    token = sign(key)
    first = await tv.verify(token, None)
    assert await tv.verify(token, None) is first
    assert counting.calls == 1 and len(tv) == 1
    # another certificate thumbprint is another cache entry
    await tv.verify(token, cert_thumbprint(b"cert"))
    assert counting.calls == 2


async def test_expired_cached_token_is_refused(
    env: tuple[Path, FakeMonotonic, FakeWallClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, mono, wall = env
    key = new_key()
    path.write_bytes(jwks_bytes(key))
    counting = Counting(monkeypatch)
    tv = _verifier(path, mono, wall)
    token = sign(key, claims(exp=T + 60))
    await tv.verify(token, None)
    wall.now += timedelta(seconds=60 + POLICY.leeway_s)
    with pytest.raises(TokenError) as info:
        await tv.verify(token, None)
    assert info.value.code == "token_expired" and counting.calls == 2 and len(tv) == 0


async def test_cache_is_bounded(env: tuple[Path, FakeMonotonic, FakeWallClock]) -> None:
    path, mono, wall = env
    key = new_key()
    path.write_bytes(jwks_bytes(key))
    tv = _verifier(path, mono, wall, cache_size=3)
    for i in range(5):
        await tv.verify(sign(key, claims(sub=f"u{i}")), None)
    assert len(tv) == 3


async def test_withdrawn_key_stops_cached_tokens(
    env: tuple[Path, FakeMonotonic, FakeWallClock],
) -> None:
    path, mono, wall = env
    old, new = new_key(), new_key()
    path.write_bytes(jwks_bytes(old))
    source = JwksSource(path, clock=mono, wall_clock=wall)
    tv = TokenVerifier(source, POLICY, wall)
    token = sign(old)
    await tv.verify(token, None)
    path.write_bytes(jwks_bytes(new))
    mono.advance(301)
    await tv.verify(token, None)  # the stale set still answers while the refetch runs
    await source.idle()
    with pytest.raises(TokenError) as info:
        await tv.verify(token, None)
    assert info.value.code == "token_kid_unknown"


async def test_failures_are_not_cached_and_oversize_is_refused_first(
    env: tuple[Path, FakeMonotonic, FakeWallClock],
) -> None:
    path, mono, wall = env
    tv = _verifier(path, mono, wall)  # no JWKS file at all
    with pytest.raises(TokenError) as info:
        await tv.verify("x" * (POLICY.max_token_bytes + 1), None)
    assert info.value.code == "token_too_large"
    with pytest.raises(JwksError):
        await tv.verify(sign(new_key()), None)
    assert not tv.health().ok


# --- unknown kid -----------------------------------------------------------------------------


async def test_random_kids_do_not_flood_the_source(
    env: tuple[Path, FakeMonotonic, FakeWallClock],
) -> None:
    path, mono, wall = env
    key = new_key()
    path.write_bytes(jwks_bytes(key))
    source = JwksSource(path, clock=mono, wall_clock=wall)
    tv = TokenVerifier(source, POLICY, wall)
    await tv.prime()
    for _ in range(100):
        with pytest.raises(TokenError) as info:
            await tv.verify(sign(key, kid=secrets.token_hex(8)), None)
        assert info.value.code == "token_kid_unknown"
    assert source.fetch_count == 1
    mono.advance(30)
    for _ in range(100):
        with pytest.raises(TokenError):
            await tv.verify(sign(key, kid=secrets.token_hex(8)), None)
    assert source.fetch_count == 2


async def test_rotated_key_is_accepted_after_one_refetch(
    env: tuple[Path, FakeMonotonic, FakeWallClock],
) -> None:
    path, mono, wall = env
    old, new = new_key(), new_key()
    path.write_bytes(jwks_bytes(old))
    source = JwksSource(path, clock=mono, wall_clock=wall)
    tv = TokenVerifier(source, POLICY, wall)
    await tv.verify(sign(old), None)
    path.write_bytes(jwks_bytes(new, old))
    mono.advance(30)
    user = await tv.verify(sign(new), None)
    assert user.sub == "alice" and source.fetch_count == 2
