"""A session on a cluster node, seen from the server: ``ClusterSession`` has the interface of
``Session`` (and its ``workspace`` that of ``Workspace``: ``sandbox.remote``), so the manager, the
API and the UI use it unchanged. Every call goes to the session's actor
(``sandbox.node.SessionHost``) on its node.

What differs from a local session, and why:

- ``stream`` relays each output as the node yields it (a Ray streaming generator); a consumer
  that stops early cancels the generator there, which interrupts the run (or drops it unrun).
- When the node (or the actor's process) is lost, the kernel and the files are gone with it:
  executions then answer ``crashed`` with the reason, and file calls raise ``SessionClosed``.
  Nothing is retried elsewhere: the session's state lived only there.
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
from ..kernel import OutputCallback
from ..models import Execution, ExecutionStatus, Output
from .files import FILE_CALL_TIMEOUT_S, NodeLost, ClusterWorkspace, unwrap

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 60.0


class ClusterSession:
    """A session whose kernel and files live on a cluster node (see the module docstring)."""

    def __init__(self, actor: Any, session_id: str, limits: Limits, node: str, node_id: str, pid: int,
                 lost_reason: Callable[[str, str], str], on_close: Callable[[ClusterSession], None]) -> None:
        self.id = session_id
        self.limits = limits
        self.node = node  # the node's jupybox name
        self.node_id = node_id  # Ray's id of it
        self.pid = pid  # the actor's process on the node
        self.created = time.time()
        self.last_used = time.monotonic()
        self.executions = 0
        self.paused = False  # a cluster's sessions are never paused: they end with the server
        self.before_resume: Any = None
        self.after_resume: Any = None
        self.pause_note: str | None = None
        self.isolation: str | None = None
        self.workspace = ClusterWorkspace(self)
        self._actor = actor
        self._lost_reason = lost_reason  # (node id, node name) -> why it is gone, in words
        self._on_close = on_close
        self._active = 0  # executions and restarts in flight
        self._runs: dict[asyncio.Task, str] = {}
        self._lost: str | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lost(self) -> str | None:
        """Why the session is gone with its node, or None while it lives."""
        return self._lost

    @property
    def busy(self) -> bool:
        return self._active > 0

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def mark_lost(self, reason: str) -> None:
        """The node is gone (the backend saw it leave): every later call answers so at once."""
        if self._lost is None:
            self._lost = reason
            log.warning("session %s: %s", self.id, reason)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed(f"session {self.id} is closed: create a new session")

    # -- what the workspace may ask (``FileCalls``) -------------------------------------------
    @property
    def actor(self) -> Any:
        return self._actor

    @property
    def reachable(self) -> bool:
        return not self._lost and not self._closed

    def wait_file_call(self, ref: Any) -> Any:
        import ray

        self._check_open()
        if self._lost:
            raise SessionClosed(f"{self._lost} Its files are gone: start a new session.")
        try:
            return ray.get(ref, timeout=FILE_CALL_TIMEOUT_S)
        except Exception as exc:
            err = unwrap(exc, self.node)
            if isinstance(err, NodeLost):
                raise SessionClosed(f"{self._gone(err)} Its files are gone: start a new session.") from None
            raise err from None

    def _gone(self, exc: NodeLost) -> str:
        """Record why the actor is gone (blocking: asks the cluster); returns the reason."""
        log.debug("session %s: actor error: %s", self.id, exc)
        self.mark_lost(self._lost_reason(self.node_id, self.node))
        return self._lost or str(exc)

    def _lost_execution(self) -> Execution:
        return Execution(status=ExecutionStatus.CRASHED, state_lost=True,
                         reason=f"{self._lost} Its kernel and files are gone: start a new session.")

    async def _call(self, ref: Any) -> Any:
        try:
            return await ref
        except Exception as exc:
            raise unwrap(exc, self.node) from None

    def _watch(self, cancel: asyncio.Event | None, run: str) -> asyncio.Task | None:
        """Relay ``cancel`` to the node, where it drops or interrupts this run only."""
        if cancel is None:
            return None

        async def relay() -> None:
            await cancel.wait()
            self._actor.cancel.remote(run)

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
        if self._lost:
            return self._lost_execution()
        run = uuid.uuid4().hex
        watcher = self._watch(cancel, run)
        ref = self._actor.execute.remote(code, timeout, run)
        try:
            with self._running(run):
                return await self._call(ref)
        except NodeLost as exc:
            await asyncio.to_thread(self._gone, exc)
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
        if self._lost:
            yield self._lost_execution()
            return
        run = uuid.uuid4().hex
        watcher = self._watch(cancel, run)
        items = self._actor.stream.remote(code, timeout, run)
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
                    await asyncio.to_thread(self._gone, lost)
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
        if self._lost or self._closed:
            return
        if task is None:
            self._actor.interrupt.remote()
        elif task in self._runs:
            self._actor.cancel.remote(self._runs[task])

    async def restart(self) -> None:
        self._check_open()
        if self._lost:
            raise SessionClosed(self._lost_execution().reason or "")
        try:
            with self._running():
                await self._call(self._actor.restart.remote())
        except NodeLost as exc:
            raise SessionClosed(f"{await asyncio.to_thread(self._gone, exc)} Start a new session.") from None

    async def close(self, keep_workspace: bool = False) -> None:
        """Stop the kernel and free the node's slot. Idempotent; a lost session closes at once."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._lost:
                await asyncio.wait_for(self._call(self._actor.close.remote()), CLOSE_TIMEOUT_S)
        except (SandboxError, asyncio.TimeoutError) as exc:
            log.warning("session %s on node %s did not close cleanly: %s", self.id, self.node, exc)
        finally:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(self._actor)  # frees the slot now rather than at garbage collection
            self._on_close(self)
