"""Bundle signatures as OPA makes and checks them: OPA's own test vectors, every refusal code
on a tampered bundle, directories, reproducible builds, shadow bundles, hot reload."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ztagent.policy.authoring import build_bundle, signature_status
from ztagent.policy.bundle_sign import (
    VerificationKey,
    canonical_json,
    file_digest,
    parse_json_numbers_as_written,
    verify_bundle,
)
from ztagent.policy.decision_cache import CachedEngine
from ztagent.policy.embedded import EmbeddedEngine, serves_shadow
from ztagent.policy.errors import PolicyLoadError
from ztagent.policy.sources import last_good_path, load_bundle, load_dir, read_bundle_members

POLICY = """package ztagent.authz

default decision := {"allow": false, "reasons": ["nope"]}

decision := {"allow": true, "reasons": []} if input.device.id in data.ztagent.allowed
"""


def source_dir(root: Path, allowed: tuple[str, ...] = ("d1",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "authz.rego").write_text(POLICY)
    (root / "ztagent").mkdir(exist_ok=True)
    (root / "ztagent" / "data.json").write_text(json.dumps({"allowed": list(allowed)}))
    return root


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def vkey(key_id: str, private: object, alg: str, scope: str | None = None) -> VerificationKey:
    public = private.public_key()  # type: ignore[attr-defined]
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return VerificationKey.from_pem(key_id, pem, alg, scope)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo("/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, dict[str, VerificationKey]]:
    key = ec_key()
    built = build_bundle(
        source_dir(tmp_path / "src"), signing_key=key, signing_alg="ES256", key_id="release",
        revision="r1",
    )  # fmt: skip
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(built.content)
    return path, {"release": vkey("release", key, "ES256")}


# --- OPA's own vectors ---------------------------------------------------------------------


def _canonical_digest(raw: bytes, name: str = "md5") -> str:
    return hashlib.new(name, canonical_json(parse_json_numbers_as_written(raw))).hexdigest()


def test_opa_hash_vectors() -> None:
    # v1/bundle/verify_test.go TestVerifyBundleFile "bad_digest": the got digest of .manifest
    assert _canonical_digest(b'{"revision": "quickbrownfaux"}') == (
        "a005c38a509dc2d5a7407b9494efb2ad"
    )
    # v1/bundle/sign_test.go TestGenerateSignedToken: data.json documents
    assert _canonical_digest(b"true") == "b326b5062b2f0e69046810717534cb09"
    assert _canonical_digest(b'{"x": {"y": true}, "a": {"b": {"z": true}}}') == (
        "36669864a622563256817033b1fc53db"
    )
    assert file_digest("a/b/c/data.json", b"[1,2,3]", "SHA-512") == (
        "60f7b5dc86ded48785436192a08dbfd04894d7f1b417c4f8d3714679a7f78cb3c833f16a8559a1cf1f32968"
        "747dc1d95ef34826263dacf125ded8f5c374be4c0"
    )


def test_json_files_hash_their_canonical_form_and_others_their_bytes() -> None:
    a = file_digest("data.json", b'{"b": [1, 2], "a": "x"}')
    assert a == file_digest("data.json", b'\xef\xbb\xbf{ "a":"x",\n "b":[1,2] }')
    assert a == hashlib.sha256(b'{"a":"x","b":[1,2]}').hexdigest()
    assert file_digest("data.json", b'{"n": 1.0}') != file_digest("data.json", b'{"n": 1}')
    assert file_digest("data.json", b'{"n": 1e3}') == hashlib.sha256(b'{"n":1e3}').hexdigest()
    assert file_digest("x.rego", b"package x\n") == hashlib.sha256(b"package x\n").hexdigest()
    assert file_digest("other.json", b"{ }") == hashlib.sha256(b"{ }").hexdigest()


def test_strings_are_escaped_as_go_without_html_escaping() -> None:
    doc = json.dumps({"s": '<a&b>\u00e9\u2028\x01\n\t"\\'}).encode()
    assert canonical_json(parse_json_numbers_as_written(doc)) == (
        '{"s":"<a&b>\u00e9\\u2028\\u0001\\n\\t\\"\\\\"}'.encode()
    )


OPA_RS256_TOKEN = (  # v1/bundle/verify_test.go signedTokenRS256 (kid foo, scope write)
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImZvbyJ9.eyJmaWxlcyI6W3sibmFtZSI6ImRiL3VhbTIvZW"
    "50aXRsZW1lbnRzL2RhdGEuanNvbiIsImhhc2giOiJjMjEzMTU0NGM3MTZhMjVhNWUzMWY1MDQzMDBmNTI0MGU4MjM1Y2"
    "FkYjlhNTdmMGJkMWI2ZjRiZDc0YjI2NjEyIiwiYWxnb3JpdGhtIjoic2hhMjU2In0seyJuYW1lIjoiZGIvdWFtMi9wb2"
    "xpY3kvb3BhLXBvbGljeS5yZWdvIiwiaGFzaCI6IjQyY2ZlNjc2OGI1N2JiNWY3NTAzYzE2NWMyOGRkMDdhYzViODEzNT"
    "U0ZWJjODUwZjJjYzM1ODQzZTcxMzdiMWQifV0sImlhdCI6MTU5MjI1MTQwNiwiaXNzIjoiSldUU2VydmljZSIsInNjb3"
    "BlIjoid3JpdGUifQ.UZcX_Qj29o213nwZ5mysiyNcgAp1AOqCkDLkj1KGZ7Cw3l17TbkF8t3FJd654sf762NGcABA0WQ2"
    "zxq-labXl_d5TKQmq23lurO3qLHI1cKQPyoxPbddGo78sJpMwWsiMyEYcyyKC9FpNUpa8cT81GPo4q9Zui8TAD0wtHh2Y"
    "xBL7E8QYLJxcLMJTJxVBgrQGLXFT7vYRc6hJz9Vu-i0SWuLBGxOCmYoHr4DWFfy0IhAbhiUFyLRpukfBPjCJNYY5LgaZ"
    "dN6LaYivtIEUms5jUuXubBimLJm7KOT5-bgJMXTcUsbrbl2Ma7PwG5IOKjjgyEvH8KVfGFZSzNrpuxKmA"
)
OPA_RS256_PUBLIC = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA9KaakMv1XKKDaSch3PFR
3a27oaHp1GNTTNqvb1ZaHZXp+wuhYDwc/MTE67x9GCifvQBWzEGorgTq7aisiOyl
vKifwz6/wQ+62WHKG/sqKn2Xikp3P63aBIPlZcHbkyyRmL62yeyuzYoGvLEYel+m
z5SiKGBwviSY0Th2L4e5sGJuk2HOut6emxDi+E2Fuuj5zokFJvIT6Urlq8f3h6+l
GeR6HUOXqoYVf7ff126GP7dticTVBgibxkkuJFmpvQSW6xmxruT4k6iwjzbZHY7P
ypZ/TdlnuGC1cOpAVyU7k32IJ9CRbt3nwEf5U54LRXLLQjFixWZHwKdDiMTF4ws0
+wIDAQAB
-----END PUBLIC KEY-----
"""


def test_an_opa_signed_jwt_verifies_and_its_listed_files_must_be_present() -> None:
    sig = json.dumps({"signatures": [OPA_RS256_TOKEN]}).encode()
    keys = {"foo": VerificationKey.from_pem("foo", OPA_RS256_PUBLIC, "RS256", "write")}
    # the signature verifies; then the two files it lists are not in this (empty) bundle
    with pytest.raises(PolicyLoadError, match=r"db/uam2/entitlements/data\.json") as info:
        verify_bundle({}, sig, keys)
    assert info.value.code == "bundle_file_missing"
    unscoped = {"foo": VerificationKey.from_pem("foo", OPA_RS256_PUBLIC, "RS256")}
    with pytest.raises(PolicyLoadError, match="scope mismatch"):
        verify_bundle({}, sig, unscoped)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(PolicyLoadError, match="does not verify") as info:
        verify_bundle({}, sig, {"foo": vkey("foo", other, "RS256", "write")})
    assert info.value.code == "bundle_signature_invalid"


# --- the bundle refusals, one per code -----------------------------------------------------


def test_signed_bundle_loads_with_its_key(signed: tuple[Path, dict[str, VerificationKey]]) -> None:
    path, keys = signed
    sources = load_bundle(path, keys=keys)
    assert sources.signed_by == "release"
    assert sources.revision == "r1"
    assert sources.signature is not None
    assert sources.signature.files == (".manifest", "authz.rego", "data.json")
    assert sources.data == {"ztagent": {"allowed": ["d1"]}}


def _refused(path: Path, keys: dict[str, VerificationKey], code: str, match: str) -> None:
    with pytest.raises(PolicyLoadError, match=match) as info:
        load_bundle(path, keys=keys)
    assert info.value.code == code


def test_edited_policy_is_a_hash_mismatch(signed: tuple[Path, dict[str, VerificationKey]]) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    members["authz.rego"] = members["authz.rego"] + b"\n# one more line\n"
    _refused(write_tar(path, members), keys, "bundle_hash_mismatch", "authz.rego: digest")


def test_edited_data_is_a_hash_mismatch_but_reformatting_is_not(
    signed: tuple[Path, dict[str, VerificationKey]],
) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    members["data.json"] = b'{ "ztagent" : { "allowed" : [ "d1" ] } }\n'  # same document
    assert load_bundle(write_tar(path, members), keys=keys).signed_by == "release"
    members["data.json"] = b'{"ztagent": {"allowed": ["d1", "evil"]}}'
    _refused(write_tar(path, members), keys, "bundle_hash_mismatch", "data.json")


def test_data_nested_past_the_parser_is_invalid_not_a_traceback(
    signed: tuple[Path, dict[str, VerificationKey]],
) -> None:
    """A bundle comes from the network and its JSON is parsed to be hashed, before anything
    about it is trusted: 5,000 levels of nesting are ``bundle_invalid``."""
    path, keys = signed
    members = read_bundle_members(path)
    members["data.json"] = b"[" * 5000 + b"]" * 5000
    _refused(write_tar(path, members), keys, "bundle_invalid", "data.json: not JSON")
    with pytest.raises(ValueError, match="nested too deeply to parse"):
        parse_json_numbers_as_written(members["data.json"])


def test_extra_file_is_unlisted(signed: tuple[Path, dict[str, VerificationKey]]) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    members["backdoor.rego"] = b"package ztagent.backdoor\n"
    _refused(write_tar(path, members), keys, "bundle_file_unlisted", "backdoor.rego")
    members = read_bundle_members(path)
    members.pop("backdoor.rego")
    members[".hidden/notes.txt"] = b"even files ztagent does not load are covered"
    _refused(write_tar(path, members), keys, "bundle_file_unlisted", "notes.txt")


def test_removed_file_is_missing(signed: tuple[Path, dict[str, VerificationKey]]) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    del members["data.json"]
    _refused(write_tar(path, members), keys, "bundle_file_missing", "data.json")


def test_manifest_is_covered(signed: tuple[Path, dict[str, VerificationKey]]) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    members[".manifest"] = b'{"revision": "r1", "roots": [""], "metadata": {"ztagent": {}}}'
    _refused(write_tar(path, members), keys, "bundle_hash_mismatch", ".manifest")


def test_wrong_key(signed: tuple[Path, dict[str, VerificationKey]]) -> None:
    path, _ = signed
    _refused(path, {"other": vkey("other", ec_key(), "ES256")}, "bundle_key_unknown", "'release'")
    _refused(path, {"release": vkey("release", ec_key(), "ES256")}, "bundle_signature_invalid",
             "does not verify")  # fmt: skip


def test_wrong_alg(signed: tuple[Path, dict[str, VerificationKey]], tmp_path: Path) -> None:
    path, _ = signed
    p384 = ec.generate_private_key(ec.SECP384R1())
    _refused(path, {"release": vkey("release", p384, "ES384")}, "bundle_signature_invalid",
             "alg 'ES256' is not key 'release'")  # fmt: skip
    # a bundle signed with EdDSA, presented to a sidecar that expects ES256 for that id
    ed = ed25519.Ed25519PrivateKey.generate()
    built = build_bundle(
        source_dir(tmp_path / "src2"), signing_key=ed, signing_alg="EdDSA", key_id="release"
    )
    other = tmp_path / "ed.tar.gz"
    other.write_bytes(built.content)
    assert load_bundle(other, keys={"release": vkey("release", ed, "EdDSA")}).signed_by
    _refused(other, {"release": vkey("release", ec_key(), "ES256")}, "bundle_signature_invalid",
             "expected ES256")  # fmt: skip


def test_unsigned_bundle_with_keys_is_refused(
    signed: tuple[Path, dict[str, VerificationKey]],
) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    del members[".signatures.json"]
    _refused(write_tar(path, members), keys, "bundle_signature_missing", "no .signatures.json")
    assert load_bundle(path).revision == "r1"  # without keys an unsigned bundle still loads


def test_signed_bundle_without_keys_is_refused_as_opa_does(
    signed: tuple[Path, dict[str, VerificationKey]],
) -> None:
    path, _ = signed
    with pytest.raises(PolicyLoadError, match="no verification keys") as info:
        load_bundle(path)
    assert info.value.code == "bundle_key_unknown"


@pytest.mark.parametrize(
    ("signatures", "code", "match"),
    [
        (b'{"signatures": ["a.b"]}', "bundle_signature_invalid", "2 segments"),
        (b'{"signatures": ["!!.e30.AA"]}', "bundle_signature_invalid", "not base64url"),
        (b'{"signatures": ["e30.bm90IGpzb24.AA"]}', "bundle_signature_invalid", "not JSON"),
        (b'{"signatures": []}', "bundle_signature_missing", "missing JWT"),
        (b'{"signatures": ["x", "y"]}', "bundle_signature_invalid", "expected exactly one"),
        (b"not json", "bundle_signature_invalid", "not JSON"),
        (b'{"signatures": ["e30.e30.AA"]}', "bundle_key_unknown", "names no key"),
        # parsed before any signature check: nested 1,500 deep it was a RecursionError
        (b'{"signatures": ' + b"[" * 1500, "bundle_signature_invalid", "levels deep"),
        (b'{"signatures": ["' + b"W1tb" * 500 + b'.e30.AA"]}', "bundle_signature_invalid", "deep"),
    ],
)
def test_malformed_signatures_file(
    signed: tuple[Path, dict[str, VerificationKey]], signatures: bytes, code: str, match: str
) -> None:
    path, keys = signed
    members = read_bundle_members(path)
    members[".signatures.json"] = signatures
    _refused(write_tar(path, members), keys, code, match)


def test_weak_digest_algorithms_are_refused() -> None:
    with pytest.raises(PolicyLoadError, match="MD5 is refused"):
        file_digest("x.rego", b"", "MD5")
    with pytest.raises(PolicyLoadError, match="unsupported digest algorithm 'sha256'"):
        file_digest("x.rego", b"", "sha256")


def test_verification_keys_must_fit_their_algorithm() -> None:
    from ztagent.policy.bundle_sign import BundleKeyError

    with pytest.raises(BundleKeyError, match="needs an EC secp256r1 key"):
        vkey("k", ec.generate_private_key(ec.SECP384R1()), "ES256")
    with pytest.raises(BundleKeyError, match="at least 2048"):
        vkey("k", rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256")
    private_pem = ec_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(BundleKeyError, match="private key"):
        VerificationKey.from_pem("k", private_pem, "ES256")


# --- directories, builds, last good copies -------------------------------------------------


def test_directories(tmp_path: Path) -> None:
    key = ec_key()
    keys = {"release": vkey("release", key, "ES256")}
    src = source_dir(tmp_path / "plain")
    assert load_dir(src, keys=keys).signed_by is None  # unsigned directory, allowed
    with pytest.raises(PolicyLoadError) as info:
        load_dir(src, keys=keys, require_signature=True)
    assert info.value.code == "bundle_signature_missing"
    # a directory signed like `opa sign`: the bundle unpacked
    built = build_bundle(src, signing_key=key, signing_alg="ES256", key_id="release")
    signed = tmp_path / "signed"
    bundle = tmp_path / "built.tar.gz"
    bundle.write_bytes(built.content)
    for name, data in read_bundle_members(bundle).items():
        (signed / name).parent.mkdir(parents=True, exist_ok=True)
        (signed / name).write_bytes(data)
    assert load_dir(signed, keys=keys, require_signature=True).signed_by == "release"
    (signed / "README.md").write_text("unlisted")
    with pytest.raises(PolicyLoadError) as info:
        load_dir(signed, keys=keys)
    assert info.value.code == "bundle_file_unlisted"


def test_build_is_reproducible(tmp_path: Path) -> None:
    key = ec_key()
    src = source_dir(tmp_path / "src")
    one = build_bundle(src, signing_key=key, signing_alg="ES256", key_id="k", revision="r")
    two = build_bundle(src, signing_key=key, signing_alg="ES256", key_id="k", revision="r")
    assert one.content == two.content
    assert one.content[4:8] == b"\0\0\0\0"  # gzip mtime 0
    assert one.content[3] & 0x08 == 0  # no file name in the gzip header
    with tarfile.open(fileobj=io.BytesIO(one.content)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted(i.name for i in infos)
    assert {(i.mtime, i.uid, i.gid, i.mode, i.uname) for i in infos} == {(0, 0, 0, 0o644, "")}
    unsigned = build_bundle(src, revision="r")
    assert ".signatures.json" not in unsigned.files and unsigned.signed_by is None


def test_signed_last_good_copy_verifies_again(tmp_path: Path) -> None:
    key = ec_key()
    keys = {"release": vkey("release", key, "ES256")}
    src = source_dir(tmp_path / "src")
    built = build_bundle(src, signing_key=key, signing_alg="ES256", key_id="release")
    # a signed directory
    signed = tmp_path / "signed"
    bundle = tmp_path / "b.tar.gz"
    bundle.write_bytes(built.content)
    for name, data in read_bundle_members(bundle).items():
        (signed / name).parent.mkdir(parents=True, exist_ok=True)
        (signed / name).write_bytes(data)
    (signed / "docs").mkdir()
    last_good = tmp_path / "last-good"
    for path in (bundle, signed):
        engine = EmbeddedEngine.load(path, last_good_dir=last_good, keys=keys)
        assert engine.signed_by == "release"
        saved = last_good_path(last_good)
        assert saved is not None
        again = EmbeddedEngine.load(saved, keys=keys, require_signature=True)
        assert again.signed_by == "release"


def test_reload_refuses_a_forged_bundle_and_keeps_serving(
    signed: tuple[Path, dict[str, VerificationKey]], tmp_path: Path
) -> None:
    path, keys = signed
    engine = EmbeddedEngine.load(path, keys=keys)
    assert engine.revision == "r1" and engine.health().ok
    forged = build_bundle(
        source_dir(tmp_path / "evil", allowed=("d1", "evil")),
        signing_key=ec_key(), signing_alg="ES256", key_id="release", revision="r2",
    )  # fmt: skip
    path.write_bytes(forged.content)
    assert engine.maybe_reload() is False
    health = engine.health()
    assert health.ok is False and health.revision == "r1"
    assert health.last_error is not None and "bundle_signature_invalid" in health.last_error
    # the start with a forged bundle and no last good copy fails like a compile error
    with pytest.raises(PolicyLoadError, match="does not verify"):
        EmbeddedEngine.load(path, keys=keys)


def test_shadow_bundle(tmp_path: Path) -> None:
    key = ec_key()
    keys = {"release": vkey("release", key, "ES256")}
    built = build_bundle(
        source_dir(tmp_path / "src"), signing_key=key, signing_alg="ES256", key_id="release",
        revision="shadow-1", dry_run=True,
    )  # fmt: skip
    path = tmp_path / "b.tar.gz"
    path.write_bytes(built.content)
    assert load_bundle(path, keys=keys).dry_run is True
    engine = EmbeddedEngine.load(path, keys=keys)
    assert engine.dry_run and serves_shadow(engine, "shadow-1")
    assert not serves_shadow(engine, "another-revision")  # raced with a reload: enforce
    cached = CachedEngine(engine, engine.ast_json, 10)
    assert serves_shadow(cached, "shadow-1")
    status = signature_status(path, keys=keys)
    assert str(status) == "signed by key release (shadow bundle: decisions logged, not enforced)"
    plain = EmbeddedEngine.load(source_dir(tmp_path / "plain"))
    assert not serves_shadow(plain, plain.revision)
    members = read_bundle_members(path)
    members[".manifest"] = b'{"metadata": {"ztagent": {"dry_run": "yes"}}}'
    del members[".signatures.json"]
    with pytest.raises(PolicyLoadError, match="dry_run' must be true or false"):
        load_bundle(write_tar(path, members))


def test_cli_build_check_test_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ztagent.cli import main

    key = ec_key()
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    src = source_dir(tmp_path / "src")
    out = tmp_path / "b.tar.gz"
    build = ["policy", "build", str(src), "--out", str(out), "--revision", "r7", "--keyid", "rel"]
    build += ["--signing-key", str(tmp_path / "k.pem"), "--signing-alg", "ES256"]
    assert main(build) == 0
    assert "revision r7, 4 files, signed by key rel (ES256)" in capsys.readouterr().out
    verify = ["--verification-key", str(tmp_path / "pub.pem"), "--verification-key-id", "rel"]
    verify += ["--verification-alg", "ES256"]
    assert main(["policy", "check", str(out), *verify]) == 0
    assert "signature: signed by key rel" in capsys.readouterr().out
    assert main(["policy", "check", str(out)]) == 1  # signed, but no key to verify it with
    assert "signature: refused: bundle_key_unknown" in capsys.readouterr().out
    assert main(["policy", "test", str(out), *verify]) == 0
    assert "signature: signed by key rel" in capsys.readouterr().out
    log = tmp_path / "decisions.jsonl"
    line = {
        "decision_id": "x",
        "allow": False,
        "reasons": ["nope"],
        "input": {"device": {"id": "d1"}},
    }
    log.write_text(json.dumps(line) + "\n")
    assert main(["policy", "replay", "--log", str(log), "--policy", str(out), *verify]) == 0
    text = capsys.readouterr().out
    assert "deny ['nope'] -> allow []" in text and "signature: signed by key rel" in text
    tampered = read_bundle_members(out)
    tampered["authz.rego"] += b"\n"
    write_tar(out, tampered)
    assert main(["policy", "check", str(out), *verify]) == 1
    assert "signature: refused: bundle_hash_mismatch" in capsys.readouterr().out
