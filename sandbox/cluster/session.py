"""A session on a cluster node, seen from the server: ``ClusterSession`` satisfies
``sandbox.protocol.SandboxSession`` (its ``workspace``, ``SessionFiles``: ``sandbox.cluster.files``),
so the manager, the API and the UI use it unchanged. It is a record in its node's agent
(``sandbox.cluster.node.NodeAgent``).

Two paths, as on one host: the kernel's own traffic (execute, outputs as they come, interrupts)
goes straight to the kernel through the node's CurveZMQ relay (``sandbox.cluster.channels``), an
ordinary kernel client on this side; control (start, restart, liveness during long runs, the
reason of a death, close) and files go to the agent through the session's ``SessionLink``.

When the node (or its agent) is lost, the kernel and the files are gone with it: executions then
answer ``crashed`` with the reason, and file calls raise ``SessionClosed``. Nothing is retried
elsewhere: the session's state lived only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..config import Limits, SandboxSettings
from ..errors import ConnectionLimit, SandboxError, SessionClosed
from ..kernel import KernelClient, OutputCollector, RawResult
from ..models import Execution, ExecutionStatus, Output
from ..protocol import OutputCallback
from ..relay import MAX_RELAYS, MAX_RELAYS_PER_SESSION, KernelRelay, open_relays
from .channels import CurveClient
from .files import ClusterWorkspace
from .link import NodeLost, SessionLink

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 60.0
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")


class ClusterSession:
    """A session whose kernel and files live on a cluster node (see the module docstring)."""

    def __init__(self, link: SessionLink, limits: Limits, settings: SandboxSettings, curve: CurveClient | None,
                 on_close: Callable[[ClusterSession], None]) -> None:
        self.id = link.session_id
        self.limits = limits
        self.settings = settings
        self.link = link
        self.created = time.time()
        self.last_used = time.monotonic()
        self.executions = 0
        self.paused = False  # a cluster's sessions are never paused: they end with the server
        self.before_resume: Any = None
        self.after_resume: Any = None
        self.pause_note: str | None = None
        self.isolation: str | None = None
        self.workspace = ClusterWorkspace(link, limits)
        self._curve = curve
        self._on_close = on_close
        self._lock = asyncio.Lock()
        self._client: KernelClient | None = None
        self._replace = False  # the kernel died or exited: the next execution asks for a fresh one
        self._running: asyncio.Task | None = None
        self._info: dict[str, Any] | None = None  # the running kernel's channels on its node
        self._generation = 0  # one more for each kernel this session connected to
        self._relays: set[KernelRelay] = set()  # notebook clients attached to the running kernel

    @property
    def node(self) -> str:
        """The jupybox name of the node it runs on."""
        return self.link.node

    @property
    def node_id(self) -> str:
        return self.link.node_id

    @property
    def closed(self) -> bool:
        return self.link.closed

    @property
    def lost(self) -> str | None:
        """Why the session is gone with its node, or None while it lives."""
        return self.link.lost

    @property
    def busy(self) -> bool:
        """An execution runs or waits, or a notebook client's request runs."""
        return self._lock.locked() or any(r.running for r in self._relays)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def mark_lost(self, reason: str) -> None:
        """The node is gone (the backend saw it leave); a running execution sees it within a second."""
        self.link.mark_lost(reason)

    def _check_open(self) -> None:
        if self.link.closed:
            raise SessionClosed(f"session {self.id} is closed: create a new session")

    def _lost_execution(self) -> Execution:
        return Execution(status=ExecutionStatus.CRASHED, state_lost=True,
                         reason=f"{self.lost} Its kernel and files are gone: start a new session.")

    async def _control(self, method: str, *args: Any) -> Any:
        """A control call to the agent; a lost node is recorded (its reason) and raised as ``NodeLost``."""
        try:
            return await self.link.call(method, *args)
        except NodeLost as exc:
            await asyncio.to_thread(self.link.gone, exc)
            raise

    async def _connect(self, method: str = "channels") -> KernelClient:
        """The direct client to the kernel: its relay opened (``channels``) or a fresh kernel's
        (``restart``) on the node, then an ordinary kernel client over it."""
        self._disconnect()
        if method == "restart":
            self._end_relays("the kernel was restarted")  # their clients reconnect to the new one
        info = await self._control(method)
        if self._curve is not None:
            info["curve"] = (self._curve.keys.public, self._curve.keys.secret, info["server_key"].encode())
        client = KernelClient(info, info.get("curve"))
        try:
            await client.connect(self.settings.start_timeout_s)
        except BaseException:
            client.close()
            raise
        self._client, self._info = client, info
        self._generation += 1
        return client

    def _disconnect(self) -> None:
        self._info = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _end_relays(self, reason: str) -> None:
        for relay in list(self._relays):
            relay.kernel_replaced(reason)

    # -- raw kernel messages (notebook front ends) -------------------------------------------
    async def attach(self, allow_stdin: bool = True) -> KernelRelay:
        """As ``Session.attach``: a relay of raw kernel messages for one notebook client, on
        sockets of its own through the node's CurveZMQ relay; it ends when the kernel is replaced
        or the session closes."""
        self._check_open()
        if self.lost:
            raise SessionClosed(f"{self.lost} Start a new session.")
        if self._client is None or self._replace:
            async with self._lock:  # behind a running execution
                self._check_open()
                if self._client is None or self._replace:
                    await self._connect("restart" if self._replace else "channels")
                    self._replace = False
        assert self._info is not None
        if len(self._relays) >= MAX_RELAYS_PER_SESSION:
            raise ConnectionLimit(f"this session already has {MAX_RELAYS_PER_SESSION} notebook connections: "
                                  "close one first")
        if open_relays() >= MAX_RELAYS:
            raise ConnectionLimit(f"the server holds {MAX_RELAYS} notebook connections: try again later")
        relay = KernelRelay(self, self._info, self._generation, self.limits, self.settings.kernel_watch,
                            allow_stdin=allow_stdin)
        self._relays.add(relay)
        await relay.open(self.settings.start_timeout_s)
        self.touch()
        return relay

    # -- what a relay may ask of its session (``RelayOwner``) ---------------------------------
    def detach(self, relay: KernelRelay) -> None:
        self._relays.discard(relay)

    def replace_kernel(self, generation: int, what: str, reason: str) -> None:
        """A notebook client's shutdown request: the next use starts a fresh kernel on the node."""
        if generation == self._generation:
            log.info("session %s: kernel %d %s", self.id, generation, what)
            self._replace = True
            self._end_relays(reason)

    def pip_request(self, request: object) -> None:
        self.link.send("pip_request", request)

    async def _alive(self) -> bool:
        """Asked once a second while an execution runs: a lost node counts as a dead kernel."""
        if self.lost:
            return False
        try:
            return await self._control("alive")
        except NodeLost:
            return False

    # -- execution --------------------------------------------------------------------------
    async def execute(self, code: str, timeout: float | None = None,
                      on_output: OutputCallback | None = None, cancel: asyncio.Event | None = None) -> Execution:
        """As ``Session.execute``: the code and its outputs go straight to and from the kernel."""
        timeout = self.settings.default_timeout_s if timeout is None else timeout
        async with self._lock:
            self._check_open()
            if self.lost:
                return self._lost_execution()
            self.last_used = time.monotonic()
            self.executions += 1
            self._running = asyncio.current_task()
            watcher = self._watch(cancel)
            try:
                return await self._execute(code, timeout, on_output, cancel)
            except NodeLost:
                return self._lost_execution()
            except (SessionClosed, asyncio.CancelledError):
                raise
            except Exception:
                if self.closed:
                    raise SessionClosed(f"session {self.id} was closed during the execution") from None
                raise
            finally:
                if watcher is not None:
                    watcher.cancel()
                if self.lost:
                    self._disconnect()
                self._running = None
                self.last_used = time.monotonic()

    def _watch(self, cancel: asyncio.Event | None) -> asyncio.Task | None:
        """Interrupt this execution (never another's) once ``cancel`` is set."""
        if cancel is None:
            return None
        task = asyncio.current_task()

        async def watch() -> None:
            await cancel.wait()
            self.interrupt(task)

        return asyncio.ensure_future(watch())

    async def _execute(self, code: str, timeout: float, on_output: OutputCallback | None,
                       cancel: asyncio.Event | None) -> Execution:
        client = self._client
        if client is None or self._replace:
            client = await self._connect("restart" if self._replace else "channels")
            self._replace = False
        if cancel is not None and cancel.is_set():
            return Execution(status=ExecutionStatus.ERROR, reason="Stopped before it ran: nothing was executed.")
        lim = self.limits
        raw = RawResult()
        installs: list[object] = []

        def pip(request: object) -> None:
            installs.append(request)
            self.link.send("pip_request", request)

        collector = OutputCollector(raw, lim.output_bytes + 1024, lim.max_images, lim.max_image_bytes, on_output, pip)
        t0 = time.monotonic()
        msg_id = client.send_execute(code)
        await client.collect(msg_id, collector, t0 + timeout, self._alive)
        if raw.aborted and not raw.outputs:  # dropped unrun by the kernel: it is idle now, so once more
            raw.done = raw.aborted = False
            msg_id = client.send_execute(code)
            await client.collect(msg_id, collector, t0 + timeout, self._alive)
        if installs:
            await self._control("pip_settle")
        if self.lost:
            return self._lost_execution()
        status, reason, state_lost = ExecutionStatus.OK, None, False
        if not raw.done and not raw.died:
            client.interrupt()
            await client.collect(msg_id, collector, time.monotonic() + self.settings.interrupt_grace_s, self._alive)
            status = ExecutionStatus.TIMEOUT
            if raw.done:
                reason = (f"Execution timed out after {timeout:g} s and was interrupted; variables are kept. "
                          "Pass a larger timeout= for longer work.")
            elif not raw.died:
                state_lost = True
                reason = (f"Execution timed out after {timeout:g} s and did not stop when interrupted; "
                          "the kernel was restarted, so earlier variables are lost.")
                await self._connect("restart")
        if self.lost:
            return self._lost_execution()
        if raw.died:
            status, state_lost, self._replace = ExecutionStatus.CRASHED, True, True
            reason = (f"The kernel died: {await self._control('exit_reason')}. A fresh kernel will run the next "
                      "execution; earlier variables are lost.")
        elif raw.ask_exit:
            status, state_lost, self._replace = ExecutionStatus.CRASHED, True, True
            reason = "The code exited the kernel; a fresh kernel will run the next execution, earlier variables are lost."
        elif status is ExecutionStatus.OK and any(o.kind == "error" for o in raw.outputs):
            status = ExecutionStatus.ERROR
        elif status is ExecutionStatus.OK and raw.aborted:
            status, reason = ExecutionStatus.ERROR, "The kernel did not run the code (it aborted the request); run it again."
        execution = Execution(status=status, outputs=raw.outputs, execution_count=raw.execution_count,
                              duration_s=round(time.monotonic() - t0, 4), truncated=raw.dropped,
                              state_lost=state_lost, reason=reason)
        if any(o.kind in ("result", "display") and o.data and any(m in o.data for m in IMAGE_MIMES)
               for o in raw.outputs):
            execution.images = await self._control("save_images", raw.outputs)  # written on the node
        return execution

    async def stream(self, code: str, timeout: float | None = None,
                     cancel: asyncio.Event | None = None) -> AsyncIterator[Output | Execution]:
        """As ``Session.stream``: each ``Output`` as the kernel sends it, then the ``Execution``; a
        consumer that stops early interrupts the run (or drops it, still waiting for its turn)."""
        queue: asyncio.Queue[Output] = asyncio.Queue()
        task = asyncio.ensure_future(self.execute(code, timeout, queue.put_nowait, cancel))
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield task.result()
        finally:
            if not task.done() and task is self._running:  # the consumer left mid-execution
                self.interrupt(task)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task}, timeout=self.settings.interrupt_grace_s + 2)
            elif not task.done():
                task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # read: nobody else will

    def interrupt(self, task: asyncio.Task | None = None) -> None:
        """As ``Session.interrupt``: ``interrupt_request`` straight to the kernel; with ``task``,
        only if that task's execution is the one running."""
        if task is not None and task is not self._running:
            return
        if self._client is not None and not self.lost:
            self._client.interrupt()

    async def restart(self) -> None:
        async with self._lock:
            self._check_open()
            if self.lost:
                raise SessionClosed(self._lost_execution().reason or "")
            try:
                await self._connect("restart")
                self._replace = False
            except NodeLost:
                raise SessionClosed(f"{self.lost} Start a new session.") from None

    async def close(self, keep_workspace: bool = False) -> None:
        """Stop the kernel and free the node's slot. Idempotent; a lost session closes at once."""
        if self.link.closed:
            return
        if self._lock.locked():
            self.interrupt()
        self.link.closed = True
        for relay in list(self._relays):
            relay.end("the session was closed", "close")
        self._disconnect()
        try:
            if not self.lost:
                await asyncio.wait_for(self.link.call("close"), CLOSE_TIMEOUT_S)
        except (SandboxError, asyncio.TimeoutError) as exc:
            log.warning("session %s on node %s did not close cleanly: %s", self.id, self.node, exc)
        finally:
            self._on_close(self)
