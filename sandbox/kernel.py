"""Speak the Jupyter messaging protocol to one kernel over ZMQ ipc sockets.

This module owns no process: a backend starts the kernel, a session decides what to do on timeouts
and deaths. Here we connect, send ``execute_request`` / ``interrupt_request`` and turn iopub
messages into ``Output`` items, draining continuously and dropping past the output budget so a
flood of output cannot grow this process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import queue
import logging
import re
import resource
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.connect import channel_socket_types

from .errors import SandboxError
from .models import Output
from .packages import take_pip_requests

log = logging.getLogger(__name__)

ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
TRUNCATION_RE = re.compile(r"\[jupybox: (\d+) bytes of output truncated\]")
PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
SOCKET_NAME = "kernel"

OutputCallback = Callable[[Output], Any]


def write_connection_file(runtime_dir: Path, kernel_runtime_path: str, host_path: Path | None = None) -> dict[str, Any]:
    """Write ``kernel.json`` for the kernel (ipc sockets under ``kernel_runtime_path``) and return
    the host-side connection info (the same sockets under ``host_path``, by default ``runtime_dir``)."""
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": f"{kernel_runtime_path}/{SOCKET_NAME}",
        "key": secrets.token_hex(16),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
        **PORTS,
    }
    path = runtime_dir / "kernel.json"
    path.write_text(json.dumps(info))
    return {**info, "ip": str((host_path or runtime_dir) / SOCKET_NAME)}


def read_connection_file(runtime_dir: Path, host_path: Path | None = None) -> dict[str, Any]:
    """The host-side connection info of a kernel that is already running (an earlier server
    process started it): its ``kernel.json``, with the sockets under ``host_path``."""
    info = json.loads((runtime_dir / "kernel.json").read_text())
    if info.get("transport") != "ipc" or not isinstance(info.get("key"), str):
        raise ValueError("not a connection file of jupybox's")
    return {**info, "ip": str((host_path or runtime_dir) / SOCKET_NAME)}


def sockets_ready(runtime_dir: Path) -> bool:
    return all((runtime_dir / f"{SOCKET_NAME}-{port}").is_socket() for port in PORTS.values())


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


@dataclass
class RawResult:
    """What the protocol layer saw; the session turns it into an ``Execution``."""

    outputs: list[Output] = field(default_factory=list)
    execution_count: int | None = None
    done: bool = False  # the kernel went idle for our request
    died: bool = False  # the kernel process disappeared while we waited
    dropped: int = 0  # output bytes dropped (kernel side and here)
    ask_exit: bool = False  # the code called exit()
    aborted: bool = False  # the kernel dropped the request unrun (it came while a run was being interrupted)


class OutputCollector:
    """Turns iopub messages into ordered outputs within the budget."""

    def __init__(self, result: RawResult, budget: int, max_images: int, max_image_bytes: int,
                 on_output: OutputCallback | None, on_pip: Callable[[Any], None] | None = None) -> None:
        """``on_pip`` takes the kernel's requests to install packages (``sandbox.packages``), which
        are then not outputs; without it they pass as what they look like."""
        self.result = result
        self.on_pip = on_pip
        self.budget = budget
        self.max_images = max_images
        self.max_image_bytes = max_image_bytes
        self.on_output = on_output
        self.text_bytes = 0
        self.rich_bytes = 0
        self.images = 0

    def _emit(self, out: Output) -> None:
        outs = self.result.outputs
        if out.kind == "stream" and outs and outs[-1].kind == "stream" and outs[-1].name == out.name:
            outs[-1].text = (outs[-1].text or "") + (out.text or "")
        else:
            outs.append(Output(**out.to_dict()))
        if self.on_output is not None:
            try:
                self.on_output(out)
            except Exception:  # a consumer's bug must not break the execution
                log.exception("output callback failed")

    def handle(self, msg: dict[str, Any]) -> None:
        """Take one iopub message. The kernel is hostile and knows the signing key, so a malformed
        message is dropped (and counted), never allowed to break the execution."""
        try:
            self._handle(msg["header"]["msg_type"], msg["content"])
        except Exception:
            log.debug("dropped a malformed kernel message", exc_info=True)
            self.result.dropped += 1

    def _take_text(self, text: str, rich: bool = False) -> str | None:
        """Charge ``text`` to the execution's budget (streams and rich outputs each have one, so a
        flood of HTML does not hide the last print): all of it, a head, or nothing."""
        for m in TRUNCATION_RE.finditer(text):  # what the kernel already dropped
            self.result.dropped += int(m.group(1))
        used = self.rich_bytes if rich else self.text_bytes
        room = self.budget - used
        if room <= 0:
            self.result.dropped += len(text)
            return None
        if len(text) > room:
            self.result.dropped += len(text) - room
            text = text[:room]
        if rich:
            self.rich_bytes += len(text)
        else:
            self.text_bytes += len(text)
        return text

    def _handle(self, kind: str, content: dict[str, Any]) -> None:
        if self.on_pip is not None and kind in ("stream", "display_data"):
            content = take_pip_requests(kind, content, self.on_pip)
            if content is None:
                return
        if kind == "stream":
            kept = self._take_text(str(content.get("text", "")))
            if kept is not None:
                self._emit(Output(kind="stream", name=str(content.get("name", "stdout")), text=kept))
        elif kind in ("execute_result", "display_data"):
            data = dict(content.get("data", {}))
            for mime in [m for m in data if m.startswith("image/")]:
                size = len(data[mime])
                if self.images >= self.max_images or size > self.max_image_bytes * 4 // 3 + 4:  # base64
                    del data[mime]
                    self.result.dropped += size
            if any(m.startswith("image/") for m in data):
                self.images += 1
            for mime in [m for m in data if not m.startswith("image/")]:  # text, html, json ...
                value = data[mime]
                text = value if isinstance(value, str) else json.dumps(value)
                kept = self._take_text(text, rich=True)
                if kept is None or (kept != text and not isinstance(value, str)):
                    del data[mime]  # over budget (structured data is not cut in the middle)
                elif isinstance(value, str):
                    data[mime] = kept
            if not data:
                return
            self._emit(Output(kind="result" if kind == "execute_result" else "display", data=data,
                              metadata=content.get("metadata") if len(json.dumps(content.get("metadata") or {})) < 4096 else None))
        elif kind == "error":
            evalue = self._take_text(str(content.get("evalue", ""))) or ""
            traceback = self._take_text("\n".join(strip_ansi(str(t)) for t in content.get("traceback", []))) or ""
            self._emit(Output(kind="error", ename=str(content.get("ename", ""))[:200], evalue=evalue,
                              traceback=traceback.split("\n") if traceback else []))
        elif kind == "execute_input":
            self.result.execution_count = content.get("execution_count")


MAX_MESSAGE_BYTES = 16 << 20  # over the largest image (10 MB raw, base64) plus its JSON
RECEIVE_QUEUE = 32  # messages ZMQ holds for us while no execution is reading
IOPUB_PROOF_S = 0.2  # how long connect waits for an iopub message after a kernel_info reply before asking again


# libzmq's default of 1023 sockets is shared by every session's client and every notebook relay
# (4 sockets each): sized with headroom, and the relays are capped well below it (``relay``)
MAX_SOCKETS = 8192


@functools.lru_cache(maxsize=1)
def _bounded_context() -> zmq.asyncio.Context:
    """One ZMQ context whose sockets refuse oversized messages and queue few: what a kernel sends
    between executions, or in one huge message, cannot grow this process's memory unboundedly.
    Its socket limit is ``MAX_SOCKETS`` (the process's open-file limit is raised to fit it where
    the hard limit allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MAX_SOCKETS * 2  # a socket holds a descriptor or two, and a connection one more
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    ctx.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    ctx.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    return ctx


class _CurveKernelClient(AsyncKernelClient):
    """jupyter_client's client with a CurveZMQ key pair of its own and the server's public key to
    check (jupyter_client's own curve support uses one pair for both ends)."""

    curve_keys: tuple[bytes, bytes, bytes] = (b"", b"", b"")  # our public, our secret, the server's public

    def _create_connected_socket(self, channel: str, identity: bytes | None = None) -> zmq.Socket:
        sock = self.context.socket(channel_socket_types[channel])
        sock.linger = 1000
        if identity:
            sock.identity = identity
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve_keys
        # a relay that refuses us (or is gone) must never block a send: queue only to a peer
        # whose handshake passed, and give up on a send after a while
        sock.immediate = True
        sock.sndtimeo = 1000
        sock.connect(self._make_url(channel))
        return sock


class KernelClient:
    """A connection to one kernel. Not thread-safe; one execution at a time (the session locks).
    ``curve``: (our public key, our secret key, the server's public key), for a kernel reached over
    TCP through a CurveZMQ relay (``sandbox.cluster.channels``)."""

    def __init__(self, connection_info: dict[str, Any], curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        if curve is None:
            self._client = AsyncKernelClient(context=_bounded_context())
        else:
            self._client = _CurveKernelClient(context=_bounded_context())
            self._client.curve_keys = curve
        self._client.load_connection_info(connection_info)
        self._client.session.key = connection_info["key"].encode()

    async def connect(self, timeout: float) -> None:
        """Start the channels and wait until the kernel answers and iopub delivers."""
        try:
            self._client.start_channels(hb=False)
        except zmq.ZMQError as exc:  # out of sockets or descriptors: this process's, not the kernel's
            raise SandboxError(f"the server has no room for another kernel connection ({exc}): try again later") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg_id = self._client.kernel_info()
            except zmq.Again:  # no peer yet (a relay's handshake still running, or refused)
                if time.monotonic() > deadline:
                    raise SandboxError(f"the kernel did not answer within {timeout:.0f} s") from None
                await asyncio.sleep(0.1)
                continue
            try:
                await self._wait_reply(msg_id, min(2.0, max(deadline - time.monotonic(), 0.1)))
                # The reply proves the shell is up; an iopub message proves our subscription is. A
                # subscription still on its way (through a cluster node's relay it crosses two
                # hops) misses this request's status messages: ask again soon rather than wait long.
                await self._client.get_iopub_msg(timeout=IOPUB_PROOF_S)
                return
            except (asyncio.TimeoutError, TimeoutError, queue.Empty):
                if time.monotonic() > deadline:
                    raise SandboxError(f"the kernel did not answer within {timeout:.0f} s") from None

    async def _wait_reply(self, msg_id: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            msg = await self._client.get_shell_msg(timeout=left)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def send_execute(self, code: str, store_history: bool = True) -> str:
        """Send ``code``; returns the request's id for ``collect``. ``allow_stdin=False`` makes
        ``input()`` fail at once with a clear error instead of waiting for a reply.
        ``store_history=False``: the server's own code (saving variables), which leaves the
        execution count and the history as they were."""
        return self._client.execute(code, allow_stdin=False, store_history=store_history)

    async def collect(self, msg_id: str, collector: OutputCollector, deadline: float,
                      is_alive: Callable[[], Awaitable[bool]]) -> RawResult:
        """Collect outputs of ``msg_id`` until the kernel is idle again (``done``), the deadline
        passes (``done`` false) or the kernel died (``died``). Never raises for what the code does."""
        result = collector.result
        next_check = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            if now >= deadline:
                return result
            if now >= next_check:
                if not await is_alive():
                    result.died = True
                    return result
                next_check = time.monotonic() + 1.0
            try:
                msg = await self._client.get_iopub_msg(timeout=min(deadline - now, next_check - now, 0.5))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["header"]["msg_type"] == "status":
                if msg["content"].get("execution_state") == "idle":
                    result.done = True
                    await self._read_reply(msg_id, result)
                    return result
                continue
            collector.handle(msg)

    async def _read_reply(self, msg_id: str, result: RawResult) -> None:
        """The execute_reply is sent just before iopub's idle; it tells whether the code called
        ``exit()`` (an ``ask_exit`` payload)."""
        try:
            reply = await self._wait_reply(msg_id, 1.0)
        except (TimeoutError, queue.Empty):
            return
        content = reply["content"]
        result.aborted = content.get("status") == "aborted"
        if result.execution_count is None:
            result.execution_count = content.get("execution_count")
        result.ask_exit = any(p.get("source") == "ask_exit" for p in content.get("payload", []))

    def interrupt(self) -> None:
        """Ask the kernel to SIGINT itself (``interrupt_request`` on the control channel): works the
        same whatever isolates the kernel."""
        msg = self._client.session.msg("interrupt_request", content={})
        self._client.control_channel.send(msg)

    def close(self) -> None:
        try:
            self._client.stop_channels()
        except Exception:  # closing a half-dead connection is best effort
            log.debug("stop_channels failed", exc_info=True)
