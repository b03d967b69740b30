"""The CA store tests use the same session PKI as the certificate checks."""

from tests.unit.pki.conftest import mint, pki, policy, session_pki

__all__ = ["mint", "pki", "policy", "session_pki"]
