"""Listen addresses checked before the host binds them.

py-libp2p binds its TCP listener with ``SO_REUSEPORT``, so a second daemon configured with the
same port starts normally and the kernel splits incoming connections between the two peer ids.
Before the host starts, each listen address with a fixed port is bound once by a plain socket
(``SO_REUSEADDR`` only, so a restart is not refused for connections still in TIME_WAIT): the
kernel refuses it while any socket listens there, and :class:`PortInUseError` says so.  A
daemon that starts in the instant between another's check and its bind is not caught.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from gossip.errors import ConfigError, LocalError
from p2pfed.multiaddrs import tcp_endpoint

__all__ = ["PortInUseError", "check_listen_addresses"]


class PortInUseError(LocalError):
    """Another program (say, another p2pfed daemon) listens on a configured port."""

    code = "port-in-use"


def check_listen_addresses(addrs: Iterable[str]) -> None:
    """Raise PortInUseError or ConfigError unless every fixed TCP listen port can be bound."""
    for addr in addrs:
        endpoint = tcp_endpoint(addr)
        if endpoint is None or endpoint[1] == 0:
            continue
        host, port, family = endpoint
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            raise _bind_error(addr, host, port, exc) from exc


def _bind_error(addr: str, host: str, port: int, exc: OSError) -> LocalError:
    if exc.errno == errno.EADDRINUSE:
        return PortInUseError(
            f"cannot listen on {addr}: port {port} is in use (another p2pfed daemon, or another "
            f"program: 'ss -ltnp sport = :{port}' names it); stop it or change node.listen")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"cannot listen on {addr}: {host} is not an address of this machine "
                           "(node.listen)")
    if exc.errno == errno.EAFNOSUPPORT:
        return ConfigError(f"cannot listen on {addr}: this machine has no "
                           f"{'IPv6' if ':' in host else 'IPv4'} (node.listen)")
    if exc.errno == errno.EACCES:
        return ConfigError(f"cannot listen on {addr}: ports below 1024 need privileges "
                           "(node.listen)")
    return ConfigError(f"cannot listen on {addr}: {exc.strerror}")
