"""DEVELOPMENT ONLY: the upstream half of ``make run``: a decision-log collector on
loopback that accepts what ``ztagent ship`` sends (OPA's decision-log API: POST, gzip, a
JSON array of events), and the demo outcome that checks what arrived against the log."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ztagent.addresses import parse_host_port
from ztagent.policy.log_verify import log_files


@dataclass
class DemoCollector:
    """Stores every event it receives; answers 400 to anything that is not OPA's format."""

    address: str
    events: list[dict[str, Any]] = field(default_factory=list)
    posts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> DemoCollector:
        host, port = parse_host_port(self.address, "upload.decision_log_url")
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                    if self.headers.get("Content-Encoding") != "gzip":
                        raise ValueError("not gzip")
                    events = json.loads(gzip.decompress(body))
                    if not isinstance(events, list) or not all(
                        isinstance(e, dict) and "decision_id" in e for e in events
                    ):
                        raise ValueError("not a JSON array of decision events")
                except (ValueError, OSError, EOFError):
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with collector.lock:
                    collector.events.extend(events)
                    collector.posts += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def lines(self) -> list[str]:
        with self.lock:
            return [e["ztagent"]["line"] for e in self.events if "line" in e.get("ztagent", {})]


def upload_outcome(
    collector: DemoCollector, log_path: Path, limit_s: float = 15.0
) -> tuple[bool, str]:
    """Wait until the log's newest line arrived, then check the received lines chain."""
    newest: str | None = None
    for path in reversed(log_files(log_path)):
        text = path.read_text(encoding="utf-8").splitlines()
        if text:
            newest = text[-1]
            break
    deadline = time.monotonic() + limit_s
    while newest is not None and newest not in collector.lines() and time.monotonic() < deadline:
        time.sleep(0.1)
    received = list(dict.fromkeys(collector.lines()))
    if newest is None or newest not in received:
        return False, (
            f"(u) decision log upload: the collector at {collector.address} has "
            f"{len(received)} lines, not the log's newest (is `ztagent ship` running? see "
            "var/log/ship.log)"
        )
    broken = sum(
        1
        for before, after in itertools.pairwise(received)
        if json.loads(after).get("prev_sha256") != hashlib.sha256(before.encode()).hexdigest()
    )
    checkpoints = sum(1 for e in collector.events if e.get("ztagent", {}).get("checkpoint"))
    decisions = len(received) - checkpoints
    return broken == 0, (
        f"(u) decision log shipped by `ztagent ship` to the collector at {collector.address} "
        f"in OPA's decision-log format: {decisions} decisions and {checkpoints} signed "
        f"checkpoints in {collector.posts} gzip batches, "
        + ("hash chain intact" if broken == 0 else f"CHAIN BROKEN at {broken} places")
    )
