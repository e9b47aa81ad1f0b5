"""A session on a cluster node, seen from the server: ``ClusterSession`` satisfies
``sandbox.protocol.SandboxSession`` (its ``workspace``, ``SessionFiles``: ``sandbox.cluster.files``),
so the manager, the API and the UI use it unchanged. It is a record in its node's agent
(``sandbox.cluster.node.NodeAgent``); every call goes there through its ``SessionLink``.

What differs from a local session, and why:

- ``stream`` relays each output as the node yields it (a Ray streaming generator); a consumer
  that stops early cancels the generator there, which interrupts the run (or drops it unrun).
- When the node (or its agent) is lost, the kernel and the files are gone with it: executions
  then answer ``crashed`` with the reason, and file calls raise ``SessionClosed``. Nothing is
  retried elsewhere: the session's state lived only there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..config import Limits
from ..errors import SandboxError, SessionClosed
from ..models import Execution, ExecutionStatus, Output
from ..protocol import OutputCallback
from .files import ClusterWorkspace
from .link import NodeLost, SessionLink, unwrap

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 60.0


class ClusterSession:
    """A session whose kernel and files live on a cluster node (see the module docstring)."""

    def __init__(self, link: SessionLink, limits: Limits, on_close: Callable[[ClusterSession], None]) -> None:
        self.id = link.session_id
        self.limits = limits
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
        self._on_close = on_close
        self._active = 0  # executions and restarts in flight
        self._runs: dict[asyncio.Task, str] = {}

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
        return self._active > 0

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def mark_lost(self, reason: str) -> None:
        self.link.mark_lost(reason)

    def _check_open(self) -> None:
        if self.link.closed:
            raise SessionClosed(f"session {self.id} is closed: create a new session")

    def _lost_execution(self) -> Execution:
        return Execution(status=ExecutionStatus.CRASHED, state_lost=True,
                         reason=f"{self.lost} Its kernel and files are gone: start a new session.")

    def _watch(self, cancel: asyncio.Event | None, run: str) -> asyncio.Task | None:
        """Relay ``cancel`` to the node, where it drops or interrupts this run only."""
        if cancel is None:
            return None

        async def relay() -> None:
            await cancel.wait()
            self.link.send("cancel", run)

        return asyncio.ensure_future(relay())

    @contextlib.contextmanager
    def _running(self, run: str | None = None) -> Any:
        self._active += 1
        self.executions += run is not None
        self.last_used = time.monotonic()
        task = asyncio.current_task()
        if run is not None and task is not None:
            self._runs[task] = run
        try:
            yield
        finally:
            self._active -= 1
            self.last_used = time.monotonic()
            if task is not None:
                self._runs.pop(task, None)

    # -- execution --------------------------------------------------------------------------
    async def execute(self, code: str, timeout: float | None = None,
                      on_output: OutputCallback | None = None, cancel: asyncio.Event | None = None) -> Execution:
        """As ``Session.execute``; with ``on_output`` the outputs are streamed from the node."""
        if on_output is not None:
            execution: Execution | None = None
            async with contextlib.aclosing(self.stream(code, timeout, cancel)) as items:
                async for item in items:
                    if isinstance(item, Execution):
                        execution = item
                    else:
                        on_output(item)
            assert execution is not None
            return execution
        self._check_open()
        if self.lost:
            return self._lost_execution()
        run = uuid.uuid4().hex
        watcher = self._watch(cancel, run)
        ref = self.link.remote("execute", code, timeout, run)
        try:
            with self._running(run):
                try:
                    return await ref
                except Exception as exc:
                    raise unwrap(exc, self.node) from None
        except NodeLost as exc:
            await asyncio.to_thread(self.link.gone, exc)
            return self._lost_execution()
        except asyncio.CancelledError:
            self._cancel_remote(ref)  # as a cancelled local execute: the node stops waiting too
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    async def stream(self, code: str, timeout: float | None = None,
                     cancel: asyncio.Event | None = None) -> AsyncIterator[Output | Execution]:
        """As ``Session.stream``: each ``Output`` as the node sends it, then the ``Execution``."""
        self._check_open()
        if self.lost:
            yield self._lost_execution()
            return
        run = uuid.uuid4().hex
        watcher = self._watch(cancel, run)
        items = self.link.remote("stream", code, timeout, run)
        finished = False
        try:
            with self._running(run):
                lost: NodeLost | None = None
                try:
                    async for ref in items:
                        item = await ref
                        finished = isinstance(item, Execution)
                        yield item
                except Exception as exc:  # from the generator itself or from one of its items
                    err = unwrap(exc, self.node)
                    if not isinstance(err, NodeLost):
                        raise err from None
                    lost = err
                if lost is not None:
                    await asyncio.to_thread(self.link.gone, lost)
                    finished = True
                    yield self._lost_execution()
        finally:
            if watcher is not None:
                watcher.cancel()
            if not finished:  # the consumer left early: the node interrupts (or drops) the run
                self._cancel_remote(items)

    def _cancel_remote(self, ref: Any) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(ref)

    def interrupt(self, task: asyncio.Task | None = None) -> None:
        """As ``Session.interrupt``; with ``task``, only that task's run (one still waiting for its
        turn is dropped rather than left to run)."""
        if task is None:
            self.link.send("interrupt")
        elif task in self._runs:
            self.link.send("cancel", self._runs[task])

    async def restart(self) -> None:
        self._check_open()
        if self.lost:
            raise SessionClosed(self._lost_execution().reason or "")
        try:
            with self._running():
                await self.link.call("restart")
        except NodeLost as exc:
            raise SessionClosed(f"{await asyncio.to_thread(self.link.gone, exc)} Start a new session.") from None

    async def close(self, keep_workspace: bool = False) -> None:
        """Stop the kernel and free the node's slot. Idempotent; a lost session closes at once."""
        if self.link.closed:
            return
        self.link.closed = True
        try:
            if not self.lost:
                await asyncio.wait_for(self.link.call("close"), CLOSE_TIMEOUT_S)
        except (SandboxError, asyncio.TimeoutError) as exc:
            log.warning("session %s on node %s did not close cleanly: %s", self.id, self.node, exc)
        finally:
            self._on_close(self)
