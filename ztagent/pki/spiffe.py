"""SPIFFE IDs and device ids, parsed once and validated on construction.

Follows py-spiffe's ``SpiffeId``: scheme ``spiffe``, a lowercase trust domain of
``[a-z0-9._-]``, a path of non-empty segments of ``[A-Za-z0-9._-]`` without ``.``/``..``,
and no query, fragment, port or userinfo. Every bad shape has its own message; all raise
``CertError('spiffe_id_invalid')``. Device ids live at ``/device/<id>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ztagent.pki.errors import CertError

SCHEME_PREFIX = "spiffe://"
MAX_SPIFFE_ID_LEN = 2048
MAX_TRUST_DOMAIN_LEN = 255
DEVICE_PATH_PREFIX = "/device/"

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _invalid(message: str) -> CertError:
    return CertError("spiffe_id_invalid", message)


def _check_trust_domain(trust_domain: str) -> str:
    """``trust_domain`` if it is a valid SPIFFE trust domain name, else ``CertError``."""
    if not trust_domain:
        raise _invalid("trust domain is missing (expected e.g. 'ztagent.dev')")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LEN:
        raise _invalid(
            f"trust domain is {len(trust_domain)} characters (expected at most "
            f"{MAX_TRUST_DOMAIN_LEN})"
        )
    if trust_domain != trust_domain.lower() and _TRUST_DOMAIN_RE.fullmatch(trust_domain.lower()):
        raise _invalid(f"trust domain {trust_domain!r} must be lowercase")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise _invalid(
            f"trust domain {trust_domain!r} has characters outside [a-z0-9._-] "
            "(lowercase letters, digits, dots, dashes, underscores)"
        )
    return trust_domain


def validate_path(path: str) -> str:
    """Return ``path`` if it is a valid SPIFFE ID path ('' or '/seg/seg...'), else raise."""
    if path == "":
        return path
    if not path.startswith("/"):
        raise _invalid(f"path {path!r} must start with '/'")
    if path.endswith("/"):
        raise _invalid(f"path {path!r} must not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise _invalid(f"path {path!r} has an empty segment")
        if segment in (".", ".."):
            raise _invalid(f"path {path!r} has a dot segment {segment!r}")
        if not _SEGMENT_RE.fullmatch(segment):
            raise _invalid(f"path segment {segment!r} has characters outside [A-Za-z0-9._-]")
    return path


class TrustDomain(str):
    """A valid SPIFFE trust domain name (lowercase ``[a-z0-9._-]``, at most 255 characters).

    Constructing one validates it (``CertError('spiffe_id_invalid')`` naming the bad part), so
    holding one proves validity; it is a ``str``, so it goes wherever the name did. Parse it
    once, at the edge (config, CLI flag, CA state), and pass the value inward."""

    __slots__ = ()

    def __new__(cls, name: str) -> TrustDomain:
        if type(name) is cls:
            return name  # already checked
        return super().__new__(cls, _check_trust_domain(str(name)))


class DeviceId(str):
    """A valid device id: 1-128 characters of ``[A-Za-z0-9._-]``, not ``.`` or ``..`` (the
    last segment of ``spiffe://<trust domain>/device/<id>``, a storage namespace, a file name
    under the CA's ``devices/``). Constructing one validates it
    (``CertError('spiffe_id_not_device')``); it is a ``str``."""

    __slots__ = ()

    def __new__(cls, value: str) -> DeviceId:
        if type(value) is cls:
            return value  # already checked
        text = str(value)
        if not _DEVICE_ID_RE.fullmatch(text) or text in (".", ".."):
            raise CertError(
                "spiffe_id_not_device",
                f"device id {text[:140]!r} is not 1-128 characters of [A-Za-z0-9._-] "
                "(and not '.' or '..')",
            )
        return super().__new__(cls, text)

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        """``spiffe://<trust_domain>/device/<this id>``."""
        return SpiffeId(TrustDomain(trust_domain), DEVICE_PATH_PREFIX + self)


@dataclass(frozen=True)
class SpiffeId:
    """A valid SPIFFE ID; constructing one validates it, so holding one proves validity."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "trust_domain", TrustDomain(self.trust_domain))
        validate_path(self.path)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain><path>``; raise ``CertError`` naming the bad part."""
        if not uri:
            raise _invalid("SPIFFE ID is empty (expected 'spiffe://<trust-domain>/<path>')")
        if len(uri) > MAX_SPIFFE_ID_LEN:
            raise _invalid(
                f"SPIFFE ID is {len(uri)} characters (expected at most {MAX_SPIFFE_ID_LEN})"
            )
        if not uri.startswith(SCHEME_PREFIX):
            scheme = uri.split(":", 1)[0] if ":" in uri else ""
            raise _invalid(f"scheme of {uri!r} is {scheme!r} (expected 'spiffe' followed by '://')")
        rest = uri[len(SCHEME_PREFIX) :]
        if "?" in rest:
            raise _invalid(f"SPIFFE ID {uri!r} must not have a query")
        if "#" in rest:
            raise _invalid(f"SPIFFE ID {uri!r} must not have a fragment")
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            raise _invalid(f"SPIFFE ID {uri!r} must not have userinfo")
        if ":" in authority:
            raise _invalid(f"SPIFFE ID {uri!r} must not have a port")
        return cls(authority, slash + path)

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"


def device_spiffe_id(trust_domain: str, device_id: str) -> str:
    """The SPIFFE ID of a device: ``spiffe://<trust_domain>/device/<device_id>``."""
    return str(DeviceId(device_id).spiffe_id(trust_domain))


def parse_device_id(spiffe: SpiffeId) -> DeviceId:
    """The device id of a ``/device/<id>`` SPIFFE ID; ``CertError('spiffe_id_not_device')``."""
    path = spiffe.path
    if not path.startswith(DEVICE_PATH_PREFIX) or "/" in path[len(DEVICE_PATH_PREFIX) :]:
        raise CertError(
            "spiffe_id_not_device",
            f"SPIFFE ID path is {path or '(empty)'!r} (expected exactly '/device/<id>')",
        )
    return DeviceId(path[len(DEVICE_PATH_PREFIX) :])
