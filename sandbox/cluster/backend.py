"""Sessions spread over the nodes of a Ray cluster, each in the docker backend of its node.

Each sandbox node runs one agent of this server's (``sandbox.cluster.node.NodeAgent``, a Ray actor
pinned to it) that owns the node's sessions; a session is a record there, and the server keeps a
``ClusterSession`` for it (``sandbox.cluster.session``). Ray places, supervises and connects; this
backend only chooses the node and keeps the warm sessions:

- Placement: the node with the most free slots (least loaded first); a node offers its
  ``jupybox_sandbox`` resource as its number of slots, and its agent refuses past them. No free
  slot anywhere is a ``CapacityError`` (HTTP 429), as on one host.
- Warm pool: ``pool_size`` sessions started ahead *per node*, handed out from the least loaded.
- Membership: the node list is watched; a node seen for the first time (at start-up, a new
  one, or one that came back) gets its agent, which first checks the node and removes what
  dead agents left there. A node that leaves, or whose agent dies, takes its sessions with it:
  they answer ``crashed`` with the reason (a node whose agent died gets a new one).
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
from .channels import CurveClient, KeyPair
from .link import NodeLost, SessionLink, unwrap
from .session import ClusterSession
from ..backends.base import Backend, KernelHandle, KernelSpec

log = logging.getLogger(__name__)

WATCH_S = 2.0  # how often the node list is read
CONNECT_TIMEOUT_S = 120.0  # joining a cluster, or starting a one-node Ray here
CALL_TIMEOUT_S = 30.0  # one question to the cluster's control store
PREPARE_TIMEOUT_S = 120.0
RETRY_PREPARE_S = 30.0  # a node that could not run sandboxes (no image yet, say) is checked again this often


@dataclass
class SandboxNode:
    """A node that offers sandbox slots, as this server knows it."""

    id: str
    slots: int
    name: str = "?"  # its jupybox name, known once prepared
    ready: bool = False
    problem: str | None = None
    prepared: float = 0.0  # when it was last prepared (monotonic)
    agent: Any = None  # this server's NodeAgent there
    agent_pid: int = 0  # its process, on that node
    address: str = ""  # where its relays listen
    key: bytes = b""  # its relays' public key
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
        self._dead_agents: set[str] = set()  # node ids whose agent died while the node lived
        self._watcher: asyncio.Task | None = None
        self._pool_changed = asyncio.Event()  # a warm session was added, or a start for a pool ended
        self._warm_starting = 0  # sessions being started for the pools
        self._waiting = 0  # callers waiting for one of them
        self._closing = False
        self._agent_class: Any = None
        self._keys = KeyPair.new()  # this server's: the only client key the nodes' relays accept
        self._address = ""  # this server's address in the cluster, the only one the relays admit

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

        from .node import NodeAgent

        self._agent_class = ray.remote(NodeAgent)
        self._address = await self._ask(ray.util.get_node_ip_address)
        found = await self._ask(control.nodes)
        if not any(n.alive and n.slots for n in found.values()):
            raise BackendUnavailable(
                f"no node of the Ray cluster at {self.settings.ray_address or 'this host'} offers sandbox slots: "
                f"start nodes with `ray start --address=HEAD:PORT --resources='{{\"{control.SLOT}\": 8}}'`")

    async def cleanup_orphans(self, is_orphan_owner: Any) -> int:
        """Prepare every node now (each removes its own leftovers) and keep watching the node
        list. The server's own predicate does not apply: owners on a node are that node's processes."""
        if self._agent_class is None:
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
        for attempt in range(2):  # a node lost meanwhile (the watcher has not seen it go): once more elsewhere
            node = await self._pick()
            try:
                session = await self._start_on(node, session_id, limits)
            except NodeLost:
                await asyncio.to_thread(self.lost_reason, node.id, node.name)  # records its fate
                if attempt:
                    raise
                continue
            self.sessions[session.id] = session
            return session
        raise AssertionError("unreachable")

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
        for node in self.nodes.values():
            if node.agent is not None:
                self._kill(node.agent)
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
        for node_id in list(self._dead_agents):  # the node lives on: it gets a new agent below
            self._dead_agents.discard(node_id)
            if node_id in self.nodes:
                self._node_left(node_id, "its jupybox agent died")
                self._deaths.pop(node_id, None)
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
        """Start this server's agent on the node (again, if the last one could not run sandboxes)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node.prepared = time.monotonic()
        if node.agent is not None:
            self._kill(node.agent)
        node.agent = self._agent_class.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
        ).remote(self.settings, node.slots, self._keys.public, self._address)
        try:
            report = await asyncio.wait_for(node.agent.prepare.remote(), PREPARE_TIMEOUT_S)
        except Exception as exc:
            node.problem = f"could not be prepared: {unwrap(exc, node.id[:8])}"
            log.warning("node %s %s", node.id[:8], node.problem)
            return 0
        node.agent_pid, node.address, node.key = report.pid, report.address, report.key
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
        """Why a session's agent is gone: its node was lost, or (node alive) the agent's process
        died (the node then gets a new agent). Blocking (asks Ray when the node's fate is not
        known yet)."""
        death = self._deaths.get(node_id)
        if death is None:
            state = control.nodes().get(node_id)
            if state is not None and state.alive:
                self._dead_agents.add(node_id)
                return f"The jupybox agent on cluster node {name!r}, which held this session, died."
            death = state.death if state is not None else "it left the cluster"
            self._deaths[node_id] = death  # no more placements there, before the watcher sees it go
        return f"The cluster node {name!r} that ran this session was lost ({death})."

    # -- placement and the warm pools -------------------------------------------------------
    def _load(self, node_id: str) -> int:
        """Sessions this server has handed out on the node."""
        return sum(1 for s in self.sessions.values() if s.node_id == node_id)

    def _room(self, node: SandboxNode) -> int:
        """Free slots on ``node`` as this server counts them: its sessions there, warm ones and
        those starting. (Another server's sessions on a shared node are not seen here: that
        node's agents refuse past its slots, with ``CapacityError``.)"""
        return node.slots - self._load(node.id) - len(node.warm) - self._starting[node.id]

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
        ready = [n for n in self.nodes.values()
                 if n.ready and n.id not in self._deaths and n.id not in self._dead_agents]
        if not ready:
            problems = "; ".join(f"{n.name}: {n.problem}" for n in self.nodes.values() if n.problem)
            raise BackendUnavailable("no node of the Ray cluster can run sandboxes" + (f" ({problems})" if problems else ""))
        room = {n.id: self._room(n) for n in ready}
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
            if self._room(node) <= 0:
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
        """Start a session on ``node``'s agent (where the caller reserved a slot in ``_starting``,
        released here); on any failure nothing is left. The agent names the session."""
        start = asyncio.ensure_future(self._await(node.agent.open.remote(limits), node.name))
        timeout = self.settings.start_timeout_s + 30
        try:
            sid = await asyncio.wait_for(asyncio.shield(start), timeout)
        except asyncio.CancelledError:
            # shut down (or the caller left) mid-start: let the start finish, then close it properly,
            # so no container outlives this
            with contextlib.suppress(Exception):
                sid = await asyncio.wait_for(start, self.settings.start_timeout_s)
                await asyncio.wait_for(node.agent.close.remote(sid), 30)
            raise
        except asyncio.TimeoutError:
            start.add_done_callback(lambda f: f.exception() or node.agent.close.remote(f.result()))
            raise SandboxError(f"no session started on the cluster within {timeout:.0f} s "
                               "(every slot busy, or the node is overloaded)") from None
        finally:
            self._starting[node.id] -= 1
        link = SessionLink(node.agent, sid, node.name, node.id, self.lost_reason)
        return ClusterSession(link, limits, self.settings, CurveClient(self._keys, node.key), self._forget)

    async def _await(self, ref: Any, node: str) -> Any:
        try:
            return await ref
        except Exception as exc:
            err = unwrap(exc, node)
            if isinstance(err, NodeLost):
                raise NodeLost(f"cluster node {node!r} was lost while the session started: try again") from None
            if isinstance(err, JupyboxError) and type(err) is not SandboxError:
                raise type(err)(f"on cluster node {node!r}: {err}") from None
            raise err from None

    @staticmethod
    async def _ask(question: Any) -> Any:
        """One blocking question to the cluster (``control.nodes``)."""
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
