"""Browser safety: which requests a web page may make to this daemon.

The API runs commands on the cluster, so a page of another site must not be
able to use it through a browser that can reach the daemon (on the head node,
or through an SSH tunnel). Three checks, run before any route:

* ``Host`` must be one of the daemon's own names (DNS rebinding sends a name
  the attacker controls);
* an ``Origin`` header, when present, must be the daemon's own origin or listed
  in ``server.allowed_origins`` (a cross-site ``fetch``/form sends its origin);
* a non-empty body must be ``application/json``: the only types a page of
  another origin can send without a CORS preflight are form and text types.  The
  routes declared ``form=True`` (the two MLBench POSTs, whose client sends forms) also
  take ``application/x-www-form-urlencoded`` and ``multipart/form-data``; the ``Origin``
  rule above is what keeps other sites' forms out of them (a browser always sends
  ``Origin`` with a cross-site POST).

No CORS header is ever sent, so browsers keep cross-origin reads blocked.
Every function here is pure; ``api.make_app`` maps a refusal to JSON 403/415.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # config imports this module: its settings type only
    from mlbench_daemon import config

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^\s:\[\]/@]+))(?::(?P<port>[0-9]{1,5}))?"
)


def split_host(text: str) -> tuple[str, int | None] | None:
    """'name', 'name:port', '[::1]:port' -> (lower name, port or None); None if malformed."""
    m = _HOST.fullmatch(text.strip())
    if not m:
        return None
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        return None
    if m.group("v6"):
        try:
            return str(ipaddress.IPv6Address(m.group("v6"))), port
        except ValueError:
            return None
    name = m.group("name").lower().rstrip(".")
    return (name, port) if name else None


def normalise_origin(text: str) -> tuple[str, str, int] | None:
    """'https://Name:443' -> ('https', 'name', 443); None for 'null' or anything not an origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if parts.username is not None or not parts.hostname:
        return None
    return scheme, parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[scheme]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_json(content_type: str) -> bool:
    """True for 'application/json', any case, with or without parameters."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def body_type_ok(content_type: str, form_allowed: bool) -> bool:
    """Whether a non-empty body of *content_type* may reach a route: JSON always, a form
    only on a route that takes forms (*form_allowed*)."""
    if is_json(content_type):
        return True
    return form_allowed and content_type.split(";", 1)[0].strip().lower() in FORM_TYPES


@dataclasses.dataclass(frozen=True)
class Policy:
    """The daemon's own names and the origins it lets in, from the [server] settings."""

    bind: str = "127.0.0.1"
    allowed_hosts: tuple[tuple[str, int | None], ...] = ()
    allowed_origins: frozenset[tuple[str, str, int]] = frozenset()
    public_metrics: bool = False
    hostname: str = ""  # this machine's name, accepted on a wildcard bind

    @classmethod
    def from_config(cls, server: config.Server) -> Policy:
        return cls(
            bind=server.host.strip().strip("[]").lower(),
            allowed_hosts=tuple(filter(None, map(split_host, server.allowed_hosts))),
            allowed_origins=frozenset(filter(None, map(normalise_origin, server.allowed_origins))),
            public_metrics=server.public_metrics,
            hostname=socket.gethostname().lower(),
        )

    def host_allowed(self, host_header: str | None, port: int) -> bool:
        """Is ``Host`` one of our names? ``port`` is the port the request came in on."""
        parsed = split_host(host_header or "")
        if parsed is None:
            return False
        name, given = parsed
        for allowed, allowed_port in self.allowed_hosts:
            if name == allowed and allowed_port in (None, given):
                return True
        if is_loopback(self.bind) and name in LOOPBACK_NAMES:
            return True  # any port: an SSH tunnel's local end may use another one
        same_port = given == port or (given is None and port == 80)
        if name == self.bind:
            return same_port
        if self.bind in ("0.0.0.0", "::"):
            # All interfaces: any address (a rebinding attack needs a name) or our hostname.
            return same_port and (_is_ip(name) or name == self.hostname)
        return False

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """No Origin (not a cross-site browser request), our own origin, or a listed one."""
        if origin is None:
            return True
        parsed = normalise_origin(origin)
        if parsed is None:
            return False
        if parsed in self.allowed_origins:
            return True
        own = split_host(host_header or "")
        if own is None:
            return False
        scheme, name, port = parsed
        return name == own[0] and port == (own[1] or DEFAULT_PORTS[scheme])
