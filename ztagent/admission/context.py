"""Who the current call was admitted for, inside the process that admitted it.

In proxyless mode (``ztagent.sidecar.proxyless``) the admission core runs in the workload's
own process; the interceptor sets the verdict's ``Admitted`` here for the duration of the
handler, and handlers read it with ``admitted()`` — never from headers.
"""

from __future__ import annotations

import contextvars

from ztagent.admission.core import Admitted

_ADMITTED: contextvars.ContextVar[Admitted | None] = contextvars.ContextVar(
    "ztagent_admitted", default=None
)


class NotAdmittedError(RuntimeError):
    """``admitted()`` outside a call the interceptor admitted (a programming error)."""


def admitted() -> Admitted:
    """The device, user, decision id and method admission verified for the current call."""
    value = _ADMITTED.get()
    if value is None:
        raise NotAdmittedError("no admitted call here: is the handler served by protected_server?")
    return value


def set_admitted(value: Admitted | None) -> contextvars.Token[Admitted | None]:
    return _ADMITTED.set(value)


def reset_admitted(token: contextvars.Token[Admitted | None]) -> None:
    _ADMITTED.reset(token)
