"""The kernel's traffic, direct: a node's agent exposes each session kernel's ZMQ channels (Unix
sockets in the session's folder; the container keeps ``--network none``) to the server over TCP, and
the server's side is an ordinary Jupyter kernel client. No Ray call sits on a cell's path.

The trust boundary does not widen: every port is a CurveZMQ server (encrypted, and authenticated
by ZAP) that accepts only the server's public key, from the server's address; the client side
accepts only the node's key. Only public keys cross, through Ray (itself on token authentication
and TLS, docs/scaling.md); secret keys never leave the process that made them. The ports are bound
on the node's cluster address only, taken from the node's range (``JUPYBOX_RELAY_PORTS``, default
``RELAY_PORTS``), and closed when the session ends. A host that runs no cluster opens none.

The messages pass as they are: the kernel's HMAC key (which the server holds, as for a local kernel)
signs them end to end, so a message the relay could alter or forge without the key is dropped by
the kernel or by the client. Shell, control and stdin go through a ROUTER (the server's side) and a
DEALER (the kernel's side): the kernel replies to the identities it was sent, which route the reply
back. Stdin's DEALER carries the shell's identity, since the kernel sends input requests to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85

from ..errors import SandboxError

log = logging.getLogger(__name__)

RELAY_PORTS = (47000, 47999)  # a node's default range; four ports per session
CHANNELS = ("shell", "control", "stdin", "iopub")  # no heartbeat: liveness is the agent's to tell
MAX_MESSAGE_BYTES = 16 << 20  # as a local client's (``sandbox.kernel``)
POLL_MS = 100  # how soon a relay's thread sees that it should stop


@dataclass(frozen=True)
class KeyPair:
    """A CurveZMQ key pair, Z85-encoded."""

    public: bytes
    secret: bytes

    @staticmethod
    def new() -> KeyPair:
        public, secret = zmq.curve_keypair()
        return KeyPair(public, secret)


@dataclass(frozen=True)
class CurveClient:
    """What a client needs to reach a node's relay: its own pair, and the node's public key."""

    keys: KeyPair
    server_key: bytes


def port_range() -> tuple[int, int]:
    """This node's relay ports: ``JUPYBOX_RELAY_PORTS`` as ``LOW-HIGH``, else ``RELAY_PORTS``."""
    raw = os.environ.get("JUPYBOX_RELAY_PORTS")
    if not raw:
        return RELAY_PORTS
    low, _, high = raw.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise SandboxError(f"JUPYBOX_RELAY_PORTS={raw!r}: give a range as LOW-HIGH, e.g. 47000-47999") from None
    if not 1024 <= lo <= hi <= 65535:
        raise SandboxError(f"JUPYBOX_RELAY_PORTS={raw!r}: a range within 1024-65535, LOW first")
    return lo, hi


ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks who may connect (RFC 27)


class AllowList:
    """The node's ZAP handler (RFC 27), on its relays' context: a CURVE client is admitted only
    with the server's public key, from the server's address; every other handshake is refused
    before a single message passes. Counts what it refused."""

    def __init__(self, context: zmq.asyncio.Context, key: bytes, address: str) -> None:
        self.key = z85.decode(key)
        self.address = address
        self.refused = 0
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self._task = asyncio.get_running_loop().create_task(self._serve())

    def admits(self, address: str, mechanism: bytes, credentials: list[bytes]) -> bool:
        return (mechanism == b"CURVE" and len(credentials) == 1 and address == self.address
                and secrets.compare_digest(credentials[0], self.key))

    async def _serve(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            version, request_id = frames[0], frames[1] if len(frames) > 1 else b""
            try:
                address, mechanism, credentials = frames[3].decode(), frames[5], frames[6:]
                ok = version == b"1.0" and self.admits(address, mechanism, credentials)
            except (IndexError, UnicodeDecodeError):
                ok = False
            self.refused += not ok
            if not ok:
                log.info("relay: refused a connection from %s", frames[3][:64] if len(frames) > 3 else "?")
            await self._socket.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                               b"OK" if ok else b"not the server", b"", b""])

    def close(self) -> None:
        self._task.cancel()
        self._socket.close(linger=0)


class NodeRelays:
    """All of a node's relays, on one ZMQ context whose ZAP handler admits only the server."""

    def __init__(self, address: str, keys: KeyPair, server_key: bytes, server_address: str) -> None:
        self.address = address  # the node's cluster address: nothing is bound elsewhere
        self.keys = keys
        self.ports = port_range()
        self.context = zmq.Context()  # the relays' sockets, each used by its relay's thread only
        self.context.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # ZAP is answered in the agent's event loop, on the same context
        zap_context = zmq.asyncio.Context.shadow(self.context)
        self.allow_list = AllowList(zap_context, server_key, server_address)  # before any relay binds
        self._taken: set[int] = set()
        self.relays: dict[str, SessionRelay] = {}

    def take_port(self, sock: zmq.Socket) -> int:
        """Bind ``sock`` on the first free port of the range."""
        lo, hi = self.ports
        for port in range(lo, hi + 1):
            if port in self._taken:
                continue
            try:
                sock.bind(f"tcp://{self.address}:{port}")
            except zmq.ZMQError:  # in use by something else on the host
                continue
            self._taken.add(port)
            return port
        raise SandboxError(f"no free port left in this node's relay range {lo}-{hi}: "
                           "widen JUPYBOX_RELAY_PORTS or lower the node's slots")

    def give_back(self, ports: list[int]) -> None:
        self._taken.difference_update(ports)

    async def open(self, sid: str, connection: dict[str, Any]) -> dict[str, Any]:
        """(Re)open the relay of session ``sid`` to the kernel at ``connection`` (its ipc
        connection info, key included); returns what the server connects to."""
        self.close(sid)
        relay = SessionRelay(self, connection)
        self.relays[sid] = relay
        return relay.start()

    def close(self, sid: str) -> None:
        relay = self.relays.pop(sid, None)
        if relay is not None:
            relay.close()

    def shutdown(self) -> None:
        for sid in list(self.relays):
            self.close(sid)
        self.allow_list.close()
        self.context.destroy(linger=0)


class SessionRelay:
    """One session's four channels, kernel (ipc) to server (TCP, CurveZMQ), in a thread of its
    own: a message crosses without waiting for the agent's event loop (busy with Ray's calls)."""

    def __init__(self, node: NodeRelays, connection: dict[str, Any]) -> None:
        self.node = node
        self.connection = connection
        self.ports: dict[str, int] = {}
        self._pairs: dict[zmq.Socket, zmq.Socket] = {}
        self._sockets: list[zmq.Socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.node.context.socket(kind)
        sock.linger = 0
        self._sockets.append(sock)
        return sock

    def start(self) -> dict[str, Any]:
        info = self.connection
        identity = f"jupybox-relay-{secrets.token_hex(8)}".encode()  # shell's, and stdin's
        try:
            for name in CHANNELS:
                front = self._socket(zmq.XPUB if name == "iopub" else zmq.ROUTER)
                front.curve_secretkey = self.node.keys.secret
                front.curve_publickey = self.node.keys.public
                front.curve_server = True
                if name != "iopub":
                    front.router_mandatory = False  # a reply to a client that left is dropped
                self.ports[name] = self.node.take_port(front)
                back = self._socket(zmq.XSUB if name == "iopub" else zmq.DEALER)
                if name in ("shell", "stdin"):
                    back.identity = identity
                back.connect(f"{info['transport']}://{info['ip']}-{info[f'{name}_port']}")
                self._pairs[front], self._pairs[back] = back, front
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._run, name="jupybox-relay", daemon=True)
        self._thread.start()  # from here on, only that thread touches the sockets
        return {"transport": "tcp", "ip": self.node.address, "key": info["key"],
                "signature_scheme": info.get("signature_scheme", "hmac-sha256"),
                "server_key": self.node.keys.public.decode(), "hb_port": 0,
                **{f"{name}_port": port for name, port in self.ports.items()}}

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self._pairs:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(POLL_MS):
                    frames = sock.recv_multipart(copy=False)
                    try:  # never blocks: a message for a peer that is not there is dropped
                        self._pairs[sock].send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        log.debug("relay: dropped a message with no peer to take it")
        except zmq.ZMQError:  # the context ended under us
            log.debug("relay ended", exc_info=True)
        finally:
            for sock in self._sockets:
                sock.close(linger=0)

    def close(self) -> None:
        """Stop relaying and close every port (idempotent); the thread closes its sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * POLL_MS / 1000 + 1)
            self._thread = None
        else:
            for sock in self._sockets:
                sock.close(linger=0)
        self._sockets.clear()
        self.node.give_back(list(self.ports.values()))
        self.ports.clear()
