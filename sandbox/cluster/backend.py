"""Sessions spread over the nodes of a Ray cluster, each in the docker backend of its node.

Each session is a Ray actor (``sandbox.node.SessionHost``) holding one ``jupybox_sandbox`` slot
on its node; the server keeps a ``ClusterSession`` proxy (``sandbox.remote_session``). Ray places,
supervises and connects; this backend only chooses the node and keeps the warm sessions:

- Placement: the node with the most free slots (least loaded first), pinned softly, so Ray
  moves the session elsewhere if that node filled up meanwhile. No free slot anywhere is a
  ``CapacityError`` (HTTP 429), as on one host.
- Warm pool: ``pool_size`` sessions started ahead *per node*, handed out from the least loaded.
- Membership: the node list is watched; a node seen for the first time (at start-up, a new
  one, or one that came back) is prepared first (``sandbox.node.prepare_node``: checks, and
  removes what its predecessor left). A node that leaves takes its sessions with it: they
  answer ``crashed`` with the reason.
- No state outside the cluster: a restarted server prepares every node again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import control
from ..config import Limits, SandboxSettings
from ..errors import BackendUnavailable, CapacityError, JupyboxError, SandboxError
from .files import NodeLost, unwrap
from .session import ClusterSession
from ..backends.base import Backend, KernelHandle, KernelSpec

log = logging.getLogger(__name__)

WATCH_S = 2.0  # how often the node list is read
CONNECT_TIMEOUT_S = 120.0  # joining a cluster, or starting a one-node Ray here
CALL_TIMEOUT_S = 30.0  # one question to the cluster's control store
PREPARE_TIMEOUT_S = 120.0
RETRY_PREPARE_S = 30.0  # a node that could not run sandboxes (no image yet, say) is checked again this often
RELEASE_LAG_S = 3.0  # how long a closed session's slot may still count as taken in the cluster's view


@dataclass
class SandboxNode:
    """A node that offers sandbox slots, as this server knows it."""

    id: str
    slots: int
    name: str = "?"  # its jupybox name, known once prepared
    ready: bool = False
    problem: str | None = None
    prepared: float = 0.0  # when it was last prepared (monotonic)
    warm: list[ClusterSession] = field(default_factory=list)
    refill: asyncio.Task | None = None


class RayBackend(Backend):
    name = "ray"
    places_sessions = True

    def __init__(self, settings: SandboxSettings) -> None:
        super().__init__(settings)
        self.nodes: dict[str, SandboxNode] = {}
        self.sessions: dict[str, ClusterSession] = {}  # handed out, not closed
        self._starting: collections.Counter[str] = collections.Counter()  # per node id
        self._deaths: dict[str, str] = {}  # node id -> why Ray lost it
        self._released: dict[str, list[float]] = collections.defaultdict(list)  # node id -> when slots were freed
        self._watcher: asyncio.Task | None = None
        self._pool_changed = asyncio.Event()  # a warm session was added, or a start for a pool ended
        self._warm_starting = 0  # sessions being started for the pools
        self._waiting = 0  # callers waiting for one of them
        self._closing = False
        self._actor_class: Any = None
        self._prepare_task: Any = None

    # -- the seam ---------------------------------------------------------------------------
    async def check(self) -> None:
        """Join the cluster (or start a one-node Ray here) and find its sandbox nodes."""
        try:
            await control.call(control.connect, self.settings.ray_address, self.settings.max_sessions,
                               timeout=CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise BackendUnavailable(f"Ray did not {'answer at ' + self.settings.ray_address if self.settings.ray_address else 'start'} "
                                     f"within {CONNECT_TIMEOUT_S:.0f} s: see `ray status` there, and Ray's logs "
                                     "under /tmp/ray/session_latest/logs") from None
        import ray

        from .node import SessionHost, prepare_node

        self._actor_class = ray.remote(SessionHost)
        self._prepare_task = ray.remote(prepare_node)
        found = await self._ask(control.nodes)
        if not any(n.alive and n.slots for n in found.values()):
            raise BackendUnavailable(
                f"no node of the Ray cluster at {self.settings.ray_address or 'this host'} offers sandbox slots: "
                f"start nodes with `ray start --address=HEAD:PORT --resources='{{\"{control.SLOT}\": 8}}'`")

    async def cleanup_orphans(self, is_orphan_owner: Any) -> int:
        """Prepare every node now (each removes its own leftovers) and keep watching the node
        list. The server's own predicate does not apply: owners on a node are that node's processes."""
        if self._actor_class is None:
            await self.check()
        removed = await self._refresh()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
        return removed

    async def start(self, spec: KernelSpec) -> KernelHandle:
        raise SandboxError("the ray backend places whole sessions on its nodes (open_session); it starts no kernel here")

    async def is_alive(self, handle: KernelHandle) -> bool:
        return False

    async def stop(self, handle: KernelHandle) -> None:
        return None

    async def open_session(self, session_id: str, limits: Limits) -> ClusterSession:
        """A started session on the least loaded node: a warm one when ``limits`` are the default."""
        if self._watcher is None:  # the manager starts us through cleanup_orphans; be safe anyway
            await self.cleanup_orphans(None)
        if limits == self.settings.limits and (warm := await self._warm_session()) is not None:
            return warm
        node = await self._pick()
        session = await self._start_on(node, session_id, limits)
        self.sessions[session.id] = session
        return session

    async def close(self) -> None:
        """Stop watching, close the warm sessions. Ray stays connected for this process's next manager."""
        self._closing = True
        tasks = [t for t in (self._watcher, *(n.refill for n in self.nodes.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        warm = [s for n in self.nodes.values() for s in n.warm]
        for node in self.nodes.values():
            node.warm.clear()
        await asyncio.gather(*(s.close() for s in warm), return_exceptions=True)
        self._watcher = None

    # -- membership -------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self._refresh()
            except Exception:  # the control store may blink; the next round tries again
                log.exception("reading the Ray cluster's nodes failed")

    async def _refresh(self) -> int:
        """Follow the node list: forget lost nodes (their sessions are lost), prepare new ones."""
        found = await self._ask(control.nodes)
        for node_id in list(self.nodes):
            state = found.get(node_id)
            if state is None or not state.alive:
                self._node_left(node_id, state.death if state else "it left the cluster")
        new = [n for n in found.values() if n.alive and n.slots and n.id not in self.nodes]
        for state in new:
            self.nodes[state.id] = SandboxNode(state.id, state.slots)
        due = [self.nodes[s.id] for s in new]
        due += [n for n in self.nodes.values() if n.problem and time.monotonic() - n.prepared > RETRY_PREPARE_S]
        reports = await asyncio.gather(*(self._prepare(n) for n in due))
        return sum(reports)

    async def _prepare(self, node: SandboxNode) -> int:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node.prepared = time.monotonic()
        ref = self._prepare_task.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
        ).remote(self.settings)
        try:
            report = await asyncio.wait_for(ref, PREPARE_TIMEOUT_S)
        except Exception as exc:
            node.problem = f"could not be prepared: {unwrap(exc, node.id[:8])}"
            log.warning("node %s %s", node.id[:8], node.problem)
            return 0
        node.name, node.problem, node.ready = report.name, report.problem, report.problem is None
        if node.problem:
            log.warning("node %s (%s) cannot run sandboxes: %s", node.name, node.id[:8], node.problem)
        else:
            log.info("node %s (%s) ready: %d slots, %d leftovers removed", node.name, node.id[:8], node.slots,
                     report.removed)
            self._refill(node)
        return report.removed

    def _node_left(self, node_id: str, death: str) -> None:
        node = self.nodes.pop(node_id)
        self._deaths[node_id] = death
        reason = self.lost_reason(node_id, node.name)
        if node.refill is not None:
            node.refill.cancel()
        for session in [*node.warm, *(s for s in self.sessions.values() if s.node_id == node_id)]:
            session.mark_lost(reason)
        for session in node.warm:
            asyncio.ensure_future(session.close())  # frees nothing on a dead node, but ends the proxy
        node.warm.clear()
        log.warning("node %s (%s) left the cluster: %s", node.name, node_id[:8], death)

    def lost_reason(self, node_id: str, name: str) -> str:
        """Why a session's actor is gone: its node was lost, or (node alive) its process died.
        Blocking (asks Ray when the node's fate is not known yet)."""
        death = self._deaths.get(node_id)
        if death is None:
            state = control.nodes().get(node_id)
            if state is not None and state.alive:
                return f"The session's process on cluster node {name!r} died."
            death = state.death if state is not None else "it left the cluster"
        return f"The cluster node {name!r} that ran this session was lost ({death})."

    # -- placement and the warm pools -------------------------------------------------------
    def _load(self, node_id: str) -> int:
        """Sessions this server has handed out on the node."""
        return sum(1 for s in self.sessions.values() if s.node_id == node_id)

    def _room(self, node: SandboxNode, free: dict[str, int]) -> int:
        """Free slots on ``node``. This server knows its own sessions at once; the cluster's count
        is needed for other servers' sessions, but lags: it may not yet hold a session just
        started, or may still hold one just closed. So: the slots, less ours, less what the
        cluster counts beyond ours and beyond those we freed a moment ago."""
        now = time.monotonic()
        recent = self._released[node.id] = [t for t in self._released[node.id] if now - t < RELEASE_LAG_S]
        ours = self._load(node.id) + len(node.warm) + self._starting[node.id]
        used = node.slots - free.get(node.id, 0)
        others = max(0, used - ours - len(recent))
        return node.slots - ours - others

    async def _warm_session(self) -> ClusterSession | None:
        """A warm session: one ready, or one a pool is about to have (sooner than a cold start),
        as long as there are fewer callers waiting than warm sessions on their way."""
        while (session := self._take_warm()) is None and self._waiting < self._warm_starting:
            self._pool_changed.clear()
            self._waiting += 1
            try:
                await self._pool_changed.wait()
            finally:
                self._waiting -= 1
        return session

    def _take_warm(self) -> ClusterSession | None:
        holders = [n for n in self.nodes.values() if n.warm and n.ready]
        if not holders:
            return None
        node = min(holders, key=lambda n: self._load(n.id))
        session = node.warm.pop(0)
        self.sessions[session.id] = session
        self._refill(node)
        return session

    async def _pick(self) -> SandboxNode:
        """The least loaded ready node, with one slot reserved in ``_starting`` (released by ``_start_on``)."""
        ready = [n for n in self.nodes.values() if n.ready]
        if not ready:
            problems = "; ".join(f"{n.name}: {n.problem}" for n in self.nodes.values() if n.problem)
            raise BackendUnavailable("no node of the Ray cluster can run sandboxes" + (f" ({problems})" if problems else ""))
        free = await self._ask(control.free_slots)
        room = {n.id: self._room(n, free) for n in ready}
        best = max(ready, key=lambda n: (room[n.id], -self._load(n.id)))
        if room[best.id] > 0:
            self._starting[best.id] += 1
            return best
        # full: a warm session (default limits) gives its slot to this one (custom limits)
        spare = max((n for n in ready if n.warm), key=lambda n: self._load(n.id), default=None)
        if spare is not None:
            self._starting[spare.id] += 1
            await spare.warm.pop().close()
            return spare
        total = sum(n.slots for n in ready)
        raise CapacityError(f"all {total} sandbox slots of the cluster's {len(ready)} node(s) are taken: close idle "
                            f"sessions, or add a node (`ray start ... --resources='{{\"{control.SLOT}\": N}}'`)")

    def _refill(self, node: SandboxNode) -> None:
        if self.settings.pool_size and not self._closing and (node.refill is None or node.refill.done()):
            node.refill = asyncio.create_task(self._fill(node))

    async def _fill(self, node: SandboxNode) -> None:
        while len(node.warm) < self.settings.pool_size and node.ready and not self._closing:
            free = await self._ask(control.free_slots)
            if self._room(node, free) <= 0:
                return  # full: the next hand-out tries again
            self._starting[node.id] += 1
            self._warm_starting += 1
            try:
                session = await self._start_on(node, None, self.settings.limits)
            except SandboxError as exc:
                log.warning("warm pool of node %s: could not start a session: %s", node.name, exc)
                return
            finally:
                self._warm_starting -= 1
                self._pool_changed.set()
            target = self.nodes.get(session.node_id)
            if target is None or self._closing:
                await session.close()
                return
            target.warm.append(session)
            self._pool_changed.set()

    async def _start_on(self, node: SandboxNode, session_id: str | None, limits: Limits) -> ClusterSession:
        """Start a session's actor, pinned softly to ``node`` (where the caller reserved a slot in
        ``_starting``, released here); on any failure nothing is left."""
        import uuid

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        sid = session_id or uuid.uuid4().hex[:12]
        actor = self._actor_class.options(
            num_cpus=0, resources={control.SLOT: 1},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=True),
        ).remote(self.settings, sid, limits)
        start = asyncio.ensure_future(self._await(actor.start.remote(), node.name))
        try:
            info = await asyncio.wait_for(asyncio.shield(start), self.settings.start_timeout_s + 30)
        except asyncio.CancelledError:
            # shut down (or the caller left) mid-start: let the start finish, then close it properly,
            # so no container outlives this
            with contextlib.suppress(Exception):
                await asyncio.wait_for(start, self.settings.start_timeout_s)
                await asyncio.wait_for(actor.close.remote(), 30)
            self._kill(actor)
            raise
        except asyncio.TimeoutError:
            self._kill(actor)
            raise SandboxError(f"no session started on the cluster within {self.settings.start_timeout_s + 30:.0f} s "
                               "(every slot busy, or the node is overloaded)") from None
        except BaseException:
            self._kill(actor)
            raise
        finally:
            self._starting[node.id] -= 1
        where = self.nodes.get(info["node_id"])
        name = where.name if where is not None else info["node"]
        return ClusterSession(actor, sid, limits, name, info["node_id"], info["pid"], self.lost_reason, self._forget)

    async def _await(self, ref: Any, node: str) -> Any:
        try:
            return await ref
        except Exception as exc:
            err = unwrap(exc, node)
            if isinstance(err, NodeLost):
                raise SandboxError(f"cluster node {node!r} was lost while the session started: try again") from None
            if isinstance(err, JupyboxError) and type(err) is not SandboxError:
                raise type(err)(f"on cluster node {node!r}: {err}") from None
            raise err from None

    @staticmethod
    async def _ask(question: Any) -> Any:
        """One blocking question to the cluster (``control.nodes``, ``control.free_slots``)."""
        try:
            return await control.call(question, timeout=CALL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise SandboxError(f"the Ray cluster's head did not answer within {CALL_TIMEOUT_S:.0f} s: "
                               "see `ray status` on it") from None

    @staticmethod
    def _kill(actor: Any) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(actor)

    def _forget(self, session: ClusterSession) -> None:
        """A session closed (or a warm one dropped): its slot is free again."""
        self.sessions.pop(session.id, None)
        if not session.lost:
            self._released[session.node_id].append(time.monotonic())
