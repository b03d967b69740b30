"""The ztagent command as users run it: exit codes, messages, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.integration.conftest import Pki, channel, write_config
from tests.integration.echo_upstream import SERVICE, EchoUpstream
from ztagent.cli import main

pytestmark = pytest.mark.integration

SERVE = [sys.executable, "-m", "ztagent", "serve"]


def test_ca_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "pki"
    assert main(["ca", "init", "--dir", str(target), "--trust-domain", "factory.example"]) == 0
    first = (target / "root-ca.pem").read_bytes()
    assert main(["ca", "init", "--dir", str(target)]) == 1
    assert "ca_exists" in capsys.readouterr().err
    assert (target / "root-ca.pem").read_bytes() == first
    assert main(["ca", "init", "--dir", str(target), "--force"]) == 0
    assert (target / "root-ca.pem").read_bytes() != first
    assert (target / "root-ca.key").stat().st_mode & 0o777 == 0o600


def test_cert_verify_accepts_and_explains_rejection(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(pki, {SERVICE: "127.0.0.1:1"})
    good = tmp_path / "good.pem"
    assert (
        main(
            [
                "ca",
                "issue",
                "--dir",
                str(pki.layout.dir),
                "--device-id",
                "cam-1",
                "--out",
                str(good),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["cert", "verify", str(good), "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accepted"] is True and out["device"]["id"] == "cam-1"

    assert main(["ca", "revoke", "--dir", str(pki.layout.dir), "--cert", str(good)]) == 0
    capsys.readouterr()
    assert main(["cert", "verify", str(good), "--config", str(config), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out == {"accepted": False, "error": out["error"]}
    assert out["error"]["code"] == "cert_revoked"

    long_lived = tmp_path / "long.pem"
    main(
        [
            "ca",
            "issue",
            "--dir",
            str(pki.layout.dir),
            "--device-id",
            "cam-2",
            "--out",
            str(long_lived),
            "--days",
            "365",
        ]
    )
    capsys.readouterr()
    assert main(["cert", "verify", str(long_lived), "--config", str(config)]) == 1
    assert "REJECTED" in (text := capsys.readouterr().out) and "cert_lifetime_too_long" in text
    # --json carries what was received and what was expected as fields, not only in words
    assert main(["cert", "verify", str(long_lived), "--config", str(config), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "cert_lifetime_too_long"
    assert error["expected"] == "<= 90 days" and error["received"].endswith(" days")


def test_bad_config_names_the_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[listen]\nadress = "127.0.0.1:8443"\n'
        '[tls]\nserver_cert="a"\nserver_key="b"\nclient_ca="c"\ncrl="d"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ztagent", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "config_invalid: listen.adress: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_cert_file_names_the_key(pki: Pki, tmp_path: Path) -> None:
    config = write_config(pki, {SERVICE: "127.0.0.1:1"})
    pki.layout.crl.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "ztagent", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "config_invalid: tls.crl: file not found" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_sigterm_drains_in_flight_calls(pki: Pki, upstream: EchoUpstream) -> None:
    config = write_config(pki, {SERVICE: upstream.address})
    port = _free_port()
    proc = subprocess.Popen(
        [*SERVE, "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with channel(pki, port, pki.mint("dev-drain")) as ch:
            for _ in range(100):  # until the subprocess serves
                try:
                    await ch.unary_unary(f"/{SERVICE}/Unary")(b"up", timeout=1)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            call = ch.unary_unary(f"/{SERVICE}/Sleep")(b"1.0", timeout=20)
            while upstream.seen[-1].method != "Sleep":
                await asyncio.sleep(0.02)
            os.kill(proc.pid, signal.SIGTERM)
            assert await call == b"1.0"  # finished although SIGTERM arrived mid-call
        assert await asyncio.to_thread(proc.wait, 15) == 0
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "draining in-flight calls" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_device_id_is_refused_at_the_flag(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """Parsed once, at the edge: argparse refuses it (exit 2) before any CA file is read."""
    with pytest.raises(SystemExit) as info:
        main(["ca", "token", "--dir", str(pki.layout.dir), "--device-id", "../etc"])
    assert info.value.code == 2
    assert "argument --device-id: device id '../etc' is not 1-128" in capsys.readouterr().err
