"""Identity assertions: minted by the sidecar's key, refused for every way they can be wrong,
and interoperable with joserfc (a standard ES256 compact JWS)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from ztagent.tokens.assertion import (
    ASSERTION_HEADER,
    MAX_ASSERTION_BYTES,
    TYP,
    AssertionError_,
    AssertionSigner,
    AssertionVerifier,
    ensure_signing_key,
    key_id,
    public_key_path,
)

METHOD = "/ztagent.workloads.v1.Storage/Put"
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "assertion.key"
    ensure_signing_key(path)
    return path


def _signer(key_path: Path, clock: Clock | None = None, lifetime_s: int = 30) -> AssertionSigner:
    return AssertionSigner(ensure_signing_key(key_path), lifetime_s, clock or Clock())


def _mint(signer: AssertionSigner, method: str = METHOD) -> str:
    return signer.mint(
        device_id="cam-1",
        spiffe_id="spiffe://ztagent.dev/device/cam-1",
        method=method,
        decision_id="d-1",
        user="alice",
    )


def _verifier(key_path: Path, clock: Clock | None = None) -> AssertionVerifier:
    return AssertionVerifier([public_key_path(key_path)], clock=clock or Clock())


def _code(verifier: AssertionVerifier, metadata: object, method: str = METHOD) -> str:
    with pytest.raises(AssertionError_) as info:
        verifier.verify(metadata, method)  # type: ignore[arg-type]
    assert info.value.status_name == "UNAUTHENTICATED"
    return info.value.code


def test_a_minted_assertion_verifies_once(key_path: Path) -> None:
    token = _mint(_signer(key_path))
    verifier = _verifier(key_path)
    who = verifier.verify([("x-ztagent-device-id", "forged"), (ASSERTION_HEADER, token)], METHOD)
    assert (who.device_id, who.spiffe_id, who.method) == (
        "cam-1",
        "spiffe://ztagent.dev/device/cam-1",
        METHOD,
    )
    assert (who.decision_id, who.user, who.expires_at - who.issued_at) == ("d-1", "alice", 30)
    assert _code(verifier, [(ASSERTION_HEADER, token)]) == "assertion_replayed"


def test_key_files_are_made_private_and_reused(key_path: Path) -> None:
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert oct(public_key_path(key_path).stat().st_mode & 0o777) == "0o644"
    first = ensure_signing_key(key_path).private_numbers()
    assert ensure_signing_key(key_path).private_numbers() == first  # not regenerated
    link = key_path.parent / "link.key"
    link.symlink_to(key_path)
    with pytest.raises(OSError, match="symbolic link"):
        ensure_signing_key(link)


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (None, "assertion_missing"),
        ([("x-ztagent-device-id", "cam-1")], "assertion_missing"),
        ([(ASSERTION_HEADER, "a.b.c"), (ASSERTION_HEADER, "a.b.c")], "assertion_malformed"),
        ([(ASSERTION_HEADER, b"bytes")], "assertion_malformed"),
        ([(ASSERTION_HEADER, "x" * (MAX_ASSERTION_BYTES + 1))], "assertion_malformed"),
        ([(ASSERTION_HEADER, "not-a-jws")], "assertion_malformed"),
        ([(ASSERTION_HEADER, "a.b.c.d")], "assertion_malformed"),
        ([(ASSERTION_HEADER, "!!.b.c")], "assertion_malformed"),
    ],
)
def test_missing_and_malformed(key_path: Path, metadata: object, code: str) -> None:
    assert _code(_verifier(key_path), metadata) == code


def test_expired_not_yet_valid_and_wrong_method(key_path: Path) -> None:
    clock = Clock()
    verifier = _verifier(key_path, clock)
    old = _mint(_signer(key_path, Clock(NOW - 36)))  # exp = NOW - 6: past the 5 s leeway
    assert _code(verifier, [(ASSERTION_HEADER, old)]) == "assertion_expired"
    future = _mint(_signer(key_path, Clock(NOW + 60)))
    assert _code(verifier, [(ASSERTION_HEADER, future)]) == "assertion_not_yet_valid"
    get = _mint(_signer(key_path), "/ztagent.workloads.v1.Storage/Get")
    assert _code(verifier, [(ASSERTION_HEADER, get)]) == "assertion_wrong_method"
    # within the leeway: accepted
    late = _mint(_signer(key_path, Clock(NOW - 34)))
    assert verifier.verify([(ASSERTION_HEADER, late)], METHOD).device_id == "cam-1"


def test_another_key_and_a_tampered_payload(key_path: Path, tmp_path: Path) -> None:
    verifier = _verifier(key_path)
    other = _mint(_signer(tmp_path / "other" / "assertion.key"))
    assert _code(verifier, [(ASSERTION_HEADER, other)]) == "assertion_bad_signature"
    header, payload, signature = _mint(_signer(key_path)).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "cam-2"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert _code(verifier, [(ASSERTION_HEADER, f"{header}.{forged}.{signature}")]) == (
        "assertion_bad_signature"
    )
    assert _code(verifier, [(ASSERTION_HEADER, f"{header}.{payload}.AAAA")]) == (
        "assertion_bad_signature"
    )


def test_other_algorithms_and_types_are_refused(key_path: Path) -> None:
    """A JWS by the trusted key but with another typ (a user token, say) is not an
    assertion; alg none or HS256 never reaches signature checking."""
    key = ECKey.import_key(ensure_signing_key(key_path))
    kid = key_id(ensure_signing_key(key_path).public_key())
    verifier = _verifier(key_path)
    payload = json.dumps({"iss": "ztagent-sidecar", "sub": "cam-1"}).encode()
    as_jwt = jws.serialize_compact({"alg": "ES256", "typ": "JWT", "kid": kid}, payload, key)
    assert _code(verifier, [(ASSERTION_HEADER, as_jwt)]) == "assertion_malformed"
    none = base64.urlsafe_b64encode(b'{"alg":"none","typ":"' + TYP.encode() + b'"}')
    token = none.rstrip(b"=").decode() + "." + payload.hex() + "."
    assert _code(verifier, [(ASSERTION_HEADER, token)]) == "assertion_malformed"


def test_interoperates_with_joserfc(key_path: Path) -> None:
    private = ensure_signing_key(key_path)
    token = _mint(_signer(key_path))
    checked = jws.deserialize_compact(token, ECKey.import_key(private.public_key()), ["ES256"])
    assert json.loads(checked.payload)["sub"] == "cam-1"
    assert checked.protected["kid"] == ECKey.import_key(private.public_key()).thumbprint()
    claims = {
        "iss": "ztagent-sidecar", "sub": "cam-9", "spiffe": "spiffe://ztagent.dev/device/cam-9",
        "method": METHOD, "did": "d-9", "iat": int(NOW), "exp": int(NOW) + 10, "jti": "j-9",
    }  # fmt: skip
    header = {"alg": "ES256", "typ": TYP, "kid": key_id(private.public_key())}
    by_joserfc = jws.serialize_compact(header, json.dumps(claims), ECKey.import_key(private))
    assert _verifier(key_path).verify([(ASSERTION_HEADER, by_joserfc)], METHOD).device_id == (
        "cam-9"
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"iss": "someone-else"}, "iss"),
        ({"sub": ""}, "'sub'"),
        ({"method": 7}, "'method'"),
        ({"exp": "soon"}, "'exp'"),
        ({"iat": True}, "'iat'"),
        ({"exp": int(NOW) + 3600}, "lifetime"),
        ({"jti": None}, "'jti'"),
        ({"user": ["a"]}, "'user'"),
    ],
)
def test_bad_claims_are_malformed(key_path: Path, change: dict[str, object], needle: str) -> None:
    private = ensure_signing_key(key_path)
    claims: dict[str, object] = {
        "iss": "ztagent-sidecar", "sub": "cam-9", "spiffe": "spiffe://x/device/cam-9",
        "method": METHOD, "did": "d-9", "iat": int(NOW), "exp": int(NOW) + 10, "jti": "j-9",
    }  # fmt: skip
    claims.update(change)
    header = {"alg": "ES256", "typ": TYP, "kid": key_id(private.public_key())}
    token = jws.serialize_compact(header, json.dumps(claims), ECKey.import_key(private))
    with pytest.raises(AssertionError_) as info:
        _verifier(key_path).verify([(ASSERTION_HEADER, token)], METHOD)
    assert info.value.code == "assertion_malformed" and needle in info.value.message


def test_a_key_that_appears_or_rotates_later_is_picked_up(tmp_path: Path) -> None:
    """The workload may start before the sidecar made its key, and the key may be replaced:
    an assertion by a key not loaded yet makes the verifier look at its files again."""
    key_path = tmp_path / "state" / "assertion.key"
    verifier = AssertionVerifier([public_key_path(key_path)], clock=Clock())
    assert "missing" in verifier.trusted()
    token = _mint(_signer(key_path))  # the sidecar starts and makes its key
    assert verifier.verify([(ASSERTION_HEADER, token)], METHOD).device_id == "cam-1"
    os.unlink(key_path)
    os.unlink(public_key_path(key_path))
    rotated = _mint(_signer(key_path))
    assert verifier.verify([(ASSERTION_HEADER, rotated)], METHOD).device_id == "cam-1"


def test_lifetime_bounds(key_path: Path) -> None:
    with pytest.raises(ValueError, match="lifetime 0 s"):
        _signer(key_path, lifetime_s=0)
    with pytest.raises(ValueError, match="lifetime 301 s"):
        _signer(key_path, lifetime_s=301)
    with pytest.raises(ValueError, match="no trusted signer key"):
        AssertionVerifier([])


def test_non_p256_keys_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    p384 = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "p384.key"
    path.write_bytes(
        p384.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="expected an EC P-256 private key"):
        ensure_signing_key(path)


def test_deep_nesting_in_header_or_payload_is_malformed_not_a_crash(key_path: Path) -> None:
    """A header nested 1,500 deep fits in MAX_ASSERTION_BYTES and is parsed before the
    signature check: the standard library's parser raised RecursionError there (a traceback
    in the workload for any local caller); it is refused assertion_malformed."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    deep = b"[" * 1500  # unterminated: the depth is what fails first
    assert len(b64(deep)) < MAX_ASSERTION_BYTES
    verifier = _verifier(key_path)
    assert _code(verifier, [(ASSERTION_HEADER, f"{b64(deep)}.e30.AAAA")]) == "assertion_malformed"
    # a signed payload nested that deep (only a trusted key could make one) is refused too
    private = ensure_signing_key(key_path)
    header = {"alg": "ES256", "typ": TYP, "kid": key_id(private.public_key())}
    token = jws.serialize_compact(header, deep, ECKey.import_key(private))
    assert _code(verifier, [(ASSERTION_HEADER, token)]) == "assertion_malformed"
