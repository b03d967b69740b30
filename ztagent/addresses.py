"""The one parser of ztagent's addresses: listeners, upstreams, the metrics and health ports.

Two shapes, as gRPC spells them:

- ``unix:/abs/path`` or ``unix:///abs/path`` (both bind ``unix:/abs/path``), and
  ``unix:relative/path`` (resolved against a base directory when one is given); ``unix://x``
  is refused: in gRPC's syntax the part after ``//`` is an authority, not a path.
- ``HOST:PORT`` with an IPv4 address, a bracketed IPv6 address (``[::1]:50061``) or a host
  name; port 0-65535 (0: pick a free one).

``parse_address`` accepts any host (a sidecar may listen on a node address);
``parse_local_address`` only ``localhost``, a loopback IP or a unix socket: what a workload and
a route upstream must be, since the workload trusts whoever reaches it to be the sidecar.
Errors are ``AddressError`` (code ``address_invalid``) saying what was received and what was
expected; the configuration wraps them with the key's name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ztagent.errors import ConfigError, ZtagentError

EXPECTED_LOCAL = "expected 'unix:/path/to.sock' or a loopback HOST:PORT such as 127.0.0.1:50061"
EXPECTED_ANY = "expected host:port, [ipv6]:port or unix:/path"
_HOST_NAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


class AddressError(ZtagentError):
    """An address that cannot be used (code ``address_invalid``)."""

    status_name = "INVALID_ARGUMENT"

    def __init__(self, text: str, why: str, expected: str) -> None:
        super().__init__("address_invalid", f"got {text!r} ({why}); {expected}")
        self.received = text
        self.why = why


@dataclass(frozen=True)
class Address:
    """A parsed address: a unix socket ``path``, or ``host`` and ``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def target(self) -> str:
        """The form gRPC binds and dials: ``unix:/path``, ``host:port`` or ``[v6]:port``."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_address(text: str, *, base: Path | None = None, local: bool = False) -> Address:
    """Parse ``text``; with ``local``, refuse anything but a unix socket or a loopback host.
    A relative unix path is resolved against ``base`` when given."""
    expected = EXPECTED_LOCAL if local else EXPECTED_ANY

    def bad(why: str) -> AddressError:
        return AddressError(text, why, expected)

    if "\x00" in text or not text.strip() or text != text.strip():
        raise bad("empty, blank-padded or NUL")
    if text.startswith("unix:"):
        rest = text.removeprefix("unix:")
        if rest.startswith("//"):
            if not rest.startswith("///"):
                raise bad("unix:// needs an absolute path, as in unix:///run/storage.sock")
            rest = rest[2:]
        if not rest:
            raise bad("no socket path")
        if base is not None and not rest.startswith("/"):
            rest = str(base / rest)
        return Address(path=rest)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise bad("no host")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise bad(f"port {port_text!r} is not 0-65535")
    port = int(port_text)
    if host.lower() == "localhost":
        return Address(host="localhost", port=port)
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        if local:
            raise bad(f"host {host!r} is neither localhost nor an IP address") from None
        if bracketed or not _HOST_NAME.fullmatch(host):
            raise bad(f"host {host!r} is not an IP address or a host name") from None
        return Address(host=host, port=port)
    if ip.version == 6 and not bracketed:
        raise bad("an IPv6 host needs brackets, as in [::1]:50061")
    if local and not ip.is_loopback:
        raise bad(f"{ip} is not a loopback address")
    return Address(host=str(ip), port=port)


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    """``host, port`` of a TCP address; ``ConfigError`` naming ``key`` otherwise."""
    try:
        address = parse_address(text)
    except AddressError as err:
        raise ConfigError(key, err.message) from None
    if address.host is None or address.port is None:
        raise ConfigError(key, f"got {text!r} (a unix socket); expected host:port")
    return address.host, address.port


def local_target(text: str, key: str, base: Path | None = None) -> str:
    """The gRPC target of a local (unix or loopback) address; ``ConfigError`` naming ``key``."""
    try:
        return parse_address(text, base=base, local=True).target
    except AddressError as err:
        raise ConfigError(key, err.message) from None


def check_bundle_url(url: str, key: str = "policy.bundle_url") -> None:
    """``https://...``, or ``http://`` to a loopback host (a bundle server on the node);
    ``ConfigError`` naming ``key`` otherwise."""
    if url.startswith("https://"):
        return
    if url.startswith("http://"):
        host = url.removeprefix("http://").split("/", 1)[0]
        try:
            if parse_address(host, local=True).host is not None:
                return
        except AddressError:
            pass
        raise ConfigError(key, f"{url!r}: plain http is allowed only to a loopback host")
    raise ConfigError(key, f"{url!r} (expected an https:// URL)")
