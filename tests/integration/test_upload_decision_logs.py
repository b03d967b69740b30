"""Decision logs to a collector: OPA's decision-log format, across outages, none lost.

The collector is a small HTTP server on loopback (the test's own) that checks what any OPA
decision-log collector would — POST, ``Content-Encoding: gzip``, a JSON array of events with
``decision_id``, ``timestamp``, ``labels`` — and, for ztagent's part, that the lines it
received chain (``prev_sha256``). The log is written by the real ``DecisionLog`` writer
(rotations and signed checkpoints included). Scenarios: normal delivery; the collector down
while records accumulate, then back; the shipper killed mid-batch (a POST that reached the
collector but whose answer never came back) and restarted; lines rotated away before upload.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ztagent.errors import TransportError
from ztagent.policy.decision_log import DecisionLog
from ztagent.policy.decision_record import GENESIS_PREV, DecisionRecord
from ztagent.policy.log_checkpoint import CheckpointSigner
from ztagent.policy.log_verify import log_files
from ztagent.upload.decision_logs import DecisionLogShipper, ShipperSettings

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass
class Collector:
    url: str = ""
    status: int = 200
    events: list[dict[str, object]] = field(default_factory=list)
    posts: int = 0
    drop_reply: bool = False
    """Store the batch, then cut the connection: the shipper never sees the 2xx."""
    hold_first: bool = False
    """Store the first batch, then hold its answer until ``release`` is set."""
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def lines(self) -> list[str]:
        with self.lock:
            return [e["ztagent"]["line"] for e in self.events if "line" in e["ztagent"]]  # type: ignore[index,operator]


def _handler(c: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/logs"
            assert self.headers["Content-Encoding"] == "gzip"
            assert self.headers["Content-Type"] == "application/json"
            events = json.loads(gzip.decompress(body))
            assert isinstance(events, list) and events
            for event in events:
                assert isinstance(event["decision_id"], str) and event["labels"]["app"] == "ztagent"
            with c.lock:
                c.posts += 1
                if c.status == 200:
                    c.events.extend(events)
                hold = c.hold_first and not c.held.is_set()
                if hold:
                    c.held.set()
            if hold:
                c.release.wait(20)
            if c.drop_reply:
                self.connection.close()
                return
            self.send_response(c.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def collector() -> Iterator[Collector]:
    state = Collector()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/logs"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _record(i: int) -> DecisionRecord:
    return DecisionRecord(
        decision_id=f"{i:032x}", time=NOW + timedelta(milliseconds=i), device_id=f"dev-{i % 3}",
        user_sub=None, service="ztagent.workloads.v1.Storage", method="Get", allow=True,
        enforced=True, dry_run=False, reasons=("ok",), failure=None, policy_revision="rev-7",
        latency_us=100, input={"device": {"id": f"dev-{i % 3}"}, "request": {"peer": "ipv4:1"}},
    )  # fmt: skip


def _write(path: Path, start: int, count: int, **kw: object) -> None:
    signer = CheckpointSigner(ec.generate_private_key(ec.SECP256R1()))
    log = DecisionLog(path, signer=signer, checkpoint_every=7, **kw)  # type: ignore[arg-type]
    log.start()
    for i in range(start, start + count):
        assert log.submit(_record(i))
    assert log.close()


def _chained(lines: list[str]) -> bool:
    unique = list(dict.fromkeys(lines))  # duplicates only by id: the same line twice
    for before, after in itertools.pairwise(unique):
        if json.loads(after)["prev_sha256"] != hashlib.sha256(before.encode()).hexdigest():
            return False
    return True


def _settings(collector: Collector, **kw: object) -> ShipperSettings:
    return ShipperSettings(collector.url, node_id="edge-7", batch_max_age_s=0, **kw)  # type: ignore[arg-type]


def _drain(shipper: DecisionLogShipper) -> None:
    for _ in range(1000):
        if not shipper.ship_once(force=True):
            return
    pytest.fail("the shipper never drained")


def test_delivery_in_opa_format_with_the_chain_and_checkpoints(
    collector: Collector, tmp_path: Path
) -> None:
    path = tmp_path / "decisions.jsonl"
    _write(path, 0, 40)
    shipper = DecisionLogShipper(path, _settings(collector, batch_max_bytes=4096), version="t")
    _drain(shipper)
    written = path.read_text().splitlines()
    assert collector.lines() == written  # every line, in order, once
    assert _chained(collector.lines()) and json.loads(written[0])["prev_sha256"] == GENESIS_PREV
    assert collector.posts > 1  # batched by size
    decision = next(e for e in collector.events if "checkpoint" not in e["ztagent"])  # type: ignore[operator]
    assert decision["decision_id"] == f"{0:032x}"
    assert decision["path"] == "ztagent/authz/decision"
    assert decision["bundles"] == {"ztagent": {"revision": "rev-7"}}
    assert decision["labels"] == {"id": "edge-7", "app": "ztagent", "version": "t"}
    assert decision["timestamp"] == "2026-12-01T12:00:00.000Z"
    assert decision["result"]["allow"] is True  # type: ignore[index]
    assert sum(1 for e in collector.events if e["ztagent"].get("checkpoint")) >= 5  # type: ignore[union-attr]
    assert shipper.stats.delivered == 40 + sum(
        1 for e in collector.events if e["ztagent"].get("checkpoint")
    )  # type: ignore[union-attr]


def test_damaged_lines_are_shipped_as_unreadable_and_the_lines_after_them_follow(
    collector: Collector, tmp_path: Path
) -> None:
    """An edited or damaged line never stops the shipper: it goes up as it is, with the
    reason, so the collector sees where the chain breaks, and the rest is delivered."""
    path = tmp_path / "decisions.jsonl"
    _write(path, 0, 8)
    lines = path.read_bytes().splitlines()
    lines[2] = b"[" * 5000 + b"]" * 5000  # beyond the standard parser's recursion
    lines[3] = b"\xff\xfe not UTF-8"
    lines[4] = b'{"input": {"request": "not an object"}, "checkpoint": 7}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    shipper = DecisionLogShipper(path, _settings(collector))
    _drain(shipper)
    events = collector.events
    assert len(events) == len(lines) and shipper.stats.delivered == len(lines)
    third, fourth, fifth = events[2:5]
    assert third["decision_id"] == f"unreadable-{hashlib.sha256(lines[2]).hexdigest()[:32]}"
    assert third["ztagent"] == {  # type: ignore[comparison-overlap]
        "line": lines[2].decode(),
        "prev_sha256": None,
        "unreadable": "JSON nested too deeply to parse",
    }
    assert str(fourth["ztagent"]["unreadable"]).startswith("not JSON: ")  # type: ignore[index]
    assert base64.b64decode(fourth["ztagent"]["line_base64"]) == lines[3]  # type: ignore[index,arg-type]
    assert fifth["ztagent"]["checkpoint"] is True and fifth["timestamp"] == ""  # type: ignore[index]
    assert collector.lines()[5:] == [line.decode() for line in lines[5:]]  # delivered after


def test_the_collector_down_then_back_loses_nothing_and_keeps_order(
    collector: Collector, tmp_path: Path
) -> None:
    path = tmp_path / "decisions.jsonl"
    _write(path, 0, 10)
    shipper = DecisionLogShipper(path, _settings(collector))
    collector.status = 503
    for _ in range(3):
        with pytest.raises(TransportError) as info:
            shipper.ship_once(force=True)
        assert info.value.code == "upload_refused"
    _write(path, 10, 15)  # decisions go on while the uplink is down
    collector.status = 200
    _drain(shipper)
    assert collector.lines() == path.read_text().splitlines()
    assert _chained(collector.lines())


def test_a_batch_whose_acknowledgement_was_lost_is_sent_again_and_nothing_else(
    collector: Collector, tmp_path: Path
) -> None:
    """As if the shipper died after the collector stored a batch but before the 2xx reached
    it: the restarted shipper sends that batch again (duplicates only by id), then goes on."""
    path = tmp_path / "decisions.jsonl"
    _write(path, 0, 30)
    collector.drop_reply = True
    first = DecisionLogShipper(path, _settings(collector, batch_max_bytes=2048))
    with pytest.raises(TransportError):
        first.ship_once(force=True)
    stored = len(collector.lines())
    assert stored > 0
    collector.drop_reply = False
    restarted = DecisionLogShipper(path, _settings(collector, batch_max_bytes=2048))
    _drain(restarted)
    lines = collector.lines()
    assert len(lines) == len(path.read_text().splitlines()) + stored  # one batch twice
    assert list(dict.fromkeys(lines)) == path.read_text().splitlines()
    assert _chained(lines)


def test_lines_rotated_away_before_upload_are_reported_as_a_gap(
    collector: Collector, tmp_path: Path
) -> None:
    path = tmp_path / "decisions.jsonl"
    _write(path, 0, 5, max_bytes=100_000, backups=0)
    shipper = DecisionLogShipper(path, _settings(collector))
    _drain(shipper)  # acknowledged up to here
    _write(path, 5, 400, max_bytes=20_000, backups=0)  # rotations delete unshipped lines
    _drain(shipper)
    gaps = [e for e in collector.events if "gap" in e["ztagent"]]  # type: ignore[operator]
    assert len(gaps) == 1 and shipper.stats.dropped == 1
    assert gaps[0]["ztagent"]["gap"]["reason"] == "rotated away before upload"  # type: ignore[index]
    # what remained on disk after the gap arrived, complete and chained
    tail = collector.lines()[-len(path.read_text().splitlines()) :]
    assert tail == path.read_text().splitlines() and _chained(tail)


def test_after_the_first_batch_only_new_lines_are_read_across_rotations(
    collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipper keeps the acknowledged line's place (file, byte range): a poll reads on
    from there, it does not scan and hash the whole retained log. Rotations in between and a
    cursor changed behind its back (another shipper) still deliver every line once, in
    order."""
    from ztagent.upload import decision_logs

    path = tmp_path / "decisions.jsonl"
    kw = {"max_bytes": 20_000, "backups": 20}
    _write(path, 0, 100, **kw)
    shipper = DecisionLogShipper(path, _settings(collector))
    _drain(shipper)
    hashed: list[bytes] = []
    real = decision_logs.line_sha256
    monkeypatch.setattr(decision_logs, "line_sha256", lambda b: hashed.append(b) or real(b))
    _write(path, 100, 3, **kw)
    _drain(shipper)
    assert len(hashed) <= 4  # the place checked, the new batch acknowledged: no scan
    _write(path, 103, 150, **kw)  # rotates the shipped place along, several times
    _drain(shipper)
    assert len(hashed) < 40
    on_disk = [line for f in log_files(path) for line in f.read_text().splitlines()]
    assert len(log_files(path)) > 5
    assert collector.lines() == on_disk  # every line once, in order, no gap
    assert not [e for e in collector.events if "gap" in e["ztagent"]]  # type: ignore[operator]
    # a cursor moved by someone else: the shipper finds it again by scanning, once
    lines = path.read_text().splitlines()
    (path.with_name(path.name + ".shipped")).write_text(
        json.dumps({"last_sha256": hashlib.sha256(lines[-5].encode()).hexdigest()})
    )
    before = len(collector.lines())
    _drain(shipper)
    assert collector.lines()[before:] == lines[-4:]


def test_ztagent_ship_killed_mid_batch_and_restarted_loses_nothing(
    collector: Collector, tmp_path: Path
) -> None:
    """The real process: ``ztagent ship`` SIGKILLed while the collector holds its POST (the
    batch is stored, the answer never sent), then started again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ztagent.ca import store as ca_store

    ca = ca_store.init_ca(tmp_path / "ca")
    log_path = tmp_path / "decisions.jsonl"
    _write(log_path, 0, 60)
    config = tmp_path / "ztagent.toml"
    config.write_text(
        f"""
[tls]
server_cert = "{ca.server_cert}"
server_key = "{ca.server_key}"
client_ca = "{ca.bundle}"
crl = "{ca.crl}"

[decision_log]
path = "{log_path}"

[upload]
decision_log_url = "{collector.url}"
batch_max_bytes = 4096
batch_max_age_s = 0
node_id = "edge-kill"
"""
    )
    collector.hold_first = True
    held, release = collector.held, collector.release

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "ztagent", "ship", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    first = start()
    try:
        assert held.wait(20), "the shipper never posted"
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        release.set()
    stored_before = len(collector.lines())
    second = start()
    try:
        deadline = time.monotonic() + 30
        expected = log_path.read_text().splitlines()
        while list(dict.fromkeys(collector.lines())) != expected:
            assert time.monotonic() < deadline, "not everything arrived after the restart"
            assert second.poll() is None, second.stderr.read().decode() if second.stderr else ""
            time.sleep(0.05)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
    lines = collector.lines()
    assert len(lines) == len(expected) + stored_before  # the held batch twice, nothing else
    assert _chained(lines)


async def test_the_sidecar_reports_what_ztagent_ship_says(
    collector: Collector, tmp_path: Path
) -> None:
    """``ztagent ship`` writes its status beside the sidecar's state; the sidecar exports it
    (``ztagent_upload_*``) and reports ``ztagent.upload``: SERVING while the uplink answers,
    NOT_SERVING once it does not (or the shipper stopped reporting)."""
    import asyncio
    import signal
    import subprocess
    import sys
    import time

    from grpc_health.v1 import health, health_pb2

    from tests.integration.conftest import ALLOW_ALL
    from ztagent.ca import store as ca_store
    from ztagent.config import load_config
    from ztagent.sidecar.server import Sidecar

    ca = ca_store.init_ca(tmp_path / "ca")
    config = tmp_path / "ztagent.toml"
    config.write_text(
        f"""
[listen]
address = "127.0.0.1:0"
[tls]
server_cert = "{ca.server_cert}"
server_key = "{ca.server_key}"
client_ca = "{ca.bundle}"
crl = "{ca.crl}"
reload_interval_s = 0.2
[policy]
path = "{ALLOW_ALL}"
reload_interval_s = 0.2
[decision_log]
path = "{tmp_path / "decisions.jsonl"}"
[posture]
enabled = false
state_dir = "{tmp_path / "state"}"
[metrics]
enabled = true
address = "127.0.0.1:0"
[upload]
decision_log_url = "{collector.url}"
batch_max_age_s = 0
"""
    )
    car = Sidecar(load_config(config))
    await car.start()
    ship = subprocess.Popen(
        [sys.executable, "-m", "ztagent", "ship", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    request = health_pb2.HealthCheckRequest(service="ztagent.upload")

    async def upload_status() -> int:
        await car._report_health()
        return int((await health.aio.HealthServicer.Check(car.health, request, None)).status)

    try:
        deadline = time.monotonic() + 20
        while await upload_status() != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "ztagent.upload never SERVING"
            await asyncio.sleep(0.1)
        collector.status = 503  # the collector refuses from now on; a decision to ship:
        import grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.bundle.read_bytes(),
            private_key=ca.device_key("demo-device").read_bytes(),
            certificate_chain=ca.device_cert("demo-device").read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{car.port}", creds) as ch:
            with pytest.raises(grpc.aio.AioRpcError):  # no route: refused, and logged
                await ch.unary_unary("/x.v1.Nowhere/Get")(b"", timeout=10)
        deadline = time.monotonic() + 20
        while await upload_status() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "ztagent.upload never NOT_SERVING"
            await asyncio.sleep(0.1)
        assert car.metrics is not None
        retried = car.metrics.upload["retried"].labels("decision_log")._value.get()
        assert retried >= 1
    finally:
        ship.send_signal(signal.SIGTERM)
        ship.wait(15)
        await car.stop(0)
