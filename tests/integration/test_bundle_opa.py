"""ztagent's signed bundles against code that is not ztagent's.

1. An independent implementation of OPA's bundle-signing format, written here from the
   specification (OPA's docs "Signature format" and ``v1/bundle/hash.go``) with nothing but
   ``cryptography``, ``hashlib``, ``json`` and ``tarfile``: a bundle it signs is accepted by
   ztagent, and a bundle ``ztagent policy build`` signs verifies with it.
2. OPA's own Go code, in-process through ``opa-golib-python-bindings``. That binding exposes
   OPA's ``rego`` package only (add_policy / add_data / eval), not its bundle loader, so OPA
   cannot be handed the ``.tar.gz`` itself. Instead OPA's builtins check what its bundle
   verifier would: ``io.jwt.verify_es256`` verifies ztagent's JWT with the public key,
   ``io.jwt.decode`` reads its payload, ``crypto.sha256`` recomputes every listed digest
   (``json.marshal(json.unmarshal(..))`` for the JSON files: OPA's compact, key-sorted
   encoding, identical to the signing hash for documents without ``<``, ``>`` or ``&``); and
   the bundle's modules and data, loaded into OPA, decide as ztagent's engine does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from tests.fixtures.ci import require_module
from ztagent.policy.authoring import build_bundle
from ztagent.policy.bundle_sign import VerificationKey
from ztagent.policy.embedded import EmbeddedEngine
from ztagent.policy.errors import PolicyLoadError
from ztagent.policy.sources import load_bundle

pytestmark = pytest.mark.integration

POLICY = """package ztagent.authz

default decision := {"allow": false, "reasons": ["device_not_allowed"]}

decision := {"allow": true, "reasons": []} if {
	input.device.id in data.ztagent.allowed
	input.request.method in data.ztagent.methods
}
"""
DATA = {"ztagent": {"allowed": ["d1", "d2"], "methods": ["Get", "Put"], "limit": 1.50}}


# --- the independent implementation ------------------------------------------------------


class Literal(str):
    """A JSON number kept as its text (the spec hashes numbers as written)."""


def spec_canonical(value: Any) -> str:
    """Objects with keys sorted, arrays in order, no whitespace; strings JSON-escaped without
    HTML escaping (our test documents hold only ASCII letters and digits)."""
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(f"{json.dumps(k)}:{spec_canonical(value[k])}" for k in sorted(value))
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(spec_canonical(v) for v in value) + "]"
    if isinstance(value, Literal):
        return str.__str__(value)
    return json.dumps(value)


def spec_digest(name: str, content: bytes) -> str:
    if name.rsplit("/", 1)[-1] in ("data.json", ".manifest"):
        doc = json.loads(content, parse_int=Literal, parse_float=Literal)
        content = spec_canonical(doc).encode()
    return hashlib.sha256(content).hexdigest()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def spec_sign(files: dict[str, bytes], key: ec.EllipticCurvePrivateKey, kid: str) -> bytes:
    header = {"alg": "ES256", "kid": kid}
    payload = {"files": [{"name": n, "hash": spec_digest(n, c), "algorithm": "SHA-256"}
                         for n, c in files.items()]}  # fmt: skip
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    token = f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    return json.dumps({"signatures": [token]}).encode()


def spec_verify(members: dict[str, bytes], public: ec.EllipticCurvePublicKey, kid: str) -> None:
    """Raises AssertionError / InvalidSignature unless the bundle verifies per the spec."""
    (token,) = json.loads(members[".signatures.json"])["signatures"]
    head, body, sig = token.split(".")
    header, payload = json.loads(unb64(head)), json.loads(unb64(body))
    assert header["alg"] == "ES256" and header["kid"] == kid
    raw = unb64(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    listed = {f["name"]: f for f in payload["files"]}
    present = {n: c for n, c in members.items() if n != ".signatures.json"}
    assert set(listed) == set(present)
    for name, content in present.items():
        assert listed[name]["algorithm"] == "SHA-256"
        assert listed[name]["hash"] == spec_digest(name, content), name


def spec_tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo("/" + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def untar(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        found = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            found[m.name.lstrip("/")] = f.read()
        return found


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "ztagent").mkdir(parents=True)
    (src / "authz.rego").write_text(POLICY)
    # written with whitespace and 1.50: the signature covers the document, not its layout
    (src / "ztagent" / "data.json").write_text(json.dumps(DATA["ztagent"], indent=3))
    return src


# --- 1. independent implementation --------------------------------------------------------


def test_a_bundle_signed_by_the_independent_signer_loads(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    members = {
        ".manifest": b'{"revision": "indep-1", "roots": ["ztagent"]}',
        "authz.rego": POLICY.encode(),
        "ztagent/data.json": b'{ "allowed": ["d1","d2"], "methods": ["Get","Put"], "limit": 1.50 }',
    }
    members[".signatures.json"] = spec_sign(members, key, "indep")
    path = tmp_path / "indep.tar.gz"
    path.write_bytes(spec_tar(members))
    keys = {"indep": VerificationKey.from_pem("indep", public_pem(key), "ES256")}
    sources = load_bundle(path, keys=keys)
    assert (sources.signed_by, sources.revision) == ("indep", "indep-1")
    assert sources.data["ztagent"]["allowed"] == ["d1", "d2"]
    # and the same bundle with one byte of the policy changed is refused
    members["authz.rego"] = POLICY.encode() + b"#"
    path.write_bytes(spec_tar(members))
    with pytest.raises(PolicyLoadError) as info:
        load_bundle(path, keys=keys)
    assert info.value.code == "bundle_hash_mismatch"


def test_ztagent_signature_verifies_with_the_independent_verifier(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    built = build_bundle(
        source(tmp_path), signing_key=key, signing_alg="ES256", key_id="release", revision="r1"
    )
    members = untar(built.content)
    assert set(members) == {".manifest", ".signatures.json", "authz.rego", "data.json"}
    spec_verify(members, key.public_key(), "release")
    with pytest.raises(InvalidSignature):
        spec_verify(members, ec.generate_private_key(ec.SECP256R1()).public_key(), "release")
    members["data.json"] = members["data.json"].replace(b'"d2"', b'"evil"')
    with pytest.raises(AssertionError, match=r"data\.json"):
        spec_verify(members, key.public_key(), "release")


# --- 2. OPA's Go code -----------------------------------------------------------------------

CHECK = """package bundlecheck

import rego.v1

token := json.unmarshal(input.signatures).signatures[0]

signature_ok := io.jwt.verify_es256(token, input.public_key)

payload := io.jwt.decode(token)[1]

header := io.jwt.decode(token)[0]

digest(name, content) := crypto.sha256(json.marshal(json.unmarshal(content))) if {
	name in {"data.json", ".manifest"}
}

digest(name, content) := crypto.sha256(content) if {
	not name in {"data.json", ".manifest"}
}

mismatched contains f.name if {
	some f in payload.files
	f.hash != digest(f.name, input.files[f.name])
}

listed := {f.name | some f in payload.files}
"""


def test_opa_verifies_ztagent_signature_and_decides_alike(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    opa_bindings = require_module("opa_bindings")
    built = build_bundle(
        source(tmp_path), signing_key=key, signing_alg="ES256", key_id="release", revision="r1"
    )
    members = untar(built.content)
    files = {n: c.decode() for n, c in members.items() if n != ".signatures.json"}
    opa = opa_bindings.OpaEngine()
    try:
        opa.add_policy("bundlecheck.rego", CHECK)
        doc = {
            "signatures": members[".signatures.json"].decode(),
            "public_key": public_pem(key).decode(),
            "files": files,
        }
        result = opa.eval_document("bundlecheck", doc)
        assert result["signature_ok"] is True
        assert result["header"] == {"alg": "ES256", "kid": "release"}
        assert result["payload"]["keyid"] == "release"
        assert sorted(result["listed"]) == sorted(files)
        assert result["mismatched"] == []
        doc["files"] = {**files, "authz.rego": files["authz.rego"] + "# edited\n"}
        assert opa.eval_document("bundlecheck", doc)["mismatched"] == ["authz.rego"]
        other = ec.generate_private_key(ec.SECP256R1())
        doc["public_key"] = public_pem(other).decode()
        assert opa.eval_document("bundlecheck", doc)["signature_ok"] is False
    finally:
        opa.close()

    # the bundle's modules and data in OPA decide as ztagent's engine serving the bundle
    path = tmp_path / "b.tar.gz"
    path.write_bytes(built.content)
    keys = {"release": VerificationKey.from_pem("release", public_pem(key), "ES256")}
    engine = EmbeddedEngine.load(path, keys=keys)
    opa = opa_bindings.OpaEngine()
    try:
        opa.add_policy("authz.rego", files["authz.rego"])
        opa.add_data(json.loads(files["data.json"]))
        for device in ("d1", "d2", "d3"):
            for method in ("Get", "Delete"):
                doc = {"device": {"id": device}, "request": {"method": method}}
                ours = engine.evaluate_sync(doc)
                theirs = opa.eval_document("ztagent.authz.decision", doc)
                assert (ours.allow, list(ours.reasons)) == (
                    theirs["allow"],
                    sorted(theirs["reasons"]),
                ), (device, method)
    finally:
        opa.close()
