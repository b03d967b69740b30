"""SpiffeId parsing: each bad shape has its own message; device ids."""

from __future__ import annotations

import pytest

from ztagent.pki.errors import CertError
from ztagent.pki.spiffe import (
    DeviceId,
    SpiffeId,
    TrustDomain,
    device_spiffe_id,
    parse_device_id,
)


def test_parses_a_device_id() -> None:
    sid = SpiffeId.parse("spiffe://ztagent.dev/device/dev-1")
    assert sid == SpiffeId("ztagent.dev", "/device/dev-1")
    assert str(sid) == "spiffe://ztagent.dev/device/dev-1"
    assert parse_device_id(sid) == "dev-1"
    assert hash(sid) == hash(SpiffeId("ztagent.dev", "/device/dev-1"))


def test_trust_domain_only_is_valid() -> None:
    assert SpiffeId.parse("spiffe://ztagent.dev").path == ""


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("", "SPIFFE ID is empty"),
        ("https://ztagent.dev/device/a", r"scheme of .* is 'https' \(expected 'spiffe'"),
        ("spiffe:/ztagent.dev/device/a", r"scheme of .* is 'spiffe' \(expected 'spiffe' followed"),
        ("SPIFFE://ztagent.dev/device/a", "scheme of .* is 'SPIFFE'"),
        ("spiffe:///device/a", "trust domain is missing"),
        ("spiffe://ZTAGENT.dev/device/a", "trust domain 'ZTAGENT.dev' must be lowercase"),
        ("spiffe://zt agent/device/a", r"outside \[a-z0-9._-\]"),
        ("spiffe://ztagent.dev:443/device/a", "must not have a port"),
        ("spiffe://user@ztagent.dev/device/a", "must not have userinfo"),
        ("spiffe://ztagent.dev/device/a?x=1", "must not have a query"),
        ("spiffe://ztagent.dev/device/a#frag", "must not have a fragment"),
        ("spiffe://ztagent.dev/device//a", "has an empty segment"),
        ("spiffe://ztagent.dev/device/a/", "must not end with '/'"),
        ("spiffe://ztagent.dev/", "must not end with '/'"),
        ("spiffe://ztagent.dev/device/../a", "has a dot segment '..'"),
        ("spiffe://ztagent.dev/./a", "has a dot segment '.'"),
        ("spiffe://ztagent.dev/device/a%20b", r"segment 'a%20b' has characters outside"),
        ("spiffe://" + "a" * 256, "trust domain is 256 characters"),
        ("spiffe://ztagent.dev/" + "a" * 2100, "SPIFFE ID is 2121 characters"),
    ],
)
def test_rejects_each_bad_shape(uri: str, match: str) -> None:
    with pytest.raises(CertError, match=match) as info:
        SpiffeId.parse(uri)
    assert info.value.code == "spiffe_id_invalid"


def test_constructor_validates_too() -> None:
    with pytest.raises(CertError, match="must start with '/'"):
        SpiffeId("ztagent.dev", "device/a")


@pytest.mark.parametrize("path", ["", "/device", "/device/a/b", "/devices/a", "/x/device/a"])
def test_parse_device_id_requires_device_path(path: str) -> None:
    with pytest.raises(CertError, match="expected exactly '/device/<id>'") as info:
        parse_device_id(SpiffeId("ztagent.dev", path))
    assert info.value.code == "spiffe_id_not_device"


@pytest.mark.parametrize("device_id", ["", ".", "..", "a b", "a/b", "ä", "x" * 129])
def test_device_id_rejects(device_id: str) -> None:
    with pytest.raises(CertError, match=r"is not 1-128 characters") as info:
        DeviceId(device_id)
    assert info.value.code == "spiffe_id_not_device"


def test_device_spiffe_id() -> None:
    assert device_spiffe_id("ztagent.dev", "Dev_1.a-b") == "spiffe://ztagent.dev/device/Dev_1.a-b"
    assert DeviceId("x" * 128) == "x" * 128
    with pytest.raises(CertError, match="must be lowercase"):
        device_spiffe_id("Ztagent.dev", "a")


def test_value_objects_are_parsed_once_and_stay_strings() -> None:
    device = DeviceId("cam-17")
    assert isinstance(device, str) and device == "cam-17"
    assert DeviceId(device) is device  # already checked: not parsed again
    assert str(device.spiffe_id("ztagent.dev")) == "spiffe://ztagent.dev/device/cam-17"
    domain = TrustDomain("ztagent.dev")
    assert TrustDomain(domain) is domain
    assert isinstance(SpiffeId("ztagent.dev", "/x").trust_domain, TrustDomain)
    assert type(parse_device_id(SpiffeId.parse("spiffe://ztagent.dev/device/a"))) is DeviceId
    with pytest.raises(CertError, match="must be lowercase") as info:
        TrustDomain("Ztagent.dev")
    assert info.value.code == "spiffe_id_invalid"
    with pytest.raises(CertError, match="at most 255"):
        TrustDomain("a" * 256)
