"""The decision and the engine interface every policy engine implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_DECISION_PATH = "data.ztagent.authz.decision"


@dataclass(frozen=True)
class Decision:
    """``data.ztagent.authz.decision`` parsed: {"allow": bool, "reasons": [str], "headers": {}}."""

    allow: bool
    reasons: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    revision: str = ""
    """Which policy produced it: bundle manifest revision, or sha256 of the sources."""

    @classmethod
    def from_result(cls, result: object, revision: str) -> Decision:
        """Validates the shape of a raw engine result; raises PolicyError(policy_bad_decision
        or policy_undefined)."""
        from ztagent.policy.errors import PolicyError

        if result is None:
            raise PolicyError("policy_undefined", "the decision path produced no value")
        if not isinstance(result, dict):
            raise PolicyError(
                "policy_bad_decision", f"expected an object, got {type(result).__name__}"
            )
        allow = result.get("allow")
        if not isinstance(allow, bool):
            raise PolicyError("policy_bad_decision", f"'allow' must be a boolean, got {allow!r}")
        reasons = result.get("reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise PolicyError(
                "policy_bad_decision", f"'reasons' must be a list of strings, got {reasons!r}"
            )
        headers = result.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise PolicyError(
                "policy_bad_decision", f"'headers' must map strings to strings, got {headers!r}"
            )
        return cls(allow=allow, reasons=tuple(sorted(reasons)), headers=headers, revision=revision)


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    """False while the last reload failed (the previous policy keeps serving) or the engine is
    unreachable."""
    revision: str
    last_error: str | None = None


class PolicyEngine(Protocol):
    """One interface for the embedded and the remote engine."""

    @property
    def revision(self) -> str: ...

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        """Evaluates the decision path; raises PolicyError on any failure."""
        ...

    def health(self) -> EngineHealth: ...

    def maybe_reload(self) -> bool:
        """Reloads when the sources changed; True if a new policy is now serving. Never raises:
        a broken new policy is refused, logged, and reported through health()."""
        ...

    async def close(self) -> None: ...
