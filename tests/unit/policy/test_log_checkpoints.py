"""Signed checkpoints: the format module (sign / verify / tampered fields), the decision-log
writer's checkpoints (interval, rotation, close, restart) and ``ztagent log verify --key``
against every kind of tampering. Real keys, real files, the real writer thread."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.unit.policy.test_decision_log import line_len, record
from ztagent.cli import main
from ztagent.errors import ConfigError
from ztagent.policy.decision_log import DecisionLog
from ztagent.policy.decision_record import GENESIS_PREV, line_sha256
from ztagent.policy.log_checkpoint import (
    CheckpointError,
    CheckpointKey,
    CheckpointReason,
    CheckpointSigner,
    check_signature,
    parse_checkpoint,
    verify_checkpoints,
)
from ztagent.policy.log_verify import log_files, verify_files

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def signer(kind: str = "p256") -> CheckpointSigner:
    if kind == "ed25519":
        return CheckpointSigner(ed25519.Ed25519PrivateKey.generate())
    curve = ec.SECP384R1() if kind == "p384" else ec.SECP256R1()
    return CheckpointSigner(ec.generate_private_key(curve))


def pub_pem(s: CheckpointSigner, path: Path) -> Path:
    data = s.public.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(data)
    return path


def a_line(s: CheckpointSigner, **changes: object) -> dict[str, object]:
    cp = s.checkpoint(
        CheckpointReason.INTERVAL,
        lines=10,
        head="ab" * 32,
        file_start=1,
        file_prev=GENESIS_PREV,
        now=NOW,
    )
    doc: dict[str, object] = json.loads(s.line(cp))
    body = doc["checkpoint"]
    assert isinstance(body, dict)
    body.update(changes)
    return doc


# --- the module -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "alg"), [("p256", "ES256"), ("p384", "ES384"), ("ed25519", "EdDSA")]
)
def test_sign_and_verify(kind: str, alg: str) -> None:
    s = signer(kind)
    doc = a_line(s)
    assert list(doc) == ["checkpoint", "sig", "prev_sha256"]
    parsed = parse_checkpoint(doc)
    assert parsed.checkpoint.alg == alg and parsed.prev_sha256 == "ab" * 32
    assert check_signature(parsed, [s.public]) == s.public


def test_a_key_from_a_certificate_pem_is_the_same_key(tmp_path: Path) -> None:
    from ztagent.ca import store as ca_store

    layout = ca_store.init_ca(tmp_path / "ca", now=NOW)
    key = ca_store.load_issuing(layout).key
    s = CheckpointSigner(key)
    from_cert = CheckpointKey.from_pem(layout.issuing_cert.read_bytes())
    from_chain = CheckpointKey.from_pem(layout.server_cert.read_bytes())  # leaf first
    assert from_cert.kid == s.kid
    assert from_chain.kid != s.kid


def test_wrong_key_is_refused() -> None:
    s, other = signer(), signer()
    with pytest.raises(CheckpointError, match="checkpoint_wrong_key: signed by key"):
        check_signature(parse_checkpoint(a_line(s)), [other.public])


def test_a_forged_kid_does_not_verify() -> None:
    s, attacker = signer(), signer()
    forged = a_line(attacker, kid=s.kid)  # claims the real key, signed by another
    with pytest.raises(CheckpointError, match="checkpoint_bad_signature"):
        check_signature(parse_checkpoint(forged), [s.public])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lines", 11),
        ("head", "cd" * 32),
        ("file_start", 2),
        ("file_prev", "ef" * 32),
        ("time", "2030-01-01T00:00:00.000Z"),
        ("reason", "close"),
    ],
)
def test_a_tampered_field_breaks_the_signature(field: str, value: object) -> None:
    s = signer()
    with pytest.raises(CheckpointError, match="checkpoint_bad_signature"):
        check_signature(parse_checkpoint(a_line(s, **{field: value})), [s.public])


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"checkpoint": {}, "sig": "", "prev_sha256": GENESIS_PREV}, "checkpoint fields"),
        ({"checkpoint": {}, "prev_sha256": GENESIS_PREV}, "keys"),
    ],
)
def test_malformed_checkpoints(doc: dict[str, object], match: str) -> None:
    with pytest.raises(CheckpointError, match=f"checkpoint_malformed: {match}"):
        parse_checkpoint(doc)


def test_an_extra_top_level_key_or_bad_value_is_malformed() -> None:
    s = signer()
    doc = a_line(s)
    doc["allow"] = True
    with pytest.raises(CheckpointError, match="checkpoint_malformed"):
        parse_checkpoint(doc)
    with pytest.raises(CheckpointError, match="lines -1, expected an integer >= 0"):
        parse_checkpoint(a_line(s, lines=-1))


def test_unusable_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint_key_invalid: k\.pem: not a PEM"):
        CheckpointKey.from_pem(b"garbage", "k.pem")
    with pytest.raises(CheckpointError, match="checkpoint_key_invalid"):
        CheckpointSigner.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


# --- the decision-log writer ------------------------------------------------------------------


@pytest.fixture
def key() -> CheckpointSigner:
    return signer()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log" / "decisions.jsonl"


def write_log(
    path: Path, s: CheckpointSigner, n: int, *, every: int = 10, start: int = 0, **kw: object
) -> DecisionLog:
    log = DecisionLog(path, signer=s, checkpoint_every=every, **kw)  # type: ignore[arg-type]
    log.start()
    for i in range(start, start + n):
        assert log.submit(record(i))
    assert log.close()
    return log


def docs(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def checkpoints(path: Path) -> list[dict[str, object]]:
    return [d["checkpoint"] for d in docs(path) if "checkpoint" in d]  # type: ignore[misc]


def test_interval_and_close_checkpoints(log_path: Path, key: CheckpointSigner) -> None:
    log = write_log(log_path, key, 25)
    assert log.stats.written == 25 and log.stats.checkpoints == 3
    cps = checkpoints(log_path)
    assert [(c["reason"], c["lines"]) for c in cps] == [
        ("interval", 10),
        ("interval", 21),
        ("close", 27),
    ]
    lines = log_path.read_bytes().splitlines()
    assert len(lines) == 28
    assert cps[0]["head"] == line_sha256(lines[9]) == docs(log_path)[10]["prev_sha256"]
    assert docs(log_path)[11]["prev_sha256"] == line_sha256(lines[10])  # chained like any line
    assert all(c["file_start"] == 1 and c["file_prev"] == GENESIS_PREV for c in cps)
    assert all(c["kid"] == key.kid for c in cps)
    report = verify_checkpoints([log_path], [key.public])
    assert report.ok and report.sealed and report.checkpoints == 3 and report.unanchored == 0


def test_a_restart_continues_positions_and_seals_once(
    log_path: Path, key: CheckpointSigner
) -> None:
    write_log(log_path, key, 15)
    write_log(log_path, key, 0)  # nothing new: no second closing checkpoint
    write_log(log_path, key, 7, start=15)
    cps = checkpoints(log_path)
    assert [(c["reason"], c["lines"]) for c in cps] == [
        ("interval", 10),
        ("close", 16),
        ("close", 24),  # 17 lines before the restart, then 7 decision lines
    ]
    assert verify_files([log_path]).ok
    assert verify_checkpoints([log_path], [key.public]).ok


def test_rotation_seals_each_file_and_positions_continue(
    log_path: Path, key: CheckpointSigner
) -> None:
    write_log(log_path, key, 40, every=5, max_bytes=6 * line_len(), backups=20)
    files = log_files(log_path)
    assert len(files) >= 5
    for older in files[:-1]:
        last = docs(older)[-1]
        assert "checkpoint" in last  # every rotated file ends with a checkpoint
    starts = [checkpoints(f)[0]["file_start"] for f in files]
    counted = 1
    for f, start in zip(files, starts, strict=True):
        assert start == counted
        counted += len(docs(f))
    report = verify_checkpoints(files, [key.public])
    assert report.ok and report.rotated_away == 0 and report.sealed


def test_bad_checkpoint_every_names_the_key(log_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"decision_log\.checkpoint_every"):
        DecisionLog(log_path, checkpoint_every=0)


# --- ztagent log verify --key -----------------------------------------------------------------


def verify(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["log", "verify", *map(str, args)])
    return code, capsys.readouterr().out


def rewrite_chain(path: Path, lines: list[bytes], start: int = 0) -> None:
    """Recompute every prev_sha256 from line ``start`` on (what an attacker would do)."""
    prev = line_sha256(lines[start - 1])
    out = lines[:start]
    for raw in lines[start:]:
        doc = json.loads(raw)
        doc["prev_sha256"] = prev
        if "checkpoint" in doc:
            new = json.dumps(doc, separators=(",", ":")).encode()
        else:
            keys = [k for k in doc if k != "prev_sha256"]
            new = json.dumps(
                {**{k: doc[k] for k in keys}, "prev_sha256": prev},
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
        out.append(new)
        prev = line_sha256(new)
    path.write_bytes(b"".join(line + b"\n" for line in out))


@pytest.fixture
def rotated(log_path: Path, key: CheckpointSigner, tmp_path: Path) -> tuple[Path, Path]:
    write_log(log_path, key, 60, every=10, max_bytes=12 * line_len(), backups=20)
    return log_path, pub_pem(key, tmp_path / "server.pub.pem")


def test_an_intact_rotated_log_verifies(
    rotated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, pub = rotated
    assert len(log_files(path)) >= 4
    code, out = verify(capsys, "--key", pub, "--rotated", path)
    assert code == 0, out
    assert out.startswith("OK: ") and "checkpoints verified" in out
    assert "sealed: ends with a close checkpoint" in out


def test_without_key_the_chain_is_checked_and_checkpoints_are_not(
    rotated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = rotated
    code, out = verify(capsys, "--rotated", path)
    assert code == 0 and "checkpoints NOT verified" in out


def test_an_edited_line_with_recomputed_hashes_is_refused(
    log_path: Path, key: CheckpointSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log_path, key, 30)
    pub = pub_pem(key, tmp_path / "k.pem")
    lines = log_path.read_bytes().splitlines()
    assert b'"allow":false' in lines[14]  # line 15, between the checkpoints on lines 11 and 22
    lines[14] = lines[14].replace(b'"allow":false', b'"allow":true')
    rewrite_chain(log_path, lines, 15)
    assert verify_files([log_path]).ok  # the chain alone is fooled
    code, out = verify(capsys, "--key", pub, log_path)
    assert code == 1
    assert "BROKEN checkpoint_head_mismatch" in out
    assert f"{log_path} line 22: checkpoint" in out
    assert "between the checkpoint on line 11 and this one was changed" in out


def test_dropped_head_is_refused(
    log_path: Path, key: CheckpointSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log_path, key, 200, every=100)
    pub = pub_pem(key, tmp_path / "k.pem")
    lines = log_path.read_bytes().splitlines()
    log_path.write_bytes(b"".join(line + b"\n" for line in lines[50:]))
    code, out = verify(capsys, "--key", pub, log_path)
    assert code == 1
    assert "BROKEN dropped_head" in out and "50 lines at the start of the file were removed" in out


def test_a_dropped_tail_is_reported(
    log_path: Path, key: CheckpointSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log_path, key, 25)  # checkpoints on lines 11, 22, close on 28
    pub = pub_pem(key, tmp_path / "k.pem")
    lines = log_path.read_bytes().splitlines()
    log_path.write_bytes(b"".join(line + b"\n" for line in lines[:-1]))  # the close removed
    code, out = verify(capsys, "--key", pub, log_path)
    assert code == 1
    assert "BROKEN tail_unanchored: 5 lines after the last checkpoint" in out
    assert f"({log_path} line 22)" in out
    log_path.write_bytes(b"".join(line + b"\n" for line in lines[:22]))  # cut at a checkpoint
    code, out = verify(capsys, "--key", pub, log_path)
    assert code == 1
    assert "BROKEN tail_unsealed: the log ends at the interval checkpoint" in out
    code, out = verify(capsys, "--key", pub, "--live", log_path)  # a writer still running
    assert code == 0 and "live: 0 lines after the last checkpoint" in out


def test_rotated_away_files_are_not_tampering(
    rotated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, pub = rotated
    files = log_files(path)
    gone = len(files[0].read_bytes().splitlines()) + len(files[1].read_bytes().splitlines())
    files[0].unlink()
    files[1].unlink()
    code, out = verify(capsys, "--key", pub, *files[2:])
    assert code == 0, out
    assert f"rotated away: the first {gone} lines of the chain" in out
    assert f"continues from line {gone + 1}" in out


def test_a_checkpoint_signed_by_another_key_is_refused(
    log_path: Path, key: CheckpointSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(log_path, key, 25)
    other = signer()
    code, out = verify(capsys, "--key", pub_pem(other, tmp_path / "other.pem"), log_path)
    assert code == 1 and "BROKEN checkpoint_wrong_key" in out and f"{log_path} line 11" in out
    # a checkpoint re-signed by an attacker's key (chain recomputed): refused as well
    lines = log_path.read_bytes().splitlines()
    cp = parse_checkpoint(json.loads(lines[10])).checkpoint
    lines[10] = other.line(dataclasses.replace(cp, kid=other.kid))
    rewrite_chain(log_path, lines, 11)
    code, out = verify(capsys, "--key", pub_pem(key, tmp_path / "k.pem"), log_path)
    assert code == 1 and "BROKEN checkpoint_wrong_key" in out
