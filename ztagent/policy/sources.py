"""Policy sources with OPA bundle semantics: a directory or a ``.tar.gz`` bundle.

This is the IO edge of the policy engines: it reads ``*.rego`` modules and ``data.json``
documents into an immutable ``PolicySources``; compiling and evaluating live in
``embedded.py``.

- A ``data.json`` is merged into the data tree at the path of its directory
  (``a/b/data.json`` -> ``data.a.b``); a key defined by two files is refused, naming both.
- ``*_test.rego`` modules are skipped unless ``include_tests``; hidden files and directories
  (names starting with ``.``) are skipped, except the root ``.manifest``.
- A bundle's ``.manifest`` may give ``revision`` (used as the policy revision), ``roots``
  (every package and data path must lie under one of them) and
  ``metadata.ztagent.dry_run = true``: a shadow bundle, whose decisions are logged and not
  enforced (``PolicySources.dry_run``).
- Bundle members are read in memory, never extracted. Refused with ``bundle_invalid``:
  drive-letter or '//' names, ``..`` components, symlinks, hard links and other non-regular members,
  duplicate names, a member over ``MAX_MEMBER_BYTES`` or a total over ``MAX_BUNDLE_BYTES``,
  more than ``MAX_MEMBERS`` entries, and a file that decompresses to more than
  ``MAX_TAR_BYTES`` (read as a stream, so a decompression bomb costs at most that much).

Signatures (OPA's ``.signatures.json``, checked by ``ztagent.policy.bundle_sign``):

- ``load_bundle(path, *, include_tests=False, keys=None, require_signature=False)`` reads
  every member of the ``.tar.gz`` (not only the ``.rego`` / ``data.json`` / ``.manifest`` it
  loads) and, when ``keys`` (key id -> ``VerificationKey``, see ``load_bundle_keys``) are
  given, verifies the bundle against them before anything is parsed: an unsigned bundle is
  ``bundle_signature_missing``, and every other refusal has its ``bundle_*`` code. This is
  the one call that decides whether a bundle file may be served: the sidecar's loader and a
  bundle downloader (verify a fetched file before installing it) both call it.
- A signed bundle with no keys is refused (``bundle_key_unknown``), as OPA refuses one with
  no verification key configured.
- A directory is verified the same way (every regular file under it except
  ``.signatures.json`` must be listed) when it has a ``.signatures.json``, or when
  ``require_signature``; otherwise a directory stays unsigned even with keys.
- ``PolicySources.signed_by`` is the key id of a verified signature (None: unsigned), and the
  revision of a signed bundle comes from its signed ``.manifest``.
- ``save_last_good`` keeps ``.signatures.json`` (and, for a signed directory, every file it
  covers), so the last good copy verifies again at the next start.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ztagent import json_input
from ztagent.config import BundleKeyConfig
from ztagent.errors import ConfigError
from ztagent.files import KEY_MODE, make_private_dir, refuse_symlink, write_atomic
from ztagent.policy.bundle_sign import (
    SIGNATURES_FILE,
    BundleKeyError,
    SignatureReport,
    VerificationKey,
    signature_key_id,
    verify_bundle,
)
from ztagent.policy.errors import PolicyLoadError

MAX_MEMBER_BYTES = 16 * 1024 * 1024
"""Largest bundle member read, in bytes (uncompressed)."""
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
"""Largest sum of declared member sizes in a bundle, in bytes (uncompressed)."""
MAX_MEMBERS = 10_000
"""Most tar entries (files and directories) in a bundle."""
MAX_TAR_BYTES = MAX_BUNDLE_BYTES + 16 * 1024 * 1024
"""Most bytes a bundle may decompress to: its members, their headers and padding. Without it
a header (a PAX or GNU long-name record) could declare gigabytes of zeros that ``tarfile``
reads into memory at once; a 3 MB download made the loader allocate 3 GB and spend a minute
before refusing it, and bundles are read before their signature can be checked."""

_TEST_SUFFIX = "_test.rego"


@dataclass(frozen=True)
class PolicySources:
    """Everything a policy engine needs, read once from a directory or a bundle."""

    modules: tuple[tuple[str, str], ...]
    """(path relative to the root, with ``/`` separators; module text), sorted by path."""
    data: dict[str, Any]
    """The merged data tree (``data`` in Rego)."""
    revision: str
    """The manifest's ``revision`` if any, else ``sha256:`` + 16 hex over modules and data."""
    tests_included: bool
    signed_by: str | None = None
    """The key id whose signature verified (``.signatures.json``); None when unsigned."""
    dry_run: bool = False
    """A shadow bundle (``.manifest`` ``metadata.ztagent.dry_run = true``): its decisions are
    logged, never enforced."""
    signature: SignatureReport | None = None
    """What the verified signature covers (None when unsigned)."""


Keys = Mapping[str, VerificationKey]
"""Bundle verification keys by key id (``load_bundle_keys`` builds them from the config)."""


def load_bundle_keys(configs: Mapping[str, BundleKeyConfig]) -> dict[str, VerificationKey]:
    """Reads each ``[policy.keys.<id>]`` PEM file; ConfigError naming ``policy.keys.<id>.key``
    when it is missing, unreadable or does not fit its algorithm."""
    keys: dict[str, VerificationKey] = {}
    for key_id, config in configs.items():
        name = f"policy.keys.{key_id}.key"
        try:
            pem = config.key.read_bytes()
        except OSError as exc:
            raise ConfigError(name, f"cannot read {config.key}: {exc.strerror}") from None
        try:
            keys[key_id] = VerificationKey.from_pem(key_id, pem, config.algorithm, config.scope)
        except BundleKeyError as exc:
            raise ConfigError(name, f"{config.key}: {exc}") from None
    return keys


def is_bundle(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz"))


def load_sources(
    path: Path,
    include_tests: bool = False,
    *,
    keys: Keys | None = None,
    require_signature: bool = False,
) -> PolicySources:
    """Loads a policy directory or a ``.tar.gz`` bundle (signatures as in the module doc)."""
    if path.is_dir():
        return load_dir(
            path, include_tests=include_tests, keys=keys, require_signature=require_signature
        )
    if path.is_file() and is_bundle(path):
        return load_bundle(
            path, include_tests=include_tests, keys=keys, require_signature=require_signature
        )
    if not path.exists():
        raise PolicyLoadError(
            "policy_data_invalid",
            f"{path}: no such file or directory (expected a policy directory or a .tar.gz bundle)",
        )
    raise PolicyLoadError(
        "bundle_invalid", f"{path}: expected a policy directory or a .tar.gz bundle"
    )


def load_dir(
    path: Path,
    *,
    include_tests: bool = False,
    keys: Keys | None = None,
    require_signature: bool = False,
) -> PolicySources:
    """Reads every ``*.rego`` and ``data.json`` under ``path`` (and a root ``.manifest``)."""
    if not path.is_dir():
        raise PolicyLoadError("policy_data_invalid", f"{path}: not a directory")
    signatures_path = path / SIGNATURES_FILE
    signatures = _read_file(signatures_path) if signatures_path.is_file() else None
    report: SignatureReport | None = None
    if signatures is not None or require_signature:
        files = {rel: _read_file(path / rel) for rel in _walk_all(path) if rel != SIGNATURES_FILE}
        report = _verify(str(path), files, signatures, keys, require_signature, bundle=False)
    modules: list[tuple[str, str]] = []
    data_files: list[tuple[str, bytes]] = []
    manifest: bytes | None = None
    for rel in _walk_dir(path):
        full = path / rel
        if rel == SIGNATURES_FILE:
            continue
        if rel == ".manifest":
            manifest = _read_file(full)
        elif rel.endswith(".rego"):
            if rel.endswith(_TEST_SUFFIX) and not include_tests:
                continue
            modules.append((rel, _decode(str(full), _read_file(full))))
        elif PurePosixPath(rel).name == "data.json":
            data_files.append((rel, _read_file(full)))
    return _assemble(str(path), modules, data_files, manifest, include_tests, report)


def _verify(
    where: str,
    files: Mapping[str, bytes],
    signatures: bytes | None,
    keys: Keys | None,
    require_signature: bool,
    *,
    bundle: bool,
) -> SignatureReport | None:
    if keys:
        if signatures is None and not bundle and not require_signature:
            return None
        return verify_bundle(files, signatures, keys, where=where)
    if signatures is not None:
        kid = signature_key_id(signatures)
        raise PolicyLoadError(
            "bundle_key_unknown",
            f"{where}: signed{f' with key {kid!r}' if kid else ''} but no verification keys "
            "are configured ([policy.keys.<key id>]); a signed policy is only served once "
            "its signature verifies",
            received=kid,
        )
    if require_signature:
        raise PolicyLoadError(
            "bundle_signature_missing", f"{where}: no {SIGNATURES_FILE} (a signature is required)"
        )
    return None


def load_bundle(
    path: Path,
    *,
    include_tests: bool = False,
    keys: Keys | None = None,
    require_signature: bool = False,
) -> PolicySources:
    """Reads an OPA bundle (``.tar.gz``) in memory, refusing unsafe members, and verifies
    its signature against ``keys`` first (see the module doc). Raises PolicyLoadError."""
    members = read_bundle_members(path)
    signatures = members.pop(SIGNATURES_FILE, None)
    report = _verify(str(path), members, signatures, keys, require_signature, bundle=True)
    modules: list[tuple[str, str]] = []
    data_files: list[tuple[str, bytes]] = []
    manifest: bytes | None = None
    for rel, content in members.items():
        if any(part.startswith(".") for part in rel.split("/")) and rel != ".manifest":
            continue
        is_rego = rel.endswith(".rego")
        is_data = PurePosixPath(rel).name == "data.json"
        if is_rego and rel.endswith(_TEST_SUFFIX) and not include_tests:
            continue
        if rel == ".manifest":
            manifest = content
        elif is_rego:
            modules.append((rel, _decode(f"{path}/{rel}", content)))
        elif is_data:
            data_files.append((rel, content))
    return _assemble(str(path), modules, data_files, manifest, include_tests, report)


def read_bundle_members(path: Path) -> dict[str, bytes]:
    """Every regular member of a ``.tar.gz`` bundle by bundle-relative name (no leading
    ``/``), in archive order, read in memory; refuses unsafe members (``bundle_invalid``)."""
    try:
        with gzip.open(path, "rb") as raw:
            stream = _Capped(raw, MAX_TAR_BYTES)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                members = _read_members(path, tar)
            while stream.read(1 << 16):  # to the end: gzip checks its CRC there, so a
                pass  # damaged file is refused, not read as other content
    except _TarTooLarge:
        raise _bad_bundle(path, f"decompresses to more than {MAX_TAR_BYTES} bytes") from None
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, OSError, zlib.error) as exc:
        raise _bad_bundle(path, f"not a readable .tar.gz ({exc})") from None
    return members


def _read_members(path: Path, tar: tarfile.TarFile) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    total = 0
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise _bad_bundle(path, f"more than {MAX_MEMBERS} entries")
        rel = _safe_member_name(path, member)
        if member.isdir():
            continue
        if rel in members:
            raise _bad_bundle(path, f"member {member.name!r} appears twice")
        total += member.size
        if total > MAX_BUNDLE_BYTES:
            raise _bad_bundle(path, f"members add up to more than {MAX_BUNDLE_BYTES} bytes")
        extracted = tar.extractfile(member)
        if extracted is None:  # pragma: no cover - regular files always extract
            raise _bad_bundle(path, f"member {member.name!r} cannot be read")
        content = extracted.read(MAX_MEMBER_BYTES + 1)
        if len(content) > MAX_MEMBER_BYTES:  # header lied about the size
            raise _bad_bundle(path, f"member {member.name!r} is larger than declared")
        members[rel] = content
    return members


class _TarTooLarge(Exception):
    pass


class _Capped(io.RawIOBase):
    """The decompressed stream, refusing (``_TarTooLarge``) to yield more than ``limit``
    bytes: reads are cut to what is left, so no single read can allocate more."""

    def __init__(self, raw: gzip.GzipFile, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._raw.read(want)
        self._left -= len(data)
        if self._left < 0:
            raise _TarTooLarge
        return data


def sources_signature(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """(relative path, mtime_ns, size, inode) of every relevant file, or of the bundle file.

    Cheap change detection for hot reload: any added, removed or rewritten ``*.rego``,
    ``data.json`` or ``.manifest`` changes it. A missing path gives ``()``.
    """
    try:
        if not path.is_dir():
            st = os.stat(path)
            return (("", st.st_mtime_ns, st.st_size, st.st_ino),)
        stamps = []
        for rel in _walk_dir(path):
            st = os.stat(path / rel)
            stamps.append((rel, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)
    except FileNotFoundError:
        return ()


# --- internals --------------------------------------------------------------------------------


def save_last_good(source: Path, last_good_dir: Path) -> Path:
    """Copy the policy at ``source`` (directory or bundle file) into ``last_good_dir``,
    replacing the previous copy only once the new one is complete; returns its path.

    Directories are 0700 and files 0600 whatever the umask, and nothing is written through
    a symlink: ``OSError(ELOOP)`` naming the path when ``current`` or ``.old`` is one (a
    planted link is left alone; the caller logs it)."""
    make_private_dir(last_good_dir)
    current = last_good_dir / "current"
    old = last_good_dir / ".old"
    refuse_symlink(current)
    refuse_symlink(old)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=last_good_dir))  # 0700, new
    try:
        if source.is_dir():
            target = staging / "policy"
            make_private_dir(target)
            signed = (source / SIGNATURES_FILE).is_file()  # keep every file it covers
            for rel in _walk_all(source) if signed else _walk_dir(source):
                make_private_dir((target / rel).parent)
                write_atomic(target / rel, (source / rel).read_bytes(), KEY_MODE)
        else:
            write_atomic(staging / "bundle.tar.gz", source.read_bytes(), KEY_MODE)
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            current.rename(old)
        staging.rename(current)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return last_good_path(last_good_dir) or last_good_dir


def last_good_path(last_good_dir: Path) -> Path | None:
    """The saved last good policy (directory or bundle), or None when there is none (or
    when ``current`` is a symlink: a planted policy is never served)."""
    current = last_good_dir / "current"
    if current.is_symlink():
        return None
    for candidate in (current / "policy", current / "bundle.tar.gz"):
        if candidate.exists() and not candidate.is_symlink():
            return candidate
    return None


def _walk_dir(root: Path) -> list[str]:
    """Relative paths of the relevant files under root, sorted, hidden dirs skipped (the
    root ``.manifest`` and ``.signatures.json`` are relevant)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        reldir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            rel = name if reldir == "." else f"{reldir}/{name}"
            if rel in (".manifest", SIGNATURES_FILE) or (
                not name.startswith(".") and (name.endswith(".rego") or name == "data.json")
            ):
                found.append(rel)
    return sorted(found)


def _walk_all(root: Path) -> list[str]:
    """Every regular file under root (hidden ones too: a signature covers all), sorted."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        reldir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            rel = name if reldir == "." else f"{reldir}/{name}"
            if (root / rel).is_file():
                found.append(rel)
    return sorted(found)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(
            "policy_data_invalid", f"{path}: cannot read: {exc.strerror}"
        ) from None


def _decode(name: str, content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyLoadError(
            "policy_parse_error", f"{name}: not UTF-8 text (byte offset {exc.start})"
        ) from None


def _bad_bundle(path: Path, message: str) -> PolicyLoadError:
    return PolicyLoadError("bundle_invalid", f"{path}: {message}")


def _safe_member_name(bundle: Path, member: tarfile.TarInfo) -> str:
    name = member.name
    # `opa build` writes names like "/data.json": one leading "/" means the bundle root.
    # Members are only read in memory, never extracted, so this cannot escape anything.
    if name.startswith("//") or (len(name) > 1 and name[1] == ":"):
        raise _bad_bundle(bundle, f"member {name!r} has an absolute path (expected relative)")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _bad_bundle(bundle, f"member {name!r} contains '..' (expected no parent refs)")
    if member.issym() or member.islnk():
        raise _bad_bundle(
            bundle, f"member {name!r} is a link to {member.linkname!r} (expected a regular file)"
        )
    if not (member.isfile() or member.isdir()):
        raise _bad_bundle(bundle, f"member {name!r} is not a regular file or directory")
    if member.size > MAX_MEMBER_BYTES:
        raise _bad_bundle(
            bundle, f"member {name!r} is {member.size} bytes (limit {MAX_MEMBER_BYTES})"
        )
    return "/".join(parts)


def _assemble(
    root: str,
    modules: list[tuple[str, str]],
    data_files: list[tuple[str, bytes]],
    manifest_bytes: bytes | None,
    include_tests: bool,
    report: SignatureReport | None = None,
) -> PolicySources:
    revision, roots, dry_run = _parse_manifest(root, manifest_bytes)
    data = _merge_data(root, data_files)
    mods = tuple(sorted(modules))
    if roots is not None:
        _check_roots(root, roots, mods, data)
    if revision is None:
        revision = _content_revision(mods, data)
    return PolicySources(
        modules=mods,
        data=data,
        revision=revision,
        tests_included=include_tests,
        signed_by=report.key_id if report is not None else None,
        dry_run=dry_run,
        signature=report,
    )


def _parse_manifest(
    root: str, raw: bytes | None
) -> tuple[str | None, list[list[str]] | None, bool]:
    """(revision, roots, dry_run) of a ``.manifest``."""
    if raw is None:
        return None, None, False
    where = f"{root}/.manifest"
    try:
        doc = json_input.loads(raw)
    except ValueError as exc:  # also not UTF-8 or nested too deep
        raise PolicyLoadError("bundle_invalid", f"{where}: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyLoadError(
            "bundle_invalid", f"{where}: expected an object, got {type(doc).__name__}"
        )
    revision = doc.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise PolicyLoadError(
            "bundle_invalid", f"{where}: 'revision' must be a string, got {revision!r}"
        )
    dry_run = _manifest_dry_run(where, doc.get("metadata"))
    roots = doc.get("roots")
    if roots is None:
        return revision or None, None, dry_run
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise PolicyLoadError(
            "bundle_invalid", f"{where}: 'roots' must be a list of strings, got {roots!r}"
        )
    return revision or None, [[p for p in r.split("/") if p] for r in roots], dry_run


def _manifest_dry_run(where: str, metadata: object) -> bool:
    """``metadata.ztagent.dry_run`` (true: a shadow bundle); other metadata is OPA's."""
    if metadata is None:
        return False
    if not isinstance(metadata, dict):
        raise PolicyLoadError(
            "bundle_invalid", f"{where}: 'metadata' must be an object, got {metadata!r:.80}"
        )
    ours = metadata.get("ztagent", {})
    if not isinstance(ours, dict):
        raise PolicyLoadError(
            "bundle_invalid", f"{where}: 'metadata.ztagent' must be an object, got {ours!r:.80}"
        )
    dry_run = ours.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise PolicyLoadError(
            "bundle_invalid",
            f"{where}: 'metadata.ztagent.dry_run' must be true or false, got {dry_run!r:.80}",
        )
    return dry_run


def _merge_data(root: str, data_files: list[tuple[str, bytes]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    owners: dict[tuple[str, ...], str] = {}
    for rel, raw in sorted(data_files):
        where = f"{root}/{rel}"
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError:
            raise PolicyLoadError("policy_data_invalid", f"{where}: not UTF-8 text") from None
        except RecursionError:  # the standard parser's limit (about a thousand levels)
            raise PolicyLoadError(
                "policy_data_invalid", f"{where}: JSON nested too deeply to parse"
            ) from None
        except json.JSONDecodeError as exc:
            raise PolicyLoadError(
                "policy_data_invalid", f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
            ) from None
        prefix = tuple(PurePosixPath(rel).parent.parts)
        if not prefix and not isinstance(doc, dict):
            raise PolicyLoadError(
                "policy_data_invalid",
                f"{where}: the root data.json must be an object, got {type(doc).__name__}",
            )
        _merge_at(tree, owners, prefix, doc, where)
    return tree


def _merge_at(
    tree: dict[str, Any],
    owners: dict[tuple[str, ...], str],
    prefix: tuple[str, ...],
    value: Any,
    where: str,
) -> None:
    node = tree
    for i, key in enumerate(prefix[:-1] if prefix else ()):
        here = prefix[: i + 1]
        child = node.setdefault(key, {})
        owners.setdefault(here, where)
        if not isinstance(child, dict):
            raise _conflict(here, owners.get(here, "?"), where)
        node = child
    if not prefix:
        _merge_obj(node, owners, (), value, where)
        return
    key = prefix[-1]
    if key not in node:
        node[key] = value
        _own(owners, prefix, value, where)
    elif isinstance(node[key], dict) and isinstance(value, dict):
        _merge_obj(node[key], owners, prefix, value, where)
    else:
        raise _conflict(prefix, owners.get(prefix, "?"), where)


def _merge_obj(
    node: dict[str, Any],
    owners: dict[tuple[str, ...], str],
    path: tuple[str, ...],
    obj: dict[str, Any],
    where: str,
) -> None:
    for key, value in obj.items():
        here = (*path, key)
        if key not in node:
            node[key] = value
            _own(owners, here, value, where)
        elif isinstance(node[key], dict) and isinstance(value, dict):
            _merge_obj(node[key], owners, here, value, where)
        else:
            raise _conflict(here, owners.get(here, "?"), where)


def _own(owners: dict[tuple[str, ...], str], path: tuple[str, ...], value: Any, where: str) -> None:
    owners.setdefault(path, where)
    if isinstance(value, dict):
        for key, child in value.items():
            _own(owners, (*path, key), child, where)


def _conflict(path: tuple[str, ...], first: str, second: str) -> PolicyLoadError:
    dotted = ".".join(("data", *path))
    return PolicyLoadError(
        "policy_data_invalid", f"{dotted} is defined by both {first} and {second}"
    )


def _package_path(text: str) -> list[str] | None:
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("package "):
            name = stripped.removeprefix("package ").strip()
            return [p.strip('"[]') for p in name.replace("[", ".[").split(".") if p]
    return None


def _check_roots(
    root: str, roots: list[list[str]], modules: Iterable[tuple[str, str]], data: dict[str, Any]
) -> None:
    def inside(path: list[str]) -> bool:
        return any(path[: len(r)] == r for r in roots)

    for rel, text in modules:
        pkg = _package_path(text)
        if pkg is not None and not inside(pkg):
            raise PolicyLoadError(
                "bundle_invalid",
                f"{root}/{rel}: package {'.'.join(pkg)} is outside the manifest roots "
                f"{['/'.join(r) for r in roots]}",
            )

    def walk(node: Any, path: list[str]) -> None:
        if inside(path):
            return
        below = [r for r in roots if r[: len(path)] == path]
        if not below or not isinstance(node, dict):
            raise PolicyLoadError(
                "bundle_invalid",
                f"{root}: data path {'/'.join(path) or '/'} is outside the manifest roots "
                f"{['/'.join(r) for r in roots]}",
            )
        for key, child in node.items():
            walk(child, [*path, key])

    for key, child in data.items():
        walk(child, [key])


def _content_revision(modules: tuple[tuple[str, str], ...], data: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for rel, text in modules:
        for part in (rel.encode(), text.encode()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest.update(b"data")
    digest.update(canonical.encode())
    return "sha256:" + digest.hexdigest()[:16]
