"""The soak's oracle: checks a recorded history against what the rules said at each moment.

Pure: the history, the parsed decision-log lines and a replay function in, a report out (no
processes, no sockets), so a unit test can feed it a wrong history and see each wrong thing
named. What it checks:

- **revocation**: a device revoked at T is refused on every call started after T + the
  propagation bound (T is the CA-up time when the CA was down at the revocation: the sidecar
  cannot learn of it before); propagation = first ``cert_revoked`` refusal - T;
- **policy revision**: every policy-decided line carries a revision that was published good,
  never a broken one, and not older than the newest good revision published more than the
  bound before the line; propagation = first line of a revision - its publish time;
- **replay**: every such line's decision is what its revision decides for the logged input
  (``replay(revision, lines)`` returns the ids that differ);
- **outcome = log**: a call the sidecar let through is logged as enforced, a refused one as
  refused, and a call that must be refused (forged token...) never succeeds;
- **nothing lost**: every acknowledged write reads back; allowed calls without a log line are
  at most the lines the sidecar counted as dropped or lost; every log file verifies.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from soak.history import CallRecord, FaultEvent, History

Replay = Callable[[str, Sequence[Mapping[str, Any]]], Sequence[str]]
"""(revision, decision-log lines decided by it) -> decision ids whose replay differs."""

CALL_HEADER = "x-soak-call"
ATTEST = "attest"
# a call cut off for one of these reasons was not allowed (the sidecar's refusal trailer codes
# always say which; a handshake refusal has no trailer and status UNAVAILABLE)
_CLOCK_SKEW_S = 0.05  # the log's times have millisecond precision

ADMISSION_PREFIXES = (
    "cert_", "token_", "policy_", "crl_", "spiffe_", "chain_", "eku_", "jwks_", "posture",
    "admission_error", "no_route",
)  # fmt: skip
"""Codes of a refusal by admission; any other code (``not_found`` from the storage workload,
``shutting_down`` from a draining worker) came after the call was admitted."""
TOKEN_CODES = frozenset(
    {"token_kid_unknown", "token_bad_signature", "token_expired", "token_not_yet_valid"}
)

WRONG_DECISION_KINDS = frozenset(
    {
        "refused_valid_token",
        "allowed_after_revocation",
        "broken_revision_served",
        "unknown_revision",
        "stale_revision",
        "replay_mismatch",
        "allowed_but_logged_refused",
        "refused_but_logged_allowed",
        "must_refuse_allowed",
    }
)
LOSS_KINDS = frozenset({"lost_write", "unlogged_beyond_counted", "log_verify_failed"})


@dataclass(frozen=True)
class Bounds:
    revocation_s: float
    """Revocation at the CA -> every call refused (CRL poll + file reload + cache)."""
    policy_s: float
    """Policy file published -> every decision by the new revision (reload interval)."""
    jwks_s: float = 0.0
    """JWKS rotated -> the driver's tokens use the new key (``jwks_in_use``) -> accepted."""


@dataclass(frozen=True)
class Violation:
    kind: str
    message: str
    call_id: str = ""


@dataclass(frozen=True)
class LogCheck:
    """One worker's decision-log files, as ``ztagent log verify`` saw them."""

    files: str
    ok: bool
    message: str


@dataclass
class OracleReport:
    calls: int = 0
    allowed: int = 0
    refusals_by_code: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    revocation_propagation_s: list[float] = field(default_factory=list)
    policy_propagation_s: list[float] = field(default_factory=list)
    replayed_lines: int = 0
    writes: int = 0
    writes_read_back: int = 0
    unlogged_allowed: int = 0
    counted_lost: int = 0
    log_checks: list[LogCheck] = field(default_factory=list)

    @property
    def wrong_decisions(self) -> list[Violation]:
        return [v for v in self.violations if v.kind in WRONG_DECISION_KINDS]

    @property
    def losses(self) -> list[Violation]:
        return [v for v in self.violations if v.kind in LOSS_KINDS]

    @property
    def ok(self) -> bool:
        return not self.violations


def percentiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(p50, p99, max), or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99, ordered[-1]


def allowed(call: CallRecord) -> bool:
    """Admission let the call through to the workload (which answered; a Get of a key it
    does not hold answers NOT_FOUND)."""
    return call.status in ("OK", "NOT_FOUND")


def refusal_code(call: CallRecord) -> str:
    """The code admission refused the call with, ``""`` when it did not (or said nothing)."""
    if allowed(call) or not call.code.startswith(ADMISSION_PREFIXES):
        return ""
    return call.code


def line_time(line: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(line["time"]).replace("Z", "+00:00")).timestamp()


def line_call_id(line: Mapping[str, Any]) -> str | None:
    doc = line.get("input")
    if not isinstance(doc, Mapping):
        return None
    request = doc.get("request")
    metadata = request.get("metadata") if isinstance(request, Mapping) else None
    if not isinstance(metadata, Mapping):
        return None
    value = metadata.get(CALL_HEADER)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def policy_decided(line: Mapping[str, Any]) -> bool:
    """The policy's answer decided the line (no refusal before it, no engine failure)."""
    return line.get("refusal") is None and not line.get("failure")


def check(
    history: History,
    lines: Sequence[Mapping[str, Any]],
    replay: Replay,
    bounds: Bounds,
    *,
    counted_lost: int = 0,
    log_checks: Sequence[LogCheck] = (),
) -> OracleReport:
    report = OracleReport(counted_lost=counted_lost, log_checks=list(log_checks))
    by_call: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for line in lines:
        cid = line_call_id(line)
        if cid is not None:
            by_call[cid].append(line)
    spans = {c.call_id: (c.t0, c.t1) for c in history.calls}

    def when(line: Mapping[str, Any]) -> tuple[float, float]:
        """When the line's call ran by the driver's clock (the one clock of calls and faults;
        the sidecar's may be stepped), else the line's own time."""
        cid = line_call_id(line)
        if cid is not None and cid in spans:
            return spans[cid]
        t = line_time(line)
        return t, t

    _outcomes(history, by_call, report)
    _tokens(history, bounds, report)
    _revocations(history, lines, bounds, report)
    _revisions(history, lines, bounds, replay, report, when)
    _storage(history, report)
    for log in log_checks:
        if not log.ok:
            report.violations.append(Violation("log_verify_failed", f"{log.files}: {log.message}"))
    return report


def _outcomes(
    history: History, by_call: Mapping[str, list[Mapping[str, Any]]], report: OracleReport
) -> None:
    for call in history.calls:
        report.calls += 1
        if allowed(call):
            report.allowed += 1
        elif call.code:
            report.refusals_by_code[call.code] += 1
        else:
            report.refusals_by_code[f"{call.status} (no ztagent code)"] += 1
        if call.expect == "refuse" and allowed(call):
            report.violations.append(
                Violation(
                    "must_refuse_allowed",
                    f"{call.method} by {call.device}/{call.user or '-'} must be refused, "
                    "was allowed",
                    call.call_id,
                )
            )
        if call.kind == ATTEST:
            continue
        logged = by_call.get(call.call_id, [])
        if not logged:
            if allowed(call):
                report.unlogged_allowed += 1
            continue
        line = logged[-1]
        if allowed(call) and not line.get("enforced"):
            report.violations.append(
                Violation(
                    "allowed_but_logged_refused",
                    f"{call.method} succeeded but its line {line.get('decision_id')} says "
                    f"refused ({line.get('reasons')})",
                    call.call_id,
                )
            )
        if line.get("enforced") and refusal_code(call) and line.get("refusal") is None:
            report.violations.append(
                Violation(
                    "refused_but_logged_allowed",
                    f"{call.method} was refused {call.code} but its line "
                    f"{line.get('decision_id')} says allowed",
                    call.call_id,
                )
            )
    if report.unlogged_allowed > report.counted_lost:
        report.violations.append(
            Violation(
                "unlogged_beyond_counted",
                f"{report.unlogged_allowed} allowed calls have no decision-log line, the "
                f"sidecar counted {report.counted_lost} lines dropped or lost",
            )
        )


def _tokens(history: History, bounds: Bounds, report: OracleReport) -> None:
    """A token of a key the JWKS holds is never refused for its key or signature (the
    driver switches to a rotated key only once it is published: ``jwks_in_use``)."""
    switches = [e.t for e in history.faults if e.kind == "jwks_in_use"]
    for call in history.calls:
        if call.user in ("", "forged") or refusal_code(call) not in TOKEN_CODES:
            continue
        if any(t <= call.t0 <= t + bounds.jwks_s for t in switches):
            continue  # a call started with the previous token just before the switch
        report.violations.append(
            Violation(
                "refused_valid_token",
                f"{call.method} by {call.device}/{call.user} refused {call.code}: {call.details}",
                call.call_id,
            )
        )


def _effective_revocations(history: History) -> list[tuple[str, float, float]]:
    """(device, revoked at, effective from): a revocation while the CA was down takes effect
    when it is back up (the sidecar learns of it from the CA)."""
    downs: list[tuple[float, float]] = []
    start: float | None = None
    for event in sorted(history.faults, key=lambda e: e.t):
        if event.kind == "ca_down":
            start = event.t
        elif event.kind == "ca_up" and start is not None:
            downs.append((start, event.t))
            start = None
    if start is not None:
        downs.append((start, float("inf")))
    out = []
    for event in history.faults:
        if event.kind != "revoke":
            continue
        effective = event.t
        for down, up in downs:
            if down <= event.t < up:
                effective = up
        out.append((event.device, event.t, effective))
    return out


def _revocations(
    history: History, lines: Sequence[Mapping[str, Any]], bounds: Bounds, report: OracleReport
) -> None:
    for device, revoked_at, effective in _effective_revocations(history):
        deadline = effective + bounds.revocation_s
        first_refusal: float | None = None
        for call in history.calls:
            if call.device != device or call.t0 < revoked_at:
                continue
            if call.code == "cert_revoked" and (first_refusal is None or call.t1 < first_refusal):
                first_refusal = call.t1
            if call.t0 > deadline and allowed(call):
                report.violations.append(
                    Violation(
                        "allowed_after_revocation",
                        f"{call.method} by {device} allowed {call.t0 - revoked_at:.2f} s after "
                        f"its revocation (bound {bounds.revocation_s:.1f} s)",
                        call.call_id,
                    )
                )
        for line in lines:
            if line.get("device_id") == device and line.get("enforced"):
                t = line_time(line)
                if t > deadline + _CLOCK_SKEW_S and line_call_id(line) is None:
                    report.violations.append(
                        Violation(
                            "allowed_after_revocation",
                            f"line {line.get('decision_id')}: {device} allowed "
                            f"{t - revoked_at:.2f} s after its revocation",
                        )
                    )
        if first_refusal is not None:
            report.revocation_propagation_s.append(max(0.0, first_refusal - effective))


def _revisions(
    history: History,
    lines: Sequence[Mapping[str, Any]],
    bounds: Bounds,
    replay: Replay,
    report: OracleReport,
    when: Callable[[Mapping[str, Any]], tuple[float, float]],
) -> None:
    publishes = sorted(
        (e for e in history.faults if e.kind in ("policy_publish", "policy_broken")),
        key=lambda e: e.t,
    )
    good: list[FaultEvent] = [e for e in publishes if e.kind == "policy_publish"]
    order = {e.revision: i for i, e in enumerate(good)}
    broken = {e.revision for e in publishes if e.kind == "policy_broken"}
    first_seen: dict[str, float] = {}
    decided: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for line in lines:
        if not policy_decided(line):
            continue
        revision = str(line.get("policy_revision"))
        t, t_end = when(line)
        where = f"line {line.get('decision_id')} at {t:.3f}"
        cid = line_call_id(line) or ""
        if revision in broken:
            report.violations.append(
                Violation("broken_revision_served", f"{where}: broken revision {revision}", cid)
            )
            continue
        if revision not in order:
            report.violations.append(
                Violation("unknown_revision", f"{where}: revision {revision} never published", cid)
            )
            continue
        published = good[order[revision]].t
        newest_due = max(
            (order[e.revision] for e in good if e.t <= t - bounds.policy_s - _CLOCK_SKEW_S),
            default=-1,
        )
        if order[revision] < newest_due or published > t_end + _CLOCK_SKEW_S:
            report.violations.append(
                Violation(
                    "stale_revision",
                    f"{where}: decided by {revision} (published {published:.3f}); "
                    f"{good[newest_due].revision} was due",
                    cid,
                )
            )
        first_seen[revision] = min(first_seen.get(revision, t), t)
        decided[revision].append(line)
    for event in good:
        if event.revision in first_seen and event is not good[0]:
            report.policy_propagation_s.append(max(0.0, first_seen[event.revision] - event.t))
    for revision, revision_lines in decided.items():
        report.replayed_lines += len(revision_lines)
        by_id = {str(line.get("decision_id")): line for line in revision_lines}
        for decision_id in replay(revision, revision_lines):
            line = by_id.get(decision_id, {})
            report.violations.append(
                Violation(
                    "replay_mismatch",
                    f"line {decision_id}: logged allow={line.get('allow')} "
                    f"{line.get('reasons')}, revision {revision} decides otherwise",
                    line_call_id(line) or "",
                )
            )


def _storage(history: History, report: OracleReport) -> None:
    report.writes = len(history.writes)
    read = {(r.namespace, r.key): r for r in history.reads}
    for write in history.writes:
        got = read.get((write.namespace, write.key))
        if got is not None and got.value == write.value:
            report.writes_read_back += 1
            continue
        why = "not read back" if got is None else (got.error or f"read {got.value!r}")
        report.violations.append(
            Violation(
                "lost_write",
                f"acknowledged write {write.namespace}/{write.key} at {write.t:.3f}: {why}",
            )
        )
