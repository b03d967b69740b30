"""Config: valid files load; every bad key or value is refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztagent.config import load_config, parse_config
from ztagent.errors import ConfigError

BASE = """
[tls]
server_cert = "s.pem"
server_key = "s.key"
client_ca = "ca.pem"
crl = "crl.pem"

[[routes]]
service = "ztagent.workloads.v1.Storage"
upstream = "127.0.0.1:50061"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ztagent.toml"
    path.write_text(text)
    return path


def test_example_config_at_repo_root_loads() -> None:
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "ztagent.toml")
    assert config.listen.address == "127.0.0.1:8443"
    assert config.identity.trust_domain == "ztagent.dev"
    assert config.route_for("ztagent.workloads.v1.Storage") is not None
    assert config.tls.client_ca == root / "certs-dev" / "ca-bundle.pem"


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.tls.server_cert == tmp_path / "s.pem"
    assert config.identity.max_cert_lifetime_days == 90
    assert config.identity.crl_failure_mode == "closed"
    assert config.routes[0].timeout_s is None


def test_the_decision_log_writer_is_a_thread_unless_a_process_is_asked_for(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ztagent.policy.decision_log import DecisionLog
    from ztagent.sidecar.log_writer import ProcessDecisionLog
    from ztagent.sidecar.server import build_decision_log

    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "s.key").write_bytes(key)
    default = load_config(write(tmp_path, BASE))
    assert default.decision_log.writer == "thread"
    assert isinstance(build_decision_log(default), DecisionLog)
    process = load_config(write(tmp_path, BASE + "[decision_log]\nwriter = 'process'\n"))
    assert isinstance(build_decision_log(process), ProcessDecisionLog)


def test_listen_override(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), listen_address="127.0.0.1:0")
    assert config.listen.address == "127.0.0.1:0"


@pytest.mark.parametrize(
    ("extra", "key", "why"),
    [
        ("[bogus]\nx = 1\n", "bogus", "unknown section"),
        ("[listen]\nadress = '127.0.0.1:1'\n", "listen.adress", "unknown key"),
        ("[listen]\naddress = 'nope'\n", "listen.address", "expected host:port"),
        ("[listen]\naddress = '127.0.0.1:70000'\n", "listen.address", "is not 0-65535"),
        ("[listen]\ngrace_period_s = -1\n", "listen.grace_period_s", "expected >= 0"),
        ("[listen]\nmax_message_bytes = 'big'\n", "listen.max_message_bytes", "integer"),
        ("[listen]\nworkers = 0\n", "listen.workers", "expected >= 1, got 0"),
        ("[metrics]\nenabled = 'yes'\n", "metrics.enabled", "true or false"),
        ("[metrics]\naddress = 'nope'\n", "metrics.address", "expected host:port"),
        ("[metrics]\nport = 9464\n", "metrics.port", "unknown key"),
        ("[health]\naddress = 'unix:/run/h.sock'\n", "health.address", "expected host:port"),
        ("[health]\naddress = 8086\n", "health.address", "string"),
        ("[health]\nport = 8086\n", "health.port", "unknown key"),
        (
            "[tokens]\nissuer = 'i'\naudience = 'a'\njwks_file = 'j'\njwks_fetch_timeout_s = 0\n",
            "tokens.jwks_fetch_timeout_s",
            ">= 0.05",
        ),
        ("[listen]\nworkers = 65\n", "listen.workers", "expected <= 64, got 65"),
        ("[decision_log]\nwriter = 'fork'\n", "decision_log.writer", "thread, process"),
        ("[listen]\nworkers = 2.5\n", "listen.workers", "integer"),
        ("[identity]\ntrust_domain = 'Bad Domain'\n", "identity.trust_domain", "lowercase"),
        ("[identity]\nmax_cert_lifetime_days = 0\n", "identity.max_cert_lifetime_days", ">= 1"),
        ("[identity]\ncheck_crl = 'yes'\n", "identity.check_crl", "true or false"),
        ("[identity]\ncrl_failure_mode = 'maybe'\n", "identity.crl_failure_mode", "closed, open"),
        (
            "[[routes]]\nservice = 'a.B'\nupstream = '10.0.0.5:80'\n",
            "routes[1].upstream",
            "is not a loopback address",
        ),
        ("[[routes]]\nservice = 'a/B'\nupstream = 'unix:/x'\n", "routes[1].service", "service"),
        ("[[routes]]\nservice = \"a.B\\n\"\nupstream = 'unix:/x'\n", "routes[1].service", "a.B"),
        (
            "[[routes]]\nservice = 'ztagent.workloads.v1.Storage'\nupstream = 'unix:/x'\n",
            "routes[1].service",
            "duplicate",
        ),
        ("[[routes]]\nservice = 'a.B'\n", "routes[1].upstream", "required"),
        (
            "[[routes]]\nservice = 'a.B'\nupstream = 'unix:/x'\ncolour = 1\n",
            "routes[1].colour",
            "unknown",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, extra: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        load_config(write(tmp_path, BASE + extra))
    assert info.value.key == key
    assert info.value.code == "config_invalid"


def test_missing_tls_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section is required") as info:
        parse_config({}, tmp_path)
    assert info.value.key == "tls"


def test_crl_required_while_checking(tmp_path: Path) -> None:
    text = BASE.replace('crl = "crl.pem"\n', "")
    with pytest.raises(ConfigError, match=r"required while identity\.check_crl") as info:
        load_config(write(tmp_path, text))
    assert info.value.key == "tls.crl"
    config = load_config(write(tmp_path, text + "[identity]\ncheck_crl = false\n"))
    assert config.tls.crl is None


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[tls\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_relative_unix_upstream_is_resolved_against_the_config_dir(tmp_path: Path) -> None:
    text = BASE.replace('upstream = "127.0.0.1:50061"', 'upstream = "unix:run/storage.sock"')
    config = load_config(write(tmp_path, text))
    assert config.routes[0].upstream == f"unix:{tmp_path / 'run' / 'storage.sock'}"
    absolute = BASE.replace('upstream = "127.0.0.1:50061"', 'upstream = "unix:/tmp/s.sock"')
    assert load_config(write(tmp_path, absolute)).routes[0].upstream == "unix:/tmp/s.sock"


TOKENS = """
[tokens]
issuer = "https://issuer.example"
audience = "ztagent"
jwks_file = "jwks.json"
"""


def test_the_token_rules_are_the_verifiers_own(tmp_path: Path) -> None:
    """The config builds the verifier's TokenPolicy: one rule, so the two cannot drift (the
    config used to refuse Ed25519, which the verifier accepts, and to allow any leeway)."""
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    text = BASE + TOKENS + 'algorithms = ["Ed25519", "ES256"]\n'
    policy = load_config(write(tmp_path, text)).tokens
    assert policy is not None and policy.policy.algorithms == ("Ed25519", "ES256")
    for line, key, why in [
        ("leeway_s = 301", "tokens.leeway_s", "expected 0 to 300 seconds"),
        ("max_token_bytes = 100", "tokens.max_token_bytes", "expected at least 256"),
        ('algorithms = ["HS256"]', "tokens.algorithms", "never none or HMAC"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, BASE + TOKENS + line + "\n"))
        assert info.value.key == key and why in info.value.message


def test_the_identity_rules_are_the_device_checks_own(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, BASE + "[identity]\ncrl_grace_s = 60\ncrl_failure_mode = 'open'\n")
    )
    assert config.identity.policy.crl_grace.total_seconds() == 60
    assert config.identity.policy.crl_fail_open
    with pytest.raises(ConfigError, match=r"identity\.trust_domain: trust domain 'a b'"):
        load_config(write(tmp_path, BASE + "[identity]\ntrust_domain = 'a b'\n"))


def test_policy_input_headers_are_an_allow_list(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.policy.input_headers.names == {"x-model"}
    text = BASE + '[policy]\ninput_headers = ["x-model", "x-request-id"]\n'
    assert load_config(write(tmp_path, text)).policy.input_headers.names == {
        "x-model",
        "x-request-id",
    }
    bad = BASE + '[policy]\ninput_headers = ["x-refresh-token"]\n'
    with pytest.raises(ConfigError, match=r"policy\.input_headers: 'x-refresh-token' looks like"):
        load_config(write(tmp_path, bad))
