"""ztagent.logs: the JSON line format, credential scrubbing, handler set-up, gRPC core's
verbosity, and the [logging] section / --log-format flag that choose the format."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ztagent.config import LoggingConfig, parse_config
from ztagent.errors import ConfigError, DeniedError
from ztagent.logs import (
    REDACTED,
    JsonFormatter,
    configure_logging,
    is_credential_name,
    quiet_native_logs,
    scrub,
)
from ztagent.timefmt import parse_rfc3339


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("ztagent.test", logging.WARNING, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def line(rec: logging.LogRecord) -> dict[str, object]:
    text = JsonFormatter().format(rec)
    assert "\n" not in text
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


def test_json_line_has_time_level_logger_message() -> None:
    rec = record("fetch from %s failing", "ca://x")
    rec.created = 1764623634.12
    doc = line(rec)
    assert doc == {
        "time": "2025-12-01T21:13:54.120Z",
        "level": "WARNING",
        "logger": "ztagent.test",
        "message": "fetch from ca://x failing",
    }
    assert parse_rfc3339(str(doc["time"])).timestamp() == pytest.approx(1764623634.12)


def test_structured_fields_from_extra() -> None:
    logger = logging.getLogger("ztagent.test.extra")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.warning(
            "refused",
            extra={"code": "cert_revoked", "device_id": "cam-1", "decision_id": "d-1"},
        )
    finally:
        logger.removeHandler(handler)
    doc = json.loads(stream.getvalue())
    assert doc["code"] == "cert_revoked"
    assert doc["device_id"] == "cam-1"
    assert doc["decision_id"] == "d-1"


def test_code_from_an_error_argument() -> None:
    err = DeniedError("policy_denied", "role_required:writer")
    assert line(record("refused %s: %s", "/x.v1.S/M", err))["code"] == "policy_denied"


@pytest.mark.parametrize(
    "name",
    ["authorization", "Authorization", "bootstrap_token", "pin", "user-pin", "password",
     "db_password", "client_secret", "cookie", "api_key", "private_key", "jwt", "auth"],
)  # fmt: skip
def test_credential_names(name: str) -> None:
    assert is_credential_name(name)


@pytest.mark.parametrize("name", ["ping", "spinner", "device_id", "code", "decision_id", "key"])
def test_other_names_are_kept(name: str) -> None:
    assert not is_credential_name(name)


def test_credentials_never_reach_the_line() -> None:
    rec = record(
        "call with authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln",
        authorization="Bearer eyJhbGciOi.eyJzdWIi.c2ln",
        token="t0ps3cret",
        pin="1234",
        metadata={"x-model": "m", "authorization": "Bearer abc", "nested": [{"password": "p"}]},
        ping="kept",
    )
    doc = line(rec)
    text = json.dumps(doc)
    for secret in ("eyJhbGciOi", "t0ps3cret", "1234", "abc", '"p"'):
        assert secret not in text
    assert doc["authorization"] == doc["token"] == doc["pin"] == REDACTED
    assert doc["metadata"] == {
        "x-model": "m",
        "authorization": REDACTED,
        "nested": [{"password": REDACTED}],
    }
    assert doc["ping"] == "kept"
    assert doc["message"] == f"call with authorization: Bearer {REDACTED}"


def test_scrub_makes_values_json() -> None:
    assert scrub({"path": Path("/x"), "n": 1, "ok": True, "none": None}) == {
        "path": "/x",
        "n": 1,
        "ok": True,
        "none": None,
    }


def test_exception_is_one_field_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = logging.LogRecord(
            "ztagent.test", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    doc = line(rec)
    assert "ValueError: boom" in str(doc["exception"])


@pytest.fixture
def bare_root() -> logging.Logger:
    """A root of its own (pytest's capture handlers sit on the real one)."""
    return logging.Logger("test-root")


def test_configure_logging_switches_format(bare_root: logging.Logger) -> None:
    text, js = io.StringIO(), io.StringIO()
    configure_logging("INFO", "text", text, root=bare_root)
    bare_root.info("hello")
    configure_logging("DEBUG", "json", js, root=bare_root)
    bare_root.debug("again")
    assert len(bare_root.handlers) == 1
    assert " INFO test-root: hello" in text.getvalue()
    assert json.loads(js.getvalue())["message"] == "again"
    with pytest.raises(ValueError, match="log format 'xml'"):
        configure_logging("INFO", "xml")


def test_configure_logging_leaves_a_configured_root_alone(bare_root: logging.Logger) -> None:
    theirs = logging.NullHandler()
    bare_root.addHandler(theirs)
    configure_logging("INFO", "json", io.StringIO(), root=bare_root)
    assert bare_root.handlers == [theirs]


def test_native_log_levels_respect_the_operator() -> None:
    env: dict[str, str] = {}
    quiet_native_logs(env)
    assert env == {"GRPC_VERBOSITY": "ERROR", "TSS2_LOG": "all+NONE"}
    env = {"GRPC_VERBOSITY": "debug", "TSS2_LOG": "marshal+debug"}
    quiet_native_logs(env)
    assert env == {"GRPC_VERBOSITY": "debug", "TSS2_LOG": "marshal+debug"}


TLS = {"server_cert": "s.pem", "server_key": "s.key", "client_ca": "ca.pem"}


def test_logging_section() -> None:
    identity = {"check_crl": False}
    base = Path("/etc/ztagent")
    assert parse_config({"tls": TLS, "identity": identity}, base).logging == LoggingConfig()
    cfg = parse_config({"tls": TLS, "identity": identity, "logging": {"format": "json"}}, base)
    assert cfg.logging.format == "json"
    with pytest.raises(ConfigError, match=r"logging\.format"):
        parse_config({"tls": TLS, "identity": identity, "logging": {"format": "xml"}}, base)
    with pytest.raises(ConfigError, match=r"logging\.level"):
        parse_config({"tls": TLS, "identity": identity, "logging": {"level": "x"}}, base)


def test_flag_overrides_the_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from ztagent import logs
    from ztagent.cli import _log_format, build_parser

    chosen: list[tuple[str, str]] = []
    monkeypatch.setattr(logs, "configure_logging", lambda level, fmt: chosen.append((level, fmt)))
    _log_format(build_parser().parse_args(["ship", "--log-format", "text"]), "json")
    _log_format(build_parser().parse_args(["ship"]), "json")
    _log_format(build_parser().parse_args(["--log-level", "DEBUG", "ship"]), "text")
    _log_format(build_parser().parse_args(["ca", "serve", "--dir", "d", "--log-format", "json"]))
    assert chosen == [("INFO", "text"), ("INFO", "json"), ("DEBUG", "text"), ("INFO", "json")]


def test_a_long_running_command_logs_json(tmp_path: Path) -> None:
    """``ztagent workload storage --log-format json``: every stderr line is one object."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = tmp_path / "trust.pub"
    pub.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztagent", "workload", "storage", "--listen", "127.0.0.1:0",
         "--data", str(tmp_path / "data"), "--trust-key", str(pub), "--log-format", "json"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = []
        for raw in proc.stderr:
            lines.append(json.loads(raw))
            if "serving on" in lines[-1]["message"]:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += [json.loads(raw) for raw in (rest or "").splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(doc) for doc in lines)
    assert lines[0]["logger"].startswith("ztagent.")


def test_a_failed_command_logging_json_ends_with_a_json_line(tmp_path: Path) -> None:
    """The final error of a command that logs JSON is a JSON object with its code (a log
    pipeline gets no stray text line); with text logs it stays ``ztagent: error: ...``."""
    config = tmp_path / "ztagent.toml"
    config.write_text('[listen]\naddress = "127.0.0.1:0"\n')
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    base = [sys.executable, "-m", "ztagent", "serve", "--config", str(config)]
    done = subprocess.run([*base, "--log-format", "json"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines[-1]["level"] == "ERROR" and lines[-1]["code"] == "config_invalid"
    assert "tls: section is required" in lines[-1]["message"]  # the key named
    done = subprocess.run(base, capture_output=True, text=True, env=env)
    assert done.stderr.strip().splitlines()[-1].startswith("ztagent: error: config_invalid: ")
