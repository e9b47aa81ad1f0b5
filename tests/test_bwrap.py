"""The bwrap backend as a user meets it: real sessions on real bubblewrap sandboxes, each promise of
isolation checked from inside the kernel. No traffic leaves this host: "no network" is proven with
the sandbox's own interfaces, a DNS lookup that has no resolver to reach, and a listener this test
opens on the host's loopback."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import ExecutionStatus, SandboxSettings, SessionManager, diskfs
from sandbox.backends.bwrap import BwrapBackend
from sandbox.config import Limits
from sandbox.errors import BackendUnavailable
from sandbox.session import Session

ROOT = Path(__file__).resolve().parent.parent


def bwrap_settings(home: Path, **kw: object) -> SandboxSettings:
    return SandboxSettings(backend="bwrap", home=home, instance="t", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def manager(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SessionManager]:
    # A short home on purpose: the kernel's Unix sockets live below it (107-byte path limit).
    async with SessionManager(bwrap_settings(tmp_path_factory.mktemp("jb"))) as m:
        yield m


@pytest.fixture(scope="module")
async def tight_manager(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SessionManager]:
    """Small limits, so the memory and process bombs hit them fast."""
    limits = Limits(memory_mb=256, pids=64)
    async with SessionManager(bwrap_settings(tmp_path_factory.mktemp("jb"), limits=limits)) as m:
        yield m


async def run_json(session: Session, code: str) -> Any:
    """Run ``code`` (which prints one JSON document) in the sandbox and return what it printed."""
    ex = await session.execute(code, timeout=20)
    assert ex.ok, ex.text()
    return json.loads(ex.stdout)


def sandbox_processes(session: Session) -> list[int]:
    """Live host processes of a session's sandbox: bwrap (its command line names the session's
    folders) and the kernel (its environment names the session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(session.folder).encode() in cmdline or f"JUPYBOX_SESSION={session.id}".encode() in environ:
            found.append(int(entry.name))
    return found


async def test_variables_persist_between_executions(manager: SessionManager) -> None:
    session = await manager.create()
    assert (await session.execute("x = 20")).ok
    ex = await session.execute("print('x is', x)\nx * 2 + 2")
    assert ex.status is ExecutionStatus.OK
    assert ex.stdout == "x is 20\n"
    assert ex.results[-1].data["text/plain"] == "42"
    await manager.close(session.id)


async def test_endless_loop_times_out_and_keeps_state(manager: SessionManager) -> None:
    session = await manager.create()
    await session.execute("kept = 'still here'")
    ex = await session.execute("while True:\n    pass", timeout=2)
    assert ex.status is ExecutionStatus.TIMEOUT
    assert not ex.state_lost and "interrupted" in (ex.reason or "")
    assert (await session.execute("kept")).results[-1].data["text/plain"] == "'still here'"
    await manager.close(session.id)


async def test_sandbox_has_no_network(manager: SessionManager) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    session = await manager.create()
    try:
        seen = await run_json(session, f"""
import json, socket
seen = {{"interfaces": [name for _, name in socket.if_nameindex()]}}
try:
    socket.getaddrinfo("pypi.org", 443)
    seen["dns"] = "resolved"
except OSError as exc:
    seen["dns"] = type(exc).__name__
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    seen["host_listener"] = "connected"
except OSError as exc:
    seen["host_listener"] = type(exc).__name__
print(json.dumps(seen))
""")
        assert seen == {"interfaces": ["lo"], "dns": "gaierror", "host_listener": "ConnectionRefusedError"}
        with pytest.raises(BlockingIOError):  # nothing ever reached the host's listener
            listener.accept()
    finally:
        listener.close()
        await manager.close(session.id)


async def test_host_files_and_environment_are_invisible(manager: SessionManager,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    marker = uuid.uuid4().hex
    monkeypatch.setenv(f"JUPYBOX_TEST_{marker.upper()}", marker)
    root_secret = Path("/root") / f".jupybox-test-secret-{marker}"
    tmp_secret = Path("/tmp") / f"jupybox-test-secret-{marker}"
    session = await manager.create()
    try:
        root_secret.write_text(marker)
        tmp_secret.write_text(marker)
        paths = [str(ROOT / "pyproject.toml"), str(ROOT / "sandbox"), str(root_secret), str(tmp_secret), "/home",
                 str(session.folder)]
        seen = await run_json(session, f"""
import json, os
print(json.dumps({{
    "exists": {{p: os.path.exists(p) for p in {paths!r}}},
    "env_has_marker": any({marker!r} in k.lower() or {marker!r} in v for k, v in os.environ.items()),
    "env_keys": sorted(os.environ),
    "tmp": os.listdir("/tmp"),
}}))
""")
        assert seen["exists"] == {p: False for p in paths}
        assert seen["env_has_marker"] is False
        assert "HOSTNAME" not in seen["env_keys"] and "VIRTUAL_ENV" not in seen["env_keys"]
        assert f"jupybox-test-secret-{marker}" not in seen["tmp"]
    finally:
        root_secret.unlink(missing_ok=True)
        tmp_secret.unlink(missing_ok=True)
        await manager.close(session.id)


async def test_only_the_workspace_and_tmp_are_writable(manager: SessionManager) -> None:
    session = await manager.create()
    seen = await run_json(session, """
import json, os, sys
def try_write(folder):
    try:
        with open(os.path.join(folder, "probe.txt"), "w") as fh:
            fh.write("x")
        return "written"
    except OSError as exc:
        return type(exc).__name__
folders = ["/mnt/data", "/tmp", "/", "/etc", "/usr", "/usr/local", "/opt/jupybox", "/root", sys.prefix,
           sys.base_prefix, os.path.dirname(os.__file__), "/run/jupybox"]
print(json.dumps({f: try_write(f) for f in folders}))
""")
    assert seen.pop("/mnt/data") == "written" and seen.pop("/tmp") == "written"
    assert all(outcome in ("PermissionError", "OSError") for outcome in seen.values()), seen
    assert session.workspace.read("probe.txt") == b"x"  # the workspace is the host's session folder
    assert seen["/run/jupybox"] == "PermissionError"  # the runtime folder is on the host's disk, unbounded
    await manager.close(session.id)


async def test_kernel_runs_without_root_or_capabilities(manager: SessionManager) -> None:
    session = await manager.create()
    seen = await run_json(session, """
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
                  "caps": {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")},
                  "no_new_privs": status["NoNewPrivs"].strip()}))
""")
    assert seen["uid"] != 0 and seen["euid"] != 0
    if os.geteuid() == 0:  # jupybox as root: the kernel is the configured sandbox user
        assert (seen["uid"], seen["gid"]) == (manager.settings.sandbox_uid, manager.settings.sandbox_gid)
        assert seen["groups"] == []
    assert set(seen["caps"].values()) == {"0000000000000000"}
    assert seen["no_new_privs"] == "1"
    await manager.close(session.id)


async def test_memory_bomb_is_an_error_and_the_kernel_lives_on(tight_manager: SessionManager) -> None:
    session = await tight_manager.create()
    await session.execute("before = 'kept'")
    ex = await session.execute("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))", timeout=30)
    # Status "error", not "crashed": the backend caps the address space (RLIMIT_AS), so the
    # allocation that crosses the limit fails inside Python with a MemoryError; nothing is killed.
    assert ex.status is ExecutionStatus.ERROR, ex.text()
    assert ex.error is not None and ex.error.ename == "MemoryError"
    after = await session.execute("print(before, len(chunks) * 16 < 256 + 512)\ndel chunks\nsum(range(10))")
    assert after.ok and after.stdout == "kept True\n", after.text()  # the limit held, the state too
    assert after.results[-1].data["text/plain"] == "45"
    await tight_manager.close(session.id)


async def test_process_bomb_is_contained_per_session(tight_manager: SessionManager) -> None:
    bomber, neighbour = await tight_manager.create(), await tight_manager.create()
    seen = await run_json(bomber, """
import json, os, time
kids, err = [], None
try:
    while len(kids) < 1000:
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
except OSError as exc:
    err = exc.errno
print(json.dumps({"forked": len(kids), "errno": err}))
""")
    assert seen["errno"] == 11 and seen["forked"] < 64  # EAGAIN at the pids limit
    # The limit counts per session, not per uid: the neighbour still starts threads.
    ex = await neighbour.execute("import threading\n"
                                 "t = threading.Thread(target=print, args=('ok',))\nt.start()\nt.join()")
    assert ex.ok and ex.stdout == "ok\n", ex.text()
    await tight_manager.close(bomber.id)
    await tight_manager.close(neighbour.id)


async def test_killed_kernel_is_reported_and_replaced(manager: SessionManager) -> None:
    session = await manager.create()
    await session.execute("lost = 1")
    ex = await session.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert ex.status is ExecutionStatus.CRASHED and ex.state_lost
    assert "SIGKILL" in (ex.reason or ""), ex.reason
    ex = await session.execute("'lost' in globals()")
    assert ex.ok and ex.results[-1].data["text/plain"] == "False"
    await manager.close(session.id)


async def test_sessions_do_not_see_each_others_workspace(manager: SessionManager) -> None:
    alice, bob = await manager.create(), await manager.create()
    assert (await alice.execute("open('alice.txt', 'w').write('private')")).ok
    seen = await run_json(bob, f"""
import json, os
print(json.dumps({{"listing": os.listdir("."), "alice_folder": os.path.exists({str(alice.workspace.root)!r})}}))
""")
    assert seen == {"listing": [], "alice_folder": False}
    assert alice.workspace.read("alice.txt") == b"private"
    await manager.close(alice.id)
    await manager.close(bob.id)


async def test_closing_a_session_leaves_no_process(manager: SessionManager) -> None:
    session = await manager.create()
    assert (await session.execute("1")).ok
    running = sandbox_processes(session)
    assert len(running) >= 2, running  # bwrap and the kernel at least
    await manager.close(session.id)
    assert sandbox_processes(session) == []


async def test_missing_bwrap_is_reported_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a host where bubblewrap is not installed
    with pytest.raises(BackendUnavailable, match="apt-get install bubblewrap"):
        await BwrapBackend(bwrap_settings(tmp_path)).check()


async def test_code_cannot_write_past_its_workspace_quota(manager: SessionManager) -> None:
    assert manager.loop_workspaces
    small = dataclasses.replace(manager.settings.limits, workspace_bytes=10_000_000)
    session = await manager.create(limits=small)
    ex = await session.execute("import os\ntry:\n    with open('big.bin', 'wb') as f:\n        f.write(os.urandom(30_000_000))\n"
                               "except OSError as e:\n    print(e.strerror)")
    assert "No space left on device" in ex.stdout and session.workspace.usage() <= 11_000_000
    folder = session.folder
    await manager.close(session.id)
    assert diskfs.mounts_under(folder) == [] and not folder.exists()
