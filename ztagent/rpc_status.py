"""The one place a ztagent error becomes a gRPC status: the family's (or the code's)
``status_name`` as a ``grpc.StatusCode``. Used by every server (sidecar, workloads, the CA
service); the checks below them never import grpc."""

from __future__ import annotations

import json

import grpc

from ztagent.errors import ZtagentError

ERROR_CODE_HEADER = "x-ztagent-error-code"
"""Trailing metadata of a refusal: its stable code (the details start with it too)."""
ERROR_RECEIVED_HEADER = "x-ztagent-error-received"
ERROR_EXPECTED_HEADER = "x-ztagent-error-expected"
"""What the check received and expected, as JSON (ASCII), when the error carries them."""
MAX_TRAILER_CHARS = 512


def grpc_status_for(err: ZtagentError) -> grpc.StatusCode:
    """``err.rpc_status()`` as a ``grpc.StatusCode``; an unknown name is ``INTERNAL``."""
    status: grpc.StatusCode | None = getattr(grpc.StatusCode, err.rpc_status(), None)
    return status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.INTERNAL


def error_trailers(err: ZtagentError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a server sends with ``err``: code, and received / expected as
    ASCII JSON (cut to ``MAX_TRAILER_CHARS``) when the error has them."""
    out = [(ERROR_CODE_HEADER, err.code)]
    for header, value in (
        (ERROR_RECEIVED_HEADER, err.received),
        (ERROR_EXPECTED_HEADER, err.expected),
    ):
        if value is not None:
            text = json.dumps(value, ensure_ascii=True, sort_keys=True, default=str)
            out.append((header, text[:MAX_TRAILER_CHARS]))
    return tuple(out)
