"""DEVELOPMENT ONLY: a local token issuer for demos and tests. Not an OIDC provider.

It lives beside the dev CA (``ztagent ca init``) in the same directory:

- ``token-issuer.key``: the current signing key, EC P-256, PKCS#8 PEM, mode 0600;
- ``jwks.json``: the public key set the sidecar is pointed at (``tokens.jwks_file``); each
  key has ``kid`` = its RFC 7638 thumbprint, ``alg`` ES256, ``use`` sig; after
  ``rotate_dev_issuer`` it holds the new key first and the previous one after it;
- ``token-issuer.json``: ``{"issuer": "https://<trust_domain>/dev-issuer",
  "audience": "ztagent", "kid": <current kid>}``.

Every file is written atomically. ``mint_token`` signs ES256 access tokens (``typ``
``at+jwt``) with the current key. Nothing here is meant for production: the private key
sits in a plain file and there is no revocation, consent or login.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from ztagent.files import KEY_MODE, PUBLIC_MODE, open_append, write_atomic
from ztagent.pki.errors import CertError
from ztagent.pki.spiffe import TrustDomain
from ztagent.tokens.errors import DevIssuerError
from ztagent.tokens.verify import cert_thumbprint

DEV_AUDIENCE = "ztagent"
TOKEN_TYP = "at+jwt"  # noqa: S105 (a media type, not a secret)
ALG = "ES256"
MAX_KEYS = 2
"""The JWKS keeps the current key and the one before it."""


@dataclass(frozen=True)
class DevIssuer:
    """DEVELOPMENT ONLY: the dev issuer's files and settings."""

    dir: Path
    issuer: str
    audience: str
    kid: str
    """The current signing key."""
    key_path: Path = field(init=False)
    jwks_path: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        for attr, path in _paths(self.dir).items():
            object.__setattr__(self, attr, path)


def _paths(ca_dir: Path) -> dict[str, Path]:
    return {
        "key_path": ca_dir / "token-issuer.key",
        "jwks_path": ca_dir / "jwks.json",
        "config_path": ca_dir / "token-issuer.json",
    }


def dev_issuer_url(trust_domain: str) -> str:
    return f"https://{trust_domain}/dev-issuer"


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    path = ca_dir / ".token-issuer.lock"
    try:
        fd = open_append(path, KEY_MODE)  # never through a symlink
    except OSError as exc:
        raise DevIssuerError("dev_issuer_invalid", f"cannot lock {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk = ECKey.import_key(key.public_key())
    return {**jwk.as_dict(private=False), "kid": jwk.thumbprint(), "alg": ALG, "use": "sig"}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _write(
    issuer: DevIssuer, key: ec.EllipticCurvePrivateKey, jwks: Sequence[Mapping[str, Any]]
) -> None:
    # JWKS first: a verifier must know a key before any token is signed with it
    write_atomic(issuer.jwks_path, _json_bytes({"keys": list(jwks)}), PUBLIC_MODE)
    write_atomic(issuer.key_path, _key_pem(key), KEY_MODE)
    config = {"issuer": issuer.issuer, "audience": issuer.audience, "kid": issuer.kid}
    write_atomic(issuer.config_path, _json_bytes(config), PUBLIC_MODE)


def init_dev_issuer(ca_dir: Path, trust_domain: str, *, force: bool = False) -> DevIssuer:
    """DEVELOPMENT ONLY: create the dev issuer's key, JWKS and settings in ``ca_dir``.

    Raise ``DevIssuerError`` (``dev_issuer_exists``) if one is there and ``force`` is False,
    ``dev_issuer_invalid`` for a bad trust domain.
    """
    try:
        trust_domain = TrustDomain(trust_domain)
    except CertError as exc:
        raise DevIssuerError("dev_issuer_invalid", exc.message) from None
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = _paths(ca_dir)
    with _locked(ca_dir):
        if not force and any(p.exists() for p in paths.values()):
            raise DevIssuerError(
                "dev_issuer_exists",
                f"a dev token issuer already exists in {ca_dir} (use force to replace it)",
            )
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = _public_jwk(key)
        issuer = DevIssuer(ca_dir, dev_issuer_url(trust_domain), DEV_AUDIENCE, jwk["kid"])
        _write(issuer, key, [jwk])
    return issuer


def load_dev_issuer(ca_dir: Path) -> DevIssuer:
    """DEVELOPMENT ONLY: the dev issuer in ``ca_dir``; ``DevIssuerError`` if absent/broken."""
    config_path = _paths(ca_dir)["config_path"]
    try:
        doc = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise DevIssuerError(
            "dev_issuer_missing", f"{config_path} not found (run init_dev_issuer first)"
        ) from None
    except (OSError, ValueError) as exc:
        raise DevIssuerError("dev_issuer_invalid", f"{config_path}: {exc}") from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), str) and doc.get(k) for k in ("issuer", "audience", "kid")
    ):
        raise DevIssuerError(
            "dev_issuer_invalid", f"{config_path}: expected issuer, audience and kid strings"
        )
    return DevIssuer(ca_dir, doc["issuer"], doc["audience"], doc["kid"])


def _load_key(issuer: DevIssuer) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(issuer.key_path.read_bytes(), None)
    except FileNotFoundError:
        raise DevIssuerError("dev_issuer_missing", f"{issuer.key_path} not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise DevIssuerError("dev_issuer_invalid", f"{issuer.key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise DevIssuerError(
            "dev_issuer_invalid", f"{issuer.key_path}: expected an EC P-256 private key"
        )
    return key


def rotate_dev_issuer(ca_dir: Path) -> DevIssuer:
    """DEVELOPMENT ONLY: sign with a new key from now on; the JWKS holds new and old keys."""
    with _locked(ca_dir):
        current = load_dev_issuer(ca_dir)
        old_key = _load_key(current)
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = _public_jwk(key)
        issuer = DevIssuer(ca_dir, current.issuer, current.audience, jwk["kid"])
        _write(issuer, key, [jwk, _public_jwk(old_key)][:MAX_KEYS])
    return issuer


def _first_cert_der(path: Path) -> bytes:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise DevIssuerError("bind_cert_invalid", f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DevIssuerError("bind_cert_invalid", f"{path}: not PEM certificates ({exc})") from None
    return certs[0].public_bytes(serialization.Encoding.DER)


def mint_token(
    ca_dir: Path,
    *,
    sub: str,
    scope: Sequence[str] = (),
    roles: Sequence[str] = (),
    ttl_s: int = 900,
    bind_cert: Path | None = None,
    audience: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> str:
    """DEVELOPMENT ONLY: an ES256 access token (``typ`` at+jwt) from the dev issuer.

    Claims: iss, sub, aud (``audience`` or the issuer's default), iat, nbf, exp (iat +
    ``ttl_s``), jti, ``scope`` (space-joined, omitted when empty), ``roles`` (list, omitted
    when empty), ``cnf.x5t#S256`` of the first certificate in ``bind_cert`` (PEM).
    ``extra_claims`` are added last and may override any of these (tests use that to mint
    broken tokens).
    """
    if not sub:
        raise DevIssuerError("dev_issuer_invalid", "sub is empty (expected a subject)")
    if ttl_s <= 0:
        raise DevIssuerError("ttl_invalid", f"ttl {ttl_s}s (expected a positive duration)")
    issuer = load_dev_issuer(ca_dir)
    key = _load_key(issuer)
    jwk = ECKey.import_key(key)
    moment = now if now is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    iat = int(moment.timestamp())
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "sub": sub,
        "aud": audience or issuer.audience,
        "iat": iat,
        "nbf": iat,
        "exp": iat + int(ttl_s),
        "jti": secrets.token_urlsafe(16),
    }
    if scope:
        claims["scope"] = " ".join(scope)
    if roles:
        claims["roles"] = list(roles)
    if bind_cert is not None:
        claims["cnf"] = {"x5t#S256": cert_thumbprint(_first_cert_der(bind_cert))}
    claims.update(extra_claims or {})
    header = {"alg": ALG, "typ": TOKEN_TYP, "kid": jwk.thumbprint()}
    return jwt.encode(header, claims, jwk, algorithms=[ALG])
