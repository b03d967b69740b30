"""Small Rego fixtures written into tmp_path by the policy tests (not the shipped policies)."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

AUTHZ = """package ztagent.authz
import rego.v1

default allow := false

allow if {
  input.user.sub in data.ztagent.authz.users
  print("allowed", input.user.sub)
}

reasons contains "user not allowed" if not allow

decision := {"allow": allow, "reasons": reasons, "headers": {"x-policy": "fixture"}}
"""

AUTHZ_TEST = """package ztagent.authz_test
import rego.v1
import data.ztagent.authz

test_alice_allowed if authz.allow with input as {"user": {"sub": "alice"}}
test_bob_denied if not authz.allow with input as {"user": {"sub": "bob"}}
test_data_override if authz.allow with input as {"user": {"sub": "bob"}}
    with data.ztagent.authz.users as ["bob"]
test_wrong if authz.allow with input as {"user": {"sub": "mallory"}}
test_boom if 1 / count([]) == 1
"""

SAMPLE: dict[str, Any] = {
    "device": {
        "id": "demo-device",
        "spiffe_id": "spiffe://ztagent.dev/device/demo-device",
        "serial": "0a",
        "fingerprint_sha256": "0" * 64,
        "issuer": "CN=issuing",
        "not_before": "2026-11-26T00:00:00Z",
        "not_after": "2026-12-26T00:00:00Z",
    },
    "posture": {
        "verified": False,
        "age_s": None,
        "firmware": {"name": None, "version": None, "signed": False, "signer": None},
        "boot": {"verified": False, "pcrs": {}},
        "host": {},
    },
    "user": {
        "authenticated": True,
        "sub": "alice",
        "iss": "https://ztagent.dev/dev-issuer",
        "aud": ["ztagent"],
        "scope": ["storage.read"],
        "roles": ["reader"],
        "cert_bound": False,
        "claims": {},
    },
    "request": {
        "service": "ztagent.workloads.v1.Storage",
        "method": "Get",
        "full_method": "/ztagent.workloads.v1.Storage/Get",
        "metadata": {},
        "peer": "ipv4:127.0.0.1:51234",
    },
    "context": {"time": "2026-11-26T19:00:00Z", "node": "edge-01", "agent_version": "0.1.0"},
}


def input_for(sub: str, **request: str) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["user"]["sub"] = sub
    doc["request"].update(request)
    return doc


def write_tree(root: Path, files: dict[str, str | dict[str, Any]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content)
        target.write_text(text, encoding="utf-8")
    return root


def authz_dir(root: Path, users: list[str] | None = None, *, tests: bool = False) -> Path:
    files: dict[str, str | dict[str, Any]] = {
        "authz.rego": AUTHZ,
        "ztagent/authz/data.json": {"users": users if users is not None else ["alice"]},
    }
    if tests:
        files["authz_test.rego"] = AUTHZ_TEST
    return write_tree(root, files)


def make_bundle(
    path: Path,
    members: dict[str, str | bytes],
    *,
    symlink: str | None = None,
    hardlink: str | None = None,
) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        if hardlink is not None:
            info = tarfile.TarInfo(hardlink)
            info.type = tarfile.LNKTYPE
            info.linkname = "authz.rego"
            tar.addfile(info)
    return path
