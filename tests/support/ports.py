"""Free loopback ports for servers the tests start."""

from __future__ import annotations

import socket


def bound_socket() -> socket.socket:
    """A socket bound to a free port on 127.0.0.1, for a server to listen on: the port stays taken
    between choosing it and serving on it, so no other test can grab it in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    """A loopback port free right now, for a server started as another process (which must bind
    it itself: another process could take it first, which is rare enough on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
