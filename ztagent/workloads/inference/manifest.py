"""Model manifests: what a TorchScript file is, and the digest it must have.

A manifest is ``<name>.manifest.json`` next to the model file::

    {
      "manifest_version": 1,
      "name": "vibration-anomaly",
      "version": "1.0.0",
      "description": "...",                 (optional)
      "file": "vibration-anomaly.pt",       a bare file name in the same directory
      "sha256": "<64 lowercase hex>",       of the model file's bytes
      "input_shape": [3, 64],               one input, no batch dimension
      "labels": ["normal", "..."],          output classes, in logit order
      "critical": true,                     needs verified posture (policies/data.json)
      "metrics": {...}                      (optional, informative only)
    }

Parsing (:func:`parse_manifest`) is pure and refuses unknown fields; the loader in
``models.py`` reads the files and checks the digest.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ztagent import json_input
from ztagent.workloads.inference.errors import InvalidInputError, ModelLoadError

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
MAX_INPUT_RANK = 8
MAX_INPUT_ELEMENTS = 1 << 20
"""Largest input a manifest may declare: 2^20 float32 values (4 MiB)."""
MAX_LABELS = 1024
MAX_LABEL_CHARS = 64

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset(
    {
        "manifest_version",
        "name",
        "version",
        "description",
        "file",
        "sha256",
        "input_shape",
        "labels",
        "critical",
        "metrics",
    }
)
_REQUIRED = _FIELDS - {"description", "metrics"}


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    file: str
    sha256: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    critical: bool
    description: str = ""
    metrics: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def input_elements(self) -> int:
        return math.prod(self.input_shape)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "file": self.file,
            "sha256": self.sha256,
            "input_shape": list(self.input_shape),
            "labels": list(self.labels),
            "critical": self.critical,
            "metrics": dict(self.metrics),
        }
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def validate_model_name(name: str) -> None:
    """Model names: 1-64 of ``a-z 0-9 . _ -``, starting with a letter or digit.

    They appear in storage keys (``outbox/<model>/...``) and in the ``x-model`` header the
    policy reads, so they are kept plain.
    """
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            "invalid_model_name",
            f"model name {name[:80]!r} is not 1-64 characters of a-z, 0-9, '.', '_', '-' "
            "starting with a letter or digit",
        )


def parse_manifest(data: bytes, path: Path) -> ModelManifest:
    """Parses manifest bytes; ``path`` only names the file in error messages."""

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError("manifest_invalid", f"{path}: {what}")

    try:
        doc = json_input.loads(data, max_depth=None)
    except ValueError as exc:  # also not UTF-8, nested too deep to parse
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad(f"got a JSON {type(doc).__name__}, expected an object")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise bad(f"unknown field(s) {unknown}; expected only {sorted(_FIELDS)}")
    missing = sorted(_REQUIRED - set(doc))
    if missing:
        raise bad(f"missing field(s) {missing}")
    if doc["manifest_version"] != MANIFEST_VERSION or isinstance(doc["manifest_version"], bool):
        raise bad(f"manifest_version is {doc['manifest_version']!r}, expected {MANIFEST_VERSION}")

    name = doc["name"]
    if not isinstance(name, str):
        raise bad(f"'name' is {name!r:.40}, expected a string")
    try:
        validate_model_name(name)
    except InvalidInputError as err:
        raise bad(err.message) from None
    version = doc["version"]
    if not isinstance(version, str) or not 0 < len(version) <= 64 or not version.isprintable():
        raise bad(f"'version' is {version!r:.80}, expected 1-64 printable characters")
    description = doc.get("description", "")
    if not isinstance(description, str) or len(description) > 1024:
        raise bad("'description' must be a string of at most 1024 characters")
    file = doc["file"]
    if (
        not isinstance(file, str)
        or not file
        or file in (".", "..")
        or "/" in file
        or "\\" in file
        or "\x00" in file
    ):
        raise bad(f"'file' is {file!r:.80}, expected a bare file name in the manifest's directory")
    sha256 = doc["sha256"]
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise bad(f"'sha256' is {sha256!r:.80}, expected 64 lowercase hex digits")
    critical = doc["critical"]
    if not isinstance(critical, bool):
        raise bad(f"'critical' is {critical!r:.40}, expected true or false")
    metrics = doc.get("metrics", {})
    if not isinstance(metrics, dict):
        raise bad(f"'metrics' is a {type(metrics).__name__}, expected an object")
    return ModelManifest(
        name=name,
        version=version,
        file=file,
        sha256=sha256,
        input_shape=_parse_shape(doc["input_shape"], bad),
        labels=_parse_labels(doc["labels"], bad),
        critical=critical,
        description=description,
        metrics=MappingProxyType(metrics),
    )


def _parse_shape(raw: object, bad: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_INPUT_RANK:
        raise bad(f"'input_shape' is {raw!r:.80}, expected a list of 1-{MAX_INPUT_RANK} sizes")
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise bad(f"'input_shape' {raw!r:.80} holds {dim!r}, expected positive integers")
    shape = tuple(raw)
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise bad(
            f"'input_shape' {list(shape)} has {math.prod(shape)} elements; maximum is "
            f"{MAX_INPUT_ELEMENTS}"
        )
    return shape


def _parse_labels(raw: object, bad: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_LABELS:
        raise bad(f"'labels' is {raw!r:.80}, expected a list of 2-{MAX_LABELS} class names")
    for label in raw:
        if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARS:
            raise bad(f"label {label!r:.80} is not a string of 1-{MAX_LABEL_CHARS} characters")
    if len(set(raw)) != len(raw):
        raise bad(f"'labels' {raw!r:.120} has duplicates")
    return tuple(raw)
