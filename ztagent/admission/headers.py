"""Which request headers reach the policy input (and so the decision log): an allow-list.

The policy input used to carry every header but four credential names, so any other
credential (``x-refresh-token``, ``x-auth-token``, ``api-key``...) was stored in clear, and a
client could fill each decision-log line with kilobytes of junk. Now only the listed headers
are copied, and a name that looks like a credential is refused even when listed: it is never
copied into the input or the log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztagent.errors import ZtagentError

DEFAULT_INPUT_HEADERS = ("x-model",)
"""What the shipped policy reads (``services[S].model_metadata_key``)."""
MAX_HEADER_VALUE_CHARS = 256
"""A listed header's value is cut to this many characters in the input."""

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CREDENTIAL_WORDS = (
    "auth", "token", "secret", "password", "passwd", "cookie", "session", "credential",
    "signature", "api-key", "apikey", "api_key", "private", "jwt", "bearer",
)  # fmt: skip


class InputHeadersError(ZtagentError):
    """An unusable header allow-list (code ``input_headers_invalid``)."""

    status_name = "FAILED_PRECONDITION"
    codes = frozenset({"input_headers_invalid"})


def looks_like_credential(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _CREDENTIAL_WORDS)


@dataclass(frozen=True)
class InputHeaders:
    """The header names the policy input carries; validated on construction."""

    names: frozenset[str] = frozenset(DEFAULT_INPUT_HEADERS)

    def __post_init__(self) -> None:
        for name in self.names:
            if not _NAME.fullmatch(name):
                raise InputHeadersError(
                    "input_headers_invalid",
                    f"{name!r} is not a lowercase header name (expected [a-z0-9._-], 1-64)",
                )
            if name.startswith(("grpc-", "x-ztagent-")):
                raise InputHeadersError(
                    "input_headers_invalid",
                    f"{name!r} is reserved (grpc-* and x-ztagent-* never reach the policy)",
                )
            if looks_like_credential(name):
                raise InputHeadersError(
                    "input_headers_invalid",
                    f"{name!r} looks like a credential; credentials are never copied into the "
                    "policy input or the decision log",
                )
