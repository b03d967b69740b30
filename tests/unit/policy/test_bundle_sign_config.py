"""``[policy.keys.<id>]`` and ``policy.require_signature``: parsed, resolved, bad values name
the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztagent.config import BundleKeyConfig, load_config
from ztagent.errors import ConfigError

BASE = """
[tls]
server_cert = "s.pem"
server_key = "s.key"
client_ca = "ca.pem"
crl = "crl.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ztagent.toml"
    path.write_text(BASE + text)
    return path


def test_no_keys_by_default(tmp_path: Path) -> None:
    policy = load_config(write(tmp_path, "")).policy
    assert dict(policy.keys) == {}
    assert policy.require_signature is False


def test_keys_are_parsed_and_paths_resolved(tmp_path: Path) -> None:
    text = """
[policy]
require_signature = true

[policy.keys.release]
key = "keys/release.pem"
algorithm = "ES256"
scope = "edge"

[policy.keys."legacy-rsa"]
key = "/etc/ztagent/rsa.pem"
"""
    policy = load_config(write(tmp_path, text)).policy
    assert policy.require_signature is True
    assert policy.keys == {
        "release": BundleKeyConfig("release", tmp_path / "keys/release.pem", "ES256", "edge"),
        "legacy-rsa": BundleKeyConfig("legacy-rsa", Path("/etc/ztagent/rsa.pem"), "RS256", None),
    }


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[policy.keys.k]\nalgorithm = 'ES256'\n", "policy.keys.k.key", "is required"),
        ("[policy.keys.k]\nkey = 'k.pem'\nalgorithm = 'ES257'\n", "policy.keys.k.algorithm",
         "expected one of RS256"),
        ("[policy.keys.k]\nkey = 'k.pem'\nalgorithm = 'HS256'\n", "policy.keys.k.algorithm",
         "HMAC keys are not accepted"),
        ("[policy.keys.k]\nkey = 'k.pem'\nkeyid = 'x'\n", "policy.keys.k.keyid", "unknown key"),
        ("[policy.keys.k]\nkey = 'k.pem'\nscope = ''\n", "policy.keys.k.scope",
         "expected a non-empty string"),
        ("[policy.keys.k]\nkey = 3\n", "policy.keys.k.key", "expected a non-empty string"),
        ("[policy]\nkeys = 'k.pem'\n", "policy.keys", "expected a table"),
        ("[policy.keys]\nk = 'k.pem'\n", "policy.keys.k", "expected a table"),
        ("[policy]\nrequire_signature = true\n", "policy.require_signature",
         "needs at least one"),
        ("[policy]\nrequire_signature = 'yes'\n", "policy.require_signature",
         "expected true or false"),
        ("[policy]\nengine = 'opa'\n[policy.keys.k]\nkey = 'k.pem'\n", "policy.keys",
         "embedded engine"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == key
