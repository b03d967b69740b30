"""User token (JWT) verification: pure, no IO, validation time and key set injected.

``verify_token`` runs the checks in a fixed order, each refusal with its own ``TokenError``
code:

1. size (``token_too_large``) before anything is decoded;
2. shape: three base64url segments, a JSON-object header without duplicate members
   (``token_malformed``); JWE and JWS JSON serialisations are not accepted;
3. ``alg`` against the allow-list *before any key or signature work*
   (``token_alg_not_allowed``): ``none`` and HMAC can never be allowed (``TokenPolicy``
   refuses them), so an HS256 token "signed" with the issuer's public key is refused here;
   a ``crit`` header is refused (no extension is understood);
4. key selection by ``kid`` from the injected key set (``token_kid_missing`` when the set
   holds several keys and the token names none, ``token_kid_unknown``), and the key must fit
   the alg family: kty, curve, the key's own ``alg``/``use`` (``token_alg_not_allowed``);
   headers that carry or point at keys (``jwk``, ``jku``, ``x5c``, ``x5u``) are never used;
5. the signature, by joserfc (``token_bad_signature``);
6. ``typ`` when configured (``token_typ_mismatch``; ``application/`` prefix and case ignored);
7. the claims: ``iss``, ``aud`` (string or list; any configured audience matches), ``exp``
   (required), ``nbf``, ``iat`` (not in the future beyond the leeway), the lifetime cap
   ``max_lifetime_s`` on ``exp - iat`` (``exp - now`` without ``iat``;
   ``token_lifetime_too_long``), ``sub`` (required),
   ``scope``/``scp``, ``roles``; bad types are ``token_claims_invalid``;
8. RFC 8705 certificate binding: ``cnf["x5t#S256"]`` must equal the thumbprint of the
   client certificate of the connection (``token_cnf_mismatch``); ``require_cert_binding``
   makes the claim mandatory (``token_cnf_required``). A ``cnf`` with only confirmation
   methods ztagent cannot check (e.g. DPoP ``jkt``) is refused as ``token_cnf_mismatch``:
   accepting it would strip the binding its issuer asked for.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import Key, KeySet

from ztagent.timefmt import rfc3339_from_timestamp as _when
from ztagent.tokens.errors import TokenError
from ztagent.tokens.policy import ALGORITHM_KEYS, TokenPolicy

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_SHOWN = 64
"""Untrusted strings are cut to this many characters in messages."""


def _show(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _norm_typ(typ: str) -> str:
    typ = typ.lower()
    return typ.removeprefix("application/")


def cert_thumbprint(der: bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url (no padding) of SHA-256 over the certificate DER."""
    return thumbprint_of_digest(hashlib.sha256(der).digest())


def thumbprint_of_digest(sha256_digest: bytes) -> str:
    """``x5t#S256`` from a certificate's SHA-256 fingerprint already computed elsewhere."""
    return base64.urlsafe_b64encode(sha256_digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class VerifiedUser:
    """A user whose token passed every check."""

    sub: str
    iss: str
    aud: tuple[str, ...]
    """The token's audiences (all of them, not only the configured ones)."""
    scope: tuple[str, ...]
    roles: tuple[str, ...]
    cert_bound: bool
    """True when the token carried ``cnf.x5t#S256`` and it matched the client certificate."""
    claims: Mapping[str, Any] = field(hash=False, compare=False)
    """The full verified payload (read-only view)."""
    expires_at: datetime

    def as_input(self) -> dict[str, Any]:
        """The policy input's ``user`` document (a fresh copy; callers may mutate it)."""
        return {
            "authenticated": True,
            "sub": self.sub,
            "iss": self.iss,
            "aud": list(self.aud),
            "scope": list(self.scope),
            "roles": list(self.roles),
            "cert_bound": self.cert_bound,
            "claims": copy.deepcopy(dict(self.claims)),
        }


def anonymous_user_input() -> dict[str, Any]:
    """The policy input's ``user`` document when the request carries no token."""
    return {
        "authenticated": False,
        "sub": None,
        "iss": None,
        "aud": [],
        "scope": [],
        "roles": [],
        "cert_bound": False,
        "claims": {},
    }


# --- parsing -----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate member {_show(name)}")
        out[name] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")


def _b64decode(segment: str, what: str) -> bytes:
    if not _SEGMENT.fullmatch(segment):
        raise TokenError("token_malformed", f"{what} is not base64url (expected [A-Za-z0-9_-])")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("token_malformed", f"{what} is not valid base64url") from None


MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays and objects a token's header or claims may have; deeper is
refused before the parser sees it (a 3,000-deep header used to end in RecursionError)."""
MAX_NUMERIC_DATE = 253402300799
"""9999-12-31T23:59:59Z: a larger exp / nbf / iat is refused, not overflowed."""


def _json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _json_object(data: bytes, what: str, code: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenError(code, f"{what} is not JSON ({exc})") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise TokenError(
            code,
            f"{what} nests {depth} levels deep (expected at most {MAX_JSON_DEPTH})",
            received=depth,
            expected=MAX_JSON_DEPTH,
        )
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise TokenError(code, f"{what} is not JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise TokenError(code, f"{what} is a JSON {type(value).__name__} (expected an object)")
    return value


def check_token_size(token: str, policy: TokenPolicy) -> None:
    """Refuse a non-string or an over-long token (``token_too_large``) before any decoding."""
    if not isinstance(token, str):
        raise TokenError("token_malformed", f"token is {type(token).__name__} (expected str)")
    limit = policy.max_token_bytes
    # len() bounds the UTF-8 size from below, so a huge string is refused without encoding it
    size = len(token) if len(token) > limit else len(token.encode("utf-8", "replace"))
    if size > limit:
        raise TokenError(
            "token_too_large", f"token is at least {size} bytes (expected at most {limit})"
        )


@dataclass(frozen=True)
class _Compact:
    header: dict[str, Any]
    alg: str


def _parse(token: str, policy: TokenPolicy) -> _Compact:
    check_token_size(token, policy)
    if not token:
        raise TokenError("token_malformed", "token is empty (expected header.payload.signature)")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError(
            "token_malformed",
            f"token has {len(parts)} segments (expected 3: header.payload.signature; "
            "JWE is not accepted)",
        )
    header = _json_object(_b64decode(parts[0], "header"), "header", "token_malformed")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenError("token_malformed", f"header alg is {_show(alg)} (expected a string)")
    if alg not in policy.algorithms:
        raise TokenError(
            "token_alg_not_allowed",
            f"alg {_show(alg)} (expected one of: {', '.join(policy.algorithms)})",
            received=str(alg)[:64],
            expected=list(policy.algorithms),
        )
    if "crit" in header:
        raise TokenError(
            "token_malformed", f"crit header {_show(header['crit'])} (expected none understood)"
        )
    for part, what in zip(parts[1:], ("payload", "signature"), strict=True):
        if not part:
            raise TokenError("token_malformed", f"{what} segment is empty")
        if not _SEGMENT.fullmatch(part):
            raise TokenError(
                "token_malformed", f"{what} segment is not base64url (expected [A-Za-z0-9_-])"
            )
    return _Compact(header, alg)


# --- key selection -----------------------------------------------------------------------


def _describe(key: Key) -> str:
    crv = key.get("crv")
    return f"kty {key.key_type}" + (f", crv {crv}" if crv else "")


def _fits(key: Key, alg: str) -> bool:
    kty, curves = ALGORITHM_KEYS[alg]
    if key.key_type != kty:
        return False
    if curves is not None and key.get("crv") not in curves:
        return False
    key_alg = key.get("alg")
    if key_alg is not None and key_alg != alg:
        return False
    use = key.get("use")
    return use is None or use == "sig"


def _select_key(header: Mapping[str, Any], alg: str, keys: KeySet) -> Key:
    kid = header.get("kid")
    all_keys = list(keys)
    if kid is None:
        if len(all_keys) != 1:
            raise TokenError(
                "token_kid_missing",
                f"token has no kid and the key set holds {len(all_keys)} keys "
                "(expected a kid naming one of them)",
            )
        candidates = all_keys
    else:
        if not isinstance(kid, str) or not kid:
            raise TokenError("token_malformed", f"kid is {_show(kid)} (expected a string)")
        candidates = [k for k in all_keys if k.kid == kid]
        if not candidates:
            known = ", ".join(str(k.kid) for k in all_keys) or "none"
            raise TokenError("token_kid_unknown", f"kid {_show(kid)} (expected one of: {known})")
    for key in candidates:
        if _fits(key, alg):
            return key
    raise TokenError(
        "token_alg_not_allowed",
        f"alg {alg} does not fit key {_show(candidates[0].kid)} ({_describe(candidates[0])}, "
        f"alg {candidates[0].get('alg') or '-'}, use {candidates[0].get('use') or '-'})",
    )


def _verify_signature(token: str, key: Key, alg: str) -> bytes:
    try:
        obj = jws.deserialize_compact(token, key, algorithms=[alg])
    except BadSignatureError:
        raise TokenError(
            "token_bad_signature", f"signature does not verify with key {_show(key.kid)} ({alg})"
        ) from None
    except JoseError as exc:
        raise TokenError(
            "token_malformed", f"JWS does not parse: {exc.error}: {exc.description}"
        ) from None
    return obj.payload


# --- claims ------------------------------------------------------------------------------


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError("token_claims_invalid", f"{name} is missing (expected NumericDate)")
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
        or not 0 <= value <= MAX_NUMERIC_DATE
    ):
        raise TokenError(
            "token_claims_invalid",
            f"{name} is {_show(value)} (expected NumericDate seconds, 0 to {MAX_NUMERIC_DATE})",
        )
    return float(value)


def _str_list(claims: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TokenError(
        "token_claims_invalid", f"{name} is {_show(value)} (expected a string or list of strings)"
    )


def _check_times(claims: Mapping[str, Any], policy: TokenPolicy, now: datetime) -> datetime:
    ts = now.timestamp()
    leeway = policy.leeway_s
    exp = _number(claims, "exp", required=True)
    assert exp is not None
    try:
        expires_at = datetime.fromtimestamp(exp, UTC)
    except (OverflowError, ValueError, OSError):
        raise TokenError("token_claims_invalid", f"exp {exp:g} is out of range") from None
    if ts >= exp + leeway:
        raise TokenError(
            "token_expired",
            f"exp {_when(exp)} (expected after {_when(ts)}, leeway {leeway:g}s)",
        )
    nbf = _number(claims, "nbf", required=False)
    if nbf is not None and ts < nbf - leeway:
        raise TokenError(
            "token_not_yet_valid",
            f"nbf {_when(nbf)} (expected at or before {_when(ts)}, leeway {leeway:g}s)",
        )
    iat = _number(claims, "iat", required=False)
    if iat is not None and iat > ts + leeway:
        raise TokenError(
            "token_iat_in_future",
            f"iat {_when(iat)} (expected at or before {_when(ts)}, leeway {leeway:g}s)",
        )
    _check_lifetime(exp, iat, ts, policy.max_lifetime_s)
    return expires_at


def _check_lifetime(exp: float, iat: float | None, ts: float, cap: float | None) -> None:
    """``token_lifetime_too_long`` when ``exp - iat`` (``exp - now`` without ``iat``) is
    above ``cap``; no leeway: the cap bounds what the issuer granted."""
    if cap is None:
        return
    lifetime, since = (exp - ts, "now") if iat is None else (exp - iat, "iat")
    if lifetime > cap:
        raise TokenError(
            "token_lifetime_too_long",
            f"token lives {lifetime:g} s (exp {_when(exp)} - {since} "
            f"{_when(ts if iat is None else iat)}; expected at most {cap:g} s, "
            "tokens.max_lifetime_s)",
            received=lifetime,
            expected=cap,
        )


def _check_audience(claims: Mapping[str, Any], policy: TokenPolicy) -> tuple[str, ...]:
    aud = _str_list(claims, "aud")
    if not aud:
        raise TokenError(
            "token_wrong_audience",
            f"aud is missing (expected one of: {', '.join(policy.audiences)})",
        )
    if not set(aud) & set(policy.audiences):
        raise TokenError(
            "token_wrong_audience",
            f"aud {_show(list(aud))} (expected one of: {', '.join(policy.audiences)})",
            received=[a[:64] for a in aud[:8]],
            expected=list(policy.audiences),
        )
    return aud


def _scope(claims: Mapping[str, Any]) -> tuple[str, ...]:
    if "scope" in claims:
        value = claims["scope"]
        if not isinstance(value, str):
            raise TokenError(
                "token_claims_invalid",
                f"scope is {_show(value)} (expected a space-separated string)",
            )
        return tuple(dict.fromkeys(value.split()))
    scp = claims.get("scp")
    if isinstance(scp, str):
        return tuple(dict.fromkeys(scp.split()))
    return tuple(dict.fromkeys(_str_list(claims, "scp") or ()))


def _roles(claims: Mapping[str, Any]) -> tuple[str, ...]:
    value = claims.get("roles")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenError("token_claims_invalid", f"roles is {_show(value)} (expected a list)")
    return tuple(value)


def _check_binding(claims: Mapping[str, Any], policy: TokenPolicy, thumbprint: str | None) -> bool:
    cnf = claims.get("cnf")
    if cnf is None:
        if policy.require_cert_binding:
            raise TokenError(
                "token_cnf_required",
                "token has no cnf claim (expected cnf.x5t#S256 binding it to the client "
                "certificate)",
            )
        return False
    if not isinstance(cnf, dict):
        raise TokenError("token_claims_invalid", f"cnf is {_show(cnf)} (expected an object)")
    bound = cnf.get("x5t#S256")
    if bound is None:
        if policy.require_cert_binding:
            raise TokenError(
                "token_cnf_required",
                f"cnf has members {_show(sorted(cnf))} (expected x5t#S256)",
            )
        raise TokenError(
            "token_cnf_mismatch",
            f"cnf confirmation methods {_show(sorted(cnf))} cannot be checked here "
            "(expected x5t#S256)",
        )
    if not isinstance(bound, str) or not bound:
        raise TokenError(
            "token_claims_invalid", f"cnf.x5t#S256 is {_show(bound)} (expected a string)"
        )
    if thumbprint is None:
        raise TokenError(
            "token_cnf_mismatch",
            f"token is bound to certificate x5t#S256 {_show(bound)} "
            "(received no client certificate)",
        )
    if not hmac.compare_digest(bound.encode(), thumbprint.encode()):
        raise TokenError(
            "token_cnf_mismatch",
            f"client certificate x5t#S256 {_show(thumbprint)} (expected {_show(bound)} "
            "from the token's cnf)",
        )
    return True


def _check_claims(
    claims: dict[str, Any], policy: TokenPolicy, now: datetime, thumbprint: str | None
) -> VerifiedUser:
    iss = claims.get("iss")
    if iss != policy.issuer:
        received = "missing" if iss is None else _show(iss)
        raise TokenError(
            "token_wrong_issuer",
            f"iss {received} (expected {policy.issuer!r})",
            received=iss[:64] if isinstance(iss, str) else None,
            expected=policy.issuer,
        )
    aud = _check_audience(claims, policy)
    expires_at = _check_times(claims, policy, now)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        received = "missing" if sub is None else _show(sub)
        raise TokenError("token_claims_invalid", f"sub {received} (expected a non-empty string)")
    scope = _scope(claims)
    roles = _roles(claims)
    cert_bound = _check_binding(claims, policy, thumbprint)
    return VerifiedUser(
        sub=sub,
        iss=policy.issuer,
        aud=aud,
        scope=scope,
        roles=roles,
        cert_bound=cert_bound,
        claims=MappingProxyType(claims),
        expires_at=expires_at,
    )


def verify_token(
    token: str,
    keys: KeySet,
    policy: TokenPolicy,
    now: datetime,
    cert_thumbprint: str | None,
) -> VerifiedUser:
    """Check a compact JWS user token at ``now``; raise ``TokenError`` naming the reason.

    ``cert_thumbprint`` is ``cert_thumbprint(der)`` of the connection's client certificate
    (None when there is none); it is compared with the token's ``cnf.x5t#S256``.
    """
    if now.tzinfo is None:
        raise ValueError("validation time must be timezone-aware")
    parsed = _parse(token, policy)
    key = _select_key(parsed.header, parsed.alg, keys)
    payload = _verify_signature(token, key, parsed.alg)
    if policy.typ is not None:
        typ = parsed.header.get("typ")
        if not isinstance(typ, str) or _norm_typ(typ) != _norm_typ(policy.typ):
            received = "missing" if typ is None else _show(typ)
            raise TokenError("token_typ_mismatch", f"typ {received} (expected {policy.typ!r})")
    claims = _json_object(payload, "payload", "token_claims_invalid")
    return _check_claims(claims, policy, now, cert_thumbprint)
