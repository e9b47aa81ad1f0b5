"""Timing a session's life, shared by the sandbox benchmarks (``bench.sandbox`` on one backend,
``bench.cluster`` on a Ray cluster beside docker): percentiles, a timed call, a checked ``1+1``,
cold starts and acquires from a warm pool. Figures, never pass/fail."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sandbox import SandboxError, SandboxSettings, Session, SessionManager

log = logging.getLogger(__name__)

POOL_SIZE = 2  # the warm pool the acquire figures are taken from (per node on a cluster)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; ``q`` in [0, 1]."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = await fn()
    return time.perf_counter() - t0, result


async def execute_ok(session: Session, code: str = "1+1") -> None:
    ex = await session.execute(code, timeout=30)
    if not ex.ok:
        raise SandboxError(f"`{code}` did not run: {ex.status.value} {ex.reason or ex.text(200)}")


async def cold_starts(manager: SessionManager, runs: int) -> list[float]:
    samples = []
    for i in range(runs):
        elapsed, session = await timed(manager.create)
        try:
            await execute_ok(session)
        finally:
            await manager.close(session.id)
        log.info("cold start %d: %.3f s", i + 1, elapsed)
        samples.append(elapsed)
    return samples


def warm_count(manager: SessionManager) -> int:
    """Warm sessions ready: the manager's pool, or the thinnest node pool of a cluster (read-only)."""
    backend: Any = manager.backend
    if backend.places_sessions:
        return min((len(n.warm) for n in backend.nodes.values() if n.ready), default=0)
    return len(manager._pool)


async def pool_full(manager: SessionManager, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while warm_count(manager) < POOL_SIZE:
        if time.monotonic() > deadline:
            raise SandboxError(f"the warm pool did not fill within {timeout:.0f} s; see the logs (--debug)")
        await asyncio.sleep(0.02)


async def warm_acquires(settings: SandboxSettings, runs: int) -> list[float]:
    samples = []
    async with SessionManager(dataclasses.replace(settings, pool_size=POOL_SIZE)) as manager:
        for i in range(runs):
            await pool_full(manager, settings.start_timeout_s * POOL_SIZE)
            elapsed, session = await timed(manager.create)
            try:
                await execute_ok(session)  # the acquired session answers; not timed
            finally:
                await manager.close(session.id)
            log.info("warm acquire %d: %.3f ms", i + 1, elapsed * 1e3)
            samples.append(elapsed)
        # Shutting down while a refill is starting a container would leak it (the thread finishes
        # the start after the task is cancelled), so let the refill finish first.
        await pool_full(manager, settings.start_timeout_s * POOL_SIZE)
    return samples
