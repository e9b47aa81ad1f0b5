"""Sessions under gVisor (`docker_runtime="runsc"`), as a user meets them: the same promises as the
default runtime, with the kernel running on gVisor's own kernel instead of the host's.

The ``gvisor_runtime`` fixture runs ``scripts/setup-gvisor.sh`` once a run (installs Debian's ``runsc``
and registers it with the Docker daemon), so CI exercises gVisor too. Nothing is mocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox import ExecutionStatus, SessionManager
from tests.support.gvisor import gvisor_settings, run_setup
from tests.support.probes import SYSCALL_PROBE


@pytest.fixture(scope="module")
def gv_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short on purpose: Unix socket paths are limited to 107 bytes.
    return tmp_path_factory.mktemp("gv")


@pytest.fixture(scope="module")
async def gvisor_manager(gvisor_runtime: str, sandbox_image: str, gv_home: Path) -> AsyncIterator[SessionManager]:
    async with SessionManager(gvisor_settings(gv_home, instance="gvisor-tests")) as manager:
        yield manager


def _inspect(name: str) -> dict:
    out = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def _containers(*filters: str) -> list[str]:
    args = ["docker", "ps", "-aq"]
    for f in filters:
        args += ["--filter", f]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()


def test_setup_script_is_idempotent(gvisor_runtime: str) -> None:
    config = Path(os.environ.get("DOCKER_CONFIG_FILE", "/etc/docker/daemon.json"))
    before = config.read_text()
    again = run_setup()
    assert again.returncode == 0, again.stderr
    assert "registered" not in again.stdout  # nothing to change the second time
    assert config.read_text() == before
    runtime = json.loads(before)["runtimes"]["runsc"]
    assert {"--host-uds=all", "--network=none", "--oci-seccomp"} <= set(runtime["runtimeArgs"])


async def test_state_persists_and_plots_come_back(gvisor_manager: SessionManager) -> None:
    session = await gvisor_manager.create()
    assert (await session.execute("x = 20")).ok
    ex = await session.execute("print('out', x)\nx * 2 + 2")
    assert ex.status is ExecutionStatus.OK
    assert ex.stdout == "out 20\n" and ex.results[-1].data["text/plain"] == "42"
    ex = await session.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert ex.ok, ex.text()
    assert len(ex.images) == 1 and session.workspace.read(ex.images[0].path).startswith(b"\x89PNG")
    await gvisor_manager.close(session.id)


async def test_the_kernel_really_runs_under_gvisor(gvisor_manager: SessionManager) -> None:
    session = await gvisor_manager.create()
    assert _inspect(f"jupybox-{session.id}")["HostConfig"]["Runtime"] == "runsc"
    ex = await session.execute(
        "import os, subprocess, json\n"
        "log = subprocess.run(['dmesg'], capture_output=True, text=True)\n"
        "print(json.dumps({'release': os.uname().release, 'dmesg': log.stdout, 'rc': log.returncode}))"
    )
    report = json.loads(ex.stdout)
    # gVisor's own kernel: a release that is not the host's; its boot log (which dmesg printed
    # before) is closed now that the syscall filter applies inside gVisor too (syslog is denied)
    assert report["release"] != os.uname().release, report
    assert report["rc"] != 0 and "Starting gVisor" not in report["dmesg"], report
    await gvisor_manager.close(session.id)


async def test_the_syscall_filter_holds_under_gvisor_too(gvisor_manager: SessionManager) -> None:
    """runsc ignores a container's seccomp profile unless told (--oci-seccomp): user namespaces,
    io_uring and ptrace were open under gVisor while the code and README promised the deny list."""
    session = await gvisor_manager.create()
    probe = SYSCALL_PROBE.replace("print(json.dumps(report))",  # PTRACE_TRACEME (0): asks nothing of another process
                                  "report['ptrace'] = call(libc.ptrace(0, 0, None, None))\nprint(json.dumps(report))")
    ex = await session.execute(probe, timeout=60)
    report = json.loads(ex.stdout)
    eperm = 1
    assert report["io_uring_setup"] == [-1, eperm]
    assert report["unshare_user"] == [-1, eperm] and report["unshare_net"] == [-1, eperm]
    assert report["ptrace"][0] == -1
    assert report["fork"] == 0  # threads and processes still work
    assert (await session.execute("print(6 * 7)")).stdout == "42\n"
    await gvisor_manager.close(session.id)


async def test_no_network_inside(gvisor_manager: SessionManager) -> None:
    session = await gvisor_manager.create()
    ex = await session.execute(
        "import os, socket, time\n"
        "print(sorted(os.listdir('/sys/class/net')), [n for _, n in socket.if_nameindex()])\n"
        "t = time.monotonic()\n"
        "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('dns ok')\nexcept OSError:\n    print('dns failed')\n"
        "s = socket.socket(); s.settimeout(5)\n"
        "try:\n    s.connect((REGISTRY_IP, 443))\n    print('connect ok')\nexcept OSError as e:\n    print('connect failed', type(e).__name__)\n"
        "print('fast', time.monotonic() - t < 3)".replace("REGISTRY_IP", repr(_registry_ip()))
    )
    lines = ex.stdout.splitlines()
    assert lines[0] == "['lo'] ['lo']", ex.text()
    assert lines[1] == "dns failed"
    assert lines[2].startswith("connect failed")
    assert lines[3] == "fast True"
    await gvisor_manager.close(session.id)


def _registry_ip() -> str:
    """The package registry's address as the host resolves it; the sandbox must not reach it.
    Falls back to a documentation address."""
    try:
        return socket.getaddrinfo("pypi.org", 443, socket.AF_INET)[0][4][0]
    except OSError:
        return "192.0.2.1"


async def test_host_files_are_invisible_and_the_root_is_read_only(gvisor_manager: SessionManager) -> None:
    secret = "/root/jupybox-gvisor-secret.txt"
    Path(secret).write_text("host secret")
    session = await gvisor_manager.create()
    try:
        ex = await session.execute(
            "import os, json\n"
            f"vis = {{p: os.path.exists(p) for p in [{secret!r}, {str(__file__)!r}, '/var/run/docker.sock']}}\n"
            "writes = {}\n"
            "for p in ['/x', '/etc/x', '/mnt/data/ok', '/tmp/ok']:\n"
            "    try:\n        open(p, 'w').write('1'); writes[p] = True\n"
            "    except OSError:\n        writes[p] = False\n"
            "print(json.dumps({'vis': vis, 'writes': writes, 'uid': os.getuid()}))"
        )
        report = json.loads(ex.stdout)
        assert not any(report["vis"].values()), report["vis"]
        assert report["writes"] == {"/x": False, "/etc/x": False, "/mnt/data/ok": True, "/tmp/ok": True}
        assert report["uid"] != 0
        assert session.workspace.read("ok") == b"1"  # the workspace is shared with the host
    finally:
        os.remove(secret)
        await gvisor_manager.close(session.id)


async def test_infinite_loop_times_out_and_keeps_state(gvisor_manager: SessionManager) -> None:
    session = await gvisor_manager.create()
    await session.execute("kept = 'still here'")
    ex = await session.execute("while True:\n    pass", timeout=2)
    assert ex.status is ExecutionStatus.TIMEOUT
    assert not ex.state_lost and "interrupted" in (ex.reason or "")
    assert (await session.execute("print(kept)")).stdout == "still here\n"
    await gvisor_manager.close(session.id)


@pytest.mark.slow
async def test_memory_bomb_crashes_and_the_next_execution_works(gvisor_manager: SessionManager) -> None:
    session = await gvisor_manager.create()
    await session.execute("v = 1")
    ex = await session.execute("hog = []\nwhile True:\n    hog.append(bytearray(50 * 1024 * 1024))", timeout=60)
    assert ex.status is ExecutionStatus.CRASHED, ex.text()
    assert ex.state_lost and "memory" in (ex.reason or ""), ex.reason
    after = await session.execute("print(1 + 1, 'v' in globals())")
    assert after.stdout == "2 False\n"
    await gvisor_manager.close(session.id)


async def test_closing_and_shutdown_leave_no_container(gvisor_runtime: str, sandbox_image: str, gv_home: Path) -> None:
    manager = SessionManager(gvisor_settings(gv_home / "shut", instance="gvisor-shutdown"))
    await manager.start()
    closed = await manager.create()
    await closed.execute("1")
    await manager.close(closed.id)
    assert _containers(f"label=jupybox.session={closed.id}") == []
    kept = await manager.create()
    await kept.execute("1")
    assert _containers(f"label=jupybox.owner={manager.owner}") != []
    await manager.shutdown()
    assert _containers(f"label=jupybox.owner={manager.owner}") == []
