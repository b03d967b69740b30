"""The issuer's key set (JWKS) as data: parsing and the health record. No IO.

The fetcher (file, ``https://``, OIDC discovery, cache and rate limit) is
``ztagent.device.jwks_fetch.JwksSource``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ztagent import json_input
from ztagent.tokens.errors import JwksError

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_DOCUMENT_BYTES = 1 << 20
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


@dataclass(frozen=True)
class JwksHealth:
    """State of a key source, for health checks and metrics."""

    ok: bool
    """A fetch succeeded since start and the last attempt did too (a key set read from
    the cache file on disk alone is not ok: it is the last good copy, running down)."""
    last_error: str | None
    """Why the last fetch attempt failed (None after a success)."""
    fetched_at: datetime | None
    """Wall-clock time of the last successful fetch (None: never)."""
    fetch_failures: int = 0
    """Failed fetch attempts since start."""


def parse_jwks(data: bytes, where: str = "JWKS") -> KeySet:
    """Parse a JWKS document into signing keys; raise ``JwksError`` (``jwks_invalid``).

    Keys with ``use`` other than ``sig`` and key types joserfc does not know are skipped.
    A set holding private or symmetric key material is refused as a whole: that is a
    leaked key or a misconfigured issuer, never something to verify with.
    """
    try:  # fetched from the network: nesting bounded
        doc = json_input.loads(data)
    except ValueError as exc:  # also not UTF-8, nested too deep
        raise JwksError("jwks_invalid", f"{where} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError("jwks_invalid", f"{where} has no 'keys' list (expected a JWK Set)")
    kept: list[dict[str, Any]] = []
    for index, entry in enumerate(doc["keys"]):
        if not isinstance(entry, dict):
            raise JwksError("jwks_invalid", f"{where} key #{index} is not an object")
        private = sorted(_PRIVATE_MEMBERS & entry.keys())
        if private or entry.get("kty") == "oct":
            raise JwksError(
                "jwks_invalid",
                f"{where} key #{index} holds private or symmetric key material "
                f"(members {private or ['kty=oct']}; expected public keys only)",
            )
        if entry.get("use", "sig") != "sig":
            continue
        kept.append(entry)
    if not kept:
        raise JwksError("jwks_invalid", f"{where} holds no public signing keys")
    try:
        return KeySet.import_key_set({"keys": kept})
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise JwksError("jwks_invalid", f"{where} has a key that does not import: {exc}") from None
