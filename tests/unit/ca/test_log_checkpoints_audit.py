"""The CA audit log's checkpoints: every event sealed by a checkpoint signed with the issuing
CA key, checked by ``ztagent log verify --key issuing-ca.pem audit.jsonl``."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.ca import store as ca_store
from ztagent.ca.audit import AuditLog, audit_path, audit_revocation
from ztagent.ca.issuance import IssuancePolicy, issue_for
from ztagent.cli import main
from ztagent.policy.decision_record import line_sha256

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(tmp_path_factory.mktemp("ca") / "ca", now=NOW - timedelta(days=1)).dir


@pytest.fixture
def ca_dir(session_ca: Path, tmp_path: Path) -> Path:
    """A CA with four events: two issuances, a refusal and a revocation."""
    target = tmp_path / "ca"
    shutil.copytree(session_ca, target)
    log = AuditLog.for_ca(target)
    certs = []
    for n in range(2):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_for(target, f"dev-{n}", key.public_key(), IssuancePolicy(), NOW)
        log.issued(cert, f"dev-{n}", method="enroll", peer=f"p{n}", now=NOW)
        certs.append(cert)
    log.refused("token_reused", "dev-1", method="enroll", peer="p9", message="m", now=NOW)
    ca_store.revoke(target, serial=certs[0].serial_number, now=NOW)
    audit_revocation(target, certs[0].serial_number, now=NOW)
    return target


def verify(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["log", "verify", *map(str, args)])
    return code, capsys.readouterr().out


def lines_of(ca_dir: Path) -> list[bytes]:
    return audit_path(ca_dir).read_bytes().splitlines()


def write(ca_dir: Path, lines: list[bytes]) -> None:
    audit_path(ca_dir).write_bytes(b"".join(line + b"\n" for line in lines))


def test_every_event_is_sealed_by_a_checkpoint_of_the_issuing_key(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = [json.loads(line) for line in lines_of(ca_dir)]
    assert [d.get("event", "checkpoint") for d in docs] == [
        "issued", "checkpoint", "issued", "checkpoint", "refused", "checkpoint", "revoked",
        "checkpoint",
    ]  # fmt: skip
    cps = [d["checkpoint"] for d in docs[1::2]]
    assert [c["lines"] for c in cps] == [1, 3, 5, 7]
    assert {c["reason"] for c in cps} == {"append"}
    layout = ca_store.CaLayout(ca_dir)
    code, out = verify(capsys, "--key", layout.issuing_cert, audit_path(ca_dir))
    assert code == 0, out
    assert "OK: 8 lines, hash chain intact, 4 checkpoints verified" in out
    assert "sealed: ends with a append checkpoint" in out


def test_an_edited_event_with_recomputed_hashes_is_refused(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = lines_of(ca_dir)
    assert b'"peer":"p9"' in lines[4]
    lines[4] = lines[4].replace(b'"peer":"p9"', b'"peer":"pX"')
    prev = line_sha256(lines[4])
    for i in range(5, len(lines)):  # recompute the chain after it
        doc = json.loads(lines[i])
        doc["prev_sha256"] = prev
        lines[i] = json.dumps(doc, separators=(",", ":")).encode()
        prev = line_sha256(lines[i])
    write(ca_dir, lines)
    issuing = ca_store.CaLayout(ca_dir).issuing_cert
    code, out = verify(capsys, "--key", issuing, audit_path(ca_dir))
    assert code == 1
    assert f"BROKEN checkpoint_head_mismatch: {audit_path(ca_dir)} line 6" in out


def test_a_dropped_head_and_a_cut_tail_are_refused(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issuing = ca_store.CaLayout(ca_dir).issuing_cert
    lines = lines_of(ca_dir)
    write(ca_dir, lines[2:])
    code, out = verify(capsys, "--key", issuing, audit_path(ca_dir))
    assert code == 1 and "BROKEN dropped_head" in out
    write(ca_dir, lines[:-1])  # the last event's checkpoint removed
    code, out = verify(capsys, "--key", issuing, audit_path(ca_dir))
    assert code == 1 and "BROKEN tail_unanchored: 1 lines after the last checkpoint" in out


def test_the_sidecar_key_is_not_the_ca_key(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = ca_store.CaLayout(ca_dir)
    code, out = verify(capsys, "--key", layout.server_cert, audit_path(ca_dir))
    assert code == 1 and "BROKEN checkpoint_wrong_key" in out


def test_a_checkpoint_forged_with_another_key_is_refused(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An attacker with their own key appends an event and signs its checkpoint."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    from ztagent.policy.log_checkpoint import CheckpointSigner

    AuditLog(audit_path(ca_dir), CheckpointSigner(attacker)).refused(
        "x_code", None, method="enroll", peer="evil", message="m", now=NOW
    )
    issuing = ca_store.CaLayout(ca_dir).issuing_cert
    code, out = verify(capsys, "--key", issuing, audit_path(ca_dir))
    assert code == 1 and f"BROKEN checkpoint_wrong_key: {audit_path(ca_dir)} line 10" in out
    pub = tmp_path / "attacker.pem"
    pub.write_bytes(
        attacker.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    code, out = verify(capsys, "--key", pub, audit_path(ca_dir))
    assert code == 1 and f"{audit_path(ca_dir)} line 2" in out  # the CA's own: not theirs
