"""Who restarts a dead kernel: one ``KernelSupervisor`` per session, and nobody else.

Several parties can notice that a session's kernel is gone: an execution whose kernel died under
it, the liveness watch that runs while notebook clients are attached, a client whose shutdown
request the kernel outlived. Each asks the supervisor, passing the kernel *generation* it saw (a
number bumped at every new kernel); the supervisor replaces that generation at most once, so
however many of them notice at once, the session gets exactly one new kernel.

Replacing runs under the session's lock (the one executions hold), so it never swaps a kernel out
from under a running execution: it waits for the execution to return first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .backends.base import Backend, KernelHandle
from .config import KernelWatch
from .errors import SessionClosed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replacement:
    """Why a kernel is replaced: ``what`` for the server's log, ``reason`` for the notebook
    clients attached to it, who are told ``autorestarting`` (as Jupyter servers do) when
    ``autorestart``, or just disconnected (a restart someone asked for)."""

    what: str
    reason: str
    autorestart: bool = True


DIED = Replacement("died", "the kernel died; it was restarted, variables are lost")
RESTARTED = Replacement("was restarted", "the kernel was restarted; variables are lost", autorestart=False)


@dataclass(frozen=True)
class Watched:
    """What the liveness watch needs to know of the session at each look."""

    clients: bool  # notebook clients are attached: the watch keeps running
    busy: bool  # one of their requests runs: look every ``check_s`` rather than every ``idle_check_s``


class KernelSupervisor:
    """The session's kernel generation, its shared looks at the kernel's life, the liveness
    watch, and the one replacement path.

    The session tells it when a kernel started (``started``) and supplies ``replace`` (stop the
    kernel, ending its clients with the ``Replacement``'s reason, and start a fresh one, which
    calls ``started`` again), ``end_clients`` (end the notebook clients now, before the slower
    replacement) and ``watched``.
    """

    def __init__(self, backend: Backend, watch: KernelWatch, lock: asyncio.Lock, name: str,
                 replace: Callable[[Replacement], Awaitable[None]],
                 end_clients: Callable[[Replacement], None],
                 watched: Callable[[], Watched]) -> None:
        self.backend = backend
        self.watch = watch
        self.lock = lock
        self.name = name  # the session's id, for the log
        self._replace = replace
        self._end_clients = end_clients
        self._watched = watched
        self._generation = 0
        self._handle: KernelHandle | None = None
        self._dead = False  # an execution saw this generation die
        # the last look at the kernel's life (handle, when, answer) and the one under way: shared
        self._alive_seen: tuple[KernelHandle, float, bool] | None = None
        self._alive_look: tuple[KernelHandle, asyncio.Future[bool]] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()  # replacements asked for and not done yet

    # -- what the session tells it ------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The running kernel's number: 1 for the first, one more for each replacement."""
        return self._generation

    @property
    def handle(self) -> KernelHandle | None:
        return self._handle

    @property
    def needs_replacement(self) -> bool:
        """No kernel runs, or an execution saw it die: the next user replaces it first."""
        return self._handle is None or self._dead

    def started(self, handle: KernelHandle) -> None:
        self._handle = handle
        self._generation += 1
        self._dead = False

    def stopped(self) -> None:
        self._handle = None

    def mark_dead(self, generation: int) -> None:
        """An execution saw kernel ``generation`` die (or exit): it is replaced before its next use."""
        if generation == self._generation:
            self._dead = True

    # -- looks at the kernel's life -----------------------------------------------------------
    async def alive(self, max_age: float = 0.0) -> bool:
        """Whether the kernel still runs. Callers at the same time wait for one look at the
        backend, and an answer that came back at most ``max_age`` seconds ago is reused."""
        handle = self._handle
        if handle is None:
            return False
        seen = self._alive_seen
        if seen is not None and seen[0] is handle and time.monotonic() - seen[1] <= max_age:
            return seen[2]
        look = self._alive_look
        if look is None or look[0] is not handle:
            task = asyncio.ensure_future(self.backend.is_alive(handle))
            look = self._alive_look = (handle, task)
            task.add_done_callback(lambda done: self._looked(handle, done))
        return await asyncio.shield(look[1])  # one caller cancelled does not cancel the others' look

    def _looked(self, handle: KernelHandle, look: asyncio.Future[bool]) -> None:
        if self._alive_look is not None and self._alive_look[1] is look:
            self._alive_look = None
        # a look at a kernel since replaced is no answer about the running one
        if not look.cancelled() and look.exception() is None and handle is self._handle:
            self._alive_seen = (handle, time.monotonic(), look.result())

    async def gone(self, generation: int) -> bool:
        """Kernel ``generation`` is dead in two looks, the second ``recheck_s`` after the first
        answered (one failed look at the container, a daemon's hiccup, must not cost a notebook
        its variables), and it is still the running one."""
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(self.watch.recheck_s)
            # the first look may reuse an answer of the last check; the second asks anew
            if generation != self._generation or await self.alive(0.0 if attempt else self.watch.check_s):
                return False
        return generation == self._generation

    # -- the one replacement path -------------------------------------------------------------
    async def replace(self, generation: int, why: Replacement = RESTARTED) -> bool:
        """Replace kernel ``generation`` unless it already was: ``True`` if this call did it."""
        async with self.lock:
            return await self.replace_locked(generation, why)

    async def replace_locked(self, generation: int, why: Replacement = RESTARTED) -> bool:
        """``replace`` for a caller that holds the session's lock (an execution)."""
        if generation != self._generation:
            return False
        if why is not RESTARTED:
            log.warning("the kernel of session %s %s", self.name, why.what)
        await self._replace(why)
        return True

    def replace_soon(self, generation: int, why: Replacement) -> None:
        """Replace kernel ``generation`` without waiting: its notebook clients are ended now (they
        reconnect to the new kernel), the replacement follows once the session's lock is free."""
        if generation != self._generation:
            return
        self._dead = True  # whoever comes first (a client reconnecting, an execution) replaces it
        self._end_clients(why)
        task = asyncio.create_task(self.replace(generation, why))
        self._pending.add(task)
        task.add_done_callback(self._replaced)

    def _replaced(self, task: asyncio.Task[bool]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), SessionClosed):
            log.warning("replacing the kernel of session %s failed: %s", self.name, task.exception())

    async def settled(self) -> None:
        """Wait for the replacements asked for so far (their failures are logged, not raised)."""
        while self._pending:
            await asyncio.wait(set(self._pending))

    # -- the liveness watch -------------------------------------------------------------------
    def ensure_watching(self) -> None:
        """Watch the kernel while notebook clients are attached (an execution watches its own):
        one watch for the session, however many clients, so the backend is asked about once a
        ``check_s`` at most."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        looked = time.monotonic()
        while True:
            await asyncio.sleep(self.watch.check_s)
            state = self._watched()
            if not state.clients:
                return
            now = time.monotonic()
            if not state.busy and now - looked < self.watch.idle_check_s:
                continue
            looked = now
            generation = self._generation
            try:
                if await self.gone(generation):
                    self.replace_soon(generation, DIED)
            except Exception as exc:  # the backend is unwell: look again next time
                log.warning("could not look at the kernel of session %s: %s", self.name, exc)

    async def close(self) -> None:
        """Stop watching (the session is closing). Replacements already asked for find the session
        closed once they hold its lock, and do nothing."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
