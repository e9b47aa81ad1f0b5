"""The server's line to one session's record in its node's agent: every call the session and its
files make goes through a ``SessionLink``, which adds the session's id, waits within a time-out and
turns Ray's failures into the sandbox's errors. Neither the session nor its files see the other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ..errors import JupyboxError, SandboxError, SessionClosed

log = logging.getLogger(__name__)

FILE_CALL_TIMEOUT_S = 120.0  # one file call (a chunk, a listing) on a live node takes far less


class NodeLost(SandboxError):
    """The session's node, or its agent there, is gone; ``reason`` says which and why."""


def unwrap(exc: BaseException, node: str) -> BaseException:
    """The error to raise for a failed agent call: the sandbox's own error as the node raised it
    (without Ray's traceback text), ``NodeLost`` for a dead agent, ``SandboxError`` otherwise."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if isinstance(cause, JupyboxError):
            return cause
        return SandboxError(f"the session failed on node {node!r}: {type(cause).__name__}: {cause}")
    if isinstance(exc, rex.ActorUnavailableError):
        return SandboxError(f"node {node!r} does not answer just now: try again in a moment")
    if isinstance(exc, rex.RayActorError):
        return NodeLost(str(exc))
    if isinstance(exc, rex.GetTimeoutError):
        return SandboxError(f"node {node!r} did not answer within {FILE_CALL_TIMEOUT_S:.0f} s")
    return exc


class SessionLink:
    """One session on its node's agent (``sandbox.cluster.node.NodeAgent``)."""

    def __init__(self, agent: Any, session_id: str, node: str, node_id: str,
                 lost_reason: Callable[[str, str], str]) -> None:
        self.agent = agent
        self.session_id = session_id
        self.node = node  # the node's jupybox name
        self.node_id = node_id  # Ray's id of it
        self._lost_reason = lost_reason  # (node id, node name) -> why it is gone, in words (blocking)
        self.lost: str | None = None
        self.closed = False

    @property
    def reachable(self) -> bool:
        """Neither closed nor lost with its node: a file left open there is worth closing."""
        return self.lost is None and not self.closed

    def mark_lost(self, reason: str) -> None:
        """The node is gone (the backend saw it leave): every later call answers so at once."""
        if self.lost is None:
            self.lost = reason
            log.warning("session %s: %s", self.session_id, reason)

    def gone(self, exc: NodeLost) -> str:
        """Record why the agent is gone (blocking: asks the cluster); returns the reason."""
        log.debug("session %s: agent error: %s", self.session_id, exc)
        self.mark_lost(self._lost_reason(self.node_id, self.node))
        return self.lost or str(exc)

    def remote(self, method: str, *args: Any) -> Any:
        """Start ``method`` on the agent for this session; returns Ray's reference (or generator)."""
        return getattr(self.agent, method).remote(self.session_id, *args)

    def send(self, method: str, *args: Any) -> None:
        """Fire and forget (an interrupt, closing a file): nothing to wait for, nothing raised."""
        if self.reachable:
            with contextlib.suppress(Exception):
                self.remote(method, *args)

    async def call(self, method: str, *args: Any) -> Any:
        """Await ``method``'s answer; the node's errors re-raised as they are, ``NodeLost`` for a dead agent."""
        try:
            return await self.remote(method, *args)
        except Exception as exc:
            raise unwrap(exc, self.node) from None

    def call_blocking(self, method: str, *args: Any) -> Any:
        """``call`` for file methods, which block (at most ``FILE_CALL_TIMEOUT_S``); once the session
        or its node is gone, ``SessionClosed`` saying so."""
        import ray

        if self.closed:
            raise SessionClosed(f"session {self.session_id} is closed: create a new session")
        if self.lost:
            raise SessionClosed(f"{self.lost} Its files are gone: start a new session.")
        try:
            return ray.get(self.remote(method, *args), timeout=FILE_CALL_TIMEOUT_S)
        except Exception as exc:
            err = unwrap(exc, self.node)
            if isinstance(err, NodeLost):
                raise SessionClosed(f"{self.gone(err)} Its files are gone: start a new session.") from None
            raise err from None
