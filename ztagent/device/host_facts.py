"""Self-reported host facts (psutil, /proc, /sys): informative, never trusted for verification.

``collect_host_facts`` never raises: each fact that cannot be read is ``"unknown"``. The
result is a JSON-ready dict sent as ``Evidence.host_facts``; it always carries
``"self_reported": true`` so nobody mistakes it for attested evidence.
"""

from __future__ import annotations

import platform
import socket
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]

UNKNOWN = "unknown"
_PROC_MOUNTS = Path("/proc/mounts")
_SYS_BLOCK = Path("/sys/block")


def collect_host_facts(
    required_processes: Sequence[str] = (), forbidden_processes: Sequence[str] = ()
) -> dict[str, Any]:
    """The host facts document (keys: os, kernel, hostname, boot_time, disk_encryption,
    listening_tcp_ports, required_processes_running, forbidden_processes_running,
    self_reported)."""
    running = _process_names()
    return {
        "os": _safe(_os_name),
        "kernel": _safe(platform.release),
        "hostname": _safe(socket.gethostname),
        "boot_time": _safe(_boot_time),
        "disk_encryption": _safe(_disk_encryption),
        "listening_tcp_ports": _safe(_listening_tcp_ports),
        "required_processes_running": _presence(required_processes, running),
        "forbidden_processes_running": _presence(forbidden_processes, running),
        "self_reported": True,
    }


def _safe(read: Any) -> Any:
    try:
        value = read()
    except Exception:  # a fact we cannot read is unknown, never an error
        return UNKNOWN
    return UNKNOWN if value in (None, "") else value


def _os_name() -> str:
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        return platform.system()
    return info.get("PRETTY_NAME") or info.get("NAME") or platform.system()


def _boot_time() -> str:
    return datetime.fromtimestamp(psutil.boot_time(), UTC).isoformat(timespec="seconds")


def _disk_encryption() -> str:
    """``"dm-crypt"`` when a dm-crypt/LUKS mapping exists, else ``"unknown"`` (absence of
    evidence: an unencrypted disk and an unreadable /sys look the same from here)."""
    for uuid_file in _SYS_BLOCK.glob("dm-*/dm/uuid"):
        try:
            if uuid_file.read_text().startswith("CRYPT-"):
                return "dm-crypt"
        except OSError:
            continue
    try:
        mounts = _PROC_MOUNTS.read_text()
    except OSError:
        return UNKNOWN
    for line in mounts.splitlines():
        device = line.split(" ", 1)[0]
        if device.startswith("/dev/mapper/luks-") or "crypt" in device:
            return "dm-crypt"
    return UNKNOWN


def _listening_tcp_ports() -> list[int] | str:
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return UNKNOWN
    return sorted({c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN and c.laddr})


def _process_names() -> set[str] | None:
    try:
        names: set[str] = set()
        for proc in psutil.process_iter(["name"]):
            name = proc.info.get("name")
            if name:
                names.add(str(name))
        return names
    except Exception:
        return None


def _presence(wanted: Iterable[str], running: set[str] | None) -> dict[str, bool] | str:
    if running is None:
        return UNKNOWN
    return {name: name in running for name in wanted}
