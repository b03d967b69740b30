"""Every option of every command has help text, ``--help`` shows defaults, and the README's
CLI table lists every command and every option (the parser is compared with the table)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztagent.cli import build_parser, main, version_text

README = Path(__file__).resolve().parents[2] / "README.md"


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser (the root too) with its command path, e.g. ("ca", "serve")."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def leaves() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    def has_sub(p: argparse.ArgumentParser) -> bool:
        return any(isinstance(a, argparse._SubParsersAction) for a in p._actions)

    return [(path, p) for path, p in commands(build_parser()) if path and not has_sub(p)]


def documented(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a user sees (not --help, not the supervisor's hidden flags)."""
    return [
        a
        for a in p._actions
        if a.help is not argparse.SUPPRESS
        and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


def readme_rows() -> dict[tuple[str, ...], str]:
    """The CLI table: command path -> the whole row."""
    text = README.read_text()
    section = text[text.index("## CLI") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[tuple[str, ...], str] = {}
    for line in section.splitlines():
        found = re.match(r"\| `ztagent((?: [a-z][a-z-]*)*)", line)
        if found:
            rows[tuple(found.group(1).split())] = line
    return rows


def long_options(action: argparse.Action) -> list[str]:
    return [o for o in action.option_strings if o.startswith("--")]


def _id(value: object) -> str:
    return " ".join(value) if isinstance(value, tuple) else ""


def test_the_walk_finds_every_command() -> None:
    paths = {path for path, _ in leaves()}
    assert {("serve",), ("ca", "serve"), ("workload", "storage"), ("policy", "test")} <= paths
    assert len(paths) > 25


@pytest.mark.parametrize(("path", "parser"), leaves(), ids=_id)
def test_every_option_has_help(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    missing = [a.dest for a in documented(parser) if not (a.help or "").strip()]
    assert missing == [], f"ztagent {' '.join(path)}: no help for {missing}"
    assert (parser.description or "").strip() or parser.format_usage()


@pytest.mark.parametrize(("path", "parser"), leaves(), ids=_id)
def test_every_command_and_option_is_in_the_readme(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    rows = readme_rows()
    assert path in rows, f"README CLI table has no row for `ztagent {' '.join(path)}`"
    row = rows[path]
    options = [o for a in documented(parser) for o in long_options(a)[:1]]
    missing = [o for o in options if not re.search(re.escape(o) + r"(?![a-z-])", row)]
    assert missing == [], f"`ztagent {' '.join(path)}` row of the README lacks {missing}"


def test_global_options_are_in_the_readme() -> None:
    text = README.read_text()
    section = text[text.index("## CLI") :]
    for action in documented(build_parser()):
        for option in long_options(action):
            assert f"`ztagent {option}" in section or f" {option}" in section, option


def test_the_table_names_no_command_that_does_not_exist() -> None:
    paths = {path for path, _ in commands(build_parser())}
    assert [row for row in readme_rows() if row not in paths] == []


def test_help_shows_defaults_and_units(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["ca", "serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 127.0.0.1:8444)" in out
    assert "days" in out and "(default: 90)" in out
    with pytest.raises(SystemExit):
        main(["workload", "storage", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "bytes" in out and "(default: 4194304)" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_version_names_the_linked_engines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == version_text()
    first, *rest = out.splitlines()
    assert re.fullmatch(r"ztagent \d+\.\d+\.\d+\S*", first)
    engines = {"grpcio", "regorus (gordon-to-regorus)", "cryptography"}
    found = {line.split(":")[0]: line for line in rest}
    assert engines <= set(found)
    assert all(re.search(r": \d+\.\d+", found[name]) for name in engines), found
