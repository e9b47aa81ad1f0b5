"""Raw Jupyter messages between one outside client (a notebook front end) and a session's kernel.

JupyterLab, Notebook and VS Code speak the Jupyter messaging protocol themselves: they need the
kernel's messages as they are, not an ``Execution``. A ``KernelRelay`` passes them through without
trusting either side:

* a client's frame goes through one path, ``send_frame``: its size is checked, it is decoded in the
  connection's wire format (``sandbox/kernel_wire.py``: its parts must be strict JSON objects), its
  channel and header fields are checked, and it is signed here with the kernel's key, which the
  client never learns; a relay reaches its own session's kernel only;
* a kernel's message is verified (signature), parsed, and bounded: ZMQ refuses huge frames, this
  module drops messages over ``max_kernel_message``, and output past the session's budget for one
  request is dropped with a note, on top of the caps the kernel applies before sending;
* each relay has its own ZMQ sockets, so a notebook and the JSON API can share a kernel without
  taking each other's replies. A relay lives as long as the kernel it was attached to: when the
  session replaces the kernel (restart, timeout, death) or closes, ``receive`` returns ``None`` and
  the client reconnects to the new kernel, as Jupyter clients do after a restart.

A relay never decides that a kernel is dead nor restarts one: the session's ``KernelSupervisor``
(``sandbox/supervisor.py``) watches the kernel and replaces it. The relay sees its session only as
a ``RelayOwner``; ``Session.attach()`` creates relays, nothing else should.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
import weakref
from collections import OrderedDict
from typing import Any, Literal, Protocol

import zmq
import zmq.asyncio

from .config import KernelWatch, Limits
from .errors import KernelMessageRefused, KernelMessageTooLarge, SandboxError
from .kernel import MAX_MESSAGE_BYTES, _bounded_context
from .kernel_wire import MAX_BUFFERS, KernelMessage, WireError, WireFormat, decode, dumps, encode_v1, loads_object
from .packages import take_pip_requests

log = logging.getLogger(__name__)

DELIMITER = b"<IDS|MSG>"
CLIENT_CHANNELS = ("shell", "control", "stdin")
OUTPUT_TYPES = frozenset({"stream", "error", "display_data", "execute_result", "update_display_data"})
MAX_CLIENT_MESSAGE_BYTES = 8 << 20  # a cell, a comm message with its buffers: far below this
MAX_ID_CHARS = 256
NUDGE_PREFIX = "jupybox-nudge-"  # the ids of the relays' own requests: their answers are never forwarded
QUEUE_MESSAGES = 64  # kernel messages held for a slow client; past it ZMQ's own small queues fill
QUEUE_BYTES = 16 << 20  # ... and their bytes: one largest message (MAX_MESSAGE_BYTES) fits
RECEIVE_HWM = 2  # kernel messages ZMQ itself holds for a relay whose queue is full
# relays (4 ZMQ sockets each) a session, and the whole process, may hold: far under the context's
# MAX_SOCKETS, so sessions' own clients always find sockets (the reserve)
MAX_RELAYS_PER_SESSION = 16
MAX_RELAYS = 512
EndCause = Literal["client", "restart", "close", "failure"]  # who ended a relay
_live: weakref.WeakSet[KernelRelay] = weakref.WeakSet()  # relays of this process not ended yet


def open_relays() -> int:
    """Relays of this process that have not ended (what ``MAX_RELAYS`` bounds)."""
    return sum(1 for relay in list(_live) if not relay.closed)


class RelayOwner(Protocol):
    """What a relay needs of its session, and all it may use."""

    id: str  # for the log

    def touch(self) -> None:
        """A client's request or the kernel's output: the session is in use."""

    def detach(self, relay: KernelRelay) -> None:
        """The relay ended: the session forgets it."""

    def replace_kernel(self, generation: int, what: str, reason: str) -> None:
        """Kernel ``generation`` outlived a client's shutdown request: replace it (once, however
        many ask); ``what`` goes to the log, ``reason`` to the clients, who are ended."""

    def pip_request(self, request: Any) -> None:
        """The kernel asked for packages (``sandbox.packages``; the same request may come through
        every relay of the kernel): install them. The message is not passed on."""


class RelayBudget:
    """The session's output budget applied to relayed output, per request.

    Output whose parent is an execute request this relay sent is charged to that request; other
    output (a hostile kernel inventing parents, threads printing later) to one shared bucket that
    each new execute request refills. Past the budget, output is dropped and counted.
    """

    def __init__(self, limits: Limits) -> None:
        self.text_limit = 2 * limits.output_bytes + 4096  # the kernel keeps head + tail + a note
        self.rich_limit = limits.max_images * (limits.max_image_bytes * 4 // 3 + 4) + 2 * limits.output_bytes
        self._requests: OrderedDict[str, list[int]] = OrderedDict()  # msg_id -> [text, rich] used
        self._shared = [0, 0]
        self.dropped = 0

    def new_request(self, msg_id: str) -> None:
        self._requests[msg_id] = [0, 0]
        while len(self._requests) > 256:
            self._requests.popitem(last=False)
        self._shared = [0, 0]

    def admit(self, msg: KernelMessage) -> tuple[bool, bool]:
        """(pass it on, first drop for this request: time to say so). Every iopub message is
        charged (comm messages too, which widgets and hostile kernels alike can make large), but
        a ``status`` is never dropped: clients need the idle that ends a request."""
        if msg.channel != "iopub" or msg.msg_type == "status":
            return True, False
        used = self._requests.get(msg.parent_id, self._shared)
        c = msg.content
        if msg.msg_type in ("stream", "error"):
            kind, limit = 0, self.text_limit
            size = len(str(c.get("text", ""))) + sum(len(str(t)) for t in c.get("traceback", []) or [])
        elif msg.msg_type in OUTPUT_TYPES:
            kind, limit = 1, self.rich_limit
            data = c.get("data")
            size = sum(len(v) if isinstance(v, str) else len(dumps({"v": v})) for v in data.values()) \
                if isinstance(data, dict) else 0
        else:  # comm messages, clear_output, execute_input...: their size on the wire
            kind, limit = 1, self.rich_limit
            size = msg.wire_bytes
        first_drop = used[kind] <= limit and used[kind] + size > limit
        used[kind] += size
        if used[kind] > limit:
            self.dropped += size
            return False, first_drop
        return True, False


class KernelRelay:
    """One client's connection to a kernel. ``send`` what the client sent; ``receive`` what the
    kernel sent, until it returns ``None`` (the kernel was replaced or the session closed)."""

    def __init__(self, owner: RelayOwner, connection_info: dict[str, Any], generation: int, limits: Limits,
                 watch: KernelWatch, allow_stdin: bool = True, max_client_message: int = MAX_CLIENT_MESSAGE_BYTES,
                 max_kernel_message: int = MAX_MESSAGE_BYTES) -> None:
        self.owner = owner
        self.generation = generation  # of the kernel it is attached to
        self.watch = watch
        self.allow_stdin = allow_stdin
        self.max_client_message = max_client_message
        self.max_kernel_message = max_kernel_message
        self.budget = RelayBudget(limits)
        self.dropped_messages = 0  # kernel messages dropped: unsigned, malformed or oversized
        self.end_reason: str | None = None
        self.ended_by: EndCause | None = None
        self._info = connection_info
        self._auth = hmac.new(connection_info["key"].encode(), digestmod=hashlib.sha256)
        self._identity = uuid.uuid4().hex.encode()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._queue: asyncio.Queue[KernelMessage | None] = asyncio.Queue(QUEUE_MESSAGES)
        self._queued_bytes = 0  # of the messages in the queue (QUEUE_BYTES bounds it)
        self._room = asyncio.Event()  # set when the client reads
        self._running: dict[str, float] = {}  # execute requests not answered yet -> when sent (negated: shutdowns)
        self._pump: asyncio.Task | None = None
        self._closed = False
        _live.add(self)

    @property
    def running(self) -> bool:
        """A request this relay sent is still running: the session is in use."""
        return bool(self._running)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- life cycle ---------------------------------------------------------------------------
    async def open(self, timeout: float) -> None:
        """Connect and wait until the kernel's iopub reaches us (a SUB socket misses what is
        published before it has joined): then the client's first request cannot lose its output."""
        ctx = _bounded_context()
        info = self._info
        # ipc sockets in a session's folder on this host; or TCP through a cluster node's CurveZMQ
        # relay, with ``curve``: (our public key, our secret key, the node's public key)
        tcp = info["transport"] == "tcp"
        base = f"tcp://{info['ip']}:" if tcp else f"{info['transport']}://{info['ip']}-"
        curve = info.get("curve")
        kinds = {"shell": zmq.DEALER, "control": zmq.DEALER, "stdin": zmq.DEALER, "iopub": zmq.SUB}
        for name, kind in kinds.items():
            try:
                sock = ctx.socket(kind)
            except zmq.ZMQError as exc:  # out of sockets or descriptors: refused, never a 500
                self.end("it never opened", "failure")
                raise SandboxError(f"the server has no room for another kernel connection ({exc}): "
                                   "try again later") from None
            sock.linger = 0
            if name in ("shell", "stdin"):  # the kernel routes input requests to the shell's identity
                sock.setsockopt(zmq.IDENTITY, self._identity)
            sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            if curve is not None:
                sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
                sock.immediate = True  # never block a send on a relay that refused us
                sock.sndtimeo = 1000
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(base + str(self._info[f"{name}_port"]))
            self._sockets[name] = sock
        deadline, wait = time.monotonic() + timeout, 0.02
        try:
            while True:  # ask again, less and less often, until an answer on iopub shows we have joined
                if self._closed:
                    raise SandboxError(f"the kernel went away while connecting ({self.end_reason}): connect again")
                await self._send_own("kernel_info_request")
                if await self._sockets["iopub"].poll(int(wait * 1000)):
                    break
                wait = min(wait * 2, 1.0)
                if time.monotonic() > deadline:
                    raise SandboxError(f"the kernel did not answer within {timeout:.0f} s")
        except BaseException as exc:
            ended_meanwhile = self._closed
            self.end("it never opened", "failure")
            if ended_meanwhile and isinstance(exc, Exception) and not isinstance(exc, SandboxError):
                raise SandboxError(f"the kernel went away while connecting ({self.end_reason}): connect again") from exc
            raise
        self._pump = asyncio.create_task(self._run())

    def end(self, reason: str, cause: EndCause = "client") -> None:
        """Stop relaying (idempotent); ``receive`` returns ``None`` once the queue is read."""
        if self._closed:
            return
        self._closed, self.end_reason, self.ended_by = True, reason, cause
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
        self._close_sockets()
        self.owner.detach(self)
        self._put_last(None)

    def kernel_replaced(self, reason: str) -> None:
        """The kernel died (or outlived a shutdown request) and is being replaced: tell the client
        as Jupyter servers do (``autorestarting``), then end; the client reconnects to the new kernel."""
        if self._closed:
            return
        self._running.clear()
        self._put_last(KernelMessage("iopub", self._header("status"), {}, {}, {"execution_state": "autorestarting"}))
        self.end(reason, "restart")

    def _put_last(self, msg: KernelMessage | None) -> None:
        """Queue a last word without waiting: a slow client's oldest message makes room for it."""
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self._queued_bytes -= dropped.wire_bytes if dropped is not None else 0
        self._queue.put_nowait(msg)

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()

    # -- client -> kernel ---------------------------------------------------------------------
    async def send(self, msg: KernelMessage) -> None:
        """``send_frame`` for a message already in hand (in-process clients): it takes the same path."""
        try:
            frame = encode_v1(msg)
        except (ValueError, TypeError) as exc:
            raise KernelMessageRefused(f"the message is not plain JSON: {exc}") from None
        await self.send_frame(frame, "v1")

    async def send_frame(self, frame: bytes | str, wire: WireFormat) -> None:
        """Check, sign and send one frame a client sent in ``wire`` format: the one way into the
        kernel. ``KernelMessageTooLarge`` (over ``max_client_message``), ``WireError`` (not a
        message in that format) and ``KernelMessageRefused`` (a channel or header a client may not
        use) say what is wrong with it; ``SandboxError`` that this relay has ended."""
        if self._closed:
            raise SandboxError(f"this connection to the kernel ended: {self.end_reason}")
        size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
        if size > self.max_client_message:
            raise KernelMessageTooLarge(f"message of {size:,} bytes refused: the limit is {self.max_client_message:,}")
        msg = self._checked(decode(frame, wire))
        frames = self._serialize(msg)
        # counted as running only where the kernel answers it (execute on shell, shutdown on shell or
        # control): one sent on another channel is never answered and would keep the session "in use"
        if msg.msg_type == "execute_request" and msg.channel == "shell":
            self._running[msg.msg_id] = time.monotonic()
            self.budget.new_request(msg.msg_id)
        elif msg.msg_type == "shutdown_request" and msg.channel in ("shell", "control"):
            self._running[msg.msg_id] = -time.monotonic()  # the kernel exits: watched like a request, then replaced
        self.owner.touch()
        try:
            await self._sockets[msg.channel].send_multipart(frames)
        except (zmq.ZMQError, KeyError) as exc:  # ended while sending (a restart closed the sockets)
            raise SandboxError(f"this connection to the kernel ended: {self.end_reason or exc}") from None

    def _checked(self, msg: KernelMessage) -> KernelMessage:
        """The relay's own rules on a decoded message (its parts are JSON objects, its buffers
        within ``MAX_BUFFERS``: the decoder saw to that)."""
        if msg.channel not in CLIENT_CHANNELS:
            raise KernelMessageRefused(f"channel {msg.channel!r}: a client sends on shell, control or stdin")
        for key in ("msg_id", "msg_type", "session"):
            value = msg.header.get(key)
            if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
                raise KernelMessageRefused(f"the header's {key} must be a string of 1 to {MAX_ID_CHARS} characters")
        if msg.msg_type == "execute_request" and not self.allow_stdin:
            msg.content = {**msg.content, "allow_stdin": False}
        return msg

    def _serialize(self, msg: KernelMessage) -> list[bytes]:
        try:
            parts = [dumps(getattr(msg, p)).encode() for p in ("header", "parent_header", "metadata", "content")]
        except (ValueError, TypeError, RecursionError) as exc:
            raise KernelMessageRefused(f"the message is not plain JSON: {exc}") from None
        auth = self._auth.copy()
        for p in parts:
            auth.update(p)
        return [DELIMITER, auth.hexdigest().encode(), *parts, *(bytes(b) for b in msg.buffers)]

    async def _send_own(self, msg_type: str) -> None:
        msg_id = f"{NUDGE_PREFIX}{uuid.uuid4().hex}"
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self._identity.decode(), "username": "jupybox",
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": "5.3"}
        await self._sockets["shell"].send_multipart(self._serialize(KernelMessage("shell", header)))

    # -- kernel -> client ---------------------------------------------------------------------
    async def receive(self) -> KernelMessage | None:
        """The kernel's next message for the client, or ``None`` when this relay has ended."""
        if self._closed and self._queue.empty():
            return None
        msg = await self._queue.get()
        if msg is not None:
            self._queued_bytes -= msg.wire_bytes
        self._room.set()
        return msg

    async def _run(self) -> None:
        poller = zmq.asyncio.Poller()
        names = {}
        for name in ("iopub", "shell", "control", "stdin"):
            poller.register(self._sockets[name], zmq.POLLIN)
            names[self._sockets[name]] = name
        try:
            while not self._closed:
                ready = dict(await poller.poll(self._poll_ms()))
                if not ready and self._shutdown_overdue():
                    # a kernel can hang on its way out after answering a client's shutdown request
                    reason = "the kernel was shut down as asked; a fresh one was started"
                    self.owner.replace_kernel(self.generation, f"did not exit within {self.watch.shutdown_grace_s:g} s "
                                              "of a notebook client's shutdown request", reason)
                    self.end(reason, "restart")  # already ended, unless that kernel was replaced meanwhile
                    return
                for sock in ready:
                    frames = await sock.recv_multipart(copy=False)
                    msg = self._parse(names[sock], frames)
                    if msg is not None:
                        await self._deliver(msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # a socket closed under us, a bug: the client reconnects
            if not self._closed:
                log.exception("kernel relay of session %s failed", self.owner.id)
                self.end("the relay failed; see the server log", "failure")

    def _poll_ms(self) -> int:
        """How long to wait for the kernel's next message: until a client's shutdown request is
        past its grace, and at most ``check_s`` (a shutdown request may be sent meanwhile)."""
        wait = self.watch.check_s
        sent = [-t for t in self._running.values() if t < 0]
        if sent:
            wait = min(wait, min(sent) + self.watch.shutdown_grace_s - time.monotonic())
        return max(0, int(wait * 1000))

    def _shutdown_overdue(self) -> bool:
        return any(t < 0 and time.monotonic() + t >= self.watch.shutdown_grace_s for t in self._running.values())

    def _parse(self, channel: str, frames: list[zmq.Frame]) -> KernelMessage | None:
        """A verified message, or ``None`` (dropped, counted): the kernel is hostile."""
        try:
            if sum(len(f.buffer) for f in frames) > self.max_kernel_message or len(frames) > MAX_BUFFERS + 8:
                raise ValueError("oversized")
            raw = [f.bytes for f in frames]
            i = raw.index(DELIMITER)
            signature, parts, buffers = raw[i + 1], raw[i + 2:i + 6], raw[i + 6:]
            if len(parts) != 4:
                raise ValueError("too few frames")
            auth = self._auth.copy()
            for p in parts:
                auth.update(p)
            if not hmac.compare_digest(auth.hexdigest().encode(), signature):
                raise ValueError("bad signature")
            header, parent, metadata, content = (loads_object(p, what) for p, what in
                                                 zip(parts, ("header", "parent header", "metadata", "content")))
        except (ValueError, WireError):
            self.dropped_messages += 1
            log.debug("dropped a kernel message in session %s", self.owner.id, exc_info=True)
            return None
        return KernelMessage(channel, header, parent, metadata, content, buffers,
                             wire_bytes=sum(len(f.buffer) for f in frames))

    async def _deliver(self, msg: KernelMessage) -> None:
        parent = msg.parent_id
        # the answers to relays' nudges, this one's and others' (iopub reaches every relay of the
        # kernel: a nudge answered after its relay ended must not reach the next client)
        if parent.startswith(NUDGE_PREFIX):
            return
        if msg.channel == "iopub" and msg.msg_type in ("stream", "display_data"):
            content = take_pip_requests(msg.msg_type, msg.content, self.owner.pip_request)
            if content is None:
                return
            if content is not msg.content:
                msg = dataclasses.replace(msg, content=content)
        if self._running.get(parent, -1) > 0 and (msg.msg_type == "execute_reply" or
                                        (msg.msg_type == "status" and msg.content.get("execution_state") == "idle")):
            del self._running[parent]
        keep, first_drop = self.budget.admit(msg)
        if not keep:
            if first_drop:
                await self._enqueue(self._note(msg, "[jupybox: further output of this request is dropped: "
                                                   "it is over the session's output budget]\n"))
            return
        self.owner.touch()
        await self._enqueue(msg)

    async def _enqueue(self, msg: KernelMessage) -> None:
        """Queue a message for the client within ``QUEUE_MESSAGES`` and ``QUEUE_BYTES``: wait while
        the client reads; one that reads nothing for ``client_stall_s`` while full is disconnected, so
        what it left unread is given back (meanwhile ZMQ's small queues fill, then the kernel's
        publisher drops for this connection alone)."""
        while True:
            self._room.clear()  # before the look: a read after it sets it again
            if not (self._queue.full() or (self._queued_bytes and self._queued_bytes + msg.wire_bytes > QUEUE_BYTES)):
                break
            try:
                await asyncio.wait_for(self._room.wait(), self.watch.client_stall_s)
            except (asyncio.TimeoutError, TimeoutError):
                waited = self._queued_bytes
                while not self._queue.empty():  # given back now, not when the client's task ends
                    self._queue.get_nowait()
                self._queued_bytes = 0
                self.end(f"the client read nothing for {self.watch.client_stall_s:g} s while {waited:,} bytes waited for it",
                         "failure")
                return
            if self._closed:
                return
        self._queued_bytes += msg.wire_bytes
        self._queue.put_nowait(msg)

    def _note(self, about: KernelMessage, text: str) -> KernelMessage:
        return KernelMessage("iopub", self._header("stream"), dict(about.parent_header), {},
                             {"name": "stderr", "text": text})

    def _header(self, msg_type: str) -> dict[str, Any]:
        return {"msg_id": f"jupybox-{uuid.uuid4().hex}", "msg_type": msg_type, "session": self._identity.decode(),
                "username": "jupybox", "version": "5.3",
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}
