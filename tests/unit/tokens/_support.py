"""Shared material for token tests: a fixed time, an issuer key, and a token builder."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, KeySet

from ztagent.tokens.policy import TokenPolicy

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
ISSUER = "https://ztagent.dev/dev-issuer"
AUDIENCE = "ztagent"
POLICY = TokenPolicy(issuer=ISSUER, audiences=(AUDIENCE,))

_UNSET: Any = object()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(doc: Mapping[str, Any]) -> str:
    return b64(json.dumps(doc).encode())


def new_key() -> ECKey:
    return ECKey.generate_key("P-256", auto_kid=True)


def public_set(*keys: ECKey | Any) -> KeySet:
    return KeySet([type(k).import_key(k.as_dict(private=False)) for k in keys])


def claims(**overrides: Any) -> dict[str, Any]:
    """Good claims at NOW; an override of None removes the claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": T - 60,
        "nbf": T - 60,
        "exp": T + 600,
        "scope": "storage.read",
        "roles": ["reader"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    key: Any,
    payload: Mapping[str, Any] | None = None,
    *,
    alg: str = "ES256",
    kid: Any = _UNSET,
    **header: Any,
) -> str:
    protected: dict[str, Any] = {"alg": alg, "typ": "at+jwt", **header}
    protected["kid"] = key.kid if kid is _UNSET else kid
    protected = {k: v for k, v in protected.items() if v is not None}  # None removes a header
    body = json.dumps(claims() if payload is None else dict(payload))
    return jws.serialize_compact(protected, body, key, algorithms=[alg])


class FakeMonotonic:
    """An injected monotonic clock; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeWallClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def jwks_bytes(*keys: Any) -> bytes:
    return json.dumps({"keys": [k.as_dict(private=False) for k in keys]}).encode()
