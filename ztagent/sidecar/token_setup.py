"""Build the token verifier from the validated ``[tokens]`` configuration."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from ztagent.config import TokensConfig
from ztagent.device.jwks_fetch import JwksSource
from ztagent.errors import ConfigError
from ztagent.tokens.verifier import TokenVerifier


def _utcnow() -> datetime:
    return datetime.now(UTC)


def source_from_config(
    tokens: TokensConfig, *, monotonic: Callable[[], float] = time.monotonic
) -> JwksSource:
    location: str | Path | None = tokens.jwks_url or tokens.jwks_file
    if location is None:
        raise ConfigError(
            "tokens.jwks_file", "set exactly one of tokens.jwks_file, tokens.jwks_url"
        )
    return JwksSource(
        location,
        ca_bundle=tokens.jwks_ca_bundle,
        cache_ttl_s=tokens.jwks_cache_ttl_s,
        min_refresh_interval_s=tokens.jwks_min_refresh_interval_s,
        clock=monotonic,
        cache_file=tokens.jwks_cache_file,
        max_stale_s=tokens.jwks_max_stale_s,
        fetch_timeout_s=tokens.jwks_fetch_timeout_s,
    )


def verifier_from_config(
    tokens: TokensConfig, clock: Callable[[], datetime] = _utcnow
) -> TokenVerifier:
    """Policy and key source from ``[tokens]``; no IO until the first ``verify``/``prime``."""
    return TokenVerifier(source_from_config(tokens), tokens.policy, clock)
