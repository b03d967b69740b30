"""Policy errors. An engine failure is a TransportError (UNAVAILABLE unless failure_mode
says open); a policy that does not compile or load is a PolicyLoadError."""

from __future__ import annotations

from ztagent.errors import ZtagentError


class PolicyError(ZtagentError):
    """Evaluation failed: ``policy_engine_error``, ``policy_timeout``, ``policy_undefined``
    (no decision at the decision path) or ``policy_bad_decision`` (wrong shape)."""


class PolicyLoadError(ZtagentError):
    """Policies or data could not be loaded/compiled: ``policy_parse_error``,
    ``policy_compile_error``, ``policy_data_invalid``, ``bundle_invalid``. The message names
    the file (and line where known)."""
