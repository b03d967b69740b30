"""What the sidecar (and the CA's renewal check) demands of a device certificate.

The configuration builds ``DevicePolicy`` from ``[identity]`` and wraps a
``DevicePolicyError`` with the key's name; ``device_check`` enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ztagent.pki.errors import CertError, DevicePolicyError
from ztagent.pki.spiffe import TrustDomain


@dataclass(frozen=True)
class DevicePolicy:
    """What the sidecar demands of a device cert."""

    trust_domain: str
    max_lifetime: timedelta = timedelta(days=90)
    check_crl: bool = True
    """A CRL from the leaf's issuer must be present (``crl_missing`` otherwise)."""
    crl_fail_open: bool = False
    """If True a CRL past nextUpdate is still used; by default such a CRL is ``crl_expired``."""
    crl_grace: timedelta = timedelta(0)
    """A CRL stays usable this long past its nextUpdate (an edge node may be offline when the
    CA publishes the next one); after that, fail closed refuses with ``crl_expired``."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "trust_domain", TrustDomain(self.trust_domain))
        except CertError as exc:
            raise DevicePolicyError("trust_domain", exc.message) from None
        if self.max_lifetime <= timedelta(0):
            raise DevicePolicyError(
                "max_cert_lifetime_days", f"{self.max_lifetime} (expected a positive duration)"
            )
        if self.crl_grace < timedelta(0):
            raise DevicePolicyError("crl_grace_s", f"{self.crl_grace} (expected 0 or more)")
