"""Outside JSON: nesting bounded, every failure a ValueError, values kept exactly."""

from __future__ import annotations

import pytest

from ztagent import json_input


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"[" * 1500, "levels deep"),  # the standard parser's RecursionError
        ("[" * 40 + "]" * 40, "40 levels deep"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b"[Infinity]", "Infinity is not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"{", "not JSON"),
    ],
)
def test_refusals_are_value_errors(data: bytes | str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        json_input.loads(data)


def test_accepted_values_are_exact() -> None:
    big = 123456789012345678901234567890
    assert json_input.loads(f'{{"n": {big}, "s": "\\u00e9"}}'.encode()) == {"n": big, "s": "é"}
    nested = "[" * 32 + "]" * 32
    assert json_input.depth(json_input.loads(nested)) == 32
    assert json_input.loads(nested, max_depth=32) is not None
    assert json_input.depth(7) == 0 and json_input.depth({"a": [1, {"b": []}]}) == 4


def test_without_a_bound_of_ours_the_parser_limit_is_still_a_value_error() -> None:
    """``max_depth=None`` (documents ztagent wrote itself): any depth the parser can take."""
    assert json_input.loads("[" * 200 + "]" * 200, max_depth=None) is not None
    with pytest.raises(ValueError, match=r"^JSON nested too deeply to parse$"):
        json_input.loads(b"[" * 5000 + b"]" * 5000, max_depth=None)
