"""A cap on the connections a threaded ``socketserver`` serves at once.

``socketserver.ThreadingMixIn`` starts a thread per accepted connection, without a bound: an
open socket that sends nothing holds a thread of the serving process. ``CappedThreadingMixIn``
serves at most ``cap_connections(n)`` at once; one more is closed at accept, without a
thread. The CA's CRL server and the sidecar's metrics endpoint use it, with a socket timeout
per connection so that an idle one frees its slot. A connection that times out or breaks is
logged at debug level, not printed as a traceback (``socketserver``'s default): any client
can cause one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)


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

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a timeout, a reset: the client's doing
            log.debug("%s: connection from %s ended: %r", type(self).__name__, client_address, exc)
        else:
            log.error("%s: serving %s failed", type(self).__name__, client_address, exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
