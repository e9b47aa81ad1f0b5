"""``jupybox bench sandbox --backend ray``: the hidden cost of the cluster backend, next to the
direct docker backend measured in the same run. Figures, never pass/fail.

Both backends run the same phases: cold start, warm acquire (a pool of ``POOL_SIZE``; per node on
the cluster), the round-trip of ``1+1`` (one session of each open at once, calls alternating so
that noise hits both), and a burst of sessions created at once (sessions per second, each counted
once it answered). The host memory a session costs outside its container (the node agents' share
and the server's own kernel clients) is read from those processes when they run on this host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sandbox import SandboxSettings, SessionManager

from .session_timing import POOL_SIZE, cold_starts, execute_ok, percentile, timed, warm_acquires

log = logging.getLogger(__name__)

BURST = 8  # sessions created at once, at most
OVERHEAD_SESSIONS = 16  # sessions held open while the agents' memory is read
TARGET_RATIO, TARGET_EXTRA_MS = 1.3, 1.5  # round-trip: at most 1.3x the direct backend, or +1.5 ms


async def paired_roundtrips(ours: SessionManager, base: SessionManager, n: int, warmup: int = 10
                            ) -> tuple[list[float], list[float]]:
    a, b = await ours.create(), await base.create()
    try:
        times: tuple[list[float], list[float]] = ([], [])
        for i in range(warmup + n):
            pair = [(a, times[0]), (b, times[1])]
            for session, out in pair if i % 2 else reversed(pair):
                elapsed, _ = await timed(lambda: execute_ok(session))
                if i >= warmup:
                    out.append(elapsed)
        return times
    finally:
        await asyncio.gather(ours.close(a.id), base.close(b.id))


async def burst(manager: SessionManager, count: int) -> float:
    """Sessions per second: ``count`` created at once, each counted once it answered ``1+1``."""

    async def one() -> Any:
        session = await manager.create()
        await execute_ok(session)
        return session

    t0 = time.perf_counter()
    sessions = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    opened = [s for s in sessions if not isinstance(s, BaseException)]
    await asyncio.gather(*(manager.close(s.id) for s in opened), return_exceptions=True)
    for failure in (s for s in sessions if isinstance(s, BaseException)):
        log.warning("burst: a session failed: %s", failure)
    return len(opened) / elapsed


async def host_overhead(manager: SessionManager, nodes: list[Any], count: int) -> dict[str, Any]:
    """Memory outside the containers with ``count`` sessions open: the agents of this host's nodes
    (all of it, shared by their sessions) and what the server itself grew by, per session."""
    agents = [n.agent_pid for n in nodes if n.agent_pid and _rss_mib(n.agent_pid) is not None]
    server_before = _rss_mib(os.getpid()) or 0.0
    agents_idle = sum(_rss_mib(pid) or 0.0 for pid in agents)
    sessions = [await manager.create() for _ in range(count)]
    try:
        for s in sessions:
            await execute_ok(s)
        agents_rss = sum(_rss_mib(pid) or 0.0 for pid in agents)
        server_growth = max(0.0, (_rss_mib(os.getpid()) or 0.0) - server_before)
    finally:
        await asyncio.gather(*(manager.close(s.id) for s in sessions))
    if not agents:
        return {"host_overhead_mib_per_session": None, "agents_rss_mib": None, "overhead_sessions": count}
    return {"host_overhead_mib_per_session": (agents_rss + server_growth) / count, "agents_rss_mib": agents_rss,
            "agents_on_this_host": len(agents), "server_growth_mib": server_growth, "overhead_sessions": count,
            "agents_growth_mib_per_session": max(0.0, agents_rss - agents_idle) / count}


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


async def measure(settings: SandboxSettings, runs: int, max_sessions: int) -> dict[str, Any]:
    runs = max(runs, 1)
    docker = dataclasses.replace(settings, backend="docker", pool_size=0)
    ray = dataclasses.replace(settings, pool_size=0)
    f: dict[str, Any] = {}
    async with SessionManager(ray) as rm, SessionManager(docker) as dm:
        nodes = [n for n in rm.backend.nodes.values() if n.ready]  # type: ignore[attr-defined]
        for name, manager in (("ray", rm), ("docker", dm)):
            cold = await cold_starts(manager, runs)
            f[f"{name}_cold_start_p50_s"] = percentile(cold, 0.5)
        theirs, base = await paired_roundtrips(rm, dm, max(50, min(200, runs * 10)))
        for name, samples in (("ray", theirs), ("docker", base)):
            f[f"{name}_roundtrip_p50_ms"] = percentile(samples, 0.5) * 1e3
            f[f"{name}_roundtrip_p95_ms"] = percentile(samples, 0.95) * 1e3
        f.update(await host_overhead(rm, nodes, min(OVERHEAD_SESSIONS, sum(n.slots for n in nodes))))
        count = max(1, min(max_sessions, BURST, sum(n.slots for n in nodes)))
        for name, manager in (("ray", rm), ("docker", dm)):
            f[f"{name}_sessions_per_s"] = await burst(manager, count)
    for name, s in (("ray", ray), ("docker", docker)):
        warm = await warm_acquires(s, runs)
        f[f"{name}_warm_acquire_p50_ms"] = percentile(warm, 0.5) * 1e3
    f["roundtrip_ratio_p50"] = f["ray_roundtrip_p50_ms"] / f["docker_roundtrip_p50_ms"]
    f["roundtrip_extra_p50_ms"] = f["ray_roundtrip_p50_ms"] - f["docker_roundtrip_p50_ms"]
    met = f["roundtrip_ratio_p50"] <= TARGET_RATIO or f["roundtrip_extra_p50_ms"] <= TARGET_EXTRA_MS
    f["cold_start_ratio_p50"] = f["ray_cold_start_p50_s"] / f["docker_cold_start_p50_s"]
    f["sessions_per_s_ratio"] = f["ray_sessions_per_s"] / f["docker_sessions_per_s"]
    overhead = f["host_overhead_mib_per_session"]
    targets = {"roundtrip": {"target": f"<= {TARGET_RATIO}x or +{TARGET_EXTRA_MS} ms", "met": met},
               "cold_start": {"target": "<= 1.5x", "met": f["cold_start_ratio_p50"] <= 1.5},
               "warm_acquire": {"target": "<= 1 ms", "met": f["ray_warm_acquire_p50_ms"] <= 1.0},
               "sessions_per_s": {"target": ">= 0.7x", "met": f["sessions_per_s_ratio"] >= 0.7},
               "host_overhead": {"target": "<= 20 MiB per session",
                                 "met": None if overhead is None else overhead <= 20.0}}
    return {"backend": "ray", "cluster": settings.ray_address or "one node on this host", "nodes": len(nodes),
            "slots": sum(n.slots for n in nodes), "runs": runs, "roundtrips": len(theirs), "burst": count,
            "figures": f, "targets": targets}


def render(r: dict[str, Any]) -> str:
    f = r["figures"]
    rss = (f"{f['host_overhead_mib_per_session']:.1f} MiB ({f['agents_on_this_host']} agent(s) {f['agents_rss_mib']:.0f} MiB "
           f"+ server {f['server_growth_mib']:.1f} MiB, {f['overhead_sessions']} sessions)"
           if f["host_overhead_mib_per_session"] is not None else "n/a (the nodes are other hosts)")
    rows = [
        ("cold start p50", f"{f['ray_cold_start_p50_s']:.2f} s", f"{f['docker_cold_start_p50_s']:.2f} s"),
        (f"warm acquire p50 (pool {POOL_SIZE})", f"{f['ray_warm_acquire_p50_ms']:.2f} ms",
         f"{f['docker_warm_acquire_p50_ms']:.2f} ms"),
        ("round-trip 1+1 p50", f"{f['ray_roundtrip_p50_ms']:.2f} ms", f"{f['docker_roundtrip_p50_ms']:.2f} ms"),
        ("round-trip 1+1 p95", f"{f['ray_roundtrip_p95_ms']:.2f} ms", f"{f['docker_roundtrip_p95_ms']:.2f} ms"),
        (f"sessions created per second ({r['burst']} at once)", f"{f['ray_sessions_per_s']:.2f}",
         f"{f['docker_sessions_per_s']:.2f}"),
        ("host memory per session outside its container", rss, "-"),
    ]
    lines = [f"jupybox sandbox benchmark: backend ray ({r['cluster']}: {r['nodes']} node(s), {r['slots']} slots) "
             f"beside docker, {r['runs']} samples per figure, {r['roundtrips']} round-trips each",
             f"{'figure':<44} {'ray':<22} {'docker (same run)':<20}", "-" * 86]
    lines += [f"{a:<44} {b:<22} {c}" for a, b, c in rows]
    lines.append(f"round-trip ray / docker (p50): {f['roundtrip_ratio_p50']:.2f}x, "
                 f"{f['roundtrip_extra_p50_ms']:+.2f} ms; target {r['targets']['roundtrip']['target']}: "
                 f"{'met' if r['targets']['roundtrip']['met'] else 'NOT met'}")
    lines.append("targets: " + ", ".join(f"{name} {t['target']}: {'n/a' if t['met'] is None else 'met' if t['met'] else 'NOT met'}"
                                         for name, t in r["targets"].items() if name != "roundtrip"))
    return "\n".join(lines)


async def run_cluster_bench(settings: SandboxSettings, runs: int, max_sessions: int, as_json: bool) -> int:
    result = await measure(settings, runs, max_sessions)
    print(json.dumps(result) if as_json else render(result))
    return 0
