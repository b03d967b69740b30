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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from ztagent import randomness
from ztagent.canonical_json import Encoded, dumps, dumps_object
from ztagent.timefmt import rfc3339

GENESIS_PREV: Final = "0" * 64
"""``prev_sha256`` of the first line of a fresh log."""


def line_sha256(line: bytes) -> str:
    """The chain hash of one line: hex SHA-256 of its bytes without the trailing newline."""
    return hashlib.sha256(line).hexdigest()


def new_decision_id(now: datetime) -> str:
    """A 32-hex-character id that sorts by time: 48-bit Unix milliseconds, 80 random bits."""
    ms = int(now.timestamp() * 1000) & 0xFFFF_FFFF_FFFF
    return f"{ms:012x}{randomness.take(10).hex()}"


def format_time(t: datetime) -> str:
    """RFC 3339, UTC, milliseconds, ``Z``: ``2025-01-02T03:04:05.678Z``."""
    return rfc3339(t, digits=3)


_PREFIX_KEYS: Final = (
    "decision_id", "time", "device_id", "user_sub", "service", "method", "allow",
    "enforced", "dry_run", "reasons", "failure", "refusal", "cached", "policy_revision",
    "latency_us", "attestation",
)  # fmt: skip
"""The line's keys before ``input`` and ``prev_sha256``, in their fixed order."""


@dataclass(eq=False)
class DecisionRecord:
    """One decided request. ``to_json_bytes`` makes its log line.

    Not ``frozen``: a frozen dataclass sets each of its 17 fields through
    ``object.__setattr__``, 7.5 µs per record against 1.7 µs, and one is built on every call.
    Treat it as immutable all the same (the writer serialises it later, on its own thread).

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
        encoded_input = dumps(self.input)
        if max_input_bytes is not None and len(encoded_input) > max_input_bytes:
            digest = hashlib.sha256(encoded_input).hexdigest()
            encoded_input = dumps(
                {"truncated": True, "bytes": len(encoded_input), "sha256": digest}
            )
        values: tuple[object, ...] = (
            self.decision_id,
            format_time(self.time),
            self.device_id,
            self.user_sub,
            self.service,
            self.method,
            self.allow,
            self.enforced,
            self.dry_run,
            list(self.reasons),
            self.failure,
            self.refusal,
            self.cached,
            self.policy_revision,
            self.latency_us,
            self.attestation,
        )
        fields = dict(zip(_PREFIX_KEYS, values, strict=True))
        fields["input"] = Encoded(encoded_input)
        fields["prev_sha256"] = prev_sha256
        return dumps_object(fields)
