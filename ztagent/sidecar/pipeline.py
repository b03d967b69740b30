"""The gRPC adapter of the admission core: the call's values out of the grpc context in, the
verdict back as identity headers or as a refusal the proxy turns into a status."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from ztagent.admission.call import peer_certificate_pem
from ztagent.admission.core import AdmissionCore, Call, Metadata
from ztagent.errors import ZtagentError
from ztagent.pki.verify import VerifiedDevice
from ztagent.tokens.assertion import ASSERTION_HEADER, AssertionSigner


def call_of(context: grpc.aio.ServicerContext, full_method: str) -> Call:
    """The plain values admission reads, taken from a grpc call."""
    return Call(
        full_method=full_method,
        metadata=tuple(context.invocation_metadata() or ()),
        peer=context.peer() or "",
        peer_cert_pem=peer_certificate_pem(context.auth_context()),
    )


class Pipeline(AdmissionCore):
    """``AdmissionCore`` for the sidecar's proxy (the ``Admission`` it calls per request).

    ``signer``: every allowed call also gets an ``x-ztagent-assertion`` for the workload, a
    short-lived signed statement of who was admitted for which method (tokens.assertion).
    """

    def __init__(self, *args: Any, signer: AssertionSigner | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("node", socket.gethostname())
        super().__init__(*args, **kwargs)
        self.signer = signer

    async def admit(
        self, context: grpc.aio.ServicerContext, full_method: str, *, hold_log: bool = False
    ) -> Metadata:
        """The identity headers to add upstream; raises the verdict's ZtagentError to refuse.
        ``hold_log``: as ``decide``'s (the caller then owes a ``release_log()``)."""
        verdict = await self.decide(call_of(context, full_method), hold_log=hold_log)
        if verdict.error is not None:
            raise verdict.error
        admitted = verdict.admitted
        if self.signer is None or admitted is None:
            return verdict.headers
        assertion = self.signer.mint(
            device_id=admitted.device_id,
            spiffe_id=admitted.spiffe_id,
            method=admitted.method,
            decision_id=admitted.decision_id,
            user=admitted.user,
        )
        return (*verdict.headers, (ASSERTION_HEADER, assertion))

    async def recheck_call(
        self, context: grpc.aio.ServicerContext, full_method: str
    ) -> ZtagentError | None:
        """``recheck`` of an open call: None while its credentials hold, else the refusal
        (logged) to end it with."""
        return await self.recheck(call_of(context, full_method))

    def verify_device(self, auth_context: Mapping[str, Sequence[bytes]]) -> VerifiedDevice:
        """The identity check alone (the attestation service and health use it)."""
        return self.verify_device_pem(peer_certificate_pem(auth_context))
