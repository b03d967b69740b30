"""``TrustMaterial``: the client CA bundle and CRLs, parsed once (no IO)."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.verification import Store

from ztagent.errors import ConfigError

_CRL_PEM_RE = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL)


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except Exception:  # InvalidSignature, ValueError, TypeError: not self-signed
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def load_crls(crl_data: bytes) -> tuple[x509.CertificateRevocationList, ...]:
    """One or more PEM CRLs, or a single DER CRL; ``ValueError`` if there is none."""
    blocks = _CRL_PEM_RE.findall(crl_data)
    if blocks:
        return tuple(x509.load_pem_x509_crl(b) for b in blocks)
    if b"-----BEGIN" in crl_data or not crl_data.strip():
        raise ValueError("no 'BEGIN X509 CRL' PEM block found")
    return (x509.load_der_x509_crl(crl_data),)


@dataclass(frozen=True)
class TrustMaterial:
    """The client CA bundle and CRLs, parsed once."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    def __post_init__(self) -> None:
        if not self.roots:
            raise ConfigError("ca_bundle", "no self-signed root CA (expected at least one)")

    @classmethod
    def from_pem(cls, bundle_pem: bytes, crl_pem: bytes | None) -> TrustMaterial:
        """Parse a PEM CA bundle and optional CRL data; ``ConfigError`` on anything unusable."""
        try:
            certs = x509.load_pem_x509_certificates(bundle_pem)
        except ValueError as exc:
            raise ConfigError("ca_bundle", f"not a PEM certificate bundle: {exc}") from None
        not_ca = [c.subject.rfc4514_string() for c in certs if not _is_ca(c)]
        if not_ca:
            raise ConfigError(
                "ca_bundle", f"holds non-CA certificates {not_ca} (expected CA certificates only)"
            )
        crls: tuple[x509.CertificateRevocationList, ...] = ()
        if crl_pem is not None:
            try:
                crls = load_crls(crl_pem)
            except ValueError as exc:
                raise ConfigError("crl", f"not a PEM or DER CRL: {exc}") from None
        return cls(
            roots=tuple(c for c in certs if _is_self_signed(c)),
            intermediates=tuple(c for c in certs if not _is_self_signed(c)),
            crls=crls,
        )

    @functools.cached_property
    def store(self) -> Store:
        return Store(list(self.roots))

    def with_intermediates(self, extra: tuple[x509.Certificate, ...]) -> TrustMaterial:
        """A copy with more intermediates (never roots): for ``explain --chain``."""
        return dataclasses.replace(self, intermediates=self.intermediates + extra)
