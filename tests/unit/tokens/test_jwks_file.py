"""JwksSource on a file: TTL, rate-limited refetches, last good keys, health, bad sets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ztagent.device.jwks_fetch import JwksSource
from ztagent.errors import ConfigError
from ztagent.tokens.errors import JwksError
from ztagent.tokens.jwks import parse_jwks

from ._support import NOW, FakeMonotonic, FakeWallClock, jwks_bytes, new_key


@pytest.fixture
def clock() -> FakeMonotonic:
    return FakeMonotonic()


def _source(path: Path, clock: FakeMonotonic) -> JwksSource:
    return JwksSource(path, clock=clock, wall_clock=FakeWallClock())


async def test_loads_and_caches_for_the_ttl(tmp_path: Path, clock: FakeMonotonic) -> None:
    path = tmp_path / "jwks.json"
    k1, k2 = new_key(), new_key()
    path.write_bytes(jwks_bytes(k1))
    source = _source(path, clock)
    keys = await source.get_keys()
    assert [k.kid for k in keys] == [k1.kid]
    assert source.health().ok and source.health().fetched_at == NOW
    path.write_bytes(jwks_bytes(k2))
    clock.advance(299)
    assert await source.get_keys() is keys and source.fetch_count == 1
    clock.advance(1)
    assert await source.get_keys() is keys  # stale: refetched in the background, not awaited
    await source.idle()
    assert [k.kid for k in await source.get_keys()] == [k2.kid]
    assert source.fetch_count == 2


async def test_unchanged_document_keeps_the_same_key_set_object(
    tmp_path: Path, clock: FakeMonotonic
) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_bytes(new_key()))
    source = _source(path, clock)
    first = await source.get_keys()
    clock.advance(301)
    assert await source.get_keys() is first
    await source.idle()
    assert await source.get_keys() is first and source.fetch_count == 2


async def test_unknown_kid_refresh_is_rate_limited(tmp_path: Path, clock: FakeMonotonic) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_bytes(new_key()))
    source = _source(path, clock)
    await source.get_keys()
    results = [await source.refresh_for_unknown_kid() for _ in range(100)]
    assert results == [False] * 100 and source.fetch_count == 1
    clock.advance(30)
    results = await asyncio.gather(*(source.refresh_for_unknown_kid() for _ in range(100)))
    assert all(results) and source.fetch_count == 2  # concurrent callers shared one fetch


async def test_failed_refresh_keeps_last_good_keys(tmp_path: Path, clock: FakeMonotonic) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks_bytes(key := new_key()))
    source = _source(path, clock)
    good = await source.get_keys()
    path.write_text("{not json")
    clock.advance(301)
    assert await source.get_keys() is good
    await source.idle()
    health = source.health()
    assert not health.ok and health.fetched_at == NOW
    assert health.last_error is not None and "jwks_invalid" in health.last_error
    path.unlink()
    clock.advance(30)
    assert await source.get_keys() is good
    await source.idle()
    assert "jwks_unavailable" in (source.health().last_error or "")
    path.write_bytes(jwks_bytes(key))
    clock.advance(30)
    await source.get_keys()
    await source.idle()
    assert source.health().ok and source.health().last_error is None


async def test_no_key_set_ever_loaded_raises(tmp_path: Path, clock: FakeMonotonic) -> None:
    source = _source(tmp_path / "absent.json", clock)
    with pytest.raises(JwksError) as info:
        await source.get_keys()
    assert info.value.code == "jwks_unavailable" and "absent.json" in info.value.message
    with pytest.raises(JwksError):  # inside the interval: refused without another attempt
        await source.get_keys()
    assert source.fetch_count == 1
    assert not source.health().ok and source.health().fetched_at is None


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (b"[]", "no 'keys' list"),
        (b"[" * 5000 + b"]" * 5000, "nested more than 32 levels"),  # from the network
        (b'{"keys": []}', "no public signing keys"),
        (b'{"keys": [1]}', "not an object"),
        (json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(), "symmetric"),
        (json.dumps({"keys": [{"kty": "EC", "use": "enc", "crv": "P-256"}]}).encode(), "no public"),
        (json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}).encode(), ""),
    ],
)
def test_parse_jwks_refuses_bad_sets(doc: bytes, needle: str) -> None:
    with pytest.raises(JwksError) as info:
        parse_jwks(doc)
    assert info.value.code == "jwks_invalid" and needle in info.value.message


def test_parse_jwks_refuses_private_keys() -> None:
    doc = json.dumps({"keys": [new_key().as_dict(private=True)]}).encode()
    with pytest.raises(JwksError, match="private"):
        parse_jwks(doc)


def test_http_url_and_bad_ca_bundle_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        JwksSource("http://issuer.example/jwks.json")
    assert info.value.key == "tokens.jwks_url"
    with pytest.raises(ConfigError) as info:
        JwksSource("https://issuer.example/jwks.json", ca_bundle=tmp_path / "none.pem")
    assert info.value.key == "tokens.jwks_ca_bundle"
