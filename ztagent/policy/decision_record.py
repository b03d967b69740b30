"""A decision-log record and its line: the format and the hash chain, no IO.

The decision log: one hash-chained JSON line per decided request.

Record format (one line, UTF-8, compact separators, keys in this order)::

    decision_id time device_id user_sub service method allow enforced dry_run reasons
    failure refusal policy_revision latency_us attestation input prev_sha256

``prev_sha256`` is the hex SHA-256 of the previous line's bytes (without its newline); the
first line of a fresh log carries ``GENESIS_PREV`` (64 zeros). Any edit, deletion, insertion
or reordering of a line breaks the chain at the line after it (``log_verify`` finds it). The
last line has no successor, so an edit to it is only detectable against an external anchor
(``LogVerifyReport.last_sha256``).

The writer (``policy.decision_log``) and the verifier (``policy.log_verify``, also used for
the CA's audit log) both build on this module.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from ztagent.timefmt import rfc3339

GENESIS_PREV: Final = "0" * 64
"""``prev_sha256`` of the first line of a fresh log."""


def line_sha256(line: bytes) -> str:
    """The chain hash of one line: hex SHA-256 of its bytes without the trailing newline."""
    return hashlib.sha256(line).hexdigest()


def new_decision_id(now: datetime) -> str:
    """A 32-hex-character id that sorts by time: 48-bit Unix milliseconds, 80 random bits."""
    ms = int(now.timestamp() * 1000) & 0xFFFF_FFFF_FFFF
    return f"{ms:012x}{secrets.token_hex(10)}"


def format_time(t: datetime) -> str:
    """RFC 3339, UTC, milliseconds, ``Z``: ``2025-01-02T03:04:05.678Z``."""
    return rfc3339(t, digits=3)


# Nested objects are key-sorted so equal records give equal bytes whatever the insertion
# order of their dicts; NaN/Infinity and non-JSON types raise (ValueError / TypeError). One
# encoder for every call: json.dumps with options builds a new encoder each time (measured:
# about half the per-line cost on the writer thread, which holds the GIL while it runs).
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
)


def _dumps(value: object) -> str:
    return _ENCODER.encode(value)


@dataclass(frozen=True)
class DecisionRecord:
    """One decided request. ``to_json_bytes`` makes its log line.

    ``allow`` is the policy's decision; ``enforced`` what happened to the call (False when
    denied; True when allowed, when ``dry_run`` let a deny through, or when ``failure_mode =
    "open"`` let it through). ``failure`` is the error code (``policy_timeout``...) when the
    failure mode, not the policy, decided. ``input`` is the policy input with credentials
    already removed; the log owns it once submitted (do not mutate it afterwards: it is
    serialised later, on the writer thread).
    """

    decision_id: str
    time: datetime
    """Timezone-aware; written as UTC with milliseconds."""
    device_id: str | None
    user_sub: str | None
    service: str
    method: str
    allow: bool
    enforced: bool
    dry_run: bool
    reasons: Sequence[str]
    failure: str | None
    policy_revision: str
    latency_us: int
    input: Mapping[str, Any] = field(hash=False)
    attestation: Mapping[str, Any] | None = field(default=None, hash=False)
    cached: bool = False
    """The policy's answer came from the exact decision cache (same revision, same read
    input), not from an evaluation."""
    refusal: Mapping[str, Any] | None = field(default=None, hash=False)
    """A refusal before (or instead of) the policy's decision: its ``code``, gRPC
    ``status``, ``message`` and, where known, ``received`` / ``expected``. None for a call the
    policy decided (its ``reasons``, ``failure`` tell)."""

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError(f"time must be timezone-aware, got naive {self.time.isoformat()}")

    def to_json_bytes(self, prev_sha256: str, max_input_bytes: int | None = None) -> bytes:
        """The line, without newline. Deterministic: same record and prev, same bytes.

        With ``max_input_bytes``, an ``input`` whose JSON is longer is replaced by
        ``{"truncated": true, "bytes": N, "sha256": ...}`` (the digest of the dropped JSON), so
        no client can make one line arbitrarily long; the rest of the line stays whole."""
        if len(prev_sha256) != 64:
            raise ValueError(f"prev_sha256 must be 64 hex characters, got {prev_sha256!r}")
        input_value: object = self.input
        if max_input_bytes is not None:
            encoded = _dumps(self.input)
            size = len(encoded.encode("utf-8", "backslashreplace"))
            if size > max_input_bytes:
                digest = hashlib.sha256(encoded.encode("utf-8", "backslashreplace")).hexdigest()
                input_value = {"truncated": True, "bytes": size, "sha256": digest}
        fields: tuple[tuple[str, object], ...] = (
            ("decision_id", self.decision_id),
            ("time", format_time(self.time)),
            ("device_id", self.device_id),
            ("user_sub", self.user_sub),
            ("service", self.service),
            ("method", self.method),
            ("allow", self.allow),
            ("enforced", self.enforced),
            ("dry_run", self.dry_run),
            ("reasons", list(self.reasons)),
            ("failure", self.failure),
            ("refusal", self.refusal),
            ("cached", self.cached),
            ("policy_revision", self.policy_revision),
            ("latency_us", self.latency_us),
            ("attestation", self.attestation),
            ("input", input_value),
            ("prev_sha256", prev_sha256),
        )
        body = ",".join(f"{_dumps(k)}:{_dumps(v)}" for k, v in fields)
        # A lone surrogate (from undecodable metadata) cannot be UTF-8 encoded; backslashreplace
        # turns it into the JSON escape \udcXX, which parses back to the same string.
        return ("{" + body + "}").encode("utf-8", "backslashreplace")
