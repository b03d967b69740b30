"""The one address parser, for listeners and upstreams alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztagent.addresses import AddressError, local_target, parse_address, parse_host_port
from ztagent.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("0.0.0.0:8443", "0.0.0.0:8443"),
        ("[::]:8443", "[::]:8443"),
        ("10.0.0.5:80", "10.0.0.5:80"),
        ("sidecar.node-7.example:8443", "sidecar.node-7.example:8443"),
        ("unix:/run/s.sock", "unix:/run/s.sock"),
    ],
)
def test_any_host_for_a_listener(text: str, target: str) -> None:
    assert parse_address(text).target == target


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nope", "no host"),
        ("host_name:1", "not an IP address or a host name"),
        ("[example.com]:1", "not an IP address or a host name"),
        ("::1:8443", "needs brackets"),
        ("127.0.0.1:65536", "is not 0-65535"),
    ],
)
def test_bad_shapes_say_what_they_got(text: str, why: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(text)
    assert info.value.code == "address_invalid"
    assert why in info.value.message and repr(text) in info.value.message


def test_unix_double_slash_means_the_same_everywhere(tmp_path: Path) -> None:
    """The config and the workloads disagreed on ``unix://x`` (accepted as 'x' by one,
    refused by the other): it is refused for both, since gRPC reads 'x' as an authority."""
    for local in (False, True):
        with pytest.raises(AddressError, match="needs an absolute path"):
            parse_address("unix://x", local=local)
    with pytest.raises(ConfigError, match=r"routes\[1\]\.upstream: got 'unix://x'"):
        local_target("unix://x", "routes[1].upstream", tmp_path)


def test_relative_unix_paths_resolve_against_the_base(tmp_path: Path) -> None:
    assert local_target("unix:run/s.sock", "k", tmp_path) == f"unix:{tmp_path / 'run/s.sock'}"
    assert local_target("unix:run/s.sock", "k") == "unix:run/s.sock"
    assert local_target("unix:///abs.sock", "k", tmp_path) == "unix:/abs.sock"


def test_local_refuses_the_network_and_host_port_refuses_unix() -> None:
    with pytest.raises(ConfigError, match=r"10\.0\.0\.5 is not a loopback address"):
        local_target("10.0.0.5:80", "routes[1].upstream")
    with pytest.raises(ConfigError, match="neither localhost nor an IP"):
        local_target("example.com:80", "listen")
    with pytest.raises(ConfigError, match=r"listen\.address: got 'unix:/s' \(a unix socket\)"):
        parse_host_port("unix:/s", "listen.address")
    assert parse_host_port("[::1]:0", "listen.address") == ("::1", 0)
