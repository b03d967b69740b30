"""``grpc.health.v1`` on the mTLS port, behind the identity check.

Health used to bypass admission: a revoked device got ``SERVING`` and could hold a Watch
stream open. Here ``Check`` and ``Watch`` first run the same device-certificate check as
every proxied call (``UNAUTHENTICATED`` with the stable code otherwise), and a Watch stream
re-checks the certificate every ``recheck_s`` seconds, so a device revoked later loses its
stream.

Probes that have no device certificate (the kubelet's native gRPC probe) use the plain
listener at ``health.address`` instead: ``plain`` is a second servicer with the same statuses
(every ``set`` goes to both), served without TLS and without the identity check. It says only
SERVING or NOT_SERVING per service name, nothing about any device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

from ztagent.errors import ZtagentError
from ztagent.rpc_status import error_trailers, grpc_status_for

log = logging.getLogger("ztagent.sidecar")

Verify = Callable[[grpc.aio.ServicerContext], object]
"""Raises a ZtagentError when the caller's certificate is refused."""


class IdentityCheckedHealth(health.aio.HealthServicer):  # type: ignore[misc]
    def __init__(self, verify: Verify, recheck_s: float = 2.0) -> None:
        super().__init__()
        self._verify = verify
        self._recheck_s = recheck_s
        self.plain = health.aio.HealthServicer()
        """The same statuses, for the plain listener (``health.address``)."""

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super().set(service, status)
        await self.plain.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        await self.plain.enter_graceful_shutdown()

    def _refused(self, context: grpc.aio.ServicerContext) -> ZtagentError | None:
        try:
            self._verify(context)
        except ZtagentError as err:
            return err
        return None

    async def _abort(self, context: grpc.aio.ServicerContext, err: ZtagentError) -> None:
        log.info("refused health call: %s", err)
        await context.abort(grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err))

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        err = self._refused(context)
        if err is not None:
            await self._abort(context, err)
        return await super().Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        err = self._refused(context)
        if err is not None:
            await self._abort(context, err)
        watch = asyncio.ensure_future(super().Watch(request, context))
        try:
            while not watch.done():
                await asyncio.wait({watch}, timeout=self._recheck_s)
                if watch.done():
                    break
                err = self._refused(context)
                if err is not None:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                    await self._abort(context, err)
            await watch
        finally:
            if not watch.done():
                watch.cancel()
