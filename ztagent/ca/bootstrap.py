"""One-time bootstrap tokens: issued by ``ztagent ca token``, consumed by ``Enroll``.

A token is a compact JWS (ES256) signed by the issuing CA's key. Header::

    {"alg": "ES256", "typ": "ztagent-bootstrap+jwt", "kid": <issuing CA SKI, lowercase hex>}

Claims: ``iss`` (``spiffe://<trust domain>``), ``sub`` and ``device_id`` (the same device id),
``iat``, ``exp`` (integer Unix seconds), ``jti`` (128 random bits, 32 lowercase hex) and
``td`` (the trust domain).

``verify_bootstrap_token`` is pure: bytes in, ``BootstrapClaims`` out, ``EnrollError``
otherwise. The token authenticates its holder for exactly one device id: the device id of a
certificate issued on enrollment comes from the token, never from the CSR.

``ReplayStore`` is the IO edge that makes a token single-use: the consumed ``jti`` with their
``exp`` in the CA database, committed before ``consume`` returns, so a token stays used across
restarts and replicas. Entries are pruned a day after the token could no longer pass
verification anyway.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey

from ztagent import json_input
from ztagent.ca import ca_keys
from ztagent.ca import store as ca_store
from ztagent.ca.db import CaDatabase
from ztagent.enrollment import EnrollError
from ztagent.errors import ConfigError
from ztagent.pki.errors import CaError, CertError
from ztagent.pki.spiffe import DeviceId
from ztagent.timefmt import rfc3339_from_timestamp as _when

TOKEN_TYP: Final = "ztagent-bootstrap+jwt"  # noqa: S105 (a media type, not a secret)
ALG: Final = "ES256"
DEFAULT_TTL_S: Final = 900
MAX_TTL_S: Final = 7 * 86400
"""Longest token lifetime (``exp - iat``) issued or accepted, in seconds."""
LEEWAY_S: Final = 30
"""A token is accepted until ``exp + LEEWAY_S`` and from ``iat - LEEWAY_S``."""
MAX_TOKEN_CHARS: Final = 4096
REPLAY_FILE: Final = "bootstrap-used.json"
"""Where a CA from before the database kept its used tokens (``ca migrate`` imports it)."""
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_JTI = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class BootstrapClaims:
    """A bootstrap token that passed every check."""

    device_id: str
    trust_domain: str
    jti: str
    issued_at: int
    """Unix seconds."""
    expires_at: int
    """Unix seconds."""
    kid: str


def trust_domain_uri(trust_domain: str) -> str:
    """The ``iss`` of a bootstrap token: ``spiffe://<trust domain>``."""
    return f"spiffe://{trust_domain}"


def ski_hex(cert: x509.Certificate) -> str:
    """The subject key identifier of a CA cert, lowercase hex (the token's ``kid``)."""
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()
    return ski.digest.hex()


def _unix(now: datetime) -> int:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return int(now.timestamp())


# --- issuing ------------------------------------------------------------------------------


def issue_bootstrap_token(
    ca_dir: Path,
    device_id: str,
    ttl_s: int = DEFAULT_TTL_S,
    now: datetime | None = None,
    *,
    db: ca_store.DbArg = None,
) -> str:
    """A fresh single-use token for ``device_id``, signed by the issuing CA of ``ca_dir``.

    ``ConfigError('ttl')`` for a ttl outside 1..MAX_TTL_S, ``CaError`` for a bad device id or
    a missing CA.
    """
    try:
        device_id = DeviceId(device_id)
    except CertError as exc:
        raise CaError("device_id_invalid", exc.message) from None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
        raise ConfigError("ttl", f"{ttl_s!r} seconds (expected 1 to {MAX_TTL_S})")
    layout = ca_store.CaLayout(ca_dir)
    td = ca_store.trust_domain_of(ca_dir, db)
    issuing = ca_store.load_issuing(layout)
    iat = _unix(now if now is not None else datetime.now(UTC))
    claims = {
        "iss": trust_domain_uri(td),
        "sub": device_id,
        "device_id": device_id,
        "iat": iat,
        "exp": iat + ttl_s,
        "jti": secrets.token_hex(16),
        "td": td,
    }
    header = {"alg": ALG, "typ": TOKEN_TYP, "kid": ski_hex(issuing.cert)}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    if isinstance(issuing.key, ec.EllipticCurvePrivateKey):
        return jws.serialize_compact(
            header, payload, ECKey.import_key(issuing.key), algorithms=[ALG]
        )
    # the key is on a token: sign the JWS through the seam, and check it before handing it out
    token = ca_keys.sign_compact_es256(issuing.key, header, payload)
    try:
        verify_bootstrap_token(token, issuing.cert, td, datetime.fromtimestamp(iat, UTC))
    except EnrollError as err:
        raise CaError(
            "ca_state_invalid",
            f"the token signed with {issuing.key.description()} does not verify: {err.message}",
        ) from None
    return token


# --- verifying (pure) -----------------------------------------------------------------------


def _malformed(message: str) -> EnrollError:
    return EnrollError("token_malformed", message)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_segment(segment: str, what: str) -> dict[str, Any]:
    if not _SEGMENT.fullmatch(segment) or not segment:
        raise _malformed(f"{what} segment is not base64url (expected [A-Za-z0-9_-]+)")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _malformed(f"{what} is not base64url ({exc})") from None
    return _json_object(raw, what)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:  # the header is parsed before the signature is checked: nesting bounded
        value = json_input.loads(raw)
    except ValueError as exc:  # also not UTF-8, nested too deep
        raise _malformed(f"{what}: {exc}") from None
    if not isinstance(value, dict):
        raise _malformed(f"{what} is a JSON {type(value).__name__} (expected an object)")
    return value


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(f"claim {name} is {_show(value)} (expected integer Unix seconds)")
    return value


def _str_claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise _malformed(f"claim {name} is {_show(value)} (expected a non-empty string)")
    return value


def _check_header(header: Mapping[str, Any], kid_expected: str) -> None:
    alg = header.get("alg")
    if alg != ALG:
        # 'none', HMAC and every other algorithm: not a signature by this CA's key
        raise EnrollError("token_bad_signature", f"alg is {_show(alg)} (expected {ALG!r})")
    if header.get("typ") != TOKEN_TYP:
        raise _malformed(f"typ is {_show(header.get('typ'))} (expected {TOKEN_TYP!r})")
    if "crit" in header:
        raise _malformed(f"crit header {_show(header['crit'])} (expected none)")
    kid = header.get("kid")
    if kid != kid_expected:
        raise EnrollError(
            "token_bad_signature",
            f"kid is {_show(kid)} (expected the issuing CA's key id {kid_expected!r}): "
            "signed by another CA?",
        )


def verify_bootstrap_token(
    token: str, issuing_cert: x509.Certificate, trust_domain: str, now: datetime
) -> BootstrapClaims:
    """Check a bootstrap token at ``now`` against the issuing CA; raise ``EnrollError``.

    Order: shape, alg (exactly ES256), typ, kid, signature, claims, time. ``now`` must be
    timezone-aware. Does not consult the replay store.
    """
    moment = _unix(now)
    if not isinstance(token, str) or not token:
        raise _malformed("token is empty (expected header.payload.signature)")
    if len(token) > MAX_TOKEN_CHARS:
        raise _malformed(f"token is {len(token)} characters (expected at most {MAX_TOKEN_CHARS})")
    parts = token.split(".")
    if len(parts) != 3:
        raise _malformed(f"token has {len(parts)} segments (expected 3: header.payload.signature)")
    header = _json_segment(parts[0], "header")
    kid_expected = ski_hex(issuing_cert)
    _check_header(header, kid_expected)
    key = issuing_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise EnrollError(
            "ca_unavailable", "the issuing CA key is not EC P-256 (expected for ES256)"
        )
    try:
        obj = jws.deserialize_compact(token, ECKey.import_key(key), algorithms=[ALG])
    except BadSignatureError:
        raise EnrollError(
            "token_bad_signature",
            f"signature does not verify with the issuing CA key {kid_expected!r} ({ALG})",
        ) from None
    except JoseError as exc:
        raise _malformed(f"JWS does not parse: {exc.error}: {exc.description}") from None
    claims = _json_object(obj.payload, "payload")
    return _check_claims(claims, kid_expected, trust_domain, moment)


def _check_claims(
    claims: Mapping[str, Any], kid: str, trust_domain: str, moment: int
) -> BootstrapClaims:
    iss = _str_claim(claims, "iss")
    if iss != trust_domain_uri(trust_domain):
        raise _malformed(f"iss is {_show(iss)} (expected {trust_domain_uri(trust_domain)!r})")
    td = _str_claim(claims, "td")
    if td != trust_domain:
        raise _malformed(f"td is {_show(td)} (expected {trust_domain!r})")
    sub = _str_claim(claims, "sub")
    device_id = _str_claim(claims, "device_id")
    if sub != device_id:
        raise _malformed(
            f"sub is {_show(sub)} but device_id is {_show(device_id)} (expected equal)"
        )
    try:
        device_id = DeviceId(device_id)
    except CertError as exc:
        raise _malformed(exc.message) from None
    jti = _str_claim(claims, "jti")
    if not _JTI.fullmatch(jti):
        raise _malformed(f"jti is {_show(jti)} (expected 32 lowercase hex characters)")
    iat, exp = _int_claim(claims, "iat"), _int_claim(claims, "exp")
    if exp <= iat or exp - iat > MAX_TTL_S:
        raise _malformed(f"exp - iat is {exp - iat} s (expected 1 to {MAX_TTL_S})")
    if iat > moment + LEEWAY_S:
        raise _malformed(
            f"iat is {iat}, in the future (validation time {moment}, leeway {LEEWAY_S} s)"
        )
    if moment > exp + LEEWAY_S:
        raise EnrollError(
            "token_expired",
            f"token expired at {_when(exp)} (validation time {_when(moment)}, leeway {LEEWAY_S} s)",
        )
    return BootstrapClaims(device_id, td, jti, iat, exp, kid)


# --- single use (IO) -------------------------------------------------------------------------


class ReplayStore:
    """The consumed ``jti`` of bootstrap tokens, in the CA database (``used_tokens``).

    One-time use is the database's: ``INSERT ... ON CONFLICT DO NOTHING`` on the primary
    key, so a token redeemed at two threads, processes or replicas at once is accepted once.
    A database that cannot be reached fails closed (``ca_unavailable``).
    """

    def __init__(self, db: CaDatabase) -> None:
        self._db = db

    @classmethod
    def for_ca(cls, ca_dir: Path, db: ca_store.DbArg = None) -> ReplayStore:
        return cls(db if isinstance(db, CaDatabase) else ca_store.open_ca_database(ca_dir, db))

    def is_used(self, jti: str) -> bool:
        return _available(lambda: self._db.token_used(jti))

    def consume(self, jti: str, exp: int, now: datetime) -> None:
        """Record ``jti`` as used (until ``exp``); ``token_reused`` if it already was."""
        if not _available(lambda: self._db.consume_token(jti, exp, _unix(now))):
            raise EnrollError(
                "token_reused",
                f"token jti {jti[:8]}… was already used (expected a token never used before; "
                "ask the operator for a new one)",
            )


def _available(fn: Callable[[], bool]) -> bool:
    try:
        return fn()
    except CaError as exc:
        raise EnrollError("ca_unavailable", f"replay store: {exc.code}: {exc.message}") from None
