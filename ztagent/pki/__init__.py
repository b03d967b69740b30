"""PKI: device certificate verification, SPIFFE IDs, trust files and the dev CA.

The checks (``verify``, ``checker``, ``spiffe``) are pure; ``trust_files`` and ``ca`` do IO.
"""

from ztagent.pki.checker import DeviceChecker
from ztagent.pki.errors import CaError, CertError
from ztagent.pki.spiffe import SpiffeId, device_spiffe_id, parse_device_id
from ztagent.pki.trust_files import TrustFiles
from ztagent.pki.verify import (
    DevicePolicy,
    TrustMaterial,
    VerifiedDevice,
    explain,
    verify_device_cert,
)

__all__ = [
    "CaError",
    "CertError",
    "DeviceChecker",
    "DevicePolicy",
    "SpiffeId",
    "TrustFiles",
    "TrustMaterial",
    "VerifiedDevice",
    "device_spiffe_id",
    "explain",
    "parse_device_id",
    "verify_device_cert",
]
