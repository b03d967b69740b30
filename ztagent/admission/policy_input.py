"""Builds the policy input document (DESIGN.md, published as policies/input.schema.json).

Pure: values in, a JSON-ready dict out. Credentials never enter the document. The device,
posture and user documents are put in as they are, not copied: admission builds them once
per certificate, attestation and token and shares them, read-only, between the requests
(and the decision-log records) that use them.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ztagent import __version__
from ztagent.admission.headers import MAX_HEADER_VALUE_CHARS, InputHeaders
from ztagent.config import IDENT, SERVICE_NAME
from ztagent.posture import unverified_posture
from ztagent.timefmt import rfc3339

__all__ = ["build_input", "request_metadata", "split_method", "unverified_posture"]


DEFAULT_HEADERS = InputHeaders()


def request_metadata(
    metadata: Sequence[tuple[str, str | bytes]] | None,
    allowed: InputHeaders = DEFAULT_HEADERS,
) -> dict[str, str]:
    """The allow-listed client metadata for the policy: lowercase keys, repeated keys joined
    with ',', binary (-bin) values base64-encoded, each value cut to
    ``MAX_HEADER_VALUE_CHARS``. Nothing else is copied (``admission.headers``)."""
    names = allowed.names
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if key not in names:
            continue
        text = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        joined = f"{out[key]},{text}" if key in out else text
        out[key] = joined[:MAX_HEADER_VALUE_CHARS]
    return out


_METHOD_NAME = re.compile(rf"/({SERVICE_NAME})/({IDENT})")
"""A gRPC path as protobuf names it: ``/`` a dotted service name ``/`` a method name."""


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Svc/Method' -> ('pkg.Svc', 'Method'); ('', '') for anything that is not a
    protobuf service and method name (control characters, spaces, empty parts), so such a
    call names no service and is refused ``no_route``."""
    match = _METHOD_NAME.fullmatch(full_method)
    if match is None:
        return "", ""
    return match[1], match[2]


def build_input(
    *,
    device: Mapping[str, Any],
    posture: Mapping[str, Any],
    user: Mapping[str, Any],
    full_method: str,
    metadata: Mapping[str, str],
    peer: str,
    now: datetime,
    node: str,
) -> dict[str, Any]:
    service, method = split_method(full_method)
    return {
        "device": device,
        "posture": posture,
        "user": user,
        "request": {
            "service": service,
            "method": method,
            "full_method": full_method,
            "metadata": metadata,
            "peer": peer,
        },
        "context": {"time": rfc3339(now, digits=3), "node": node, "agent_version": __version__},
    }
