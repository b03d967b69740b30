"""Two ``ztagent ca serve`` replicas on one real PostgreSQL (started by the test).

Each replica is its own process with its own copy of the CA directory (the keys, as a
deployment would mount them; its own audit log), and both use the same database
(``--db postgresql://...``). What must hold:

- one bootstrap token redeemed by 10 clients at once through both replicas: exactly one
  enrollment succeeds, the others get ``token_reused``;
- a device enrolled at replica A renews at replica B; a revocation made at A is in the CRL B
  serves (the newest CRL any replica signed is in the database);
- replica A killed with SIGKILL in the middle of enrollments: B keeps serving, every
  certificate a client received is in the database, and no token was used twice.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.fixtures.postgres import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
from ztagent._proto.v1 import enrollment_pb2, enrollment_pb2_grpc
from ztagent.ca.db import open_database
from ztagent.device.enroll import enroll, renew
from ztagent.enrollment import EnrollError
from ztagent.errors import ZtagentError

pytestmark = pytest.mark.integration

ZTAGENT = [sys.executable, "-m", "ztagent"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ztagent(*args: str) -> str:
    done = subprocess.run([*ZTAGENT, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"ztagent {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def _certificates_of(dsn: str, device_id: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM issued WHERE device_id = %s", (device_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


@dataclass
class Replica:
    name: str
    ca_dir: Path
    enroll_port: int
    renew_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.enroll_port}"

    @property
    def renew_address(self) -> str:
        return f"127.0.0.1:{self.renew_port}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _start(name: str, ca_dir: Path, dsn: str, tmp: Path) -> Replica:
    enroll_port, renew_port = _free_port(), _free_port()
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*ZTAGENT, "ca", "serve", "--dir", str(ca_dir), "--db", dsn,
             "--listen", f"127.0.0.1:{enroll_port}", "--renew-listen", f"127.0.0.1:{renew_port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    replica = Replica(name, ca_dir, enroll_port, renew_port, proc, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{name} exited:\n{log.read_text()}"
        try:
            with socket.create_connection(("127.0.0.1", enroll_port), timeout=1):
                return replica
        except OSError:
            time.sleep(0.1)
    replica.stop(signal.SIGKILL)
    pytest.fail(f"{name} not listening after 30 s:\n{log.read_text()}")


@dataclass
class Fleet:
    dsn: str
    ca_dir: Path
    a: Replica
    b: Replica
    tmp: Path

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "ca-bundle.pem"

    def token(self, device: str) -> str:
        return _ztagent("ca", "token", "--dir", str(self.ca_dir), "--db", self.dsn,
                        "--device-id", device).strip()  # fmt: skip


@pytest.fixture
def fleet(postgres_dsn: str, tmp_path: Path) -> Iterator[Fleet]:
    ca_dir = tmp_path / "ca"
    _ztagent("ca", "init", "--dir", str(ca_dir), "--db", postgres_dsn)
    copies = []
    for name in ("a", "b"):  # each replica mounts its own copy of the keys
        copy = tmp_path / f"replica-{name}"
        shutil.copytree(ca_dir, copy)
        copies.append(copy)
    a = _start("a", copies[0], postgres_dsn, tmp_path)
    try:
        b = _start("b", copies[1], postgres_dsn, tmp_path)
    except BaseException:
        a.stop()
        raise
    try:
        yield Fleet(postgres_dsn, ca_dir, a, b, tmp_path)
    finally:
        a.stop()
        b.stop()


async def _try_enroll(fleet: Fleet, replica: Replica, token: str, out: Path) -> str:
    try:
        result = await enroll(
            replica.address, token, fleet.bundle, out, renew_server=replica.renew_address
        )
    except ZtagentError as err:  # a refusal, or the replica gone (ca_unreachable)
        return err.code
    return f"ok:{result.serial}"


async def test_one_token_redeemed_at_both_replicas_at_once_enrolls_once(fleet: Fleet) -> None:
    token = fleet.token("cam-race")
    outcomes = await asyncio.gather(
        *(
            _try_enroll(fleet, (fleet.a, fleet.b)[i % 2], token, fleet.tmp / f"dev-{i}")
            for i in range(10)
        )
    )
    ok = [o for o in outcomes if o.startswith("ok:")]
    assert len(ok) == 1, outcomes
    assert sorted(set(outcomes) - set(ok)) == ["token_reused"], outcomes
    db = open_database(fleet.ca_dir, fleet.dsn)
    entry = db.issued(int(ok[0].removeprefix("ok:"), 16))
    assert entry is not None and entry.device_id == "cam-race"
    db.close()


async def test_enrolled_at_a_renewed_at_b_revoked_at_a_refused_in_bs_crl(fleet: Fleet) -> None:
    device = fleet.tmp / "cam-1"
    first = await enroll(
        fleet.a.address, fleet.token("cam-1"), fleet.bundle, device,
        renew_server=fleet.a.renew_address,
    )  # fmt: skip
    renewed = await renew(device, server=fleet.b.renew_address)  # the other replica
    assert renewed.serial != first.serial
    _ztagent(
        "ca", "revoke", "--dir", str(fleet.a.ca_dir), "--db", fleet.dsn,
        "--cert", str(device / "device.pem"),
    )  # fmt: skip
    creds = grpc.ssl_channel_credentials(root_certificates=fleet.bundle.read_bytes())
    async with grpc.aio.secure_channel(fleet.b.address, creds) as channel:
        reply = await enrollment_pb2_grpc.EnrollmentStub(channel).GetCRL(
            enrollment_pb2.GetCRLRequest(), timeout=10
        )
    crl = x509.load_pem_x509_crl(reply.crl)
    assert crl.get_revoked_certificate_by_serial_number(int(renewed.serial, 16)) is not None
    # and the revoked certificate can no longer renew, at either replica
    for replica in (fleet.a, fleet.b):
        with pytest.raises(EnrollError) as info:
            await renew(device, server=replica.renew_address)
        assert info.value.code == "renew_cert_revoked"


async def test_a_replica_killed_mid_load_loses_nothing(fleet: Fleet) -> None:
    tokens = {f"cam-{i}": fleet.token(f"cam-{i}") for i in range(16)}
    received: list[str] = []

    async def device(i: int, replica: Replica) -> str:
        name = f"cam-{i}"
        outcome = await _try_enroll(fleet, replica, tokens[name], fleet.tmp / name)
        if outcome.startswith("ok:"):
            received.append(outcome.removeprefix("ok:"))
        return outcome

    first = [asyncio.ensure_future(device(i, (fleet.a, fleet.b)[i % 2])) for i in range(8)]
    await asyncio.sleep(0.05)
    os.kill(fleet.a.proc.pid, signal.SIGKILL)
    assert fleet.a.proc.wait(10) == -signal.SIGKILL
    outcomes = list(await asyncio.gather(*first))
    # B keeps serving: the devices that went to A retry at B with the same tokens
    for i in range(8, 16):
        outcomes.append(await device(i, fleet.b))
    for i in range(8):
        if not outcomes[i].startswith("ok:"):
            name = f"cam-{i}"
            retry = await _try_enroll(fleet, fleet.b, tokens[name], fleet.tmp / f"{name}-retry")
            if retry.startswith("ok:"):
                received.append(retry.removeprefix("ok:"))
            else:
                # refused only because A redeemed it before it died: token and certificate
                # are one transaction, so A then recorded the device's certificate too
                assert retry == "token_reused", (name, outcomes[i], retry)
                assert _certificates_of(fleet.dsn, name) == 1, name
    assert all(o.startswith("ok:") for o in outcomes[8:]), outcomes
    db = open_database(fleet.ca_dir, fleet.dsn)
    for serial in received:  # every certificate a client received is in the database
        assert db.issued(int(serial, 16)) is not None, serial
    # no token usable twice: each was consumed once, and a second redemption is refused
    for name, token in tokens.items():
        assert await _try_enroll(fleet, fleet.b, token, fleet.tmp / f"{name}-again") == (
            "token_reused"
        )
    issued_devices = db.counts()[0]
    assert issued_devices >= len(received) + 2  # + the server cert and the demo device
    db.close()
