"""Proxyless mode: the sidecar's admission inside a Python gRPC workload.

gRPC's own answer to the cost of a second hop is "proxyless": the server takes its security
configuration itself. Here a ``grpc.aio`` workload protects itself with the same config file
and the same checks as the sidecar — device certificate + CRL, posture, user token, policy,
decision log, metrics — by serving through ``protected_server``::

    from ztagent.sidecar.proxyless import admitted, protected_server

    guard = protected_server("ztagent.toml", add_services=lambda server: (
        storage_pb2_grpc.add_StorageServicer_to_server(MyStorage(), server)))
    await guard.start()            # the mTLS port of [listen], attestation and health on it
    ...
    def Get(self, request, context):
        who = admitted()           # the verified device and user of this call
        ... who.device_id, who.user, who.decision_id ...

Everything around the checks is the sidecar itself (``Sidecar`` with its proxy replaced by
the workload's services): hot reload of the trust files, CRL fetching, JWKS refresh, policy
reload and bundle polling run in the same background tasks, so there is one implementation.
``AdmissionInterceptor`` wraps every handler of the workload's services: the admission core
decides on the call's values before the handler runs (a refusal aborts with exactly the
sidecar's status, ``code: message`` details and ``x-ztagent-error-*`` trailers), and the
verdict's ``Admitted`` is set for the handler in a context variable (``admitted()``) — the
handler reads the caller from there, never from headers. Health and attestation keep their
own checks (the identity check, the attestation protocol) and are not wrapped.

A sidecar isolates the keys and the checks from the workload's code; proxyless trusts the
workload process with them (its server key, its decision log, the policy) in exchange for
one hop less. Only ``grpc.aio`` servers are supported here.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from ztagent.admission.context import (
    NotAdmittedError,
    admitted,
    reset_admitted,
    set_admitted,
)
from ztagent.admission.core import AdmissionCore, Admitted
from ztagent.config import Config, load_config
from ztagent.errors import ZtagentError
from ztagent.rpc_status import error_trailers, grpc_status_for
from ztagent.sidecar.pipeline import call_of

log = logging.getLogger("ztagent.proxyless")

UNWRAPPED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "ztagent.v1.Attestation",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Services with checks of their own (or none needed): not run through admission."""


class AdmissionInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs ``core().decide`` before every handler of the workload's services."""

    def __init__(self, core: Callable[[], AdmissionCore | None]) -> None:
        self._core = core

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        service = method.lstrip("/").split("/", 1)[0]
        if service in UNWRAPPED_SERVICES:
            return handler
        admit = self._admit
        if handler is None:  # an unknown method: refused as the sidecar refuses it (no_route)

            async def unknown(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(method, context)
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no method {method}")

            return grpc.unary_unary_rpc_method_handler(unknown)
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = await admit(method, context)
                try:
                    return await inner_uu(request, context)
                finally:
                    reset_admitted(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                token = await admit(method, context)
                try:
                    async for item in inner_us(request, context):
                        yield item
                finally:
                    reset_admitted(token)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                token = await admit(method, context)
                try:
                    return await inner_su(requests, context)
                finally:
                    reset_admitted(token)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        inner_ss = handler.stream_stream

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            token = await admit(method, context)
            try:
                async for item in inner_ss(requests, context):
                    yield item
            finally:
                reset_admitted(token)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )

    async def _admit(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> contextvars.Token[Admitted | None]:
        core = self._core()
        if core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting_down: not serving yet")
            raise AssertionError("unreachable")
        verdict = await core.decide(call_of(context, method))
        err: ZtagentError | None = verdict.error
        if err is not None:
            log.info("refused %s: %s", method, err)
            await context.abort(
                grpc_status_for(err), f"{err.code}: {err.message}", error_trailers(err)
            )
            raise AssertionError("unreachable")
        return set_admitted(verdict.admitted)


def protected_server(
    config: Config | Path | str, *, add_services: Callable[[grpc.aio.Server], None]
) -> Any:
    """A ``Sidecar`` that serves ``add_services``' servicers behind admission instead of
    proxying: ``await guard.start()`` binds ``[listen] address`` with the sidecar's mTLS,
    ``await guard.stop()`` drains. Returns the ``Sidecar`` (its ``port``, ``health``,
    ``metrics``, ``pipeline`` as usual)."""
    from ztagent.sidecar.server import Sidecar

    loaded = config if isinstance(config, Config) else load_config(Path(config))
    car = Sidecar(loaded, services=add_services)
    return car


__all__ = ["AdmissionInterceptor", "NotAdmittedError", "admitted", "protected_server"]
