"""Errors of the token domain: user tokens (JWT), the issuer's key set, the dev issuer.

``TokenError`` codes (stable, relied on by logs, policies and scripts; UNAUTHENTICATED):

``token_malformed``, ``token_too_large``, ``token_alg_not_allowed``, ``token_kid_missing``,
``token_kid_unknown``, ``token_bad_signature``, ``token_expired``, ``token_not_yet_valid``,
``token_iat_in_future``, ``token_lifetime_too_long`` (``exp - iat``, or ``exp - now`` without
``iat``, above ``TokenPolicy.max_lifetime_s``), ``token_wrong_issuer``, ``token_wrong_audience``,
``token_typ_mismatch``, ``token_cnf_mismatch``, ``token_cnf_required``,
``token_claims_invalid``.

``JwksError`` codes (the issuer's key set could not be had; UNAVAILABLE):
``jwks_unavailable`` (fetch failed: network, TLS, HTTP status, file missing, no key set yet),
``jwks_invalid`` (fetched, but not a usable JWKS or discovery document).

``TokenPolicyError`` (``token_policy_invalid``): a ``TokenPolicy`` that cannot be used; its
``key`` names the setting (``algorithms``, ``audience``...), which the configuration prefixes
with ``tokens.``.

``DevIssuerError`` codes (development-only issuer files): ``dev_issuer_exists``,
``dev_issuer_missing``, ``dev_issuer_invalid``, ``ttl_invalid``, ``bind_cert_invalid``.

Messages say what was received and what was expected; they never contain a whole token.
"""

from __future__ import annotations

from enum import StrEnum

from ztagent.errors import TransportError, VerificationError, ZtagentError


class TokenCode(StrEnum):
    """Every ``TokenError`` code."""

    TOKEN_ALG_NOT_ALLOWED = "token_alg_not_allowed"
    TOKEN_BAD_SIGNATURE = "token_bad_signature"
    TOKEN_CLAIMS_INVALID = "token_claims_invalid"
    TOKEN_CNF_MISMATCH = "token_cnf_mismatch"
    TOKEN_CNF_REQUIRED = "token_cnf_required"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_IAT_IN_FUTURE = "token_iat_in_future"
    TOKEN_KID_MISSING = "token_kid_missing"
    TOKEN_KID_UNKNOWN = "token_kid_unknown"
    TOKEN_LIFETIME_TOO_LONG = "token_lifetime_too_long"
    TOKEN_MALFORMED = "token_malformed"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    TOKEN_TOO_LARGE = "token_too_large"
    TOKEN_TYP_MISMATCH = "token_typ_mismatch"
    TOKEN_UNVERIFIABLE = "token_unverifiable"
    TOKEN_WRONG_AUDIENCE = "token_wrong_audience"
    TOKEN_WRONG_ISSUER = "token_wrong_issuer"


class JwksCode(StrEnum):
    """Every ``JwksError`` code."""

    JWKS_INVALID = "jwks_invalid"
    JWKS_UNAVAILABLE = "jwks_unavailable"


class DevIssuerCode(StrEnum):
    """Every ``DevIssuerError`` code."""

    BIND_CERT_INVALID = "bind_cert_invalid"
    DEV_ISSUER_EXISTS = "dev_issuer_exists"
    DEV_ISSUER_INVALID = "dev_issuer_invalid"
    DEV_ISSUER_MISSING = "dev_issuer_missing"
    TTL_INVALID = "ttl_invalid"


class TokenError(VerificationError):
    """A user token was checked and refused."""

    codes = frozenset(TokenCode)


class JwksError(TransportError):
    """The issuer's key set could not be fetched or parsed."""

    codes = frozenset(JwksCode)


class TokenPolicyError(ZtagentError):
    """A token policy setting is out of bounds (code ``token_policy_invalid``)."""

    status_name = "FAILED_PRECONDITION"

    def __init__(self, key: str, message: str) -> None:
        super().__init__("token_policy_invalid", f"{key}: {message}")
        self.key = key
        self.reason = message


class DevIssuerError(ZtagentError):
    """A dev-issuer operation could not be done (missing, existing or broken files)."""

    codes = frozenset(DevIssuerCode)
