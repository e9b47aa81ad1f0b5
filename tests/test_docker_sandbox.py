"""The docker backend as a user meets it: stateful sessions, outputs, images, and the promises of
isolation, each checked against a real container running a real kernel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import socket
import subprocess
import tempfile
from contextlib import aclosing
from pathlib import Path

import pytest

from sandbox import Execution, ExecutionStatus, Output, QuotaExceeded, SessionManager, diskfs
from tests.support.sandboxes import docker_settings, jupybox_containers


async def test_state_persists_and_outputs_arrive_in_order(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    assert (await session.execute("x = 20")).ok
    seen = []
    ex = await session.execute("import sys\nprint('out', x)\nprint('err', file=sys.stderr)\nx * 2 + 2",
                               on_output=seen.append)
    assert ex.status is ExecutionStatus.OK
    assert ex.stdout == "out 20\n"
    assert ex.stderr == "err\n"
    assert ex.results[-1].data["text/plain"] == "42"
    assert [o.kind for o in ex.outputs] == ["stream", "stream", "result"]
    assert [o.kind for o in seen] == ["stream", "stream", "result"]
    assert ex.execution_count == 2
    await docker_manager.close(session.id)


async def test_stream_yields_outputs_as_they_come_and_a_cancel_stops_only_its_own_run(
        docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    cancel = asyncio.Event()
    items = []
    async for item in session.stream("import time\nprint('ready', flush=True)\ntime.sleep(60)",
                                     timeout=120, cancel=cancel):
        items.append(item)  # the output arrives while the code still runs
        if isinstance(item, Output):
            cancel.set()  # the kernel is interrupted; the run still ends with its execution
    execution = items[-1]
    assert isinstance(execution, Execution) and execution.status is ExecutionStatus.ERROR
    assert execution.error is not None and execution.error.ename == "KeyboardInterrupt"
    assert [o.text for o in items[:-1] if isinstance(o, Output) and o.kind == "stream"] == ["ready\n"]
    assert execution.duration_s < 30
    assert (await session.execute("print('still here')")).stdout == "still here\n"  # state kept

    # a consumer that walks away mid-run interrupts it: the session is free again at once
    async with aclosing(session.stream("import time\nprint('go', flush=True)\ntime.sleep(60)", timeout=120)) as run:
        async for _ in run:
            break
    assert (await asyncio.wait_for(session.execute("1 + 1"), 30)).results[-1].data["text/plain"] == "2"
    await docker_manager.close(session.id)


async def test_a_run_stopped_while_waiting_for_its_turn_never_runs(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    running = asyncio.Event()
    holder = asyncio.ensure_future(session.execute(
        "import time\nprint('first running', flush=True)\ntime.sleep(2)\nprint('first done')", timeout=30,
        on_output=lambda out: running.set()))
    await asyncio.wait_for(running.wait(), 30)  # the first caller's code runs: the kernel is taken
    cancel = asyncio.Event()

    async def queued() -> list:
        return [item async for item in session.stream("flag = 'ran'\nprint('second ran')", timeout=30, cancel=cancel)]

    second = asyncio.ensure_future(queued())
    cancel.set()  # pressed Stop while the first caller's code still runs
    items = await asyncio.wait_for(second, 30)
    assert (await holder).stdout == "first running\nfirst done\n"  # the other caller's run was not interrupted
    assert len(items) == 1 and items[0].status is ExecutionStatus.ERROR and "nothing was executed" in items[0].reason
    assert (await session.execute("print(globals().get('flag'))")).stdout == "None\n"
    await docker_manager.close(session.id)


async def test_the_run_after_a_cancelled_one_is_not_lost(docker_manager: SessionManager) -> None:
    """A caller that cancels its execution leaves the kernel still stopping it; a request that
    arrives meanwhile is dropped by the kernel unrun (an 'aborted' reply), and is sent again."""
    session = await docker_manager.create()
    running = asyncio.Event()
    first = asyncio.ensure_future(session.execute("import time\nprint('go', flush=True)\ntime.sleep(60)",
                                                  on_output=lambda out: running.set()))
    await asyncio.wait_for(running.wait(), 30)  # the code runs
    session.interrupt(first)
    first.cancel()
    ex = await asyncio.wait_for(session.execute("1 + 1"), 30)
    assert ex.status is ExecutionStatus.OK and ex.results[-1].data["text/plain"] == "2"
    await docker_manager.close(session.id)


async def test_error_is_data_with_clean_traceback(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    ex = await session.execute("def f():\n    return 1 / 0\nf()")
    assert ex.status is ExecutionStatus.ERROR
    assert ex.error is not None and ex.error.ename == "ZeroDivisionError"
    tb = "\n".join(ex.error.traceback or [])
    assert "\x1b[" not in tb and "return 1 / 0" in tb
    assert "ZeroDivisionError" in ex.text()
    await docker_manager.close(session.id)


async def test_plot_is_saved_as_png_in_the_workspace(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    ex = await session.execute(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('销售额 sales')\nplt.show()"
    )
    assert ex.ok, ex.text()
    assert len(ex.images) == 1 and ex.images[0].mime == "image/png"
    data = session.workspace.read(ex.images[0].path)
    assert data.startswith(b"\x89PNG") and len(data) == ex.images[0].size
    assert f"]({ex.images[0].path})" in ex.text()
    assert "Glyph" not in ex.stderr  # the CJK font is there: no missing-glyph warning
    listed = [f.path for f in session.workspace.list()]
    assert ex.images[0].path in listed
    await docker_manager.close(session.id)


async def test_uploaded_file_is_read_by_the_code_and_results_come_back(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    session.workspace.write("sales.csv", b"region,amount\nnorth,10\nsouth,32\n")
    ex = await session.execute(
        "import pandas as pd, os\ndf = pd.read_csv('sales.csv')\nos.makedirs('out', exist_ok=True)\n"
        "open('out/total.txt', 'w').write(str(df.amount.sum()))\nint(df.amount.sum())"
    )
    assert ex.ok, ex.text()
    assert ex.results[-1].data["text/plain"] == "42"
    assert session.workspace.read("out/total.txt") == b"42"
    await docker_manager.close(session.id)


async def test_infinite_loop_times_out_and_keeps_state(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    await session.execute("kept = 'still here'")
    ex = await session.execute("while True:\n    pass", timeout=2)
    assert ex.status is ExecutionStatus.TIMEOUT
    assert not ex.state_lost and "interrupted" in (ex.reason or "")
    assert ex.error is not None and ex.error.ename == "KeyboardInterrupt"
    after = await session.execute("print(kept)")
    assert after.stdout == "still here\n"
    await docker_manager.close(session.id)


async def test_code_that_swallows_interrupts_gets_a_restart(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    await session.execute("kept = 1")
    ex = await session.execute(
        "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass",
        timeout=1.5,
    )
    assert ex.status is ExecutionStatus.TIMEOUT
    assert ex.state_lost and "restarted" in (ex.reason or "")
    after = await session.execute("'kept' in globals()")
    assert after.ok and after.results[-1].data["text/plain"] == "False"
    await docker_manager.close(session.id)


async def test_input_fails_fast_with_a_clear_message(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    ex = await session.execute("input('name? ')", timeout=10)
    assert ex.status is ExecutionStatus.ERROR
    assert "does not support input requests" in (ex.error.evalue or "")  # type: ignore[union-attr]
    assert ex.duration_s < 5
    await docker_manager.close(session.id)


@pytest.mark.parametrize("code", ["import os; os._exit(1)", "exit()"])
async def test_exiting_the_kernel_restarts_it(docker_manager: SessionManager, code: str) -> None:
    session = await docker_manager.create()
    await session.execute("v = 1")
    ex = await session.execute(code, timeout=10)
    assert ex.status is ExecutionStatus.CRASHED and ex.state_lost
    after = await session.execute("print('alive', 'v' in globals())")
    assert after.stdout == "alive False\n"
    await docker_manager.close(session.id)


@pytest.mark.slow
async def test_memory_bomb_crashes_only_its_own_session(docker_manager: SessionManager) -> None:
    bystander = await docker_manager.create()
    await bystander.execute("safe = 'untouched'")
    session = await docker_manager.create()
    ex = await session.execute("hog = []\nwhile True:\n    hog.append(bytearray(50 * 1024 * 1024))", timeout=60)
    assert ex.status is ExecutionStatus.CRASHED, ex.text()
    assert "memory" in (ex.reason or "")
    assert (await session.execute("print(1 + 1)")).stdout == "2\n"
    assert (await bystander.execute("print(safe)")).stdout == "untouched\n"
    await docker_manager.close(session.id)
    await docker_manager.close(bystander.id)


@pytest.mark.slow
async def test_fork_bomb_is_contained_by_the_pids_limit(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    ex = await session.execute("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                               timeout=5)
    assert ex.status in (ExecutionStatus.TIMEOUT, ExecutionStatus.CRASHED)
    # the host still forks normally, and the session is usable again (recovered or restarted)
    assert subprocess.run(["true"]).returncode == 0
    after = await session.execute("print('ok')", timeout=30)
    assert after.stdout == "ok\n"
    await docker_manager.close(session.id)


async def test_huge_output_is_truncated_head_and_tail(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ex = await session.execute("print('H' + 'x' * 100_000_000 + 'T')", timeout=60)
    assert ex.ok
    limit = docker_manager.settings.limits.output_bytes
    assert len(ex.stdout) < limit + 200
    assert ex.stdout.startswith("Hxxx") and ex.stdout.rstrip("\n").endswith("xxxT")
    assert "bytes of output truncated" in ex.stdout
    assert ex.truncated >= 100_000_000 - limit
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50, f"the host process grew by {grown_mb:.0f} MB"
    await docker_manager.close(session.id)


async def test_endless_print_loop_is_truncated_and_stopped(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    ex = await session.execute("i = 0\nwhile True:\n    print('line', i)\n    i += 1", timeout=3)
    assert ex.status is ExecutionStatus.TIMEOUT
    assert ex.truncated > 0 and "bytes of output truncated" in ex.stdout
    assert len(ex.stdout) < docker_manager.settings.limits.output_bytes + 200
    assert ex.stdout.startswith("line 0\n")
    assert (await session.execute("print(i > 1000)")).stdout == "True\n"
    await docker_manager.close(session.id)


async def test_no_network_inside(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    ex = await session.execute(
        "import os, socket, time\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
        "t = time.monotonic()\n"
        "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('dns ok')\nexcept OSError as e:\n    print('dns failed')\n"
        "s = socket.socket(); s.settimeout(5)\n"
        "try:\n    s.connect((REGISTRY_IP, 443))\n    print('connect ok')\nexcept OSError as e:\n    print('connect failed', type(e).__name__)\n"
        "print('fast', time.monotonic() - t < 3)".replace("REGISTRY_IP", repr(_registry_ip()))
    )
    lines = ex.stdout.splitlines()
    assert lines[0] == "['lo']"
    assert lines[1] == "dns failed"
    assert lines[2].startswith("connect failed")
    assert lines[3] == "fast True"
    await docker_manager.close(session.id)


def _registry_ip() -> str:
    """The package registry's address as the host resolves it (the one outside host reachable from
    here); the sandbox must not reach it. Falls back to a documentation address."""
    try:
        return socket.getaddrinfo("pypi.org", 443, socket.AF_INET)[0][4][0]
    except OSError:
        return "192.0.2.1"


async def test_host_files_and_environment_are_invisible(docker_manager: SessionManager, tmp_path) -> None:
    secret = "/root/jupybox-test-secret.txt"
    with open(secret, "w") as fh:
        fh.write("host secret")
    os.environ["JUPYBOX_TEST_HOST_SECRET"] = "s3cret"
    session = await docker_manager.create()
    try:
        ex = await session.execute(
            "import os, json\n"
            f"paths = [{secret!r}, {str(__file__)!r}, '/var/run/docker.sock', '/var/lib/docker', '/root/.cache']\n"
            "vis = {p: os.path.exists(p) for p in paths}\n"
            "writes = {}\n"
            "for p in ['/x', '/etc/x', '/usr/x', '/opt/jupybox/x', '/mnt/data/ok', '/tmp/ok']:\n"
            "    try:\n        open(p, 'w').write('1'); writes[p] = True\n"
            "    except OSError:\n        writes[p] = False\n"
            "print(json.dumps({'vis': vis, 'writes': writes, 'uid': os.getuid(),\n"
            "  'secret_env': any('s3cret' in v for v in os.environ.values()), 'cwd': os.getcwd()}))"
        )
        report = json.loads(ex.stdout)
        assert not any(report["vis"].values()), report["vis"]
        assert report["writes"] == {"/x": False, "/etc/x": False, "/usr/x": False, "/opt/jupybox/x": False,
                                    "/mnt/data/ok": True, "/tmp/ok": True}
        assert report["uid"] != 0
        assert report["secret_env"] is False
        assert report["cwd"] == "/mnt/data"
    finally:
        os.remove(secret)
        del os.environ["JUPYBOX_TEST_HOST_SECRET"]
        await docker_manager.close(session.id)


async def test_code_cannot_write_past_its_workspace_quota(docker_manager: SessionManager) -> None:
    """The quota binds the sandbox's own writes too: each workspace is a filesystem of its size."""
    assert docker_manager.loop_workspaces  # root with loop devices: what CI and a server have
    small = dataclasses.replace(docker_manager.settings.limits, workspace_bytes=20_000_000)
    session, other = await docker_manager.create(limits=small), await docker_manager.create()
    fill = "n = 0\ntry:\n    with open('big.bin', 'wb') as f:\n        for _ in range(60):\n" \
           "            f.write(b'x' * 1_000_000); n += 1\nexcept OSError as e:\n    print(n, e.strerror)"
    ex = await session.execute(fill)
    written = int(ex.stdout.split()[0])
    assert "No space left on device" in ex.stdout and 18 <= written <= 22, ex.stdout
    assert session.workspace.usage() <= 22_000_000 and str(session.workspace.root) in diskfs.mounts_under(session.folder)
    with pytest.raises(QuotaExceeded):  # the host's own writes are refused, with words
        session.workspace.write("more.bin", b"y" * 5_000_000)
    assert (await other.execute("open('ok.bin', 'wb').write(b'z' * 30_000_000)")).ok  # its own room
    assert (await session.execute("import os\nos.remove('big.bin')\nprint(open('a.txt', 'w').write('ok'))")).ok
    folder = session.folder
    await docker_manager.close(session.id)
    await docker_manager.close(other.id)
    assert diskfs.mounts_under(folder) == [] and not folder.exists()


async def test_two_sessions_share_nothing(docker_manager: SessionManager) -> None:
    a = await docker_manager.create()
    b = await docker_manager.create()
    await a.execute("private = 'a'\nopen('a.txt', 'w').write('a')")
    ex = await b.execute("import os\nprint('private' in globals(), os.listdir('.'), os.path.exists('/mnt/data/a.txt'))")
    assert ex.stdout == "False [] False\n"
    assert not b.workspace.exists("a.txt") and a.workspace.exists("a.txt")
    await docker_manager.close(a.id)
    await docker_manager.close(b.id)


async def test_container_carries_the_hardening_and_labels(docker_manager: SessionManager) -> None:
    session = await docker_manager.create()
    cid = f"jupybox-{session.id}"
    info = json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True).stdout)[0]
    host = info["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] == host["MemorySwap"] == docker_manager.settings.limits.memory_mb * 2**20
    assert host["PidsLimit"] == docker_manager.settings.limits.pids
    assert host["NanoCpus"] > 0 and "/tmp" in host["Tmpfs"]
    assert not host.get("PortBindings")
    assert info["Config"]["User"] != "" and not info["Config"]["User"].startswith("0")
    assert info["Config"]["Labels"]["jupybox"] == "1"
    assert info["Config"]["Labels"]["jupybox.session"] == session.id
    ex = await session.execute("print(open('/proc/net/tcp').read().count('\\n') - 1, open('/proc/net/tcp6').read().count('\\n') - 1)")
    assert ex.stdout == "0 0\n"  # the kernel listens on Unix sockets only
    await docker_manager.close(session.id)
    assert cid not in subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout


async def test_shutdown_leaves_no_container(sandbox_image: str, jb_home) -> None:
    manager = SessionManager(docker_settings(jb_home / "shut", instance="shutdown-test", pool_size=1))
    await manager.start()
    for _ in range(2):
        await (await manager.create()).execute("1")
    ours = [c for c in jupybox_containers()]
    assert len(ours) >= 3  # two sessions and a warm one
    await manager.shutdown()
    labels = subprocess.run(["docker", "ps", "-a", "--filter", "label=jupybox.owner=" + manager.owner, "-q"],
                            capture_output=True, text=True).stdout.split()
    assert labels == []


async def test_idle_sessions_are_reaped_and_reported(sandbox_image: str, jb_home) -> None:
    reaped: list[str] = []
    manager = SessionManager(docker_settings(jb_home / "reap", instance="reap-test", idle_ttl_s=1.0),
                             on_reap=reaped.append)
    await manager.start()
    try:
        session = await manager.create()
        await session.execute("1")
        for _ in range(40):
            if reaped:
                break
            await asyncio.sleep(0.25)
        assert reaped == [session.id] and session.closed
        assert f"jupybox-{session.id}" not in subprocess.run(
            ["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True).stdout
    finally:
        await manager.shutdown()


def test_short_socket_links_of_processes_gone_are_pruned(tmp_path) -> None:
    """A process that crashed leaves its short links behind: the next link made removes those of
    processes that no longer run, and no live process's link."""
    from sandbox.session import socket_alias

    done = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    dead_pid = int(done.stdout)  # that shell has exited
    base = Path(tempfile.gettempdir(), f"jupybox-{os.geteuid()}")
    base.mkdir(mode=0o700, exist_ok=True)
    (tmp_path / "run").mkdir()
    stale = base / f"{dead_pid}-stale{os.getpid()}"
    stale.symlink_to(tmp_path / "gone", target_is_directory=True)
    live = socket_alias(f"{os.getpid()}-live", tmp_path / "run")
    try:
        assert not stale.is_symlink()
        fresh = socket_alias(f"{os.getpid()}-second", tmp_path / "run")
        assert live.is_symlink() and fresh.is_symlink()  # this process runs: its links stay
        fresh.unlink()
    finally:
        live.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)


@pytest.mark.parametrize("backend", ["docker", "local"])
async def test_a_deep_home_gets_short_socket_links(sandbox_image: str, tmp_path, backend: str) -> None:
    """Unix socket paths are limited to 107 bytes: a deep JUPYBOX_HOME (a CI's temp folder) still
    runs kernels, through a private short link that goes when the session does."""
    home = tmp_path / ("deep-" * 16)
    settings = dataclasses.replace(docker_settings(home, instance="deep-home"), backend=backend, allow_unsafe_local=True)
    async with SessionManager(settings) as manager:
        session = await manager.create()
        assert len(str(session.runtime_dir / "kernel-1")) > 107
        await session.execute("x = 6 * 7")
        await session.restart()
        ex = await session.execute("x = 7 * 6; print(x)")
        assert ex.status == ExecutionStatus.OK and ex.stdout == "42\n"
        links = list(Path(tempfile.gettempdir(), f"jupybox-{os.geteuid()}").glob(f"*-{session.id}"))
        assert [link.resolve() for link in links] == [session.runtime_dir.resolve()]
        assert oct(os.stat(links[0].parent).st_mode & 0o777) == "0o700"
        await manager.close(session.id)
        assert not links[0].is_symlink()
