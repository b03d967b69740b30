"""``OpaEngine``: the remote policy engine, an OPA server reached over its REST API.

Every decision is one ``POST /v1/data/<decision path>`` with ``{"input": ...}`` through
opa-python-client's async client (``opa_client.opa_async.AsyncOpaClient``), which keeps one
aiohttp session, so connections to OPA are reused for the life of the engine. Each call is
bounded by ``timeout_s`` and never retried (the library's retry with back-off is switched
off: a retry would not fit in a per-request budget of a few hundred milliseconds).

Failures are ``PolicyError``: ``policy_timeout`` when OPA does not answer in time,
``policy_engine_error`` when it cannot be reached or answers with an HTTP error or a body
that is not a JSON object, ``policy_undefined`` when the answer has no ``result`` (the
decision path is undefined for this input), ``policy_bad_decision`` when the result has the
wrong shape. The OPA server loads its own policies (bundles, discovery), so
``maybe_reload`` never reloads anything here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from opa_client.opa_async import AsyncOpaClient

from ztagent.errors import ConfigError
from ztagent.policy.errors import PolicyError
from ztagent.policy.types import DEFAULT_DECISION_PATH, Decision, EngineHealth

if TYPE_CHECKING:
    from ztagent.config import PolicyConfig

DEFAULT_OPA_URL = "http://127.0.0.1:8181"
DEFAULT_TIMEOUT_S = 0.25
UNKNOWN_REVISION = "opa"
"""The revision reported when OPA's answer carries no provenance."""


class OpaEngine:
    """``PolicyEngine`` backed by an OPA server (``url`` is its base URL, no path)."""

    def __init__(
        self,
        url: str = DEFAULT_OPA_URL,
        *,
        decision_path: str = DEFAULT_DECISION_PATH,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError("policy.timeout_ms", f"expected a positive timeout, got {timeout_s}")
        host, port, tls = _parse_url(url)
        self._url = url.rstrip("/")
        self._data_path = _data_path(decision_path)
        self._timeout_s = timeout_s
        self._client = AsyncOpaClient(host=host, port=port, ssl=tls, retries=0, timeout=timeout_s)
        self._opened = False
        self._closed = False
        self._revision = UNKNOWN_REVISION
        self._last_error: str | None = None

    @classmethod
    def from_config(cls, config: PolicyConfig) -> OpaEngine:
        return cls(config.opa_url, decision_path=config.decision_path, timeout_s=config.timeout_s)

    @property
    def url(self) -> str:
        """The decision URL, ``<base>/v1/data/<path>``."""
        return f"{self._url}/v1/data/{self._data_path}"

    @property
    def revision(self) -> str:
        """The bundle revision OPA reported in its last answer, else ``"opa"``."""
        return self._revision

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        try:
            body = await self._query(input_doc)
            if "result" not in body:
                raise PolicyError(
                    "policy_undefined",
                    f"OPA answered without a result for {self.url} (got keys {sorted(body)}, "
                    "expected 'result'): the decision is undefined for this input",
                )
            revision = _revision_of(body)
            decision = Decision.from_result(body["result"], revision)
        except PolicyError as err:
            self._last_error = str(err)
            raise
        self._revision = revision
        self._last_error = None
        return decision

    async def _query(self, input_doc: Mapping[str, Any]) -> dict[str, Any]:
        """One round trip; every failure leaves as a PolicyError."""
        if self._closed:
            raise PolicyError("policy_engine_error", f"the OPA engine for {self._url} is closed")
        try:
            async with asyncio.timeout(self._timeout_s):
                if not self._opened:
                    await self._client.__aenter__()  # one aiohttp session for the engine's life
                    self._opened = True
                body = await self._client.query_rule(
                    input_data=dict(input_doc),
                    package_path=self._data_path,
                    query_params={"provenance": "true"},
                )
        except TimeoutError:
            raise PolicyError(
                "policy_timeout",
                f"OPA at {self.url} did not answer within {self._timeout_s * 1000:g} ms",
            ) from None
        except aiohttp.ContentTypeError as exc:
            raise PolicyError(
                "policy_engine_error",
                f"OPA at {self.url} answered HTTP {exc.status} with content type "
                f"{_content_type(exc)} (expected application/json)",
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise PolicyError(
                "policy_engine_error",
                f"OPA at {self.url} answered HTTP {exc.status} {exc.message} (expected 200)",
            ) from exc
        except aiohttp.ClientError as exc:
            raise PolicyError(
                "policy_engine_error",
                f"cannot reach OPA at {self.url}: {exc or type(exc).__name__}",
            ) from exc
        except ValueError as exc:  # json.JSONDecodeError
            raise PolicyError(
                "policy_engine_error", f"OPA at {self.url} answered with invalid JSON: {exc}"
            ) from exc
        except TypeError as exc:
            raise PolicyError(
                "policy_engine_error", f"the input document is not JSON-serialisable: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise PolicyError(
                "policy_engine_error",
                f"OPA at {self.url} answered a JSON {type(body).__name__} (expected an object)",
            )
        return body

    def health(self) -> EngineHealth:
        return EngineHealth(
            ok=self._last_error is None, revision=self._revision, last_error=self._last_error
        )

    def maybe_reload(self) -> bool:
        """The OPA server manages its own policies and bundles: nothing to reload here."""
        return False

    async def close(self) -> None:
        self._closed = True
        if self._opened:
            self._opened = False
            await self._client.close_connection()


def _parse_url(url: str) -> tuple[str, int, bool]:
    """``http(s)://host[:port]`` -> (host, port, tls)."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("policy.opa_url", f"expected http(s)://host:port, got {url!r}")
    if parts.path or parts.query or parts.fragment:
        raise ConfigError("policy.opa_url", f"expected a base URL without a path, got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError("policy.opa_url", f"bad port in {url!r}: {exc}") from None
    tls = parts.scheme == "https"
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return host, port if port is not None else (443 if tls else 80), tls


def _data_path(decision_path: str) -> str:
    """``data.ztagent.authz.decision`` -> ``ztagent/authz/decision``."""
    segments = decision_path.split(".")
    if len(segments) < 2 or segments[0] != "data" or not all(segments[1:]):
        raise ConfigError(
            "policy.decision_path", f"expected data.<package>.<rule>, got {decision_path!r}"
        )
    return "/".join(segments[1:])


def _revision_of(body: Mapping[str, Any]) -> str:
    """The policy revision from OPA's ``provenance`` (asked for with ``?provenance=true``):
    the bundle revision(s), else the legacy top-level revision, else ``"opa"``."""
    provenance = body.get("provenance")
    if not isinstance(provenance, dict):
        return UNKNOWN_REVISION
    bundles = provenance.get("bundles")
    if isinstance(bundles, dict):
        revisions: dict[str, str] = {
            str(name): str(info["revision"])
            for name, info in bundles.items()
            if isinstance(info, dict) and isinstance(info.get("revision"), str)
        }
        if len(revisions) == 1:
            return next(iter(revisions.values()))
        if revisions:
            return json.dumps(revisions, sort_keys=True, separators=(",", ":"))
    revision = provenance.get("revision")
    return revision if isinstance(revision, str) and revision else UNKNOWN_REVISION


def _content_type(exc: aiohttp.ClientResponseError) -> str:
    if exc.headers is None:
        return "unknown"
    return str(exc.headers.get("Content-Type", "unknown"))
