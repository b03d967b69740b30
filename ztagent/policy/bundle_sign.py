"""OPA bundle signatures (``.signatures.json``): verification and signing, bytes in, bytes out.

Pure: no files, no clock. ``ztagent.policy.sources`` reads a bundle's members and calls
``verify_bundle``; ``ztagent policy build`` calls ``sign_bundle``. The rules are OPA's own,
read in ``open-policy-agent/opa`` ``v1/bundle/verify.go`` (``VerifyBundleSignature``,
``verifyJWTSignature``, ``VerifyBundleFile``), ``v1/bundle/hash.go`` (the hasher),
``v1/bundle/bundle.go`` (``Reader.Read``, ``preProcessBundle``, ``IsStructuredDoc``,
``hashBundleFiles``, ``writeSignatures``), ``v1/bundle/sign.go`` (``generatePayload``) and
``v1/util/json.go`` (``Unmarshal``):

- ``.signatures.json`` is ``{"signatures": ["<JWS compact>"]}`` with exactly one JWT (none:
  ``bundle_signature_missing``; several: ``bundle_signature_invalid``). Its payload is
  ``{"files": [{"name", "hash", "algorithm"}], "keyid"?, "scope"?, "iss"?, "iat"?}``.
- The key is the one named by the JWT header ``kid``, else by the (deprecated) payload
  ``keyid``; neither, or a name with no configured key: ``bundle_key_unknown``. OPA does not
  fall back to a single configured key, and neither does this.
- The header ``alg`` must be the key's configured algorithm, and the signature must verify
  with that key (``bundle_signature_invalid``). The payload ``scope`` must equal the key's
  ``scope`` (both may be absent).
- Every file of the bundle except ``.signatures.json`` itself must be listed
  (``bundle_file_unlisted``; ``.manifest`` is a file like any other and must be listed), its
  digest must match (``bundle_hash_mismatch``), and every listed file must be in the bundle
  (``bundle_file_missing``). Names are bundle-relative with no leading ``/``.
- A file whose base name is ``data.json``, ``data.yaml`` or ``.manifest`` is hashed over its
  canonical JSON form (object keys sorted, no whitespace, numbers as written, strings escaped
  as Go's ``encoding/json`` with HTML escaping off), so reformatting does not change it; every
  other file over its raw bytes. A leading UTF-8 BOM is dropped first, as OPA does.
- Digest algorithms as OPA names them: ``SHA-224``, ``SHA-256`` (what ``opa build`` and
  ``sign_bundle`` write), ``SHA-384``, ``SHA-512``, ``SHA-512-224``, ``SHA-512-256``.

Where ztagent is stricter than OPA (each refusal has its code): ``MD5`` and ``SHA-1`` file
digests are refused (OPA accepts them; no OPA tool writes them); HMAC keys are not accepted
(``ztagent.config.BUNDLE_KEY_ALGORITHMS``); verification keys must be public keys or
certificates, never private keys; a JWT header with ``crit`` is refused; YAML data files are
refused (ztagent loads JSON data only, so it could not evaluate what was signed). OPA's
per-bundle ``keyid`` override and ``exclude_files`` globs have no ztagent equivalent: every
file is covered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ztagent import json_input
from ztagent.config import BUNDLE_KEY_ALGORITHMS
from ztagent.policy.errors import PolicyLoadError

SIGNATURES_FILE = ".signatures.json"
MANIFEST_FILE = ".manifest"
DEFAULT_HASH = "SHA-256"
MIN_RSA_BITS = 2048
MAX_SIGNATURES_BYTES = 1024 * 1024
"""Largest ``.signatures.json`` read (OPA has no separate limit; a JWT listing thousands of
files stays far below this)."""

_STRUCTURED = frozenset({"data.json", "data.yaml", MANIFEST_FILE})
"""OPA's ``IsStructuredDoc`` (which also names ``signatures.json``, never hashed here)."""

_HASHES: Mapping[str, str] = {
    "SHA-224": "sha224",
    "SHA-256": "sha256",
    "SHA-384": "sha384",
    "SHA-512": "sha512",
    "SHA-512-224": "sha512_224",
    "SHA-512-256": "sha512_256",
}
_WEAK_HASHES = frozenset({"MD5", "SHA-1"})


@dataclass(frozen=True)
class _Alg:
    kind: str  # "RS", "PS", "ES", "EdDSA"
    hash: type[hashes.HashAlgorithm] | None
    curve: type[ec.EllipticCurve] | None = None
    size: int = 0  # ES: bytes per coordinate


_ALGS: Mapping[str, _Alg] = {
    "RS256": _Alg("RS", hashes.SHA256),
    "RS384": _Alg("RS", hashes.SHA384),
    "RS512": _Alg("RS", hashes.SHA512),
    "PS256": _Alg("PS", hashes.SHA256),
    "PS384": _Alg("PS", hashes.SHA384),
    "PS512": _Alg("PS", hashes.SHA512),
    "ES256": _Alg("ES", hashes.SHA256, ec.SECP256R1, 32),
    "ES384": _Alg("ES", hashes.SHA384, ec.SECP384R1, 48),
    "ES512": _Alg("ES", hashes.SHA512, ec.SECP521R1, 66),
    "EdDSA": _Alg("EdDSA", None),
}
assert set(_ALGS) == set(BUNDLE_KEY_ALGORITHMS), "the config's algorithms are the ones here"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class BundleKeyError(ValueError):
    """A key that cannot be used with its algorithm (the config names the key)."""


@dataclass(frozen=True)
class VerificationKey:
    """A key allowed to sign bundles: ``[policy.keys.<key_id>]`` parsed."""

    key_id: str
    algorithm: str
    public_key: PublicKey
    scope: str | None = None

    @classmethod
    def from_pem(
        cls, key_id: str, pem: bytes, algorithm: str, scope: str | None = None
    ) -> VerificationKey:
        """A PEM public key (SPKI or PKCS#1 RSA) or certificate; raises BundleKeyError."""
        if algorithm not in _ALGS:
            raise BundleKeyError(
                f"algorithm {algorithm!r} is not supported "
                f"(expected one of {', '.join(BUNDLE_KEY_ALGORITHMS)})"
            )
        if b"PRIVATE KEY-----" in pem:
            raise BundleKeyError("is a private key (expected the public key or a certificate)")
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                loaded: object = x509.load_pem_x509_certificate(pem).public_key()
            else:
                loaded = serialization.load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise BundleKeyError(f"not a PEM public key or certificate ({exc})") from None
        return cls(key_id, algorithm, check_key(loaded, algorithm), scope)


def check_key(key: object, algorithm: str) -> Any:
    """``key`` if it fits ``algorithm`` (type, curve, RSA size); raises BundleKeyError."""
    alg = _ALGS.get(algorithm)
    if alg is None:
        raise BundleKeyError(f"algorithm {algorithm!r} is not supported")
    public = key.public_key() if hasattr(key, "public_key") else key
    if alg.kind in ("RS", "PS"):
        if not isinstance(public, rsa.RSAPublicKey):
            raise BundleKeyError(f"{algorithm} needs an RSA key, got {_key_name(public)}")
        if public.key_size < MIN_RSA_BITS:
            raise BundleKeyError(
                f"RSA key of {public.key_size} bits (expected at least {MIN_RSA_BITS})"
            )
    elif alg.kind == "ES":
        assert alg.curve is not None
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, alg.curve
        ):
            raise BundleKeyError(
                f"{algorithm} needs an EC {alg.curve.name} key, got {_key_name(public)}"
            )
    elif not isinstance(public, ed25519.Ed25519PublicKey):
        raise BundleKeyError(f"EdDSA needs an Ed25519 key, got {_key_name(public)}")
    return key


def _key_name(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__.lstrip("_")


@dataclass(frozen=True)
class FileDigest:
    """One ``files`` entry of the JWT payload."""

    name: str
    hash: str
    algorithm: str = DEFAULT_HASH


@dataclass(frozen=True)
class SignatureReport:
    """A bundle whose signature verified: who signed it and what it covers."""

    key_id: str
    algorithm: str
    files: tuple[str, ...]
    """Every verified file name, sorted."""
    scope: str | None = None
    issuer: str | None = None


# --- canonical JSON (OPA's hasher) -------------------------------------------------------


class _Number(str):
    """A JSON number kept as written (Go's ``json.Number``, which OPA's decoder uses)."""

    __slots__ = ()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_numbers_as_written(raw: bytes) -> Any:
    """JSON decoded as OPA's ``util.Unmarshal`` does for hashing: BOM dropped, numbers kept
    as their literal text. Raises ValueError (UnicodeDecodeError, JSONDecodeError)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_reject_constant,
        )
    except RecursionError:  # a bundle file from the network, parsed before it is trusted
        raise ValueError("JSON nested too deeply to parse") from None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_GO_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
             "\t": "\\t", "\u2028": "\\u2028", "\u2029": "\\u2029"}  # fmt: skip
_GO_ESCAPE = re.compile('["\\\\\x00-\x1f\u2028\u2029]')


def _go_string(text: str) -> str:
    """A JSON string as Go's encoder writes it with SetEscapeHTML(false): ``"`` ``\\`` and
    the short escapes, other control characters as ``\\u00xx``, U+2028/2029 escaped,
    everything else (``<``, ``&``, non-ASCII) as is; lone surrogates become U+FFFD as Go's
    decoder makes them."""
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return '"' + _GO_ESCAPE.sub(lambda m: _GO_SHORT.get(m[0]) or f"\\u{ord(m[0]):04x}", text) + '"'


def canonical_json(value: Any) -> bytes:
    """OPA's ``walk`` in ``v1/bundle/hash.go``: ``{`` sorted keys ``:`` values ``,`` ``}``,
    arrays in order, primitives as Go encodes them, no whitespace."""
    parts: list[str] = []
    _walk(value, parts)
    return "".join(parts).encode("utf-8")


def _walk(value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):  # code point order = UTF-8 byte order (Go)
            if i:
                out.append(",")
            out.append(_go_string(key))
            out.append(":")
            _walk(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _walk(item, out)
        out.append("]")
    elif isinstance(value, _Number):
        out.append(str.__str__(value))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, str):
        out.append(_go_string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):  # values built in Python (sign_bundle of parsed data)
        out.append(json.dumps(value))
    else:
        raise TypeError(f"cannot hash a {type(value).__name__}")


def is_structured(name: str) -> bool:
    return PurePosixPath(name).name in _STRUCTURED


def file_digest(name: str, content: bytes, algorithm: str = DEFAULT_HASH) -> str:
    """Hex digest of one bundle file as OPA computes it; raises PolicyLoadError
    (``bundle_signature_invalid`` for an unsupported algorithm, ``bundle_invalid`` for a
    structured file that is not JSON)."""
    if algorithm in _WEAK_HASHES:
        raise PolicyLoadError(
            "bundle_signature_invalid",
            f"{name}: digest algorithm {algorithm} is refused (expected SHA-256 or stronger)",
        )
    hash_name = _HASHES.get(algorithm)
    if hash_name is None:
        raise PolicyLoadError(
            "bundle_signature_invalid",
            f"{name}: unsupported digest algorithm {algorithm!r} "
            f"(expected one of {', '.join(_HASHES)})",
        )
    digest = hashlib.new(hash_name)
    if is_structured(name):
        try:
            value = parse_json_numbers_as_written(content)
        except ValueError as exc:
            raise PolicyLoadError(
                "bundle_invalid", f"{name}: not JSON, cannot be hashed as OPA does ({exc})"
            ) from None
        digest.update(canonical_json(value))
    else:
        digest.update(content)
    return digest.hexdigest()


# --- verification -------------------------------------------------------------------------


def verify_bundle(
    files: Mapping[str, bytes],
    signatures_json: bytes | None,
    keys: Mapping[str, VerificationKey],
    *,
    where: str = "bundle",
) -> SignatureReport:
    """Verifies a bundle: ``files`` maps every bundle-relative name (no leading ``/``) except
    ``.signatures.json`` to its bytes, ``signatures_json`` is that file (None: absent).
    Returns the report or raises PolicyLoadError with one of the ``bundle_*`` codes."""
    if signatures_json is None:
        raise PolicyLoadError(
            "bundle_signature_missing",
            f"{where}: no {SIGNATURES_FILE} (expected a signed bundle: keys are configured)",
        )
    token = _single_token(signatures_json, where)
    header, payload, signing_input, signature = _split_jws(token, where)
    listed = _listed_files(payload, where)
    key = _choose_key(header, payload, keys, where)
    alg = header.get("alg")
    if alg != key.algorithm:
        raise PolicyLoadError(
            "bundle_signature_invalid",
            f"{where}: JWT alg {alg!r} is not key {key.key_id!r}'s algorithm "
            f"(expected {key.algorithm})",
            received=alg,
            expected=key.algorithm,
        )
    if not _signature_ok(key, signing_input, signature):
        raise PolicyLoadError(
            "bundle_signature_invalid",
            f"{where}: the JWT signature does not verify with key {key.key_id!r} ({alg})",
        )
    scope = _optional_str(payload, "scope", where)
    if (scope or "") != (key.scope or ""):
        raise PolicyLoadError(
            "bundle_signature_invalid",
            f"{where}: scope mismatch: the JWT has {scope!r}, key {key.key_id!r} expects "
            f"{key.scope!r}",
            received=scope,
            expected=key.scope,
        )
    _check_files(files, listed, where)
    return SignatureReport(
        key_id=key.key_id,
        algorithm=key.algorithm,
        files=tuple(sorted(files)),
        scope=scope or None,
        issuer=_optional_str(payload, "iss", where),
    )


def signature_key_id(signatures_json: bytes) -> str | None:
    """The key id a ``.signatures.json`` names (header ``kid``, else payload ``keyid``),
    without verifying anything: for reports only. None when it names none or is malformed."""
    try:
        token = _single_token(signatures_json, "bundle")
        header, payload, _, _ = _split_jws(token, "bundle")
    except PolicyLoadError:
        return None
    kid = header.get("kid")
    if isinstance(kid, str) and kid:
        return kid
    keyid = payload.get("keyid")
    return keyid if isinstance(keyid, str) and keyid else None


def _invalid(where: str, message: str) -> PolicyLoadError:
    return PolicyLoadError("bundle_signature_invalid", f"{where}: {SIGNATURES_FILE}: {message}")


def _single_token(raw: bytes, where: str) -> str:
    if len(raw) > MAX_SIGNATURES_BYTES:
        raise _invalid(where, f"{len(raw)} bytes (limit {MAX_SIGNATURES_BYTES})")
    try:
        doc = json_input.loads(raw)
    except ValueError as exc:  # also not UTF-8 or nested too deep
        raise _invalid(where, str(exc)) from None
    if not isinstance(doc, dict):
        raise _invalid(where, f"expected an object, got {type(doc).__name__}")
    signatures = doc.get("signatures")
    if signatures is None or signatures == []:
        raise PolicyLoadError(
            "bundle_signature_missing",
            f"{where}: {SIGNATURES_FILE}: missing JWT (expected exactly one)",
        )
    if not isinstance(signatures, list) or not all(isinstance(s, str) for s in signatures):
        raise _invalid(where, f"'signatures' must be a list of strings, got {signatures!r:.80}")
    if len(signatures) > 1:
        raise _invalid(where, f"{len(signatures)} JWTs (expected exactly one)")
    plugin = doc.get("plugin")
    if plugin not in (None, ""):
        raise _invalid(where, f"signing plugin {plugin!r} is not supported (expected none)")
    token: str = signatures[0]
    return token


_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def _b64url(part: str, what: str, where: str) -> bytes:
    if not _B64URL.match(part) or len(part) % 4 == 1:
        raise _invalid(where, f"malformed JWT: the {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - the regex admits only these
        raise _invalid(where, f"malformed JWT: the {what} is not base64url") from None


def _json_object(raw: bytes, what: str, where: str) -> dict[str, Any]:
    try:
        doc = json_input.loads(raw)
    except ValueError as exc:  # also not UTF-8 or nested too deep
        raise _invalid(where, f"malformed JWT: the {what}: {exc}") from None
    if not isinstance(doc, dict):
        raise _invalid(where, f"malformed JWT: the {what} is not an object")
    return doc


def _split_jws(token: str, where: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    parts = token.split(".")
    if len(parts) != 3:
        raise _invalid(where, f"malformed JWT: {len(parts)} segments (expected 3)")
    header = _json_object(_b64url(parts[0], "header", where), "header", where)
    payload = _json_object(_b64url(parts[1], "payload", where), "payload", where)
    signature = _b64url(parts[2], "signature", where)
    if "crit" in header:
        raise _invalid(where, f"JWT header 'crit' {header['crit']!r} is not supported")
    if header.get("b64") is False:
        raise _invalid(where, "unencoded JWT payloads (b64: false) are not supported")
    return header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def _optional_str(payload: Mapping[str, Any], name: str, where: str) -> str | None:
    value = payload.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(where, f"JWT claim {name!r} must be a string, got {value!r:.80}")
    return value


def _listed_files(payload: Mapping[str, Any], where: str) -> dict[str, FileDigest]:
    raw = payload.get("files")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise _invalid(where, f"JWT claim 'files' must be a list, got {type(raw).__name__}")
    listed: dict[str, FileDigest] = {}
    for entry in raw:
        if not isinstance(entry, dict):
            raise _invalid(where, f"a 'files' entry must be an object, got {entry!r:.80}")
        fields = {}
        for name in ("name", "hash", "algorithm"):
            value = entry.get(name, "")
            if not isinstance(value, str):
                raise _invalid(where, f"'files' {name} must be a string, got {value!r:.80}")
            fields[name] = value
        # OPA keys the files by name (a later entry replaces an earlier one)
        listed[fields["name"].removeprefix("/")] = FileDigest(**fields)
    return listed


def _choose_key(
    header: Mapping[str, Any],
    payload: Mapping[str, Any],
    keys: Mapping[str, VerificationKey],
    where: str,
) -> VerificationKey:
    kid = header.get("kid")
    key_id = kid if isinstance(kid, str) else ""
    if not key_id:
        key_id = _optional_str(payload, "keyid", where) or ""
    configured = ", ".join(sorted(keys)) or "none"
    if not key_id:
        raise PolicyLoadError(
            "bundle_key_unknown",
            f"{where}: the JWT names no key (no 'kid' header, no 'keyid' claim; "
            f"configured: {configured})",
            expected=sorted(keys),
        )
    key = keys.get(key_id)
    if key is None:
        raise PolicyLoadError(
            "bundle_key_unknown",
            f"{where}: signed with key {key_id!r}, which is not configured "
            f"(configured: {configured})",
            received=key_id,
            expected=sorted(keys),
        )
    return key


def _signature_ok(key: VerificationKey, signing_input: bytes, signature: bytes) -> bool:
    alg = _ALGS[key.algorithm]
    public = key.public_key
    try:
        if alg.kind == "EdDSA":
            assert isinstance(public, ed25519.Ed25519PublicKey)
            public.verify(signature, signing_input)
        elif alg.kind == "ES":
            assert isinstance(public, ec.EllipticCurvePublicKey) and alg.hash is not None
            if len(signature) != 2 * alg.size:
                return False
            r = int.from_bytes(signature[: alg.size], "big")
            s = int.from_bytes(signature[alg.size :], "big")
            public.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(alg.hash()))
        else:
            assert isinstance(public, rsa.RSAPublicKey) and alg.hash is not None
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if alg.kind == "RS"
                else padding.PSS(mgf=padding.MGF1(alg.hash()), salt_length=padding.PSS.AUTO)
            )
            public.verify(signature, signing_input, pad, alg.hash())
    except InvalidSignature:
        return False
    return True


def _check_files(files: Mapping[str, bytes], listed: dict[str, FileDigest], where: str) -> None:
    remaining = dict(listed)
    for name, content in files.items():
        entry = remaining.pop(name, None)
        if entry is None:
            raise PolicyLoadError(
                "bundle_file_unlisted",
                f"{where}: file {name} is not included in the bundle signature",
                received=name,
            )
        if not entry.algorithm:
            raise _invalid(where, f"no digest algorithm given for file {name}")
        got = file_digest(name, content, entry.algorithm)
        if got != entry.hash.lower():
            raise PolicyLoadError(
                "bundle_hash_mismatch",
                f"{where}: {name}: digest mismatch ({entry.algorithm} want {entry.hash}, "
                f"got {got})",
                received=got,
                expected=entry.hash,
            )
    if remaining:
        names = sorted(remaining)
        raise PolicyLoadError(
            "bundle_file_missing",
            f"{where}: file(s) {', '.join(names)} listed in the bundle signature but not "
            "found in the bundle",
            expected=names,
        )


# --- signing ------------------------------------------------------------------------------


def load_signing_key(pem: bytes, algorithm: str) -> PrivateKey:
    """A PEM private key (PKCS#8, PKCS#1 RSA, SEC1 EC) fitting ``algorithm``; raises
    BundleKeyError."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BundleKeyError(f"not an unencrypted PEM private key ({exc})") from None
    checked: PrivateKey = check_key(key, algorithm)
    return checked


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_token(
    digests: Iterable[FileDigest],
    key: PrivateKey,
    algorithm: str,
    *,
    key_id: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """The JWT ``opa build --signing-key`` writes: header ``{"alg", "kid"?}``, payload
    ``{"files": [...], "keyid"?}`` (OPA adds the deprecated ``keyid`` claim when there is a
    key id and no claims file; ``claims`` are merged in, as its ``--claims-file``).
    Deterministic for RS*, ES* (RFC 6979 nonces) and EdDSA; PS* signatures are salted, so a
    PS* bundle differs from build to build in ``.signatures.json`` only."""
    alg = _ALGS.get(algorithm)
    if alg is None:
        raise BundleKeyError(f"algorithm {algorithm!r} is not supported")
    check_key(key, algorithm)
    header: dict[str, Any] = {"alg": algorithm}
    if key_id:
        header["kid"] = key_id
    payload: dict[str, Any] = {
        "files": [{"name": d.name, "hash": d.hash, "algorithm": d.algorithm} for d in digests]
    }
    if claims:
        payload.update(claims)
    elif key_id:
        payload["keyid"] = key_id
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    )
    data = signing_input.encode("ascii")
    if alg.kind == "EdDSA":
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        signature = key.sign(data)
    elif alg.kind == "ES":
        assert isinstance(key, ec.EllipticCurvePrivateKey) and alg.hash is not None
        # RFC 6979 deterministic nonces: the same bundle and key give the same bytes
        r, s = decode_dss_signature(
            key.sign(data, ec.ECDSA(alg.hash(), deterministic_signing=True))
        )
        signature = r.to_bytes(alg.size, "big") + s.to_bytes(alg.size, "big")
    else:
        assert isinstance(key, rsa.RSAPrivateKey) and alg.hash is not None
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if alg.kind == "RS"
            else padding.PSS(mgf=padding.MGF1(alg.hash()), salt_length=padding.PSS.DIGEST_LENGTH)
        )
        signature = key.sign(data, pad, alg.hash())
    return signing_input + "." + _b64(signature)


def signatures_file(token: str) -> bytes:
    """``.signatures.json`` as OPA writes it (``json.MarshalIndent(..., "", " ")``)."""
    return json.dumps({"signatures": [token]}, indent=1).encode("utf-8")


def sign_bundle(
    files: Mapping[str, bytes],
    key: PrivateKey,
    algorithm: str,
    *,
    key_id: str | None = None,
    claims: Mapping[str, Any] | None = None,
) -> bytes:
    """``.signatures.json`` for ``files`` (every bundle file but that one, by bundle-relative
    name), each hashed with SHA-256 as OPA hashes it."""
    if SIGNATURES_FILE in files:
        raise ValueError(f"{SIGNATURES_FILE} cannot sign itself")
    digests = [FileDigest(name, file_digest(name, content)) for name, content in files.items()]
    return signatures_file(sign_token(digests, key, algorithm, key_id=key_id, claims=claims))
