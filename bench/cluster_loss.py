"""The cluster backend losing a node under load: a three-node Ray cluster on this host (a head and
two workers, each a sandbox node with its own name and home), ``SESSIONS`` sessions spread over
them, one worker taken away while every session runs a cell; its sessions must answer ``crashed``
and the others run on. Figures, never pass/fail::

    JUPYBOX_IMAGE=jupybox-sandbox:TAG python -m bench.cluster_loss [--sessions 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sandbox import ExecutionStatus, Limits, SandboxSettings, SessionManager
from sandbox.cluster import SLOT, import_ray

from .session_timing import percentile

SESSIONS = 60
MEMORY_MB = 256  # per session: sixty of them fit a small host


async def measure(image: str, count: int) -> dict[str, Any]:
    ray = import_ray("127.0.0.1")
    from ray.cluster_utils import Cluster

    base = Path(tempfile.mkdtemp(prefix="jb-loss-"))
    slots = -(-count // 3) + 2

    def args(role: str) -> dict[str, Any]:
        return {"node_ip_address": "127.0.0.1", "num_cpus": 1, "resources": {SLOT: slots},
                "env_vars": {"JUPYBOX_NODE": f"loss-{role}", "JUPYBOX_HOME": str(base / role),
                             "JUPYBOX_RELAY_PORTS": {"head": "47000-47299", "w1": "47300-47599",
                                                     "w2": "47600-47899"}[role]}}

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**args("head"), "include_dashboard": False})
    workers = {r: cluster.add_node(wait=False, **args(r)) for r in ("w1", "w2")}
    cluster.wait_for_nodes()
    f: dict[str, Any] = {"cluster_start_s": time.perf_counter() - t0}
    settings = SandboxSettings(backend="ray", ray_address=cluster.address, image=image, home=base / "server",
                               instance="bench-loss", max_sessions=count + 6,
                               limits=Limits(memory_mb=MEMORY_MB))
    try:
        async with SessionManager(settings) as manager:
            t0 = time.perf_counter()
            sessions = await asyncio.gather(*(manager.create() for _ in range(count)))
            f["create_all_s"] = time.perf_counter() - t0
            f["per_node"] = dict(collections.Counter(s.node for s in sessions))  # type: ignore[attr-defined]
            await asyncio.gather(*(s.execute(f"x = {i}") for i, s in enumerate(sessions)))
            victims = [s for s in sessions if s.node == "loss-w2"]  # type: ignore[attr-defined]
            running = [asyncio.ensure_future(s.execute("import time; time.sleep(20); x", timeout=120))
                       for s in sessions]
            await asyncio.sleep(2)
            t0 = time.perf_counter()
            await asyncio.to_thread(cluster.remove_node, workers["w2"])
            results = await asyncio.gather(*running)
            f["lost_sessions"] = len(victims)
            crashed = [r for s, r in zip(sessions, results) if s in victims]
            f["lost_answered_crashed"] = sum(r.status is ExecutionStatus.CRASHED for r in crashed)
            f["others_ok"] = sum(r.ok for s, r in zip(sessions, results) if s not in victims)
            f["others"] = count - len(victims)
            after = [s for s in sessions if s not in victims]
            rt = []
            for s in after:
                t1 = time.perf_counter()
                ex = await s.execute("x")
                rt.append(time.perf_counter() - t1)
                f["state_kept"] = f.get("state_kept", 0) + (ex.ok and ex.results[0].data["text/plain"] == str(sessions.index(s)))
            f["roundtrip_after_loss_p50_ms"] = percentile(rt, 0.5) * 1e3
            t0 = time.perf_counter()
            await asyncio.gather(*(manager.close(s.id) for s in sessions))
            f["close_all_s"] = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"sessions": count, "nodes": 3, "slots_per_node": slots, "figures": f}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    image = os.environ.get("JUPYBOX_IMAGE") or SandboxSettings().image
    result = asyncio.run(measure(image, opts.sessions))
    print(json.dumps(result) if opts.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
