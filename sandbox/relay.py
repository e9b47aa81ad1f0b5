"""Raw Jupyter messages between one outside client (a notebook front end) and a session's kernel.

JupyterLab, Notebook and VS Code speak the Jupyter messaging protocol themselves: they need the
kernel's messages as they are, not an ``Execution``. A ``KernelRelay`` passes them through without
trusting either side:

* a client's message is checked (channel, header fields, JSON objects, size) and signed here with
  the kernel's key, which the client never learns; a relay reaches its own session's kernel only;
* a kernel's message is verified (signature), parsed, and bounded: ZMQ refuses huge frames, this
  module drops messages over ``max_kernel_message``, and output past the session's budget for one
  request is dropped with a note, on top of the caps the kernel applies before sending;
* each relay has its own ZMQ sockets, so a notebook and the JSON API can share a kernel without
  taking each other's replies. A relay lives as long as the kernel it was attached to: when the
  session replaces the kernel (restart, timeout, death) or closes, ``receive`` returns ``None`` and
  the client reconnects to the new kernel, as Jupyter clients do after a restart.

``Session.attach()`` creates relays; nothing else should.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import zmq
import zmq.asyncio

from .config import Limits
from .errors import KernelMessageRefused, KernelMessageTooLarge, SandboxError
from .kernel import MAX_MESSAGE_BYTES, _bounded_context

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

DELIMITER = b"<IDS|MSG>"
CLIENT_CHANNELS = ("shell", "control", "stdin")
OUTPUT_TYPES = frozenset({"stream", "error", "display_data", "execute_result", "update_display_data"})
MAX_CLIENT_MESSAGE_BYTES = 8 << 20  # a cell, a comm message with its buffers: far below this
MAX_BUFFERS = 64
MAX_ID_CHARS = 256
QUEUE_MESSAGES = 64  # kernel messages held for a slow client; past it ZMQ's own small queues fill
QUEUE_BYTES = 16 << 20  # ... and their bytes: one largest message (MAX_MESSAGE_BYTES) fits
RECEIVE_HWM = 2  # kernel messages ZMQ itself holds for a relay whose queue is full
STALL_S = 30.0  # a client that reads nothing this long while its queue is full is disconnected
# relays (4 ZMQ sockets each) a session, and the whole process, may hold: far under the context's
# MAX_SOCKETS, so sessions' own clients always find sockets (the reserve)
MAX_RELAYS_PER_SESSION = 16
MAX_RELAYS = 512
# a kernel still alive this long after a client's shutdown request is replaced, as Jupyter's own
# kernel manager kills one after its shutdown wait (5 s): ipykernel can hang on its way out
SHUTDOWN_GRACE_S = 5.0
LIVENESS_CHECK_S = 1.0  # while a request runs and the kernel is silent, how often to ask if it lives
IDLE_LIVENESS_S = 3.0  # with nothing running, how often (Jupyter Server's restarter polls every 3 s too)
EndCause = Literal["client", "restart", "close", "failure"]  # who ended a relay
_restarts: set[asyncio.Task] = set()  # kernel restarts a relay started; referenced until done
_live: weakref.WeakSet[KernelRelay] = weakref.WeakSet()  # relays of this process not ended yet


def open_relays() -> int:
    """Relays of this process that have not ended (what ``MAX_RELAYS`` bounds)."""
    return sum(1 for relay in list(_live) if not relay.closed)


@dataclass
class KernelMessage:
    """One Jupyter message, unsigned: what a client sends or receives on ``channel``."""

    channel: str  # shell | control | stdin | iopub
    header: dict[str, Any]
    parent_header: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)
    wire_bytes: int = field(default=0, repr=False, compare=False)  # its size as the kernel sent it

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def parent_id(self) -> str:
        return str(self.parent_header.get("msg_id", ""))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """Strict JSON (no NaN/Infinity, which browsers cannot parse) that must be an object."""
    value = json.loads(bytes(raw), parse_constant=_reject_constant)
    if not isinstance(value, dict):
        raise ValueError(f"the {what} is not a JSON object")
    return value


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


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
            size = sum(len(v) if isinstance(v, str) else len(_dumps({"v": v})) for v in data.values()) \
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

    def __init__(self, session: Session, connection_info: dict[str, Any], limits: Limits,
                 allow_stdin: bool = True, max_client_message: int = MAX_CLIENT_MESSAGE_BYTES,
                 max_kernel_message: int = MAX_MESSAGE_BYTES) -> None:
        self.session = session
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
        self._own: set[str] = set()  # ids of the relay's own requests (the nudges): never forwarded
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
        base = f"{self._info['transport']}://{self._info['ip']}-"
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
        self.session._detach(self)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)
        if self._queue.full():  # the client is slow: make room for the end marker
            self._queue.get_nowait()
            self._queue.put_nowait(None)

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()

    # -- client -> kernel ---------------------------------------------------------------------
    async def send(self, msg: KernelMessage) -> None:
        """Sign and send a client's message; ``KernelMessageRefused`` says what is wrong with it."""
        if self._closed:
            raise SandboxError(f"this connection to the kernel ended: {self.end_reason}")
        frames = self._serialize(self._checked(msg))
        size = sum(len(f) for f in frames)
        if size > self.max_client_message:
            raise KernelMessageTooLarge(f"the message is {size:,} bytes; the limit is {self.max_client_message:,}")
        # counted as running only where the kernel answers it (execute on shell, shutdown on shell or
        # control): one sent on another channel is never answered and would keep the session "in use"
        if msg.msg_type == "execute_request" and msg.channel == "shell":
            self._running[msg.msg_id] = time.monotonic()
            self.budget.new_request(msg.msg_id)
        elif msg.msg_type == "shutdown_request" and msg.channel in ("shell", "control"):
            self._running[msg.msg_id] = -time.monotonic()  # the kernel exits: watched like a request, then replaced
        self.session.touch()
        try:
            await self._sockets[msg.channel].send_multipart(frames)
        except zmq.ZMQError as exc:  # ended while sending (a restart closed the sockets)
            raise SandboxError(f"this connection to the kernel ended: {self.end_reason or exc}") from None

    def _checked(self, msg: KernelMessage) -> KernelMessage:
        if msg.channel not in CLIENT_CHANNELS:
            raise KernelMessageRefused(f"channel {msg.channel!r}: a client sends on shell, control or stdin")
        for part in ("header", "parent_header", "metadata", "content"):
            if not isinstance(getattr(msg, part), dict):
                raise KernelMessageRefused(f"the message's {part} is not a JSON object")
        for key in ("msg_id", "msg_type", "session"):
            value = msg.header.get(key)
            if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
                raise KernelMessageRefused(f"the header's {key} must be a string of 1 to {MAX_ID_CHARS} characters")
        if len(msg.buffers) > MAX_BUFFERS or not all(isinstance(b, (bytes, bytearray, memoryview)) for b in msg.buffers):
            raise KernelMessageRefused(f"a message carries at most {MAX_BUFFERS} binary buffers")
        if msg.msg_type == "execute_request" and not self.allow_stdin:
            msg.content = {**msg.content, "allow_stdin": False}
        return msg

    def _serialize(self, msg: KernelMessage) -> list[bytes]:
        try:
            parts = [_dumps(msg.header), _dumps(msg.parent_header), _dumps(msg.metadata), _dumps(msg.content)]
        except (ValueError, TypeError) as exc:
            raise KernelMessageRefused(f"the message is not plain JSON: {exc}") from None
        auth = self._auth.copy()
        for p in parts:
            auth.update(p)
        return [DELIMITER, auth.hexdigest().encode(), *parts, *(bytes(b) for b in msg.buffers)]

    async def _send_own(self, msg_type: str) -> None:
        msg_id = f"jupybox-{uuid.uuid4().hex}"
        self._own.add(msg_id)
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
        checked = time.monotonic()
        try:
            while not self._closed:
                ready = dict(await poller.poll(int(LIVENESS_CHECK_S * 1000)))
                if not ready:
                    # a kernel can die at any time, also some seconds after a shutdown request it
                    # answered: asked every second while a request runs, every few when idle
                    now = time.monotonic()
                    if self._running or now - checked >= IDLE_LIVENESS_S:
                        checked = now
                        if await self._kernel_gone():
                            await self._replace_kernel("died during a request from a notebook client",
                                                       "the kernel died; it was restarted, variables are lost")
                            return
                    if any(sent < 0 and time.monotonic() + sent > SHUTDOWN_GRACE_S for sent in self._running.values()):
                        await self._replace_kernel(
                            f"did not exit within {SHUTDOWN_GRACE_S:.0f} s of a notebook client's shutdown request",
                            "the kernel was shut down as asked; a fresh one was started")
                        return
                    continue
                for sock in ready:
                    frames = await sock.recv_multipart(copy=False)
                    msg = self._parse(names[sock], frames)
                    if msg is not None:
                        await self._deliver(msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # a socket closed under us, a bug: the client reconnects
            if not self._closed:
                log.exception("kernel relay of session %s failed", self.session.id)
                self.end("the relay failed; see the server log", "failure")

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
            header, parent, metadata, content = (_json_object(p, what) for p, what in
                                                 zip(parts, ("header", "parent header", "metadata", "content")))
        except (ValueError, RecursionError):
            self.dropped_messages += 1
            log.debug("dropped a kernel message in session %s", self.session.id, exc_info=True)
            return None
        return KernelMessage(channel, header, parent, metadata, content, buffers,
                             wire_bytes=sum(len(f.buffer) for f in frames))

    async def _deliver(self, msg: KernelMessage) -> None:
        parent = msg.parent_id
        if parent in self._own:  # the answers to our nudges (a few per relay)
            return
        if self._running.get(parent, -1) > 0 and (msg.msg_type == "execute_reply" or
                                        (msg.msg_type == "status" and msg.content.get("execution_state") == "idle")):
            del self._running[parent]
        keep, first_drop = self.budget.admit(msg)
        if not keep:
            if first_drop:
                await self._enqueue(self._note(msg, "[jupybox: further output of this request is dropped: "
                                                   "it is over the session's output budget]\n"))
            return
        self.session.touch()
        await self._enqueue(msg)

    async def _enqueue(self, msg: KernelMessage) -> None:
        """Queue a message for the client within ``QUEUE_MESSAGES`` and ``QUEUE_BYTES``: wait while
        the client reads; one that reads nothing for ``STALL_S`` while full is disconnected, so
        what it left unread is given back (meanwhile ZMQ's small queues fill, then the kernel's
        publisher drops for this connection alone)."""
        while True:
            self._room.clear()  # before the look: a read after it sets it again
            if not (self._queue.full() or (self._queued_bytes and self._queued_bytes + msg.wire_bytes > QUEUE_BYTES)):
                break
            try:
                await asyncio.wait_for(self._room.wait(), STALL_S)
            except (asyncio.TimeoutError, TimeoutError):
                waited = self._queued_bytes
                while not self._queue.empty():  # given back now, not when the client's task ends
                    self._queue.get_nowait()
                self._queued_bytes = 0
                self.end(f"the client read nothing for {STALL_S:.0f} s while {waited:,} bytes waited for it", "failure")
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

    async def _kernel_gone(self) -> bool:
        """The kernel is dead in two looks at the backend, the second asked for half a second
        after the first answered (one failed look at the container, a daemon's hiccup, must not
        cost a notebook its variables), and this relay still stands."""
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(0.5)
            # the first look may reuse another connection's answer of the last second; the second
            # waits for a new one (or for one under way)
            if self._closed or await self.session.kernel_alive(max_age=0.0 if attempt else LIVENESS_CHECK_S):
                return False
        return not self._closed

    async def _replace_kernel(self, what: str, reason: str) -> None:
        """The kernel died (or outlived a client's shutdown request): tell the client as Jupyter
        servers do (``autorestarting``), then give the session a fresh kernel (the old one is
        stopped first); that ends this relay, and the client reconnects to the new kernel."""
        log.warning("the kernel of session %s %s", self.session.id, what)
        await self._enqueue(KernelMessage("iopub", self._header("status"), {}, {},
                                            {"execution_state": "autorestarting"}))
        self._running.clear()
        task = asyncio.create_task(self.session.restart(self._info))  # once, whichever connection saw it first
        _restarts.add(task)
        task.add_done_callback(_restarts.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() and log.warning(
            "restarting the dead kernel of session %s failed: %s", self.session.id, t.exception()))
        self.end(reason, "restart")
