"""The decision and the engine interface every policy engine implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztagent.policy.errors import PolicyError

DEFAULT_DECISION_PATH = "data.ztagent.authz.decision"


@dataclass(frozen=True)
class Decision:
    """``data.ztagent.authz.decision`` parsed: {"allow": bool, "reasons": [str], "headers": {}}."""

    allow: bool
    reasons: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    revision: str = ""
    """Which policy produced it: bundle manifest revision, or sha256 of the sources."""
    cached: bool = False
    """Answered by the exact decision cache (``policy.decision_cache``), not evaluated."""

    @classmethod
    def from_result(cls, result: object, revision: str) -> Decision:
        """Validates the shape of a raw engine result; raises PolicyError(policy_bad_decision
        or policy_undefined). Runs on every call: plain loops, no comprehension frames."""
        if result is None:
            raise PolicyError("policy_undefined", "the decision path produced no value")
        if type(result) is not dict:
            raise PolicyError(
                "policy_bad_decision", f"expected an object, got {type(result).__name__}"
            )
        allow = result.get("allow")
        if type(allow) is not bool:
            raise PolicyError("policy_bad_decision", f"'allow' must be a boolean, got {allow!r}")
        reasons = result.get("reasons", [])
        if type(reasons) is not list:
            raise PolicyError(
                "policy_bad_decision", f"'reasons' must be a list of strings, got {reasons!r}"
            )
        for reason in reasons:
            if type(reason) is not str:
                raise PolicyError(
                    "policy_bad_decision", f"'reasons' must be a list of strings, got {reasons!r}"
                )
        headers = result.get("headers", {})
        if type(headers) is not dict:
            raise PolicyError(
                "policy_bad_decision", f"'headers' must map strings to strings, got {headers!r}"
            )
        for key, value in headers.items():
            if type(key) is not str or type(value) is not str:
                raise PolicyError(
                    "policy_bad_decision",
                    f"'headers' must map strings to strings, got {headers!r}",
                )
        reasons.sort()
        return cls(allow, tuple(reasons), headers, revision)


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
