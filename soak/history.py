"""What the soak records while it runs: every call, every fault, every acknowledged write.

Plain frozen values (no grpc, no processes): the driver appends them, the oracle reads them.
Times are wall-clock seconds (``time.time()``), the clock the decision log's ``time`` uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Expect = Literal["any", "refuse"]
"""``refuse``: the call must never be allowed whatever the faults (a forged token, a user
without the role the method needs under every revision, no certificate). ``any``: allowed or
refused as the rules at that moment say (the oracle checks revocation and policy replay)."""


@dataclass(frozen=True)
class CallRecord:
    call_id: str
    """Sent as the ``x-soak-call`` header (in ``policy.input_headers``): joins the call to its
    decision-log line."""
    device: str
    user: str
    """Token subject, ``""`` without a token, ``forged`` for an edited token."""
    method: str
    """Full gRPC method, ``/ztagent.workloads.v1.Storage/Put``."""
    kind: str
    """``unary``, ``server_stream``, ``client_stream``, ``bidi`` or ``attest``."""
    t0: float
    t1: float
    status: str
    """gRPC status name, ``OK`` when the call succeeded."""
    code: str = ""
    """``x-ztagent-error-code`` of a refusal (or ``""``)."""
    details: str = ""
    expect: Expect = "any"


@dataclass(frozen=True)
class FaultEvent:
    t: float
    """When the fault took effect (after the command that makes it returned)."""
    kind: str
    """``revoke``, ``renew``, ``policy_publish``, ``policy_broken``, ``server_rotate``,
    ``jwks_rotate``, ``crl_resign``, ``ca_down``, ``ca_up``, ``workload_restart``,
    ``worker_kill``, ``disk_full``, ``disk_ok``, ``enroll``."""
    device: str = ""
    revision: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Write:
    """A storage ``Put`` (or one message of a ``BulkPut``) the workload acknowledged."""

    key: str
    value: str
    namespace: str
    """The device whose namespace holds it (storage keys are per device)."""
    t: float


@dataclass(frozen=True)
class ReadBack:
    key: str
    namespace: str
    value: str | None
    """What the final read returned, ``None`` when not found or the read failed."""
    error: str = ""


@dataclass(frozen=True)
class Sample:
    t: float
    process: str
    rss_bytes: int
    fds: int
    threads: int
    pid: int = 0


@dataclass
class History:
    calls: list[CallRecord] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    reads: list[ReadBack] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def dump(self, path: Path) -> None:
        """One JSON object per line, ``{"type": ..., ...}``: the run's evidence, kept."""
        with path.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"type": "run", "started": self.started, "ended": self.ended}))
            out.write("\n")
            for kind, items in (
                ("call", self.calls),
                ("fault", self.faults),
                ("write", self.writes),
                ("read", self.reads),
                ("sample", self.samples),
            ):
                for item in items:
                    out.write(json.dumps({"type": kind, **asdict(item)}) + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        history = cls()
        kinds: dict[str, Any] = {
            "call": (CallRecord, history.calls),
            "fault": (FaultEvent, history.faults),
            "write": (Write, history.writes),
            "read": (ReadBack, history.reads),
            "sample": (Sample, history.samples),
        }
        for line in _lines(path):
            doc = json.loads(line)
            kind = doc.pop("type")
            if kind == "run":
                history.started, history.ended = doc["started"], doc["ended"]
                continue
            factory, target = kinds[kind]
            target.append(factory(**doc))
        return history


def _lines(path: Path) -> Iterable[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line
