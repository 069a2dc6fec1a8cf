"""The addresses a daemon listens on and advertises: TCP multiaddrs, checked at the door.

``p2pfed init`` and start-up (``Config.validate``) refuse anything py-libp2p's TCP transport
would fail on later with a long traceback (``127.0.0.1:4001``, a port over 65535, UDP).
"""

from __future__ import annotations

import socket

from gossip.errors import ConfigError

_LISTEN_HOSTS = ("ip4", "ip6")
_ANNOUNCE_HOSTS = ("ip4", "ip6", "dns", "dns4", "dns6")


def check_multiaddr(addr: str, where: str, *, announce: bool) -> None:
    """ConfigError unless ``addr`` is a TCP multiaddr the daemon can listen on (``/ip4/A/tcp/P``
    or ``/ip6/A/tcp/P``) or, for ``announce``, advertise (also ``/dns*/NAME/tcp/P``, with an
    optional ``/p2p/ID``)."""
    from multiaddr import Multiaddr

    example = "e.g. /ip4/0.0.0.0/tcp/4001"
    try:
        names = [p.name for p in Multiaddr(addr).protocols()]
    except Exception as exc:  # py-multiaddr's parse errors have no common base
        reason = str(exc).split(" (string:")[0]
        raise ConfigError(f"{where}: {addr!r} is not a multiaddr ({reason}); {example}") from None
    hosts = _ANNOUNCE_HOSTS if announce else _LISTEN_HOSTS
    tail = names[2:]
    if len(names) < 2 or names[0] not in hosts or names[1] != "tcp" \
            or tail not in ([], ["p2p"] if announce else []):
        raise ConfigError(f"{where}: {addr!r} is not a TCP address this daemon can "
                          f"{'advertise' if announce else 'listen on'}: "
                          f"/{'|'.join(hosts)}/<host>/tcp/<port>; {example}")


def tcp_endpoint(addr: str) -> tuple[str, int, socket.AddressFamily] | None:
    """(host, port, family) of an ``/ip4/…/tcp/…`` or ``/ip6/…/tcp/…`` address, else None."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] or parts[1] not in _LISTEN_HOSTS or parts[3] != "tcp" \
            or not parts[4].isdigit():
        return None
    family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
    return parts[2], int(parts[4]), family
