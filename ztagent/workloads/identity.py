"""What a workload behind the sidecar trusts: a signed identity assertion, and a socket only
the sidecar can reach.

A third-party Python workload uses the same two pieces::

    from ztagent.workloads.identity import bind_local, caller, trust_verifier

    verifier = trust_verifier([Path("/var/lib/ztagent/state/assertion.pub")])
    port = bind_local(server, "unix:/run/ztagent/app.sock")        # 0600, or 0660 + group
    ...
    def Get(self, request, context):
        who = caller(verifier, context, "/my.pkg.v1.App/Get")       # raises AssertionError_
        ... who.device_id, who.user, who.decision_id ...

``caller`` takes the device id from the verified assertion only (never from a bare
``x-ztagent-device-id``, which any process that reaches the socket could send) and checks
that the assertion was minted for this very method and is used once. A refusal is an
``AssertionError_`` (UNAUTHENTICATED) the handler aborts with, like any ``ZtagentError``.

``bind_local`` creates a unix socket with mode 0600 (0660 with ``group``: the sidecar's
user must be in it) whatever the umask: the umask is narrowed while gRPC binds, so the socket
is never connectable by others, not even for an instant, and chmod/chown follow. TCP
listeners must be loopback (``local_target``); on TCP the assertion is the only guard, which
is why it is checked on every transport.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from ztagent.addresses import local_target
from ztagent.errors import ConfigError, TransportError
from ztagent.tokens.assertion import AssertedIdentity, AssertionVerifier

log = logging.getLogger("ztagent.workloads")

SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660
_UMASK_LOCK = threading.Lock()


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """``--trust-key`` and ``--socket-group``: who a workload accepts calls from."""
    p.add_argument(
        "--trust-key",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="public key (or certificate) whose identity assertions are accepted: the "
        "sidecar's assertion.pub (<posture.state_dir>/assertion.pub); repeat for several; "
        "required behind a sidecar",
    )
    p.add_argument(
        "--socket-group",
        help="unix socket mode 0660 owned by this group (the sidecar's user must be in it); "
        "default 0600: the sidecar runs as the same user",
    )


def trust_verifier(keys: Sequence[Path]) -> AssertionVerifier:
    """The verifier for ``--trust-key`` files (PEM public keys or certificates of the
    signers whose assertions this workload accepts); ``ConfigError`` with none."""
    if not keys:
        raise ConfigError(
            "trust_key",
            "no --trust-key given (expected the sidecar's assertion.pub, e.g. "
            "var/state/assertion.pub): without it every call would be refused",
        )
    verifier = AssertionVerifier(list(keys))
    log.info("accepting identity assertions signed by: %s", verifier.trusted())
    return verifier


def caller(
    verifier: AssertionVerifier, context: grpc.aio.ServicerContext | Any, method: str
) -> AssertedIdentity:
    """The verified identity of this call (``method`` is ``/package.Service/Method``)."""
    return verifier.verify(context.invocation_metadata(), method)


def bind_local(server: Any, listen: str, *, group: str | None = None) -> int:
    """Bind ``server`` (``grpc.server`` or ``grpc.aio.server``) to a local address: the port
    for loopback TCP, 0 for a unix socket created 0600 (0660 and owned by ``group``)."""
    address = local_target(listen, "listen")
    unix = address.startswith("unix:")
    gid = _group_id(group) if group is not None else None
    mode = GROUP_SOCKET_MODE if gid is not None else SOCKET_MODE
    try:
        if unix:
            path = Path(address.removeprefix("unix:"))
            with _UMASK_LOCK:
                previous = os.umask(0o777 & ~mode)
                try:
                    server.add_insecure_port(address)
                finally:
                    os.umask(previous)
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, mode)
            return 0
        return int(server.add_insecure_port(address))
    except RuntimeError as exc:
        raise TransportError("listen_failed", f"cannot bind {address}: {exc}") from None
    except OSError as exc:
        raise TransportError("listen_failed", f"{address}: {exc.strerror or exc}") from None


def _group_id(group: str) -> int:
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("socket_group", f"no group {group!r} on this system") from None
