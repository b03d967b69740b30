"""Enrollment: devices get their certificate from the CA with a one-time token, then renew it.

CA side: ``bootstrap`` (tokens, replay store), ``issuance`` (CSR checks, what the CA issues),
``audit`` (the CA's hash-chained audit log), ``ca_service`` (the gRPC service and server).
Device side: ``client``, ``csr``, ``keystores``. Errors: ``errors.EnrollError``.

Nothing is imported here beyond the error type, so importing one side does not load the other.
"""

from ztagent.enroll.errors import EnrollError

__all__ = ["EnrollError"]
