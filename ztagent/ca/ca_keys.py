"""The CA's signing keys: a private key in a file, or an issuing key held on a PKCS#11 token.

``KeyPair.key`` (``ztagent.ca.builders``) is a ``SigningKey``: either a ``cryptography`` EC
private key (file keys, the default: nothing changes for them) or a ``CaKey``, a key the CA
cannot read that signs SHA-256 digests (``TokenCaKey``: a non-extractable, sensitive P-256
key on a token, SoftHSM2 in the tests). ``sign_digest`` is the one seam every signature goes
through when the key is a ``CaKey``:

- certificates and CRLs (``sign_certificate`` / ``sign_crl``): ``cryptography`` cannot sign
  with a key it does not hold, so the certificate (CRL) is built with a throwaway P-256 key
  (the signature algorithm, ecdsa-with-SHA256, is the same), its TBS bytes are signed on the
  token, the Certificate / CertificateList DER is assembled with ``asn1crypto``, loaded back
  and verified with the issuer's public key before it is returned (fail closed);
- compact ES256 JWS (the bootstrap tokens): ``sign_compact_es256``;
- the audit log's checkpoints: ``ztagent.policy.log_checkpoint.CheckpointSigner`` takes the
  ``CaKey`` itself (it has ``public_key`` and ``sign_digest``).

A token-held issuing key is recorded in the CA directory as ``issuing-ca.keystore.json``
(instead of ``issuing-ca.key``)::

    {"type": "pkcs11", "uri": "pkcs11:token=ca;object=issuing-ca;id=%ab...",
     "module": "/usr/lib/softhsm/libsofthsm2.so", "pin_file": "/etc/ztagent/ca.pin"}

``pin_file`` (absolute path) is there only when one was given at ``init``; the PIN itself is
never written anywhere. When loading, the PIN is the one passed in, else the first line of the
recorded ``pin_file``, else ``ZTAGENT_PKCS11_PIN``. The session is the process-wide shared one
of ``ztagent.pkcs11_keys`` (the device's key stores use the same registry).

Errors are ``CaError`` naming the key store: ``ca_unavailable`` when the token cannot be used
now (no module, no token, wrong or missing PIN), ``ca_state_invalid`` when the record is
broken, the key is not on the token, or a signature does not verify.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from asn1crypto import crl as asn1_crl  # type: ignore[import-untyped]
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from ztagent import json_input
from ztagent.errors import ConfigError
from ztagent.files import PUBLIC_MODE, write_atomic
from ztagent.pkcs11_keys import (
    DEFAULT_PKCS11_MODULE,
    PIN_ENV,
    KeyStoreError,
    Pkcs11KeyStore,
    Pkcs11Uri,
    resolve_pin,
)
from ztagent.pki.errors import CaError

KEYSTORE_FILE: Final = "issuing-ca.keystore.json"
DEFAULT_ISSUING_LABEL: Final = "ztagent-issuing-ca"
P256_COORD_LEN: Final = 32
_RECORD_KEYS: Final = frozenset({"type", "uri", "module", "pin_file"})


class CaKey(Protocol):
    """A P-256 signing key the CA cannot read: it signs SHA-256 digests."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA over a 32-byte SHA-256 digest; the DER ``ECDSA-Sig-Value``."""
        ...

    def description(self) -> str:
        """Where the key is, for messages (never a PIN)."""
        ...


SigningKey = ec.EllipticCurvePrivateKey | CaKey
"""What ``KeyPair.key`` holds."""


def keystore_path(ca_dir: Path) -> Path:
    """``<ca_dir>/issuing-ca.keystore.json``: present when the issuing key is on a token."""
    return ca_dir / KEYSTORE_FILE


def sign_digest(key: SigningKey, digest: bytes) -> bytes:
    """ECDSA over a SHA-256 digest with either kind of key; the DER signature."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    return key.sign_digest(digest)


# --- certificates, CRLs, JWS through the seam ---------------------------------------------------


def _throwaway() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _raw_signature(key: CaKey, tbs: bytes) -> bytes:
    return key.sign_digest(hashlib.sha256(tbs).digest())


def _ec_public(public_key: object, what: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CaError(
            "ca_state_invalid",
            f"{what}: the issuer's key is {type(public_key).__name__} (expected EC P-256)",
        )
    return public_key


def sign_certificate(
    builder: x509.CertificateBuilder, key: CaKey, verify_with: object
) -> x509.Certificate:
    """``builder`` signed by ``key`` (a key the CA cannot read), verified with
    ``verify_with`` (the issuer's public key) before it is returned."""
    issuer_public = _ec_public(verify_with, key.description())
    draft = builder.sign(_throwaway(), hashes.SHA256())
    tbs = draft.tbs_certificate_bytes
    der = assemble_certificate(
        tbs, draft.public_bytes(serialization.Encoding.DER), _raw_signature(key, tbs)
    )
    cert = x509.load_der_x509_certificate(der)
    if cert.tbs_certificate_bytes != tbs:
        raise CaError("ca_state_invalid", "the assembled certificate changed its TBS bytes")
    try:
        issuer_public.verify(cert.signature, tbs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CaError(
            "ca_state_invalid",
            f"the certificate signed with {key.description()} does not verify with the "
            "issuing CA's public key (is the token's key the one in issuing-ca.pem?)",
        ) from None
    return cert


def assemble_certificate(tbs: bytes, draft_der: bytes, signature: bytes) -> bytes:
    """Certificate DER: ``tbs`` (TBSCertificate DER), the signature algorithm of the draft
    certificate ``draft_der`` and ``signature`` (DER ECDSA-Sig-Value)."""
    draft = asn1_x509.Certificate.load(draft_der)
    cert = asn1_x509.Certificate(
        {
            "tbs_certificate": asn1_x509.TbsCertificate.load(tbs),
            "signature_algorithm": draft["signature_algorithm"],
            "signature_value": signature,
        }
    )
    return bytes(cert.dump())


def sign_crl(
    builder: x509.CertificateRevocationListBuilder, key: CaKey, verify_with: object
) -> x509.CertificateRevocationList:
    """``builder`` signed by ``key``, checked with ``verify_with`` (the issuer's public key)."""
    issuer_public = _ec_public(verify_with, key.description())
    draft = builder.sign(_throwaway(), hashes.SHA256())
    tbs = draft.tbs_certlist_bytes
    der = assemble_crl(
        tbs, draft.public_bytes(serialization.Encoding.DER), _raw_signature(key, tbs)
    )
    crl = x509.load_der_x509_crl(der)
    if crl.tbs_certlist_bytes != tbs or not crl.is_signature_valid(issuer_public):
        raise CaError(
            "ca_state_invalid",
            f"the CRL signed with {key.description()} does not verify with the issuing CA's "
            "public key (is the token's key the one in issuing-ca.pem?)",
        )
    return crl


def assemble_crl(tbs: bytes, draft_der: bytes, signature: bytes) -> bytes:
    """CertificateList DER: ``tbs`` (TBSCertList DER), the draft's signature algorithm and
    ``signature`` (DER ECDSA-Sig-Value)."""
    draft = asn1_crl.CertificateList.load(draft_der)
    crl = asn1_crl.CertificateList(
        {
            "tbs_cert_list": asn1_crl.TbsCertList.load(tbs),
            "signature_algorithm": draft["signature_algorithm"],
            "signature": signature,
        }
    )
    return bytes(crl.dump())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_compact_es256(key: SigningKey, header: Mapping[str, object], payload: bytes) -> str:
    """A compact JWS ``base64url(header).base64url(payload).base64url(r || s)``: ES256 over
    SHA-256 of the signing input, the signature as raw 32-byte ``r`` and ``s``."""
    head = json.dumps(dict(header), separators=(",", ":")).encode()
    signing_input = f"{_b64url(head)}.{_b64url(payload)}"
    der = sign_digest(key, hashlib.sha256(signing_input.encode()).digest())
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(P256_COORD_LEN, "big") + s.to_bytes(P256_COORD_LEN, "big")
    return f"{signing_input}.{_b64url(raw)}"


# --- the token-held issuing key -----------------------------------------------------------------


@dataclass(frozen=True)
class TokenCaKey:
    """A ``CaKey`` on a PKCS#11 token (``Pkcs11KeyStore``: non-extractable, sensitive)."""

    store: Pkcs11KeyStore

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.store.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        try:
            return self.store.sign_digest_ecdsa(digest)
        except KeyStoreError as err:
            raise _ca_error(self.description(), err) from None

    def description(self) -> str:
        return f"key store {self.store.uri} (module {self.store.module})"

    def record(self, pin_file: Path | None = None) -> dict[str, str]:
        """What ``issuing-ca.keystore.json`` holds (never the PIN)."""
        record = self.store.record()
        if pin_file is not None:
            record["pin_file"] = str(pin_file.absolute())
        return record

    def destroy(self) -> None:
        """Delete the key pair from the token (an ``init`` that failed half-way, a test)."""
        try:
            self.store.destroy()
        except KeyStoreError as err:
            raise _ca_error(self.description(), err) from None
        with _opened_lock:
            for cache_key in [k for k, v in _opened.items() if v.store.uri == self.store.uri]:
                _opened.pop(cache_key).close()

    def close(self) -> None:
        self.store.close()


def _ca_error(where: str, err: KeyStoreError | ConfigError) -> CaError:
    code = err.code
    kind = (
        "ca_unavailable"
        if code in ("keystore_unavailable", "keystore_pin_incorrect", "config_invalid")
        else "ca_state_invalid"
    )
    return CaError(kind, f"issuing CA {where}: {code}: {err.message}")


def parse_token_spec(spec: str) -> Pkcs11Uri:
    """A ``pkcs11:token=<label>;object=<name>`` key-store spec for the issuing CA key
    (``ConfigError('--key-store')`` otherwise)."""
    if not spec.startswith("pkcs11:"):
        raise ConfigError(
            "--key-store", f"got {spec!r}, expected file or pkcs11:token=LABEL;object=NAME"
        )
    uri = Pkcs11Uri.parse(spec)
    if uri.token is None:
        raise ConfigError("--key-store", f"{spec!r} names no token label (expected token=LABEL)")
    return uri


def create_token_key(uri: Pkcs11Uri, pin: str) -> TokenCaKey:
    """A fresh non-extractable, sensitive P-256 key pair on the token ``uri`` names, labelled
    ``object`` (default ``ztagent-issuing-ca``) with a random ``CKA_ID`` (or ``id``)."""
    assert uri.token is not None
    module = uri.module or DEFAULT_PKCS11_MODULE
    where = f"key store {uri} (module {module})"
    try:
        store = Pkcs11KeyStore.create(
            module, uri.token, pin, uri.object or DEFAULT_ISSUING_LABEL, key_id=uri.id
        )
    except KeyStoreError as err:
        raise _ca_error(where, err) from None
    return TokenCaKey(store)


@contextlib.contextmanager
def new_issuing_key(uri: Pkcs11Uri | None, pin: str | None) -> Iterator[TokenCaKey | None]:
    """For ``init_ca``: a fresh key on the token ``uri`` names (None: a file key, nothing to
    do), deleted from the token again when the block fails, its session released after."""
    if uri is None:
        yield None
        return
    assert pin is not None
    key = create_token_key(uri, pin)
    try:
        yield key
    except BaseException:
        with contextlib.suppress(CaError):
            key.destroy()
        raise
    finally:
        key.close()


def token_pin(pin: str | None, pin_file: Path | None, where: str) -> str:
    """``pin``, else the first line of ``pin_file``, else ``ZTAGENT_PKCS11_PIN``."""
    if pin is None:
        try:
            pin = resolve_pin(pin_file)
        except ConfigError as err:
            raise CaError("ca_unavailable", f"issuing CA {where}: {err.message}") from None
    if not pin:
        raise CaError(
            "ca_unavailable",
            f"issuing CA {where} needs the token's PIN: give a PIN file or set {PIN_ENV}",
        )
    return pin


def write_record(path: Path, key: TokenCaKey, pin_file: Path | None) -> None:
    data = json.dumps(key.record(pin_file), indent=2, sort_keys=True).encode() + b"\n"
    try:
        write_atomic(path, data, PUBLIC_MODE)
    except OSError as exc:
        raise CaError("ca_state_invalid", f"cannot write {path}: {exc.strerror}") from None


def read_record(path: Path) -> dict[str, str]:
    """The record in ``issuing-ca.keystore.json`` (never read through a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(64 * 1024)
        doc: Any = json_input.loads(raw, max_depth=None)
    except OSError as exc:
        raise CaError("ca_state_invalid", f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CaError("ca_state_invalid", f"{path} is not JSON: {exc}") from None
    if (
        not isinstance(doc, dict)
        or doc.get("type") != "pkcs11"
        or not set(doc) <= _RECORD_KEYS
        or not all(isinstance(doc.get(k), str) for k in ("uri", "module"))
        or not isinstance(doc.get("pin_file", ""), str)
    ):
        raise CaError(
            "ca_state_invalid",
            f"{path}: expected {{'type': 'pkcs11', 'uri': ..., 'module': ...[, 'pin_file': ...]}}",
        )
    return {str(k): str(v) for k, v in doc.items()}


_CacheKey = tuple[str, str, bytes, bytes]
_opened: dict[_CacheKey, TokenCaKey] = {}
_opened_lock = threading.Lock()


def load_token_key(path: Path, issuing_cert: x509.Certificate, pin: str | None) -> TokenCaKey:
    """The issuing key ``path`` (``issuing-ca.keystore.json``) names, checked to be the key of
    ``issuing_cert``. PIN: ``pin``, else the recorded ``pin_file``, else the environment.

    The CA loads its issuing key for every request: a key opened once (same module, URI,
    certificate and PIN) is kept, with the token's logged-in session, for as long as that
    session lives (``ztagent.pkcs11_keys.close_all_sessions`` ends it)."""
    record = read_record(path)
    where = f"key store {record['uri']} (module {record['module']})"
    pin_file = Path(record["pin_file"]) if "pin_file" in record else None
    secret = token_pin(pin, pin_file, where)
    cert_der = issuing_cert.public_bytes(serialization.Encoding.DER)
    cache_key = (
        record["module"],
        record["uri"],
        hashlib.sha256(cert_der).digest(),
        hashlib.sha256(secret.encode()).digest(),
    )
    with _opened_lock:
        cached = _opened.get(cache_key)
        if cached is not None and cached.store.is_open():
            return cached
        try:
            store = Pkcs11KeyStore.load(record["uri"], record["module"], secret)
        except (KeyStoreError, ConfigError) as err:
            raise _ca_error(where, err) from None
        key = TokenCaKey(store)
        if key.public_key() != issuing_cert.public_key():
            key.close()
            raise CaError(
                "ca_state_invalid",
                f"issuing CA {where} holds another key than the issuing CA certificate's",
            )
        stale = _opened.pop(cache_key, None)
        if stale is not None:
            stale.close()
        _opened[cache_key] = key
        return key


def forget_token_keys() -> None:
    """Release every issuing key ``load_token_key`` keeps open (their sessions close when no
    other store uses them)."""
    with _opened_lock:
        keys = list(_opened.values())
        _opened.clear()
    for key in keys:
        key.close()
