"""Self-reported host facts: the document's shape, and that nothing in it can raise."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.fixtures.ci import skip_unless_ci
from ztagent.device import host_facts as host
from ztagent.device.host_facts import UNKNOWN, collect_host_facts

KEYS = {
    "os",
    "kernel",
    "hostname",
    "boot_time",
    "disk_encryption",
    "listening_tcp_ports",
    "required_processes_running",
    "forbidden_processes_running",
    "self_reported",
}


def test_shape_and_values_on_this_host() -> None:
    me = psutil.Process(os.getpid()).name()
    facts = collect_host_facts(required_processes=[me], forbidden_processes=["no-such-proc-x"])
    assert set(facts) == KEYS
    assert facts["self_reported"] is True
    assert facts["hostname"] == socket.gethostname()
    assert facts["kernel"] == os.uname().release
    assert datetime.fromisoformat(facts["boot_time"]).tzinfo is not None
    assert facts["disk_encryption"] in ("dm-crypt", UNKNOWN)
    ports = facts["listening_tcp_ports"]
    assert ports == UNKNOWN or (
        ports == sorted(set(ports)) and all(isinstance(p, int) for p in ports)
    )
    assert facts["required_processes_running"] == {me: True}
    assert facts["forbidden_processes_running"] == {"no-such-proc-x": False}
    json.dumps(facts)  # goes on the wire as JSON


def test_a_listening_socket_is_reported() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ports = collect_host_facts()["listening_tcp_ports"]
        if ports == UNKNOWN:
            skip_unless_ci("psutil.net_connections needs privileges here")
        assert server.getsockname()[1] in ports


def test_nothing_raises_when_every_source_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    def denied(*args: object, **kwargs: object) -> None:
        raise psutil.AccessDenied()

    monkeypatch.setattr(host.psutil, "boot_time", boom)
    monkeypatch.setattr(host.psutil, "net_connections", denied)
    monkeypatch.setattr(host.psutil, "process_iter", boom)
    monkeypatch.setattr(host.platform, "release", boom)
    monkeypatch.setattr(host.platform, "freedesktop_os_release", boom)
    monkeypatch.setattr(host.socket, "gethostname", boom)
    monkeypatch.setattr(host, "_SYS_BLOCK", Path("/nonexistent/sys/block"))
    monkeypatch.setattr(host, "_PROC_MOUNTS", Path("/nonexistent/proc/mounts"))

    facts = collect_host_facts(required_processes=["sshd"], forbidden_processes=["nc"])
    assert set(facts) == KEYS
    assert facts["self_reported"] is True
    for key in KEYS - {"self_reported"}:
        assert facts[key] == UNKNOWN, key


def test_dm_crypt_is_detected_from_sys_block_or_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys_block = tmp_path / "block"
    (sys_block / "dm-0" / "dm").mkdir(parents=True)
    (sys_block / "dm-0" / "dm" / "uuid").write_text("LVM-abc\n")
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n")
    monkeypatch.setattr(host, "_SYS_BLOCK", sys_block)
    monkeypatch.setattr(host, "_PROC_MOUNTS", mounts)
    assert collect_host_facts()["disk_encryption"] == UNKNOWN

    (sys_block / "dm-1" / "dm").mkdir(parents=True)
    (sys_block / "dm-1" / "dm" / "uuid").write_text("CRYPT-LUKS2-0123-root\n")
    assert collect_host_facts()["disk_encryption"] == "dm-crypt"

    (sys_block / "dm-1" / "dm" / "uuid").write_text("LVM-def\n")
    mounts.write_text("/dev/mapper/luks-0123 / ext4 rw 0 0\n")
    assert collect_host_facts()["disk_encryption"] == "dm-crypt"
