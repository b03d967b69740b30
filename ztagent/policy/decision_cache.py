"""An exact decision cache: the same policy, the same input *as far as the policy reads it*,
the same decision.

Caching on the whole input is useless (it holds the time, the peer address, the posture age);
caching on nothing is wrong. At policy load, ``read_set`` walks the compiled policy's AST
(Regorus ``get_ast_as_json``) and collects every ``input.…`` reference path: a field path
as far as it is spelled with constant names (``input.user.sub``,
``input.request.metadata["x-model"]``), cut at the first computed index
(``input.request.metadata[k]`` reads the whole ``metadata``). A bare ``input`` (passed to a
function, ``object.get(input, ...)``, ``walk(input)``) reads everything; a call to a builtin
whose answer is not a function of its arguments (``time.now_ns``, ``rand.intn``,
``http.send``, ``uuid.rfc4122``, ...) makes every decision uncacheable. In both cases the
cache is off for that policy revision and says why.

The cache key is the policy revision plus the canonical JSON of the input projected onto
the read set, so a policy or data reload, a changed posture, a different user or device, a
rotated trust anchor that changes the device document — anything the policy can see — is a
different key. Engine errors are never cached. Bounded (LRU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ztagent.canonical_json import dumps
from ztagent.policy.types import Decision, EngineHealth, PolicyEngine

log = logging.getLogger("ztagent.policy")

DEFAULT_MAX_ENTRIES = 10_000
NON_DETERMINISTIC_PREFIXES = (
    "time.now",
    "rand.",
    "http.send",
    "uuid.",
    "net.lookup",
    "opa.runtime",
    "crypto.x509.parse_and_verify",
    "io.jwt.decode_verify",
    "trace",
    "print",
)
"""Builtins whose result is not a function of their arguments (or that have side effects)."""

CacheKey = tuple[int, bytes]
"""Which read paths are missing (a bit per path), and the canonical JSON of the values of
the others (``null`` where a path is missing): a missing field and any value, ``null``
included, are different keys."""


@dataclass(frozen=True)
class ReadSet:
    """What a policy reads of its input: field paths, or ``None`` when it cannot be cached
    (``reason`` says why)."""

    paths: tuple[tuple[str, ...], ...] | None
    reason: str = ""

    @property
    def cacheable(self) -> bool:
        return self.paths is not None


def _ref_path(node: Any) -> tuple[bool, list[str], list[Any]] | None:
    """For a ref chain (``Var``, ``RefDot``, ``RefBrack``): whether it is rooted at
    ``input``, its path from there as far as every step is a constant name, and the index
    expressions (which may read input themselves). None when ``node`` is not a ref."""
    steps: list[tuple[str, Any]] = []
    current = node
    while True:
        if not isinstance(current, dict) or len(current) != 1:
            return None
        ((kind, body),) = current.items()
        if kind == "Var":
            rooted = body.get("value") == "input"
            break
        if kind == "RefDot":
            field = body.get("field")
            name = field[1] if isinstance(field, list) and len(field) == 2 else None
            steps.append(("dot", name))
        elif kind == "RefBrack":
            steps.append(("brack", body.get("index")))
        else:
            return None
        current = body.get("refr")
    path: list[str] = []
    indices: list[Any] = []
    cut = False
    for step, value in reversed(steps):  # innermost first
        name = value if step == "dot" else _string_constant(value)
        if step == "brack":
            indices.append(value)
        if cut or not isinstance(name, str):
            cut = True
            continue
        path.append(name)
    return rooted, path, indices


def _string_constant(node: Any) -> str | None:
    if isinstance(node, dict) and len(node) == 1 and "String" in node:
        value = node["String"].get("value")
        return value if isinstance(value, str) else None
    return None


def _call_name(body: Any) -> str | None:
    fcn = body.get("fcn") if isinstance(body, dict) else None
    parts: list[str] = []
    while isinstance(fcn, dict) and len(fcn) == 1:
        ((kind, inner),) = fcn.items()
        if kind == "Var":
            parts.append(str(inner.get("value")))
            break
        if kind == "RefDot":
            field = inner.get("field")
            parts.append(str(field[1]) if isinstance(field, list) and len(field) == 2 else "?")
            fcn = inner.get("refr")
            continue
        return None
    return ".".join(reversed(parts)) if parts else None


def read_set(ast_json: str) -> ReadSet:
    """The input paths the policy modules in ``ast_json`` read (see the module doc)."""
    paths: set[tuple[str, ...]] = set()
    modules = json.loads(ast_json)
    for module in modules:
        if not isinstance(module, dict):
            continue
        for kind, body in _walk_refs(module.get("ast")):
            if kind == "call":
                name = str(body)
                if name.startswith(NON_DETERMINISTIC_PREFIXES):
                    return ReadSet(None, f"the policy calls {name}(), which is not deterministic")
            else:
                path = tuple(body)
                if not path:
                    return ReadSet(None, "the policy reads the whole input (a bare `input`)")
                paths.add(path)
    # A path covered by a shorter one adds nothing.
    kept = sorted(p for p in paths if not any(q != p and p[: len(q)] == q for q in paths))
    return ReadSet(tuple(kept))


def _walk_refs(node: Any) -> Iterator[tuple[str, Any]]:
    """Input paths ("path", parts) and builtin calls ("call", name) under ``node``, the
    computed indices of input refs included (they may read input themselves)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, list):
            stack.extend(current)
            continue
        if not isinstance(current, dict):
            continue
        ref = _ref_path(current)
        if ref is not None and ref[0]:
            yield "path", ref[1]
            stack.extend(ref[2])  # computed indices may read input too
            continue
        if len(current) == 1:
            ((kind, body),) = current.items()
            if kind == "Call":
                name = _call_name(body)
                if name is not None:
                    yield "call", name
        for key, value in current.items():
            if key not in ("span", "source") and isinstance(value, dict | list):
                stack.append(value)


def project(input_doc: Mapping[str, Any], paths: tuple[tuple[str, ...], ...]) -> CacheKey | None:
    """``input_doc`` restricted to ``paths``, as a cache key (None: a value JSON cannot
    hold, so this input is evaluated uncached)."""
    out = []
    missing = 0
    bit = 1
    for path in paths:
        value: Any = input_doc
        try:
            for part in path:
                # a JSON value: an object has the key (KeyError when not); a string, a
                # number, an array, null or false have no fields (TypeError)
                value = value[part]
        except (KeyError, TypeError):  # every part is a str: an array raises TypeError
            value = None
            missing |= bit
        out.append(value)
        bit <<= 1
    try:
        return missing, dumps(out)
    except (TypeError, ValueError):
        return None


class CachedEngine:
    """A ``PolicyEngine`` answering repeated decisions from an exact cache.

    ``ast_of`` gives the AST JSON of the engine's current policy; the read set is recomputed
    whenever the engine's revision changes (and the cache starts empty)."""

    def __init__(
        self,
        engine: PolicyEngine,
        ast_of: Callable[[], str],
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.inner = engine
        self._ast_of = ast_of
        self._max = max_entries
        self._entries: OrderedDict[CacheKey, Decision] = OrderedDict()
        self._revision: str | None = None
        self._read = ReadSet(None, "not loaded")
        self.hits = 0
        self.misses = 0

    @property
    def revision(self) -> str:
        return self.inner.revision

    def _refresh(self) -> None:
        revision = self.inner.revision
        if revision == self._revision:
            return
        self._entries.clear()
        self._revision = revision
        try:
            self._read = read_set(self._ast_of())
        except (ValueError, TypeError, KeyError) as exc:
            self._read = ReadSet(None, f"the policy AST could not be read: {exc}")
        if self._read.cacheable:
            log.info("decision cache on for revision %s: reads %s", revision, self._read.paths)
        else:
            log.info("decision cache off for revision %s: %s", revision, self._read.reason)

    def _lookup(self, input_doc: Mapping[str, Any]) -> tuple[CacheKey | None, Decision | None]:
        self._refresh()
        paths = self._read.paths
        if paths is None:
            return None, None
        key = project(input_doc, paths)
        if key is None:
            return None, None
        hit = self._entries.get(key)
        if hit is not None and hit.revision == self.inner.revision:
            self._entries.move_to_end(key)
            self.hits += 1
            return key, hit
        return key, None

    def _store(self, key: CacheKey | None, decision: Decision) -> Decision:
        if key is None:
            return decision
        self.misses += 1
        if decision.revision == self._revision:
            # stored as it is answered from now on: marked cached (Decision is frozen)
            self._entries[key] = dataclasses.replace(decision, cached=True)
            if len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return decision

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        key, hit = self._lookup(input_doc)
        if hit is not None:
            return hit
        return self._store(key, await self.inner.evaluate(input_doc))  # errors: uncached

    def evaluate_sync(self, input_doc: Mapping[str, Any]) -> Decision:
        """``evaluate`` for an inner engine with ``evaluate_sync`` (tools, benchmarks)."""
        key, hit = self._lookup(input_doc)
        if hit is not None:
            return hit
        decision: Decision = self.inner.evaluate_sync(input_doc)  # type: ignore[attr-defined]
        return self._store(key, decision)

    def health(self) -> EngineHealth:
        return self.inner.health()

    def maybe_reload(self) -> bool:
        reloaded = self.inner.maybe_reload()
        if reloaded:
            self._refresh()
        return reloaded

    async def close(self) -> None:
        await self.inner.close()
