"""``jupybox bench sandbox``: what a user waits for and what a session costs. Figures, never pass/fail.

Measured on the settings' backend, one phase after the other, every session closed on the way out:
cold start of a session, acquire from a warm pool, the round-trip of ``1+1`` next to a bare local
ipykernel measured in the same run (alternating, so noise hits both), idle memory per kernel
(docker), the kernel's own resident memory idle and after a soak of cells that each print a few
megabytes (it must stay flat: printed output is not kept), how long pausing and resuming a session
holding 100 MB of variables takes (a durable manager, as the server runs) and the disk the paused
session takes, how long ``%pip install NAME; import NAME`` of a small wheelhouse package takes, and how many sessions this host holds before its free memory nears a reserve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from sandbox import JupyboxError, SandboxError, SandboxSettings, Session, SessionManager
from sandbox.manager import disk_usage

from .packages import pip_install_times
from .session_timing import POOL_SIZE, cold_starts, execute_ok, percentile, timed, warm_acquires

log = logging.getLogger(__name__)

MEMORY_SESSIONS = 3
MEMORY_RESERVE = 2 << 30  # the capacity probe stops before MemAvailable would drop under this
SOAK_CELL_BYTES = 2_000_000  # printed by each cell of the memory soak
KERNEL_RSS = "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024)"
CGROUP_V1 = Path("/sys/fs/cgroup/memory/docker")
# figure -> (target, comparison, text); shown next to the figures as information only
TARGETS: dict[str, tuple[float, str, str]] = {
    "cold_start_p50_s": (1.5, "<", "< 1.5 s"),
    "warm_acquire_p50_ms": (50.0, "<", "< 50 ms"),
    "roundtrip_ratio_p50": (1.5, "<=", "<= 1.5x"),
    "resume_p50_s": (2.0, "<", "< 2 s"),
    "pip_install_import_p50_s": (3.0, "<", "< 3 s"),
}
# the variables a paused session holds in the pause and resume phase: 100 MB (an array, a DataFrame)
STATE_CODE = ("import numpy as np, pandas as pd\n"
              "big = np.random.default_rng(0).random(6_250_000)\n"
              "frame = pd.DataFrame({'a': np.arange(3_125_000, dtype='float64'), 'b': big[:3_125_000] * 2})\n"
              "print(big.nbytes + int(frame.memory_usage(index=False).sum()))")


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


async def _run(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode()


async def container_memory(session_id: str) -> int | None:
    """Bytes in use by the session's container, page cache that could be dropped left out (as
    ``docker stats`` counts): from the cgroup-v1 files, else from ``docker stats``."""
    ids = (await _run("docker", "ps", "-q", "--no-trunc", "--filter", f"label=jupybox.session={session_id}")).split()
    if not ids:
        return None
    folder = CGROUP_V1 / ids[0]
    try:
        usage = int((folder / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        return usage - int(stat.get("total_inactive_file", 0))
    except (OSError, ValueError):
        pass
    m = re.match(r"([\d.]+)\s*([KMG]?i?B)", await _run("docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", ids[0]))
    if not m:
        return None
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "kB": 1000, "KB": 1000, "MB": 10**6, "GB": 10**9}
    return int(float(m.group(1)) * scale.get(m.group(2), 1))


async def _bare_execute(kc: Any, code: str = "1+1") -> None:
    """Send ``code`` and wait for iopub idle and the shell reply, as the sandbox's client does."""
    msg_id = kc.execute(code, allow_stdin=False, store_history=True)
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["header"]["msg_type"] == "status"
                and msg["content"].get("execution_state") == "idle"):
            break
    while (await kc.get_shell_msg(timeout=30))["parent_header"].get("msg_id") != msg_id:
        pass


async def roundtrips(manager: SessionManager, n: int, warmup: int = 10) -> tuple[list[float], list[float]]:
    """(jupybox, bare) round-trips of ``1+1``, alternating one of each, order swapped every pair."""
    # The venv's kernel over ipc sockets, the transport the sandbox uses too.
    tmp = tempfile.mkdtemp(prefix="jb-bare-")
    km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=f"{tmp}/kernel")
    session: Session | None = None
    kc: Any = None
    try:
        await km.start_kernel(extra_arguments=["--HistoryManager.enabled=False"])  # as the sandbox starts it
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        session = opened = await manager.create()
        sbx: Callable[[], Awaitable[Any]] = lambda: execute_ok(opened)  # noqa: E731
        bare: Callable[[], Awaitable[Any]] = lambda: _bare_execute(kc)  # noqa: E731
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(warmup + n):
            pair = [(sbx, ours), (bare, theirs)]
            for fn, out in pair if i % 2 else reversed(pair):
                elapsed, _ = await timed(fn)
                if i >= warmup:
                    out.append(elapsed)
        return ours, theirs
    finally:
        if session is not None:
            await manager.close(session.id)
        if kc is not None:
            kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
        shutil.rmtree(tmp, ignore_errors=True)


async def idle_memory(manager: SessionManager) -> list[int]:
    sessions = [await manager.create() for _ in range(MEMORY_SESSIONS)]
    try:
        for s in sessions:
            await execute_ok(s)
        await asyncio.sleep(1.0)  # let the kernels settle into idle
        found = [await container_memory(s.id) for s in sessions]
        return [m for m in found if m]
    finally:
        for s in sessions:
            await manager.close(s.id)


async def kernel_soak(manager: SessionManager, cells: int) -> tuple[int, int]:
    """The kernel process's resident bytes once idle, and after ``cells`` cells that each print
    ``SOAK_CELL_BYTES`` of new text."""
    session = await manager.create()
    try:
        await session.execute(f"chunk = 'x' * {SOAK_CELL_BYTES}")
        idle = int((await session.execute(KERNEL_RSS)).stdout)
        for _ in range(cells):
            ex = await session.execute("print(chunk.upper())")
            if not ex.ok:
                raise SandboxError(f"the memory soak stopped: {ex.reason or ex.status.value}")
        return idle, int((await session.execute(KERNEL_RSS)).stdout)
    finally:
        await manager.close(session.id)


async def pause_resume(settings: SandboxSettings, runs: int) -> dict[str, Any]:
    """Pause and resume one session holding ``STATE_CODE``'s 100 MB of variables, ``runs`` times, on
    a durable manager of its own instance: seconds per pause (saving, container removed), per resume
    (a kernel started and the variables loaded, until a cell's result is back), and bytes on disk."""
    durable = dataclasses.replace(settings, durable=True, pool_size=0,
                                  instance=f"{settings.instance or 'bench'}-pause")
    async with SessionManager(durable) as manager:
        session = await manager.create()
        try:
            made = await session.execute(STATE_CODE, timeout=120)
            if not made.ok:
                raise SandboxError(f"the pause phase could not make its variables: {made.reason or made.text()}")
            pauses, resumes, disk, saved = [], [], 0, 0
            for _ in range(runs):
                t0 = time.perf_counter()
                report = await manager.pause(session.id)
                pauses.append(time.perf_counter() - t0)
                saved, disk = report.bytes, await asyncio.to_thread(disk_usage, session.folder)
                t0 = time.perf_counter()
                back = await session.execute("float(big[-1] + frame['a'].iloc[-1])")
                resumes.append(time.perf_counter() - t0)
                if not back.ok or not back.resumed or "big" not in back.resumed:
                    raise SandboxError(f"the session did not resume with its variables: {back.resumed or back.text()}")
            return {"variables_mb": int(made.stdout) / 1e6, "state_mb": saved / 1e6, "paused_disk_mb": disk / 1e6,
                    "pause_p50_s": percentile(pauses, 0.5), "resume_p50_s": percentile(resumes, 0.5),
                    "resume_max_s": max(resumes)}
        finally:
            await manager.close(session.id)


async def capacity(manager: SessionManager, max_sessions: int, per_session: int) -> tuple[int, float, str]:
    """Open sessions one after the other until a limit; returns (held, seconds, why it stopped)."""
    held: list[Session] = []
    reason = f"reached --max-sessions {max_sessions}"
    t0 = time.perf_counter()
    try:
        while len(held) < max_sessions:
            if mem_available() - per_session < MEMORY_RESERVE:
                reason = f"host MemAvailable would drop under {MEMORY_RESERVE >> 20} MiB"
                break
            try:
                held.append(await manager.create())
                await execute_ok(held[-1])
            except JupyboxError as exc:
                reason = f"a start failed: {exc}"
                log.warning("capacity probe stopped after %d sessions: %s", len(held), exc)
                break
            log.info("capacity: %d sessions held", len(held))
        return len(held), time.perf_counter() - t0, reason
    finally:
        await asyncio.gather(*(manager.close(s.id) for s in held), return_exceptions=True)


async def measure(settings: SandboxSettings, runs: int, max_sessions: int) -> dict[str, Any]:
    runs = max(runs, 1)
    plain = dataclasses.replace(settings, pool_size=0, max_sessions=max(max_sessions, MEMORY_SESSIONS, 2))
    f: dict[str, Any] = {}
    async with SessionManager(plain) as manager:
        cold = await cold_starts(manager, runs)
        f.update(cold_start_p50_s=percentile(cold, 0.5), cold_start_p95_s=percentile(cold, 0.95), cold_start_min_s=min(cold))
    warm = await warm_acquires(settings, runs)
    f.update(warm_acquire_p50_ms=percentile(warm, 0.5) * 1e3, warm_acquire_p95_ms=percentile(warm, 0.95) * 1e3)
    async with SessionManager(plain) as manager:
        ours, theirs = await roundtrips(manager, max(50, min(200, runs * 10)))
        f.update(roundtrip_p50_ms=percentile(ours, 0.5) * 1e3, roundtrip_p95_ms=percentile(ours, 0.95) * 1e3,
                 bare_roundtrip_p50_ms=percentile(theirs, 0.5) * 1e3, bare_roundtrip_p95_ms=percentile(theirs, 0.95) * 1e3)
        f["roundtrip_ratio_p50"] = f["roundtrip_p50_ms"] / f["bare_roundtrip_p50_ms"]
        mem = await idle_memory(manager) if settings.backend == "docker" else []
        f["idle_memory_mib"] = sum(mem) / len(mem) / (1 << 20) if mem else None
        cells = max(20, min(200, runs * 20))
        idle_rss, soak_rss = await kernel_soak(manager, cells)
        f.update(kernel_idle_rss_mib=idle_rss / (1 << 20), kernel_soak_rss_mib=soak_rss / (1 << 20),
                 soak_printed_mb=cells * SOAK_CELL_BYTES / 1e6)
        if settings.backend == "docker":
            f.update(await pause_resume(settings, max(2, min(runs, 5))))
        if settings.backend in ("docker", "bwrap"):
            f.update(await pip_install_times(settings, max(3, min(runs, 10))))
        per_session = sum(mem) // len(mem) if mem else settings.limits.memory_mb << 20
        held, seconds, why = await capacity(manager, max_sessions, per_session)
        f.update(capacity_sessions=held, capacity_s=seconds)
    targets = {k: {"target": t, "value": f[k], "met": f[k] < t if op == "<" else f[k] <= t}
               for k, (t, op, _) in TARGETS.items() if k in f}
    return {"backend": settings.backend, "runtime": settings.docker_runtime, "runs": runs,
            "roundtrips": len(ours), "figures": f, "targets": targets, "capacity_stopped": why}


def render(r: dict[str, Any]) -> str:
    f = r["figures"]

    def met(key: str) -> str:
        return f"{TARGETS[key][2]:<9} {'yes' if r['targets'][key]['met'] else 'NO'}"

    mem = f"{f['idle_memory_mib']:.1f} MiB" if f["idle_memory_mib"] else "n/a (docker only)"
    rows = [
        ("cold start p50 / p95 / min", f"{f['cold_start_p50_s']:.2f} / {f['cold_start_p95_s']:.2f} / {f['cold_start_min_s']:.2f} s", met("cold_start_p50_s")),
        (f"warm acquire p50 / p95 (pool {POOL_SIZE})", f"{f['warm_acquire_p50_ms']:.3f} / {f['warm_acquire_p95_ms']:.3f} ms", met("warm_acquire_p50_ms")),
        ("round-trip 1+1 jupybox p50 / p95", f"{f['roundtrip_p50_ms']:.2f} / {f['roundtrip_p95_ms']:.2f} ms", ""),
        ("round-trip 1+1 bare ipykernel (ipc) p50/p95", f"{f['bare_roundtrip_p50_ms']:.2f} / {f['bare_roundtrip_p95_ms']:.2f} ms", ""),
        ("round-trip ratio jupybox / bare (p50)", f"{f['roundtrip_ratio_p50']:.2f}x", met("roundtrip_ratio_p50")),
        (f"idle memory per kernel (mean of {MEMORY_SESSIONS})", mem, ""),
        ("kernel RSS idle / after printing " + f"{f['soak_printed_mb']:.0f} MB",
         f"{f['kernel_idle_rss_mib']:.1f} / {f['kernel_soak_rss_mib']:.1f} MiB", ""),
        *([(f"pause / resume, {f['variables_mb']:.0f} MB of variables (p50)",
            f"{f['pause_p50_s']:.2f} / {f['resume_p50_s']:.2f} s (max {f['resume_max_s']:.2f})", met("resume_p50_s")),
           ("resume / cold start (p50)", f"{f['resume_p50_s'] / f['cold_start_p50_s']:.2f}x", ""),
           ("paused session: saved state / disk", f"{f['state_mb']:.0f} / {f['paused_disk_mb']:.0f} MB", "")]
          if "resume_p50_s" in f else []),
        *([("%pip install NAME; import NAME p50 / max / first", f"{f['pip_install_import_p50_s']:.2f} / "
            f"{f['pip_install_import_max_s']:.2f} / {f['pip_install_import_first_s']:.2f} s", met("pip_install_import_p50_s")),
           ("  baseline: import json in the same session (p50)", f"{f['pip_baseline_import_p50_ms']:.2f} ms", "")]
          if "pip_install_import_p50_s" in f else []),
        ("capacity: sessions held / time", f"{f['capacity_sessions']} in {f['capacity_s']:.1f} s", ""),
    ]
    head = f"jupybox sandbox benchmark: backend {r['backend']}" + (f" ({r['runtime']})" if r["runtime"] else "")
    lines = [head + f", {r['runs']} samples per figure, {r['roundtrips']} round-trips each",
             f"{'figure':<44} {'measured':<26} {'target':<9} met", "-" * 86]
    lines += [f"{a:<44} {b:<26} {c}".rstrip() for a, b, c in rows]
    lines.append(f"capacity probe stopped: {r['capacity_stopped']}")
    return "\n".join(lines)


async def run_sandbox_bench(settings: SandboxSettings, runs: int = 10, max_sessions: int = 40,
                            as_json: bool = False) -> int:
    """Measure and print; the exit code says only whether the benchmark ran, never whether targets were met."""
    if settings.backend == "ray":  # a cluster: measured beside the direct docker backend instead
        from .cluster import run_cluster_bench

        return await run_cluster_bench(settings, runs, max_sessions, as_json)
    result = await measure(settings, runs, max_sessions)
    print(json.dumps(result) if as_json else render(result))
    return 0
