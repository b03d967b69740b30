"""Firmware manifests: vendor tooling, signature envelope, strict parsing, digest check."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from tests.unit.posture._support import manifest_json
from ztagent.errors import ConfigError
from ztagent.posture.errors import PostureError
from ztagent.posture.firmware import (
    FirmwareManifest,
    check_firmware_digest,
    generate_firmware_key,
    key_id,
    load_trusted_keys,
    sign_manifest,
    verify_manifest,
)


@pytest.mark.parametrize("alg", ["Ed25519", "ES256"])
def test_sign_and_verify(tmp_path: Path, alg: str) -> None:
    private, public = generate_firmware_key(tmp_path, "vendor", alg)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware image")
    manifest, signature = sign_manifest(private, image, name="edge-fw", version="1.0", svn=4)
    keys = load_trusted_keys([public])
    parsed, signer = verify_manifest(manifest, signature, keys)
    assert signer == next(iter(keys)) == key_id(keys[signer])
    assert parsed.svn == 4 and parsed.version == "1.0"
    assert json.loads(signature)["alg"] == alg


def test_untrusted_key_and_bad_signature(tmp_path: Path) -> None:
    private, public = generate_firmware_key(tmp_path / "a", "vendor")
    rogue, _ = generate_firmware_key(tmp_path / "b", "rogue")
    keys = load_trusted_keys([public])
    manifest, signature = sign_manifest(rogue, b"img", name="fw", version="1", svn=0)
    with pytest.raises(PostureError, match=r"firmware_untrusted_key: .*expected one of"):
        verify_manifest(manifest, signature, keys)
    manifest, signature = sign_manifest(private, b"img", name="fw", version="1", svn=0)
    envelope = json.loads(signature)
    envelope["sig"] = base64.b64encode(b"\x00" * 64).decode()
    with pytest.raises(PostureError, match="firmware_bad_signature"):
        verify_manifest(manifest, json.dumps(envelope).encode(), keys)
    envelope["alg"] = "ES256"
    with pytest.raises(PostureError, match="firmware_bad_signature: signature alg ES256"):
        verify_manifest(manifest, json.dumps(envelope).encode(), keys)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "0 bytes"),
        (b"[]", "keys list"),
        (manifest_json(extra=1), "keys"),
        (manifest_json(svn=-1), "svn -1"),
        (manifest_json(svn=True), "svn True"),
        (manifest_json(svn="3"), "svn '3'"),
        (manifest_json(image_sha256="AB" * 32), "image_sha256"),
        (manifest_json(image_sha256="ab" * 31), "image_sha256"),
        (manifest_json(name=""), "non-empty"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 5000 + b"]" * 5000, "nested more than 32 levels"),  # not RecursionError
    ],
)
def test_manifest_junk_is_malformed(raw: bytes, match: str) -> None:
    with pytest.raises(PostureError, match=f"evidence_malformed: firmware manifest: .*{match}"):
        FirmwareManifest.parse(raw)


@pytest.mark.parametrize(
    "envelope",
    [
        b"",
        b"{}",
        b'{"key_id": "x", "alg": "RS256", "sig": ""}',
        b'{"key_id":"x","alg":"ES256","sig":"!!"}',
    ],
)
def test_signature_envelope_junk_is_malformed(envelope: bytes) -> None:
    with pytest.raises(PostureError, match="evidence_malformed: firmware signature"):
        verify_manifest(manifest_json(), envelope, {})


def test_digest_check() -> None:
    manifest = FirmwareManifest.parse(manifest_json())
    check_firmware_digest(manifest, "ab" * 32)
    with pytest.raises(PostureError, match=r"firmware_digest_mismatch: .*measured firmware cdcd"):
        check_firmware_digest(manifest, "cd" * 32)


def test_key_files(tmp_path: Path) -> None:
    generate_firmware_key(tmp_path, "vendor")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_firmware_key(tmp_path, "vendor")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match=r"posture.firmware_keys: .*not a PEM public key"):
        load_trusted_keys([tmp_path / "junk.pem"])
