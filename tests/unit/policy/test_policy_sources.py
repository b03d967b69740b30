from __future__ import annotations

import gzip
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.unit.policy._rego import AUTHZ, AUTHZ_TEST, authz_dir, make_bundle, write_tree
from ztagent.policy import sources as sources_mod
from ztagent.policy.errors import PolicyLoadError
from ztagent.policy.sources import load_bundle, load_dir, load_sources, sources_signature


def test_load_dir_reads_modules_and_nests_data(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p",
        {
            "authz.rego": AUTHZ,
            "authz_test.rego": AUTHZ_TEST,
            "lib/util.rego": "package lib\nx := 1\n",
            ".hidden/skip.rego": "package hidden\n",
            "data.json": {"top": 1},
            "a/b/data.json": {"k": "v"},
            "ztagent/authz/data.json": {"users": ["alice"]},
            "notes.txt": "ignored",
        },
    )
    src = load_dir(root)
    assert [rel for rel, _ in src.modules] == ["authz.rego", "lib/util.rego"]
    assert src.data == {
        "top": 1,
        "a": {"b": {"k": "v"}},
        "ztagent": {"authz": {"users": ["alice"]}},
    }
    assert not src.tests_included
    with_tests = load_dir(root, include_tests=True)
    assert [rel for rel, _ in with_tests.modules] == [
        "authz.rego",
        "authz_test.rego",
        "lib/util.rego",
    ]
    assert with_tests.tests_included


def test_nested_data_merges_with_parent_object(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "p", {"data.json": {"a": {"x": 1}}, "a/data.json": {"y": 2}})
    assert load_dir(root).data == {"a": {"x": 1, "y": 2}}


def test_conflicting_data_names_both_files(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "p", {"data.json": {"a": {"b": {"k": 1}}}, "a/b/data.json": {"k": 2}}
    )
    with pytest.raises(PolicyLoadError, match=r"data\.a\.b\.k is defined by both") as err:
        load_dir(root)
    assert err.value.code == "policy_data_invalid"
    assert str(root / "data.json") in err.value.message
    assert str(root / "a/b/data.json") in err.value.message


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "p", {"x/data.json": '{\n  "a": 1,\n  oops\n}'})
    with pytest.raises(PolicyLoadError, match=r"x/data\.json:3:3: invalid JSON"):
        load_dir(root)
    deep = write_tree(tmp_path / "q", {"x/data.json": "[" * 5000 + "]" * 5000})
    with pytest.raises(PolicyLoadError, match=r"x/data\.json: JSON nested too deeply") as err:
        load_dir(deep)
    assert err.value.code == "policy_data_invalid"


def test_revision_is_content_hash_and_changes_with_content(tmp_path: Path) -> None:
    first = load_dir(authz_dir(tmp_path / "a"))
    same = load_dir(authz_dir(tmp_path / "b"))
    other = load_dir(authz_dir(tmp_path / "c", users=["bob"]))
    assert first.revision.startswith("sha256:") and len(first.revision) == len("sha256:") + 16
    assert first.revision == same.revision
    assert first.revision != other.revision


def test_revision_from_manifest(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p")
    (root / ".manifest").write_text(json.dumps({"revision": "v42"}))
    assert load_dir(root).revision == "v42"


def test_load_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path / "b.tar.gz",
        {
            ".manifest": json.dumps({"revision": "2026-11-26", "roots": ["ztagent"]}),
            "./authz.rego": AUTHZ,
            "authz_test.rego": AUTHZ_TEST,
            "ztagent/authz/data.json": json.dumps({"users": ["alice"]}),
            "README.md": "ignored",
        },
    )
    src = load_sources(bundle)
    assert src.revision == "2026-11-26"
    assert [rel for rel, _ in src.modules] == ["authz.rego"]
    assert src.data == {"ztagent": {"authz": {"users": ["alice"]}}}
    assert len(load_bundle(bundle, include_tests=True).modules) == 2


def test_opa_build_style_root_slash_names_are_bundle_relative(tmp_path: Path) -> None:
    """`opa build` writes members as /.manifest, /data.json, /authz.rego."""
    bundle = make_bundle(
        tmp_path / "b.tar.gz",
        {
            "/.manifest": json.dumps({"revision": "r1"}),
            "/authz.rego": AUTHZ,
            "/ztagent/authz/data.json": json.dumps({"users": ["bob"]}),
        },
    )
    src = load_bundle(bundle)
    assert src.revision == "r1"
    assert [rel for rel, _ in src.modules] == ["authz.rego"]
    assert src.data == {"ztagent": {"authz": {"users": ["bob"]}}}


def test_bundle_without_manifest_uses_content_hash(tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path / "b.tar.gz",
        {"authz.rego": AUTHZ, "ztagent/authz/data.json": json.dumps({"users": ["alice"]})},
    )
    assert load_bundle(bundle).revision == load_dir(authz_dir(tmp_path / "d")).revision


@pytest.mark.parametrize(
    ("members", "kwargs", "expected"),
    [
        ({"../evil.rego": "package evil\n"}, {}, r"'\.\.'"),
        ({"a/../../evil.rego": "package evil\n"}, {}, r"'\.\.'"),
        ({"//etc/evil.rego": "package evil\n"}, {}, "absolute path"),
        ({"C:/evil.rego": "package evil\n"}, {}, "absolute path"),
        ({"authz.rego": AUTHZ}, {"symlink": "link.rego"}, "is a link"),
        ({"authz.rego": AUTHZ}, {"hardlink": "hard.rego"}, "is a link"),
        ({"a.rego": "package a\n", "./a.rego": "package a\n"}, {}, "appears twice"),
        ({".manifest": "[1]"}, {}, "expected an object"),
        (
            {".manifest": '{"roots": ["other"]}', "authz.rego": AUTHZ},
            {},
            "outside the manifest roots",
        ),
    ],
)
def test_bad_bundles_are_refused(
    tmp_path: Path, members: dict[str, str], kwargs: dict[str, str], expected: str
) -> None:
    bundle = make_bundle(tmp_path / "bad.tar.gz", members, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(PolicyLoadError, match=expected) as err:
        load_bundle(bundle)
    assert err.value.code == "bundle_invalid"


def test_oversized_member_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_mod, "MAX_MEMBER_BYTES", 100)
    bundle = make_bundle(tmp_path / "big.tar.gz", {"data.json": json.dumps({"x": "y" * 200})})
    with pytest.raises(PolicyLoadError, match=r"bytes \(limit 100\)") as err:
        load_bundle(bundle)
    assert err.value.code == "bundle_invalid"


def _header(name: str, kind: bytes, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def test_a_header_declaring_gigabytes_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PAX record declaring 4 MiB of zeros (gigabytes in the attack): ``tarfile`` would read
    it into memory at once; the stream is cut at ``MAX_TAR_BYTES`` and refused."""
    monkeypatch.setattr(sources_mod, "MAX_TAR_BYTES", 1024 * 1024)
    bomb = tmp_path / "pax.tar.gz"
    with gzip.open(bomb, "wb") as out:
        out.write(_header("././@PaxHeader", tarfile.XHDTYPE, 4 * 1024 * 1024))
        out.write(bytes(4 * 1024 * 1024))
    with pytest.raises(PolicyLoadError, match="decompresses to more than 1048576 bytes") as err:
        load_bundle(bomb)
    assert err.value.code == "bundle_invalid"


def test_a_flood_of_entries_is_refused(tmp_path: Path) -> None:
    """The same directory header over and over: no file, no duplicate name among files,
    only entries that ``tarfile`` keeps a record of each (gigabytes for a 16 MiB download)."""
    bomb = tmp_path / "dirs.tar.gz"
    with gzip.open(bomb, "wb") as out:
        out.write(_header("d/", tarfile.DIRTYPE) * (sources_mod.MAX_MEMBERS + 1) + bytes(1024))
    with pytest.raises(PolicyLoadError, match="more than 10000 entries") as err:
        load_bundle(bomb)
    assert err.value.code == "bundle_invalid"


def test_a_damaged_file_is_refused_never_read_as_other_content(tmp_path: Path) -> None:
    """One byte flipped anywhere after the gzip header: refused ``bundle_invalid`` (a bad
    deflate block, or the CRC at the end of the stream), or read exactly as written. Reading
    stopped at the end of the tar, before the CRC, and some flips escaped as ``zlib.error``."""
    text = "".join(f"# line {i} {i * i}\n" for i in range(20_000))  # compressible: many blocks
    bundle = make_bundle(tmp_path / "b.tar.gz", {"authz.rego": AUTHZ + text})
    original = bundle.read_bytes()
    expected = sources_mod.read_bundle_members(bundle)
    refused = 0
    for offset in range(20, len(original), 499):
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        bundle.write_bytes(bytes(damaged))
        try:
            members = sources_mod.read_bundle_members(bundle)
        except PolicyLoadError as err:
            assert err.code == "bundle_invalid"
            refused += 1
            continue
        assert members == expected, f"byte {offset} flipped: read as other content"
    assert refused > 0


def test_not_a_tarball_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(PolicyLoadError, match="not a readable") as err:
        load_sources(bad)
    assert err.value.code == "bundle_invalid"


def test_signature_changes_on_edit_add_and_remove(tmp_path: Path) -> None:
    root = authz_dir(tmp_path / "p")
    sig = sources_signature(root)
    assert sig == sources_signature(root)
    assert {s[0] for s in sig} == {"authz.rego", "ztagent/authz/data.json"}
    (root / "extra.rego").write_text("package extra\n")
    sig2 = sources_signature(root)
    assert sig2 != sig
    st = os.stat(root / "authz.rego")
    os.utime(root / "authz.rego", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sources_signature(root) != sig2
    (root / "extra.rego").unlink()
    assert sources_signature(root) != sig2
    assert sources_signature(tmp_path / "missing") == ()
