"""A cap on the connections a threaded ``socketserver`` serves at once.

``socketserver.ThreadingMixIn`` starts a thread per accepted connection, without a bound: an
open socket that sends nothing holds a thread of the serving process. ``CappedThreadingMixIn``
serves at most ``cap_connections(n)`` at once; one more is closed at accept, without a
thread. The CA's CRL server and the sidecar's metrics endpoint use it, with a socket timeout
per connection so that an idle one frees its slot.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from typing import Any


class CappedThreadingMixIn(socketserver.ThreadingMixIn):
    _slots: threading.BoundedSemaphore

    def cap_connections(self, limit: int) -> None:
        """Serve at most ``limit`` connections at once (call before serving)."""
        self._slots = threading.BoundedSemaphore(limit)

    def refused_connection(self, client_address: Any) -> None:
        """Called for each connection closed over the cap (default: nothing)."""

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connection(client_address)
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_WR)
            request.close()  # over the cap: closed, no thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
