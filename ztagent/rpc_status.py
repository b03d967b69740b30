"""The one place a ztagent error becomes a gRPC status: the family's (or the code's)
``status_name`` as a ``grpc.StatusCode``. Used by every server (sidecar, workloads, the CA
service); the checks below them never import grpc."""

from __future__ import annotations

import grpc

from ztagent.errors import ZtagentError


def grpc_status_for(err: ZtagentError) -> grpc.StatusCode:
    """``err.rpc_status()`` as a ``grpc.StatusCode``; an unknown name is ``INTERNAL``."""
    status: grpc.StatusCode | None = getattr(grpc.StatusCode, err.rpc_status(), None)
    return status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.INTERNAL
