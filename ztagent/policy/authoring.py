"""Library side of ``ztagent policy test | check | eval | build`` and decision-log replay.

Each function returns a typed result and prints nothing; the CLI formats them. Rule lists
come from Regorus' own AST (``get_ast_as_json``), not from regular expressions.

Regorus parses a module eagerly (``add_policy``) but compiles lazily: unsafe variables and rule
conflicts surface at the first evaluation, unknown functions only when evaluation reaches the
call. ``check`` therefore (1) parses every file on its own, (2) evaluates every rule with no
input, dropping files whose errors poison the whole engine and retrying the rest, and (3)
compiles every rule as an entry point of Regorus' register VM (``regorus.Program``), which
resolves every function call statically; from that pass only unknown-function errors are kept,
since other VM errors may be VM limitations rather than policy errors.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import regorus

from ztagent import json_input
from ztagent.policy.bundle_sign import (
    MANIFEST_FILE,
    SIGNATURES_FILE,
    PrivateKey,
    VerificationKey,
    sign_bundle,
    verify_bundle,
)
from ztagent.policy.embedded import (
    EngineErrorInfo,
    eval_path,
    module_name,
    new_engine,
    parse_engine_error,
    set_input,
)
from ztagent.policy.errors import PolicyError, PolicyLoadCode, PolicyLoadError
from ztagent.policy.log_checkpoint import is_checkpoint
from ztagent.policy.sources import Keys, PolicySources, load_dir, load_sources
from ztagent.policy.types import DEFAULT_DECISION_PATH, Decision

TestStatus = Literal["PASS", "FAIL", "ERROR"]


# --- rules, from the AST ------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleInfo:
    """One rule definition (a rule may have several)."""

    package: str
    """``data.ztagent.authz``"""
    name: str
    """``allow``; ref heads are dotted (``a.b.c``), brackets with variables dropped."""
    file: str
    line: int
    end_line: int
    kind: Literal["rule", "default", "function"]

    @property
    def path(self) -> str:
        return f"{self.package}.{self.name}"


def list_rules(engine: Any) -> tuple[RuleInfo, ...]:
    """Every rule definition of every module loaded in a ``regorus.Engine``, in file order."""
    found: list[RuleInfo] = []
    for module in json.loads(engine.get_ast_as_json()):
        file = module["source"]["file"]
        contents: str = module["source"]["contents"]
        ast = module["ast"]
        package = "data." + ".".join(_ref_parts(ast["package"]["refr"]))
        for rule in ast.get("rules", []):
            kind_key, body = next(iter(rule.items()))
            if kind_key == "Default":
                kind: Literal["rule", "default", "function"] = "default"
                refr = body["refr"]
            else:
                head_key, head = next(iter(body["head"].items()))
                kind = "function" if head_key == "Func" else "rule"
                refr = head["refr"]
            span = body["span"]
            end_line = contents.count("\n", 0, span["end"]) + 1
            name = ".".join(_ref_parts(refr))
            found.append(RuleInfo(package, name, file, span["line"], end_line, kind))
    return tuple(found)


def _ref_parts(refr: Mapping[str, Any]) -> list[str]:
    key, node = next(iter(refr.items()))
    if key == "Var":
        return [str(node["value"])]
    if key == "RefDot":
        return [*_ref_parts(node["refr"]), str(node["field"][1])]
    if key == "RefBrack":
        base = _ref_parts(node["refr"])
        index_key, index = next(iter(node["index"].items()))
        return [*base, str(index["value"])] if index_key == "String" else base
    return []


# --- run_tests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest class

    package: str
    name: str
    status: TestStatus
    file: str
    message: str = ""
    """Why it failed (``undefined``, ``false``) or the engine error, with file:line:col."""
    prints: tuple[str, ...] = ()
    """``print()`` output while the test ran."""


@dataclass(frozen=True)
class FileCoverage:
    file: str
    covered: tuple[int, ...]
    not_covered: tuple[int, ...]

    @property
    def percent(self) -> float:
        total = len(self.covered) + len(self.not_covered)
        return 100.0 if total == 0 else 100.0 * len(self.covered) / total


@dataclass(frozen=True)
class CoverageReport:
    files: tuple[FileCoverage, ...]

    @property
    def percent(self) -> float:
        covered = sum(len(f.covered) for f in self.files)
        total = covered + sum(len(f.not_covered) for f in self.files)
        return 100.0 if total == 0 else 100.0 * covered / total


@dataclass(frozen=True)
class TestReport:
    __test__ = False  # not a pytest class

    results: tuple[TestResult, ...]
    coverage: CoverageReport | None = None

    def count(self, status: TestStatus) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        return all(r.status == "PASS" for r in self.results)


def run_tests(path: Path, *, coverage: bool = False, keys: Keys | None = None) -> TestReport:
    """Like ``opa test``: evaluates every ``test_*`` rule of every package (modules and
    ``*_test.rego`` files under ``path``, a directory or a bundle, verified against ``keys``).
    PASS when defined and not false, FAIL when false or undefined, ERROR on an engine error.
    Raises PolicyLoadError when a file does not parse or the signature is refused."""
    sources = load_sources(path, include_tests=True, keys=keys)
    engine = new_engine(path, sources)
    engine.set_gather_prints(True)
    if coverage:
        engine.set_enable_coverage(True)
    results: list[TestResult] = []
    seen: set[str] = set()
    for rule in list_rules(engine):
        if rule.kind == "function" or not rule.name.startswith("test_") or "." in rule.name:
            continue
        if rule.path in seen:
            continue
        seen.add(rule.path)
        status: TestStatus
        try:
            value = eval_path(engine, rule.path)
        except PolicyError as exc:
            status, message = "ERROR", exc.message
        else:
            if value is None or value is False:
                status, message = "FAIL", "undefined" if value is None else "false"
            else:
                status, message = "PASS", ""
        prints = tuple(str(p) for p in engine.take_prints())
        results.append(TestResult(rule.package, rule.name, status, rule.file, message, prints))
    report = _coverage(engine) if coverage else None
    return TestReport(results=tuple(results), coverage=report)


def _coverage(engine: Any) -> CoverageReport:
    raw = json.loads(engine.get_coverage_report_as_json())
    files = tuple(
        FileCoverage(
            file=f["path"],
            covered=tuple(sorted(f.get("covered", []))),
            not_covered=tuple(sorted(f.get("not_covered", []))),
        )
        for f in raw.get("files", [])
    )
    return CoverageReport(files=files)


# --- check --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    """1-based; 0 when the engine did not say."""
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


_LOAD_LOCATION = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$", re.DOTALL)
_UNKNOWN_FUNCTION = re.compile(
    r"(?:could not find function|Unknown function:)\s*'?(?P<name>[\w.]+)'?", re.IGNORECASE
)


def check(path: Path, *, keys: Keys | None = None) -> tuple[Problem, ...]:
    """Parse and compile problems of every module (tests included) and of the data files,
    sorted by file, line and column; a refused signature (``keys``) is the one problem. An
    empty tuple means the sources are clean."""
    try:
        sources = load_sources(path, include_tests=True, keys=keys)
    except PolicyLoadError as exc:
        m = _LOAD_LOCATION.match(exc.message)
        if m:
            return (Problem(m["file"], int(m["line"]), int(m["col"]), m["msg"]),)
        return (Problem(str(path), 0, 0, f"{exc.code}: {exc.message}"),)

    problems: dict[tuple[str, int, int, str], Problem] = {}

    def add(info: EngineErrorInfo, fallback_file: str) -> str:
        problem = Problem(
            info.file or fallback_file, info.line or 0, info.column or 0, info.message
        )
        problems[(problem.file, problem.line, problem.column, problem.message)] = problem
        return problem.file

    parsed: list[tuple[str, str]] = []
    for rel, text in sources.modules:
        try:
            regorus.Engine().add_policy(module_name(path, rel), text)
        except RuntimeError as exc:
            add(parse_engine_error(exc), module_name(path, rel))
        else:
            parsed.append((rel, text))

    remaining = parsed
    removed_functions: set[str] = set()
    all_rules: tuple[RuleInfo, ...] = ()
    while remaining:
        sub = PolicySources(tuple(remaining), sources.data, sources.revision, True)
        try:
            engine = new_engine(path, sub)
        except PolicyLoadError as exc:
            problems[(str(path), 0, 0, exc.message)] = Problem(str(path), 0, 0, exc.message)
            break
        engine.set_gather_prints(True)  # keep print() output off stderr
        rules = list_rules(engine)
        if not all_rules:
            all_rules = rules
        bad_files: set[str] = set()
        for rule_path in dict.fromkeys(r.path for r in rules if r.kind != "function"):
            try:
                engine.eval_rule(rule_path)
            except TypeError:
                continue  # a set of composite values: a conversion limit, not a problem
            except RuntimeError as exc:
                info = parse_engine_error(exc)
                fn = _UNKNOWN_FUNCTION.search(info.message)
                if fn and fn["name"].rsplit(".", 1)[-1] in removed_functions:
                    continue  # defined in a file dropped for its own errors
                bad_files.add(add(info, _file_of(rule_path, rules)))
        kept = [(rel, t) for rel, t in remaining if module_name(path, rel) not in bad_files]
        if len(kept) == len(remaining):
            break
        removed_functions |= {
            r.name.rsplit(".", 1)[-1] for r in rules if r.kind == "function" and r.file in bad_files
        }
        remaining = kept

    if remaining:
        _vm_check(path, remaining, sources.data, all_rules, add)
    return tuple(sorted(problems.values(), key=lambda p: (p.file, p.line, p.column, p.message)))


def _file_of(rule_path: str, rules: tuple[RuleInfo, ...]) -> str:
    return next((r.file for r in rules if r.path == rule_path), "")


def _vm_check(
    path: Path,
    modules: list[tuple[str, str]],
    data: Mapping[str, Any],
    rules: tuple[RuleInfo, ...],
    add: Any,
) -> None:
    named = [(module_name(path, rel), text) for rel, text in modules]
    data_json = json.dumps(data)
    for rule_path in dict.fromkeys(r.path for r in rules if r.kind != "function"):
        try:
            regorus.Program.compile_from_modules(data_json, named, [rule_path])
        except Exception as exc:  # VM limitations are not policy problems: keep only these
            info = parse_engine_error(exc)
            if _UNKNOWN_FUNCTION.search(info.message):
                add(info, str(path))


# --- evaluate_input -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    decision: Decision | None
    """None when the result is undefined or not a decision (see ``error``)."""
    raw: object
    """The value at the decision path, JSON-shaped (None when undefined)."""
    explanation: tuple[str, ...] = ()
    """With explain: ``file:line: data.pkg.rule => value`` for each rule evaluated."""
    prints: tuple[str, ...] = ()
    """``print()`` output of the policy, ``file:line: text``."""
    error: str | None = None
    """Why ``decision`` is None (``policy_undefined: ...``, ``policy_bad_decision: ...``)."""


def evaluate_input(
    path: Path,
    input_doc: Mapping[str, Any],
    *,
    explain: bool = False,
    data_path: Path | None = None,
    decision_path: str = DEFAULT_DECISION_PATH,
) -> EvalResult:
    """``ztagent policy eval``: evaluates ``decision_path`` for one input. ``data_path`` is an
    extra JSON document merged at the data root. Raises PolicyLoadError / PolicyError
    (policy_engine_error)."""
    sources = load_sources(path)
    if data_path is not None:
        sources = _with_extra_data(sources, data_path)
    engine = new_engine(path, sources)
    engine.set_gather_prints(True)
    if explain:
        engine.set_enable_coverage(True)
    set_input(engine, input_doc)
    raw = eval_path(engine, decision_path)
    prints = tuple(str(p) for p in engine.take_prints())
    explanation = _explain(engine) if explain else ()
    try:
        decision: Decision | None = Decision.from_result(raw, sources.revision)
        error = None
    except PolicyError as exc:
        decision, error = None, str(exc)
    return EvalResult(decision, raw, explanation, prints, error)


def _with_extra_data(sources: PolicySources, data_path: Path) -> PolicySources:
    try:
        extra = json_input.loads(data_path.read_bytes(), max_depth=None)
    except OSError as exc:
        raise PolicyLoadError(
            "policy_data_invalid", f"{data_path}: cannot read: {exc.strerror}"
        ) from None
    except ValueError as exc:
        raise PolicyLoadError("policy_data_invalid", f"{data_path}: invalid JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise PolicyLoadError(
            "policy_data_invalid", f"{data_path}: expected an object, got {type(extra).__name__}"
        )
    merged = _merge(dict(sources.data), extra, str(data_path))
    return PolicySources(sources.modules, merged, sources.revision, sources.tests_included)


def _merge(base: dict[str, Any], extra: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key, value in extra.items():
        if key not in base:
            base[key] = value
        elif isinstance(base[key], dict) and isinstance(value, dict):
            base[key] = _merge(dict(base[key]), value, where)
        else:
            raise PolicyLoadError(
                "policy_data_invalid", f"{where}: key {key!r} is already defined by the policy data"
            )
    return base


def _explain(engine: Any) -> tuple[str, ...]:
    """Rules whose lines the evaluation covered, with the value each rule has for this input
    (functions are listed without a value). Coverage is read before the extra evaluations."""
    report = _coverage(engine)
    covered = {f.file: set(f.covered) for f in report.files}
    lines: list[str] = []
    values: dict[str, str] = {}
    for rule in list_rules(engine):
        hit = covered.get(rule.file, set())
        if not any(rule.line <= n <= rule.end_line for n in hit):
            continue
        if rule.kind == "function":
            lines.append(f"{rule.file}:{rule.line}: {rule.path} (function, called)")
            continue
        if rule.path not in values:
            try:
                value = eval_path(engine, rule.path)
                values[rule.path] = "undefined" if value is None else json.dumps(value)
            except PolicyError as exc:
                values[rule.path] = f"error: {exc.message}"
        lines.append(f"{rule.file}:{rule.line}: {rule.path} => {values[rule.path]}")
    return tuple(lines)


# --- replay -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayChange:
    line_no: int
    decision_id: str | None
    old_allow: bool
    new_allow: bool
    old_reasons: tuple[str, ...]
    new_reasons: tuple[str, ...]


@dataclass(frozen=True)
class ReplayError:
    line_no: int
    decision_id: str | None
    message: str


@dataclass(frozen=True)
class ReplayReport:
    total: int
    """Non-blank lines read."""
    changed: tuple[ReplayChange, ...]
    errors: tuple[ReplayError, ...]
    revision: str = ""
    """Revision of the candidate policy."""
    refused: int = 0
    """Lines of calls refused before the policy was asked (bad certificate, bad token...):
    nothing a candidate policy could change, so they are counted, not replayed."""
    truncated: int = 0
    """Lines whose input was over ``decision_log.max_input_bytes`` (only its size and digest
    were kept): they cannot be replayed, so they are counted."""


def replay(
    log_path: Path,
    policy_path: Path,
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    keys: Keys | None = None,
) -> ReplayReport:
    """Re-evaluates every logged input against the candidate policy at ``policy_path`` (a
    directory or a bundle, verified against ``keys``; a shadow bundle's decisions are compared
    like any other) and reports each line whose ``allow`` or (sorted) ``reasons`` would
    change. Lines that are not JSON objects with an ``input`` object, or on which the
    candidate policy fails, are reported as errors with their line number; replay goes on."""
    sources = load_sources(policy_path, keys=keys)
    engine = new_engine(policy_path, sources)
    engine.set_gather_prints(True)
    total = refused = truncated = 0
    changed: list[ReplayChange] = []
    errors: list[ReplayError] = []
    try:
        handle = log_path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise PolicyLoadError(
            "policy_data_invalid", f"{log_path}: cannot read: {exc.strerror}"
        ) from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json_input.loads(line, max_depth=None)
            except ValueError as exc:  # also nested too deeply to parse (an edited line)
                total += 1
                errors.append(ReplayError(line_no, None, str(exc)))
                continue
            if is_checkpoint(entry):  # a signed anchor of the chain, not a decision
                continue
            total += 1
            if not isinstance(entry, dict):
                errors.append(ReplayError(line_no, None, "expected a JSON object"))
                continue
            if entry.get("refusal") is not None:
                refused += 1
                continue
            decision_id = entry.get("decision_id")
            did = str(decision_id) if decision_id is not None else None
            input_doc, old_allow, old_reasons = (
                entry.get("input"),
                entry.get("allow"),
                entry.get("reasons", []),
            )
            if not isinstance(input_doc, dict):
                errors.append(ReplayError(line_no, did, "no 'input' object"))
                continue
            if input_doc.get("truncated") is True:
                truncated += 1
                continue
            if not isinstance(old_allow, bool) or not isinstance(old_reasons, list):
                errors.append(
                    ReplayError(line_no, did, "'allow' must be a boolean and 'reasons' a list")
                )
                continue
            try:
                set_input(engine, input_doc)
                new = Decision.from_result(eval_path(engine, decision_path), sources.revision)
            except PolicyError as exc:
                engine.take_prints()
                errors.append(ReplayError(line_no, did, str(exc)))
                continue
            engine.take_prints()  # discard print() output
            old = tuple(sorted(str(r) for r in old_reasons))
            if new.allow != old_allow or new.reasons != old:
                changed.append(ReplayChange(line_no, did, old_allow, new.allow, old, new.reasons))
    return ReplayReport(total, tuple(changed), tuple(errors), sources.revision, refused, truncated)


# --- signature status ---------------------------------------------------------------------------

SIGNATURE_CODES = frozenset(
    {
        PolicyLoadCode.BUNDLE_SIGNATURE_MISSING,
        PolicyLoadCode.BUNDLE_SIGNATURE_INVALID,
        PolicyLoadCode.BUNDLE_KEY_UNKNOWN,
        PolicyLoadCode.BUNDLE_FILE_UNLISTED,
        PolicyLoadCode.BUNDLE_FILE_MISSING,
        PolicyLoadCode.BUNDLE_HASH_MISMATCH,
    }
)


@dataclass(frozen=True)
class SignatureStatus:
    """What ``policy check`` / ``test`` / ``replay`` say about a policy's signature."""

    status: Literal["signed", "unsigned", "refused"]
    key_id: str | None = None
    error: str | None = None
    """The refusal (``code: message``) when refused."""
    dry_run: bool = False
    """A shadow bundle."""

    def __str__(self) -> str:
        shadow = " (shadow bundle: decisions logged, not enforced)" if self.dry_run else ""
        if self.status == "signed":
            return f"signed by key {self.key_id}{shadow}"
        if self.status == "unsigned":
            return f"unsigned{shadow}"
        return f"refused: {self.error}"


def signature_status(path: Path, *, keys: Keys | None = None) -> SignatureStatus:
    """Loads ``path`` as the sidecar would with ``keys`` and says whether it is signed, by
    whom, or why its signature is refused. Other load errors are not this report's business
    (``check`` reports them): they give ``unsigned`` unless a signature was verified."""
    try:
        sources = load_sources(path, keys=keys)
    except PolicyLoadError as exc:
        if exc.code in SIGNATURE_CODES:
            return SignatureStatus("refused", error=f"{exc.code}: {exc.message}")
        return SignatureStatus("unsigned")
    if sources.signed_by is not None:
        return SignatureStatus("signed", sources.signed_by, dry_run=sources.dry_run)
    return SignatureStatus("unsigned", dry_run=sources.dry_run)


# --- build --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltBundle:
    content: bytes
    """The ``.tar.gz``: the same bytes for the same inputs."""
    revision: str
    files: tuple[str, ...]
    """Member names (bundle-relative, without the leading ``/`` OPA writes)."""
    signed_by: str | None = None


def build_bundle(
    source: Path,
    *,
    revision: str | None = None,
    roots: Sequence[str] | None = None,
    signing_key: PrivateKey | None = None,
    signing_alg: str = "RS256",
    key_id: str = "",
    dry_run: bool = False,
) -> BuiltBundle:
    """Like ``opa build -b DIR [--signing-key ...]``: every ``.rego`` under ``source`` (tests
    too, as ``opa build`` keeps them) at its relative path, all ``data.json`` documents merged
    into one root ``/data.json``, a ``/.manifest`` with ``revision`` (default: the source's
    manifest revision, else its content hash), ``roots`` (default: the source manifest's, else
    ``[""]``, everything) and, with ``dry_run``, ``metadata.ztagent.dry_run = true`` (a shadow
    bundle); signed with ``signing_key`` into ``/.signatures.json`` as ``opa build`` signs
    (JWT header ``kid`` = ``key_id``, payload ``files`` + the deprecated ``keyid``).

    Reproducible: members sorted by name, mode 0644, uid/gid 0, no user names, mtime 0, USTAR
    headers, gzip with mtime 0 and no file name. The result is loaded back (and with a key,
    verified) before it is returned. Raises PolicyLoadError."""
    if signing_key is not None and not key_id:
        raise PolicyLoadError(
            "bundle_invalid",
            "a signed bundle needs a key id (--keyid): the sidecar picks the verification key "
            "by the JWT's kid, as OPA does",
        )
    sources = load_dir(source, include_tests=True)
    manifest: dict[str, Any] = {
        "revision": revision or sources.revision,
        "roots": list(roots) if roots is not None else _source_roots(source),
    }
    if dry_run:
        manifest["metadata"] = {"ztagent": {"dry_run": True}}
    files: dict[str, bytes] = {rel: text.encode("utf-8") for rel, text in sources.modules}
    files["data.json"] = _compact(sources.data)
    files[MANIFEST_FILE] = _compact(manifest)
    if signing_key is not None:
        files[SIGNATURES_FILE] = sign_bundle(files, signing_key, signing_alg, key_id=key_id)
    signed_by = None
    if signing_key is not None:  # what a sidecar holding the public key will check
        public = VerificationKey(key_id, signing_alg, signing_key.public_key())
        unsigned = {name: data for name, data in files.items() if name != SIGNATURES_FILE}
        signed_by = verify_bundle(unsigned, files[SIGNATURES_FILE], {key_id: public}).key_id
    return BuiltBundle(_tar_gz(files), manifest["revision"], tuple(sorted(files)), signed_by)


def _source_roots(source: Path) -> list[str]:
    path = source / MANIFEST_FILE
    if path.is_file():
        doc = json.loads(path.read_bytes())  # load_dir has validated it
        roots = doc.get("roots") if isinstance(doc, dict) else None
        if isinstance(roots, list):
            return [str(r) for r in roots]
    return [""]


def _compact(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tar_gz(files: Mapping[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo("/" + name)  # opa build's names: "/data.json"
            info.size = len(files[name])
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()
