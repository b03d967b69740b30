"""What the sidecar demands of a user token: the one place the token rules are stated.

The configuration builds ``TokenPolicy`` from ``[tokens]`` and wraps a ``TokenPolicyError``
with the key's name; the verifier (``tokens.verify``) enforces it. Nothing else restates an
allowed algorithm or a limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ztagent.tokens.errors import TokenPolicyError

ALGORITHM_KEYS: Mapping[str, tuple[str, frozenset[str] | None]] = MappingProxyType(
    {
        "ES256": ("EC", frozenset({"P-256"})),
        "ES384": ("EC", frozenset({"P-384"})),
        "ES512": ("EC", frozenset({"P-521"})),
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
        "Ed25519": ("OKP", frozenset({"Ed25519"})),
    }
)
"""The algorithms a policy may allow, with the key type (and curves) each one needs.

Only asymmetric signatures: ``none`` and HMAC (``HS*``) are absent on purpose."""

MAX_LEEWAY_S = 300.0
MIN_LIFETIME_S = 1.0
"""``max_lifetime_s`` below this would refuse every token."""
MIN_TOKEN_BYTES = 256
"""``max_token_bytes`` below this would refuse any real token."""


@dataclass(frozen=True)
class TokenPolicy:
    """What the sidecar demands of a user token."""

    issuer: str
    """Expected ``iss``, compared exactly."""
    audiences: tuple[str, ...]
    """Accepted ``aud`` values; a token matches when any of its audiences is listed."""
    algorithms: tuple[str, ...] = ("ES256",)
    """Allowed JWS algorithms (keys of ``ALGORITHM_KEYS``); never ``none``, never HMAC."""
    leeway_s: float = 30
    """Clock skew tolerated on exp / nbf / iat, in seconds (0 to ``MAX_LEEWAY_S``)."""
    max_token_bytes: int = 8192
    """Longer tokens are refused before any decoding."""
    typ: str | None = None
    """Required ``typ`` header (e.g. ``at+jwt``); None = not checked."""
    require_cert_binding: bool = False
    """Require ``cnf.x5t#S256`` (RFC 8705) matching the client certificate."""
    max_lifetime_s: float | None = None
    """Longest accepted lifetime, in seconds: ``exp - iat``, or ``exp - now`` when the token
    has no ``iat``; longer is ``token_lifetime_too_long``. None = no cap (the default)."""

    def __post_init__(self) -> None:
        if not self.issuer:
            raise TokenPolicyError("issuer", "missing (expected the issuer URL, e.g. https://...)")
        if not self.audiences or not all(self.audiences):
            raise TokenPolicyError(
                "audience", f"{list(self.audiences)!r} (expected one or more audiences)"
            )
        if not self.algorithms:
            raise TokenPolicyError("algorithms", "empty (expected e.g. ['ES256'])")
        for alg in self.algorithms:
            if alg not in ALGORITHM_KEYS:
                raise TokenPolicyError(
                    "algorithms",
                    f"{alg!r} is not allowed (expected asymmetric algorithms: "
                    f"{', '.join(ALGORITHM_KEYS)}; never none or HMAC)",
                )
        if not math.isfinite(self.leeway_s) or not 0 <= self.leeway_s <= MAX_LEEWAY_S:
            raise TokenPolicyError(
                "leeway_s", f"{self.leeway_s} (expected 0 to {MAX_LEEWAY_S:g} seconds)"
            )
        if self.max_token_bytes < MIN_TOKEN_BYTES:
            raise TokenPolicyError(
                "max_token_bytes",
                f"{self.max_token_bytes} (expected at least {MIN_TOKEN_BYTES} bytes)",
            )
        if self.max_lifetime_s is not None and not (
            math.isfinite(self.max_lifetime_s) and self.max_lifetime_s >= MIN_LIFETIME_S
        ):
            raise TokenPolicyError(
                "max_lifetime_s",
                f"{self.max_lifetime_s} (expected a number >= {MIN_LIFETIME_S:g} seconds, "
                "or leave it unset for no cap)",
            )
        if self.typ is not None and not self.typ.strip():
            raise TokenPolicyError("typ", "empty (expected e.g. 'at+jwt', or leave it unset)")
