"""The CA audit log: one hash-chained JSON line per event, each sealed by a signed checkpoint
line (tests/unit/ca/test_log_checkpoints_audit.py checks those), verifiable by log_verify."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.ca import store as ca_store
from ztagent.ca.audit import AuditLog, audit_path, audit_revocation, verify_audit_log
from ztagent.ca.issuance import IssuancePolicy, issue_for
from ztagent.policy.decision_record import GENESIS_PREV, line_sha256

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(tmp_path_factory.mktemp("ca") / "ca", now=NOW - timedelta(days=1)).dir


@pytest.fixture
def ca_dir(session_ca: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ca"
    shutil.copytree(session_ca, target)
    return target


def _all_lines(ca_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in audit_path(ca_dir).read_text().splitlines()]


def _lines(ca_dir: Path) -> list[dict[str, object]]:
    """The event lines (every other line is the checkpoint sealing the event before it)."""
    lines = _all_lines(ca_dir)
    assert all("checkpoint" in line for line in lines[1::2])
    return lines[0::2]


def test_events_are_chained_and_verify(ca_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_for(ca_dir, "dev-1", key.public_key(), IssuancePolicy(), NOW)
    log = AuditLog.for_ca(ca_dir)
    h1 = log.issued(
        cert, "dev-1", method="enroll", peer="ipv4:127.0.0.1:1", now=NOW, extra={"jti": "a" * 32}
    )
    log.refused(
        "token_reused",
        "dev-1",
        method="enroll",
        peer="ipv4:127.0.0.1:2",
        message="token jti aaaa… was already used",
        now=NOW,
    )
    ca_store.revoke(ca_dir, serial=cert.serial_number, now=NOW)
    audit_revocation(ca_dir, cert.serial_number, now=NOW)

    lines = _lines(ca_dir)
    assert [line["event"] for line in lines] == ["issued", "refused", "revoked"]
    assert lines[0] == {
        "time": "2026-11-26T12:00:00.000Z",
        "event": "issued",
        "device_id": "dev-1",
        "serial": format(cert.serial_number, "x"),
        "not_after": "2027-02-24T11:55:00.000Z",
        "method": "enroll",
        "peer": "ipv4:127.0.0.1:1",
        "jti": "a" * 32,
        "prev_sha256": GENESIS_PREV,
    }
    assert lines[1]["prev_sha256"] == h1
    assert lines[1]["code"] == "token_reused"
    assert lines[2]["device_id"] == "dev-1"  # looked up in ca.json
    assert lines[2]["actor"] == "cli"
    report = verify_audit_log(ca_dir)
    assert report.ok and report.lines == 6


def test_an_edited_line_breaks_the_chain(ca_dir: Path) -> None:
    log = AuditLog.for_ca(ca_dir)
    for n in range(3):
        log.refused("csr_malformed", None, method="enroll", peer=f"p{n}", message="m", now=NOW)
    path = audit_path(ca_dir)
    path.write_text(path.read_text().replace('"peer":"p1"', '"peer":"pX"'))
    report = verify_audit_log(ca_dir)
    assert not report.ok
    assert (report.code, report.first_bad_line) == ("chain_broken", 4)


def test_a_new_writer_continues_the_chain_and_drops_a_partial_line(ca_dir: Path) -> None:
    AuditLog.for_ca(ca_dir).refused("x_code", None, method="renew", peer="p", message="m", now=NOW)
    path = audit_path(ca_dir)
    first = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'{"time":"2026-11-26T12:00:01.000Z","ev')  # a crash mid-write
    AuditLog(path).refused("y_code", None, method="renew", peer="p", message="m", now=NOW)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3  # event, its checkpoint, then an unsigned writer's event
    assert json.loads(lines[2])["prev_sha256"] == line_sha256(first.splitlines()[-1])
    assert verify_audit_log(ca_dir).ok


def test_revocation_of_an_unknown_serial_is_logged_without_device(ca_dir: Path) -> None:
    audit_revocation(ca_dir, 0xABC, actor="test", now=NOW)
    (line,) = _lines(ca_dir)
    assert (line["serial"], line["device_id"], line["actor"]) == ("abc", None, "test")
    assert audit_path(ca_dir).stat().st_mode & 0o777 == 0o640
