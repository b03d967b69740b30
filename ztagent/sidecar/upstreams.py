"""Route table and the pooled channels to the local services (one channel per upstream)."""

from __future__ import annotations

import grpc

from ztagent.admission.policy_input import split_method
from ztagent.config import Route


def service_of(full_method: str) -> str:
    """'/pkg.v1.Svc/Method' -> 'pkg.v1.Svc' ('' when the name is malformed)."""
    return split_method(full_method)[0]


class Upstreams:
    """Maps gRPC service names to routes and keeps one insecure loopback channel per upstream.

    Channels are created lazily inside the running event loop and reused by every call.
    """

    def __init__(self, routes: tuple[Route, ...], max_message_bytes: int) -> None:
        self._routes = {route.service: route for route in routes}
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(sorted(self._routes))

    def route(self, service: str) -> Route | None:
        return self._routes.get(service)

    def channel(self, route: Route) -> grpc.aio.Channel:
        channel = self._channels.get(route.upstream)
        if channel is None:
            channel = grpc.aio.insecure_channel(route.upstream, options=self._options)
            self._channels[route.upstream] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
