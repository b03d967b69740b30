"""``EmbeddedEngine``: Rego evaluated in-process by Regorus (``import regorus``).

Sources are compiled once into a ``regorus.Engine`` (modules + data) and probed with a sample
input, so a policy that cannot evaluate is refused at load. ``evaluate`` runs inline in the
coroutine (synchronous CPU work of tens of microseconds): it sets the input as a Python object
(``set_input`` converts directly; ``set_input_json(json.dumps(...))`` measured about twice as
slow) and reads the result with ``eval_rule`` (native objects; Rego sets come back as Python
sets and are turned into sorted lists). A set of objects or arrays cannot become a Python set,
so for those results it falls back to ``eval_rule_as_json``.

Hot reload: ``maybe_reload`` builds a complete new engine and then replaces one attribute. All
callers share one event loop and ``evaluate`` never awaits between reading that attribute and
finishing, so the swap is atomic with respect to concurrent evaluations. (To evaluate from
worker threads instead, give each thread its own ``engine.clone()``, about 1 us per clone.)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regorus

from ztagent.policy.errors import PolicyError, PolicyLoadError
from ztagent.policy.sources import (
    Keys,
    PolicySources,
    last_good_path,
    load_sources,
    save_last_good,
    sources_signature,
)
from ztagent.policy.types import DEFAULT_DECISION_PATH, Decision, EngineHealth
from ztagent.posture import unverified_posture
from ztagent.tokens.verify import anonymous_user_input

logger = logging.getLogger("ztagent.policy")

SAMPLE_INPUT: Mapping[str, Any] = {
    "device": {
        "id": "sample-device",
        "spiffe_id": "spiffe://ztagent.dev/device/sample-device",
        "serial": "01",
        "fingerprint_sha256": "0" * 64,
        "issuer": "CN=sample",
        "not_before": "2026-01-01T00:00:00Z",
        "not_after": "2026-01-02T00:00:00Z",
    },
    "posture": unverified_posture(),
    "user": anonymous_user_input(),
    "request": {
        "service": "ztagent.sample.v1.Sample",
        "method": "Get",
        "full_method": "/ztagent.sample.v1.Sample/Get",
        "metadata": {},
        "peer": "ipv4:127.0.0.1:1",
    },
    "context": {"time": "2026-01-01T00:00:00Z", "node": "sample", "agent_version": "0.0.0"},
}
"""A minimal input with every key present; used to probe a policy at load."""

_LOCATION = re.compile(r"-->\s*(?P<file>.+):(?P<line>\d+):(?P<col>\d+)\s*$", re.MULTILINE)
_ERROR_LINE = re.compile(r"^error:\s*(?P<msg>.*)$", re.MULTILINE)
_NOT_A_RULE = "not a valid rule path"


@dataclass(frozen=True)
class EngineErrorInfo:
    """A Regorus error message taken apart: where (when it says) and what."""

    file: str | None
    line: int | None
    column: int | None
    message: str

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


def parse_engine_error(exc: BaseException) -> EngineErrorInfo:
    """Parses ``--> file:line:col ... error: message`` out of a Regorus exception text,
    dropping the Rust backtrace (printed when RUST_BACKTRACE is set)."""
    text = str(exc)
    for marker in ("\nStack backtrace:", "\n\nCaused by:"):
        text = text.split(marker, 1)[0]
    text = text.strip()
    # nested errors ("Compilation error: --> inner...") are reported innermost last
    locs = list(_LOCATION.finditer(text))
    errs = list(_ERROR_LINE.finditer(text))
    loc = locs[-1] if locs else None
    if errs:
        message = errs[-1].group("msg").strip()
    else:
        message = (text.splitlines() or [type(exc).__name__])[0]
    if loc is None:
        return EngineErrorInfo(None, None, None, message)
    return EngineErrorInfo(loc["file"], int(loc["line"]), int(loc["col"]), message)


def module_name(path: Path, rel: str) -> str:
    """The name a module is registered under (shown in errors, prints and coverage)."""
    return str(path / rel)


def new_engine(path: Path, sources: PolicySources) -> Any:
    """A ``regorus.Engine`` with every module parsed and the data added (nothing evaluated:
    compile errors such as unsafe variables or unknown functions surface at first eval).
    Raises PolicyLoadError(policy_parse_error | policy_data_invalid)."""
    engine = regorus.Engine()
    for rel, text in sources.modules:
        try:
            engine.add_policy(module_name(path, rel), text)
        except RuntimeError as exc:
            info = parse_engine_error(exc)
            if info.file is None:
                info = EngineErrorInfo(module_name(path, rel), None, None, info.message)
            raise PolicyLoadError("policy_parse_error", str(info)) from None
    if sources.data:
        try:
            engine.add_data(sources.data)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise PolicyLoadError(
                "policy_data_invalid", f"{path}: data rejected by the engine: {exc}"
            ) from None
    return engine


_SCALARS = (str, bool, int, float, type(None))


def to_plain(value: Any) -> Any:
    """Turns Regorus results into JSON-shaped values: sets become sorted lists. (Exact type
    checks first: this runs on every decision, and strings are most of what it sees.)"""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {k: v if type(v) is str else to_plain(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) is str else to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        items = [to_plain(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def eval_path(engine: Any, rule_path: str) -> Any:
    """Evaluates ``rule_path`` on an engine whose input is set; None when undefined. Raises
    PolicyError(policy_engine_error)."""
    try:
        try:
            return to_plain(engine.eval_rule(rule_path))
        except TypeError:  # a set of objects/arrays cannot be a Python set
            return json.loads(engine.eval_rule_as_json(rule_path))
    except RuntimeError as exc:
        info = parse_engine_error(exc)
        if info.message.startswith(_NOT_A_RULE):
            raise PolicyError(
                "policy_engine_error", f"{rule_path} is not defined by any loaded module"
            ) from None
        raise PolicyError("policy_engine_error", f"evaluating {rule_path}: {info}") from None


def set_input(engine: Any, input_doc: Mapping[str, Any]) -> None:
    try:
        engine.set_input(input_doc)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise PolicyError(
            "policy_engine_error", f"input cannot be given to the engine: {exc}"
        ) from None


@dataclass(frozen=True)
class _Compiled:
    engine: Any
    revision: str
    signed_by: str | None = None
    dry_run: bool = False
    """A shadow bundle: its decisions are logged and not enforced (``serves_shadow``)."""


def serves_shadow(engine: object, revision: str) -> bool:
    """True when ``engine`` (an EmbeddedEngine, or a wrapper of one exposing it as ``inner``,
    such as the decision cache) now serves a shadow bundle of exactly ``revision``: a
    decision of that revision is then logged, not enforced. A revision that just changed
    under a concurrent reload answers False (enforce)."""
    while not isinstance(engine, EmbeddedEngine) and hasattr(engine, "inner"):
        engine = engine.inner
    if not isinstance(engine, EmbeddedEngine):
        return False
    current = engine._current
    return current.dry_run and current.revision == revision


class EmbeddedEngine:
    """The default ``PolicyEngine``: Regorus in-process, hot-reloadable."""

    def __init__(
        self,
        path: Path,
        decision_path: str,
        compiled: _Compiled,
        signature: Any,
        last_good_dir: Path | None = None,
        *,
        keys: Keys | None = None,
        require_signature: bool = False,
    ):
        self._path = path
        self._decision_path = decision_path
        self._current = compiled
        self._signature = signature
        self._last_error: str | None = None
        self._last_good_dir = last_good_dir
        self._keys = keys
        self._require_signature = require_signature

    @classmethod
    def load(
        cls,
        path: Path,
        decision_path: str = DEFAULT_DECISION_PATH,
        *,
        last_good_dir: Path | None = None,
        keys: Keys | None = None,
        require_signature: bool = False,
    ) -> EmbeddedEngine:
        """Loads and compiles the sources at ``path`` (directory or .tar.gz bundle); raises
        PolicyLoadError naming the file and line when they cannot be used.

        With ``keys`` (``sources.load_bundle_keys``), a bundle is served only once its
        ``.signatures.json`` verifies (``sources.load_bundle``): a bad or missing signature is
        refused exactly like a policy that does not compile, here, at every reload, and for
        the last good copy.

        With ``last_good_dir``, every policy that loads is copied there, and a start with a
        broken (or missing) policy serves that last good copy instead of failing: the error is
        logged and ``health()`` reports it (``ztagent.policy`` NOT_SERVING) until a good
        policy is at ``path`` again."""
        signature = sources_signature(path)
        try:
            compiled = _compile(path, decision_path, keys, require_signature)
        except PolicyLoadError as exc:
            saved = last_good_path(last_good_dir) if last_good_dir is not None else None
            if saved is None:
                raise
            compiled = _compile(saved, decision_path, keys, require_signature)
            engine = cls(
                path,
                decision_path,
                compiled,
                signature,
                last_good_dir,
                keys=keys,
                require_signature=require_signature,
            )
            engine._last_error = f"{exc} (serving the last good policy from {saved})"
            logger.error(
                "policy at %s refused at start: %s; serving the last good policy from %s "
                "(revision %s)",
                path,
                exc,
                saved,
                compiled.revision,
            )
            return engine
        engine = cls(
            path,
            decision_path,
            compiled,
            signature,
            last_good_dir,
            keys=keys,
            require_signature=require_signature,
        )
        engine._save_last_good()
        return engine

    def _save_last_good(self) -> None:
        if self._last_good_dir is None:
            return
        try:
            save_last_good(self._path, self._last_good_dir)
        except OSError as exc:
            logger.warning(
                "cannot keep a last good policy copy in %s: %s", self._last_good_dir, exc
            )

    @property
    def revision(self) -> str:
        return self._current.revision

    @property
    def decision_path(self) -> str:
        return self._decision_path

    @property
    def signed_by(self) -> str | None:
        """The key id that signed the serving policy (None: unsigned)."""
        return self._current.signed_by

    @property
    def dry_run(self) -> bool:
        """The serving policy is a shadow bundle (``metadata.ztagent.dry_run``)."""
        return self._current.dry_run

    def ast_json(self) -> str:
        """The current policy's AST (Regorus ``get_ast_as_json``), for the decision cache."""
        engine = self._current.engine
        if engine is None:
            raise ValueError("the policy engine is closed")
        text: str = engine.get_ast_as_json()
        return text

    async def evaluate(self, input_doc: Mapping[str, Any]) -> Decision:
        """Evaluates the decision path; raises PolicyError (policy_engine_error,
        policy_undefined, policy_bad_decision)."""
        return self.evaluate_sync(input_doc)

    def evaluate_sync(self, input_doc: Mapping[str, Any]) -> Decision:
        """``evaluate`` without the coroutine (for tools and benchmarks)."""
        current = self._current  # read once: a concurrent reload swaps the attribute only
        if current.engine is None:
            raise PolicyError("policy_engine_error", "the policy engine is closed")
        set_input(current.engine, input_doc)
        try:
            raw = eval_path(current.engine, self._decision_path)
        finally:
            prints = current.engine.take_prints()
            if prints:
                logger.debug("policy print(): %s", prints)
        return Decision.from_result(raw, current.revision)

    def health(self) -> EngineHealth:
        return EngineHealth(
            ok=self._last_error is None,
            revision=self._current.revision,
            last_error=self._last_error,
        )

    def maybe_reload(self) -> bool:
        """Reloads when the sources' signature changed; True if a new policy now serves.

        Never raises. A broken new policy is logged, reported by ``health()`` and not retried
        until the files change again; the previous policy keeps serving."""
        signature = sources_signature(self._path)
        if signature == self._signature:
            return False
        self._signature = signature  # recorded first: a racing write shows up as a change
        try:
            compiled = _compile(
                self._path, self._decision_path, self._keys, self._require_signature
            )
        except PolicyLoadError as exc:
            self._last_error = str(exc)
            logger.error(
                "policy reload from %s refused, still serving revision %s: %s",
                self._path,
                self._current.revision,
                exc,
            )
            return False
        except Exception as exc:  # never raise out of a reload poll
            self._last_error = f"policy_load_error: unexpected {type(exc).__name__}: {exc}"
            logger.exception("policy reload from %s failed", self._path)
            return False
        previous = self._current.revision
        self._current = compiled
        self._last_error = None
        self._save_last_good()
        logger.info(
            "policy reloaded from %s: revision %s -> %s%s%s",
            self._path,
            previous,
            compiled.revision,
            f", signed by key {compiled.signed_by!r}" if compiled.signed_by else "",
            ", SHADOW bundle (decisions logged, not enforced)" if compiled.dry_run else "",
        )
        return True

    async def close(self) -> None:
        """Drops the Regorus engine here, on the owning thread: Regorus engines are
        thread-bound ("unsendable"), and left to the garbage collector they may be dropped
        on whichever thread runs the next collection. Evaluating after close raises."""
        self._current = _Compiled(
            engine=None,
            revision=self._current.revision,
            signed_by=self._current.signed_by,
            dry_run=self._current.dry_run,
        )


def _compile(
    path: Path,
    decision_path: str,
    keys: Keys | None = None,
    require_signature: bool = False,
) -> _Compiled:
    sources = load_sources(path, keys=keys, require_signature=require_signature)
    engine = new_engine(path, sources)
    engine.set_gather_prints(True)  # print() output goes to the debug log, never to stderr
    set_input(engine, SAMPLE_INPUT)
    try:
        eval_path(engine, decision_path)  # also prepares the engine for the first request
    except PolicyError as exc:
        engine.take_prints()
        raise PolicyLoadError(
            "policy_compile_error", f"{exc.message} (probed at load with a sample input)"
        ) from None
    engine.take_prints()
    return _Compiled(
        engine=engine,
        revision=sources.revision,
        signed_by=sources.signed_by,
        dry_run=sources.dry_run,
    )
