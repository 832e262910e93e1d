"""The systemd notify protocol (sd_notify(3)), implemented directly.

One datagram per call to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a
leading ``@`` names the abstract namespace.  Without ``$NOTIFY_SOCKET`` (not
run by systemd) every call is a no-op.
"""

import os
import socket
from collections.abc import Mapping


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send *state* (e.g. "READY=1\\nSTATUS=...") to systemd; False when not under systemd.

    A send failure raises OSError: the caller decides whether it matters.
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        raise OSError(f"NOTIFY_SOCKET must be a path or @abstract name, got {address!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(1.0)
        sock.sendto(state.encode(), address)
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between required WATCHDOG=1 pings, or None when no watchdog is set for us."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
