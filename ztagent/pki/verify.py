"""Device certificate verification: the public API, gathered from its modules.

``trust`` parses the CA bundle and CRLs, ``device_check`` is the pure check
(``verify_device_cert``, ``explain``), ``checker`` the cached per-request ``DeviceChecker``.
"""

from ztagent.pki.checker import DeviceChecker
from ztagent.pki.device_check import (
    VerifiedDevice,
    explain,
    verify_device_cert,
    verify_with_expiry,
)
from ztagent.pki.policy import DevicePolicy
from ztagent.pki.trust import TrustMaterial, load_crls

__all__ = [
    "DeviceChecker",
    "DevicePolicy",
    "TrustMaterial",
    "VerifiedDevice",
    "explain",
    "load_crls",
    "verify_device_cert",
    "verify_with_expiry",
]
