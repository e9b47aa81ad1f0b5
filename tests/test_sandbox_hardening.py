"""Attacks from inside a real container on what the host keeps for it, and limits a client cannot
lift: each test does what hostile code or a hostile caller would, and checks the host held."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess

import pytest

from sandbox import ExecutionStatus, Limits, LimitsError, SandboxError, SessionManager
from sandbox.backends.base import KernelSpec
from tests.support.probes import SYSCALL_PROBE
from tests.support.sandboxes import docker_settings


async def test_code_cannot_fill_or_plant_in_the_kernels_runtime_folder(docker_manager: SessionManager) -> None:
    """/run/jupybox is a folder on the host's disk: after start-up the kernel may not write there."""
    session = await docker_manager.create()
    ex = await session.execute(
        "import os, json\nreport = {}\n"
        "try:\n    open('/run/jupybox/fill.bin', 'wb').write(b'x' * 64 * 2**20); report['fill'] = 'written'\n"
        "except OSError as e:\n    report['fill'] = e.strerror\n"
        "try:\n    os.makedirs('/run/jupybox/adir'); report['plant'] = 'made'\n"
        "except OSError as e:\n    report['plant'] = e.strerror\n"
        "try:\n    open('/run/jupybox/kernel.json', 'a').write('x' * 2**20); report['append'] = 'written'\n"
        "except OSError as e:\n    report['append'] = e.strerror\n"
        "try:\n    os.remove('/run/jupybox/kernel-1'); report['remove'] = 'removed'\n"
        "except OSError as e:\n    report['remove'] = e.strerror\n"
        "print(json.dumps(report))")
    assert json.loads(ex.stdout) == {k: "Permission denied" for k in ("fill", "plant", "append", "remove")}
    host_side = sorted(p.name for p in session.runtime_dir.iterdir())
    assert host_side == ["kernel-1", "kernel-2", "kernel-3", "kernel-4", "kernel-5", "kernel.json"]
    # the session's handling goes on: a restart and the executions after it work
    await session.restart()
    assert (await session.execute("print('after restart')")).stdout == "after restart\n"
    ex = await session.execute("import os; os._exit(3)")
    assert ex.status is ExecutionStatus.CRASHED
    assert (await session.execute("print('fresh kernel')")).stdout == "fresh kernel\n"
    await docker_manager.close(session.id)


async def test_leftovers_in_the_runtime_folder_do_not_break_a_restart(docker_manager: SessionManager) -> None:
    """Whatever sits in the runtime folder when a kernel starts (here: put there by hand, as a
    kernel of a host without root could) is removed, symlinks unfollowed."""
    session = await docker_manager.create()
    (session.runtime_dir / "adir" / "deeper").mkdir(parents=True)
    (session.runtime_dir / "kernel-9").symlink_to("/etc/passwd")
    await session.restart()
    assert (await session.execute("print(1 + 1)")).stdout == "2\n"
    assert "adir" not in {p.name for p in session.runtime_dir.iterdir()}
    await docker_manager.close(session.id)


async def test_syscall_filter_limits_and_mount_options(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    report = json.loads((await session.execute(SYSCALL_PROBE, timeout=60)).stdout)
    eperm = 1
    assert report["io_uring_setup"] == [-1, eperm]  # Docker 20.10's own default profile allows it
    assert report["unshare_user"] == [-1, eperm] and report["unshare_net"] == [-1, eperm]
    assert report["fork"] == 0  # threads and processes still work (clone without namespace flags)
    assert report["nofile"] == [4096, 4096] and report["core"] == [0, 0]
    assert report["noexec"] == {"/tmp": True, "/mnt/data": True, "/dev/shm": True}
    assert report["exec_tmp"] == "Permission denied"
    uid = json.loads((await session.execute("import os, json; print(json.dumps(os.getuid()))")).stdout)
    assert uid == docker_manager.settings.sandbox_uid and uid >= 65536  # a uid no host account has
    await docker_manager.close(session.id)


@pytest.mark.parametrize("change", [{"cpus": 1e-9}, {"cpus": 0.001}, {"cpus": 0.005}, {"cpus": float("nan")},
                                    {"memory_mb": 4}, {"pids": 1}, {"memory_mb": 10**9}])
async def test_limits_below_what_a_kernel_runs_with_or_above_the_servers_are_refused(
        docker_manager: SessionManager, change: dict) -> None:
    before = _session_containers(docker_manager)
    with pytest.raises(LimitsError) as refused:
        await docker_manager.create(limits=dataclasses.replace(docker_manager.settings.limits, **change))
    name = next(iter(change))
    assert name in str(refused.value) and "Docker" not in str(refused.value)
    assert _session_containers(docker_manager) == before


async def test_a_container_that_cannot_start_is_removed_and_its_error_says_no_internals(
        docker_manager: SessionManager, tmp_path) -> None:
    """`docker run` is create then start; the daemon accepts a CPU quota of 0.005 CPUs at create and
    fails at start, which used to leave a `Created` container and put the daemon's words (a cgroup
    path, a container id) in the error. The backend is asked directly: the manager refuses such
    limits before they get this far."""
    sid = "startfail" + os.urandom(2).hex()
    spec = KernelSpec(session_id=sid, owner=docker_manager.owner, runtime_dir=tmp_path / "run",
                      workspace_dir=tmp_path / "data",
                      limits=dataclasses.replace(docker_manager.settings.limits, cpus=0.005))
    with pytest.raises(SandboxError) as failed:
        await docker_manager.backend.start(spec)
    message = str(failed.value)
    assert "refused" in message and "log" in message
    assert not re.search(r"/sys/fs/cgroup|[0-9a-f]{12}|OCI|cpu", message), message
    names = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    assert f"jupybox-{sid}" not in names.split()


async def test_sessions_are_admitted_while_their_memory_fits_the_budget(sandbox_image: str, jb_home) -> None:
    settings = docker_settings(jb_home / "budget", instance="budget", memory_budget_mb=640,
                               limits=Limits(memory_mb=256))
    async with SessionManager(settings) as manager:
        first, second = await manager.create(), await manager.create()
        with pytest.raises(SandboxError, match="memory limits add up to 512 MiB of the 640 MiB"):
            await manager.create()
        small = await manager.create(limits=Limits(memory_mb=128))  # what is left still fits
        await manager.close(first.id)
        third = await manager.create()  # room again
        assert {s.id for s in manager.list()} == {second.id, small.id, third.id}


async def test_printing_forever_costs_the_kernel_no_memory(docker_manager: SessionManager) -> None:
    """IPython keeps every byte a cell prints unless told not to; the kernel must stay flat."""
    limits = dataclasses.replace(docker_manager.settings.limits, memory_mb=512)
    session = await docker_manager.create(limits=limits)
    rss = "int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024"
    await session.execute("import sys\nchunk = 'x' * 3_000_000")
    for _ in range(3):  # warm up: the first prints allocate the buffers they reuse afterwards
        await session.execute("print(chunk.upper())")
    before = int((await session.execute(f"print({rss})")).stdout)
    for _ in range(150):  # 450 MB through stdout, near the session's 512 MiB
        # a new string each time: a print of the same object would cost a leak nothing
        ex = await session.execute("print(chunk.upper()); print(chunk[:1000].upper(), file=sys.stderr); len(chunk)")
        assert ex.ok and ex.truncated > 0
    after = int((await session.execute(f"print({rss})")).stdout)
    assert after - before < 40, f"the kernel grew from {before} to {after} MiB"

    ex = await session.execute("n = 0\nwhile True:\n    print('x' * 10000); n += 1", timeout=5)
    assert ex.status is ExecutionStatus.TIMEOUT and not ex.state_lost, ex.reason
    assert (await session.execute("print(n > 1000)")).stdout == "True\n"
    await docker_manager.close(session.id)


def _session_containers(manager: SessionManager) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=jupybox.owner={manager.owner}"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()
