"""JSON from outside (a device's host facts and event log, a stored value), parsed with its
nesting bounded.

The standard library's parser recurses once per level and ends a document nested about a
thousand deep in ``RecursionError`` (not a ``ValueError``), which escaped the callers' error
handling as a traceback per call. ``loads`` turns that into ``ValueError`` and also refuses
anything nested deeper than ``max_depth`` (and NaN / Infinity, which are not JSON), so callers
keep their single ``except ValueError`` and what they accept can be written back by any
encoder. It stays the standard parser: orjson would turn an integer beyond 64 bits into a
float, changing a stored value.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

DEFAULT_MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted by default (the document itself is 1)."""


def depth(value: object) -> int:
    """How deeply ``value`` nests lists and dicts (a scalar: 0), without recursion; only
    containers go on the stack (a scalar is looked at once, never pushed and popped)."""
    if not isinstance(value, dict | list):
        return 0
    deepest = 0
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | str, max_depth: int | None = DEFAULT_MAX_DEPTH) -> Any:
    """The JSON value in ``data``; ``ValueError`` (with the reason) when it is not UTF-8, not
    JSON (NaN and Infinity included), or nests deeper than ``max_depth``. ``None``: no bound
    of ours, only the parser's own (about a thousand levels), still as ``ValueError`` — for
    documents ztagent wrote itself and reads back, such as decision-log lines, where a
    tighter bound could call a genuine line broken."""
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:  # the C scanner unwinds cleanly; the document is just too deep
        raise ValueError(
            "JSON nested too deeply to parse"
            if max_depth is None
            else f"JSON nested more than {max_depth} levels deep"
        ) from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise ValueError(f"not JSON: {exc}") from None
    if max_depth is not None:
        found = depth(value)
        if found > max_depth:
            raise ValueError(f"JSON nested {found} levels deep (at most {max_depth})")
    return value
