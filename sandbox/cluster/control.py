"""The Ray cluster under the ``ray`` backend: joining it, and its sandbox nodes with their slots.

Ray places, supervises and connects; jupybox only reads what Ray knows. A *sandbox node* is a
Ray node started with the ``jupybox_sandbox`` resource, its number of session slots::

    JUPYBOX_NODE=gpu-box-2 ray start --address=HEAD:6379 --resources='{"jupybox_sandbox": 16}'

The node's agent holds at most that many sessions, and the cluster's capacity is the sum of the
slots.

Everything here calls Ray's blocking client API: call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import BackendUnavailable

log = logging.getLogger(__name__)

SLOT = "jupybox_sandbox"  # the custom resource a node offers, one unit per session
OBJECT_STORE_BYTES = 128 << 20  # a one-node Ray started here moves small messages only
REACH_TIMEOUT_S = 5.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _loopback(address: str | None) -> bool:
    if address is None:
        return True
    host = urlsplit(f"//{address}").hostname or ""
    return host in LOOPBACK


def import_ray(address: str | None) -> Any:
    """Ray, imported with jupybox's defaults (its settings are read once, at import): no usage
    statistics sent anywhere, no crash handler of Ray's on SIGTERM, and a cluster on loopback kept on loopback (Ray otherwise rewrites 127.0.0.1 to the host's public address,
    which is also what a one-node Ray started here would bind)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's C++ crash handler also takes SIGTERM, and aborts the process after jupybox's own
    # orderly shutdown (exit status -6): the server's signal handling is jupybox's
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    if _loopback(address):
        # makes Ray use loopback for the local node's address
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("the ray backend needs Ray: pip install 'jupybox[ray]'") from None
    return ray


def _reachable(address: str) -> None:
    """Fail fast on an address where nothing listens: Ray itself retries such a one for minutes."""
    parts = urlsplit(f"//{address}")
    if parts.hostname is None or parts.port is None:
        raise BackendUnavailable(f"--ray-address {address!r}: give the head's GCS address as host:port (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise BackendUnavailable(f"nothing answers at {address} ({exc.strerror or exc}): is the Ray head running there "
                                 "(`ray start --head`), and is this its address (`ray status` on it)?") from None


def connect(address: str | None, slots: int) -> bool:
    """Join the cluster at ``address``, or start a one-node Ray on loopback offering ``slots``
    sandbox slots. Returns whether this call connected (False: this process already had Ray)."""
    ray = import_ray(address)
    if ray.is_initialized():
        return False
    if address and address != "auto":
        _reachable(address)
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # "local" explicitly: never join a cluster Ray finds by itself (RAY_ADDRESS, /tmp/ray)
            ray.init(address="local", include_dashboard=False, resources={SLOT: slots},
                     object_store_memory=OBJECT_STORE_BYTES, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local one-node Ray"
        raise BackendUnavailable(f"could not start or join {where}: {exc}. Check --ray-address "
                                 "(host:port of the head, `ray status` there shows it)") from None
    log.info("joined %s", address or "a one-node Ray on loopback, started here")
    return True


@dataclass
class NodeState:
    """One Ray node as Ray reports it."""

    id: str
    address: str
    slots: int  # its jupybox_sandbox resource; 0 for nodes that run no sandboxes
    alive: bool
    death: str  # why Ray lost it, when it did


def nodes() -> dict[str, NodeState]:
    """Every node Ray knows, dead ones included (their death reason says why)."""
    import ray

    found = {}
    for n in ray.nodes():
        slots = int((n.get("Resources") or {}).get(SLOT, 0))
        found[n["NodeID"]] = NodeState(id=n["NodeID"], address=n.get("NodeManagerAddress", "?"), slots=slots,
                                       alive=bool(n.get("Alive")),
                                       death=n.get("DeathReasonMessage") or "it stopped answering")
    return found


class _RayThread:
    """One daemon thread for Ray's blocking client calls, started once and kept for the life of
    the process. Kept, because Ray starts a one-node cluster's processes with a parent-death
    signal, which Linux sends when the *thread* that started them ends (so a pool thread or a
    short-lived one would take the cluster down with it); a daemon, because Ray may block for
    minutes and must never keep the process from exiting on SIGTERM."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Callable[[bool, Any], None]]] = (
            queue.SimpleQueue())
        threading.Thread(target=self._serve, name="jupybox-ray", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, reply = self._calls.get()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting task
                reply(False, exc)
            else:
                reply(True, result)

    async def call(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not done.done():
                done.set_result(value) if ok else done.set_exception(value)

        self._calls.put((fn, args, lambda ok, value: loop.call_soon_threadsafe(settle, ok, value)))
        return await asyncio.wait_for(done, timeout)


_ray_thread: _RayThread | None = None


async def call(fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """``fn(*args)`` (one of the blocking calls above) on the Ray thread, awaited for at most
    ``timeout`` seconds (``asyncio.TimeoutError`` after that; the call itself goes on)."""
    global _ray_thread
    if _ray_thread is None:
        _ray_thread = _RayThread()
    return await _ray_thread.call(fn, args, timeout)
