"""Durable sessions: records that outlive the server, pause and resume, retention.

The manager's part against real Docker containers (pause by call and by idle expiry, resume with
variables, a pause during a running cell, two resumes at once, a full workspace, retention, a
shutdown and a second manager on the same home); the server's part with `jupybox serve` as a real
process, killed with SIGKILL and stopped with SIGTERM between requests of a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox import Caller, PauseFailed, SessionClosed, SessionManager
from sandbox.state import STATE_DIR
from store import SessionRecords
from tests.support.ports import free_port
from tests.support.sandboxes import ROOT, docker_settings


def container_running(session_id: str) -> bool:
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"name=^jupybox-{session_id}$"],
                         capture_output=True, text=True, check=True).stdout
    return bool(out.strip())


def container_exists(session_id: str) -> bool:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"name=^jupybox-{session_id}$"],
                         capture_output=True, text=True, check=True).stdout
    return bool(out.strip())


SETUP = ("import pandas as pd, socket\n"
         "x = 41\n"
         "df = pd.DataFrame({'v': [1.5, 2.5, 3.0]})\n"
         "square = lambda n: n * n\n"
         "conn = socket.socket()\n"
         "open('result.txt', 'w').write('kept')\n")


# -- the manager ------------------------------------------------------------------------------------
async def test_a_paused_session_has_no_container_and_resumes_with_its_variables(sandbox_image: str,
                                                                                 jb_home: Path) -> None:
    settings = docker_settings(jb_home / "pause", instance="durable-pause", durable=True)
    async with SessionManager(settings) as manager:
        session = await manager.create(caller=Caller("alice"))
        assert (await session.execute(SETUP)).ok
        report = await manager.pause(session.id, Caller("alice"))
        assert {"x", "df", "square"} <= set(report.saved) and "conn" in report.skipped
        assert report.modules.get("pd") == "pandas"
        assert session.paused and not container_exists(session.id)
        assert manager.get(session.id, Caller("alice")) is session  # listed under the same id
        record = manager.records.get(session.id)
        assert record.state == "paused" and record.owner == "alice" and record.disk_bytes > 0
        assert "conn" in record.note
        with pytest.raises(SessionClosed):  # another user's paused session is as absent as a running one's
            await manager.pause(session.id, Caller("bob"))

        ex = await session.execute("print(x + 1, df['v'].sum(), square(3), pd.__name__, "
                                   "open('result.txt').read(), 'conn' in dir())")
        assert ex.ok and ex.stdout.split() == ["42", "7.0", "9", "pandas", "kept", "False"]
        assert ex.resumed and "x" in ex.resumed and "conn" in ex.resumed and "not restored" in ex.resumed
        assert "resumed" in ex.text()  # the model is told too
        assert not session.paused and container_running(session.id)
        assert not (session.workspace.root / STATE_DIR).exists()  # loaded, then removed: the quota is free
        assert STATE_DIR not in [f.path.split("/")[0] for f in session.workspace.list()]
        again = await session.execute("x")
        assert again.resumed is None  # said once
        assert manager.records.get(session.id).state == "running"


async def test_pause_interrupts_a_running_cell_and_two_resumes_start_one_kernel(sandbox_image: str,
                                                                                 jb_home: Path) -> None:
    settings = docker_settings(jb_home / "busy", instance="durable-busy", durable=True)
    async with SessionManager(settings) as manager:
        session = await manager.create()
        await session.execute("n = 7")
        running = asyncio.ensure_future(session.execute("import time\nwhile True: time.sleep(0.05)", timeout=60))
        await asyncio.sleep(1.0)
        report = await manager.pause(session.id)
        ex = await running
        assert report.interrupted and "interrupted" in report.words()
        assert ex.error is not None and ex.error.ename == "KeyboardInterrupt"
        assert "n" in report.saved and session.paused

        starts = []
        original = manager.backend.start

        async def counting(spec):
            starts.append(spec.session_id)
            return await original(spec)

        manager.backend.start = counting  # type: ignore[method-assign]
        a, b = await asyncio.gather(session.execute("n * 2"), session.execute("n * 3"))
        assert starts == [session.id]
        assert [a.outputs[0].data["text/plain"], b.outputs[0].data["text/plain"]] == ["14", "21"]
        assert sum(bool(e.resumed) for e in (a, b)) == 1


async def test_a_full_workspace_fails_the_pause_and_the_session_runs_on(sandbox_image: str, jb_home: Path) -> None:
    from sandbox import Limits

    limits = Limits(workspace_bytes=20_000_000, file_bytes=20_000_000)
    settings = docker_settings(jb_home / "full", instance="durable-full", durable=True, limits=limits)
    async with SessionManager(settings) as manager:
        if not manager.loop_workspaces:
            pytest.fail("this test needs each workspace on its own size-capped filesystem (root and loop devices)")
        session = await manager.create()
        code = ("import numpy as np\n"
                "small = 5\n"
                "filler = open('filler.bin', 'wb')\n"
                "try:\n"
                "    while True: filler.write(b'0' * 1_000_000); filler.flush()\n"
                "except OSError: pass\n"
                "filler.close()\n"
                "big = np.ones(1_000_000)\n")
        assert (await session.execute(code)).ok
        with pytest.raises(PauseFailed) as failed:
            await manager.pause(session.id)
        assert "space" in str(failed.value) or "quota" in str(failed.value)
        assert not session.paused and container_running(session.id)
        assert (await session.execute("print(small)")).stdout == "5\n"
        assert manager.records.get(session.id).state == "running"


async def test_idle_sessions_are_paused_and_deleted_after_retention(sandbox_image: str, jb_home: Path) -> None:
    events: list[tuple[str, str]] = []
    settings = docker_settings(jb_home / "idle", instance="durable-idle", durable=True, idle_ttl_s=1.0,
                               retain_days=6 / 86400)  # six seconds
    async with SessionManager(settings) as manager:
        manager.on_event = lambda action, sid, owner, detail: events.append((action, sid))
        session = await manager.create()
        await session.execute("kept = 'yes'")
        deadline = time.monotonic() + 30
        while ("session.pause", session.id) not in events:  # told once paused and recorded
            assert time.monotonic() < deadline, "the idle session was not paused"
            await asyncio.sleep(0.2)
        assert session.paused and not container_exists(session.id)
        assert manager.records.get(session.id).state == "paused"
        ex = await session.execute("print(kept)")  # resumed by its use: the retention starts again from here
        assert ex.stdout == "yes\n" and ex.resumed

        folder = session.folder
        deadline = time.monotonic() + 60
        while ("session.expire", session.id) not in events or folder.exists():  # told, then removed
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.2)
        assert manager.records.get(session.id) is None
        with pytest.raises(SessionClosed):
            manager.get(session.id)


async def test_shutdown_pauses_everything_and_a_new_manager_resumes_it(sandbox_image: str, jb_home: Path) -> None:
    settings = docker_settings(jb_home / "restart", instance="durable-restart", durable=True)
    async with SessionManager(settings) as manager:
        kept = await manager.create(caller=Caller("alice"))
        await kept.execute("import numpy as np\narr = np.arange(10)")
        closed = await manager.create()
        await manager.close(closed.id)
    assert not container_exists(kept.id)  # SIGTERM's promise: nothing runs while the server is gone
    assert kept.folder.exists() and not closed.folder.exists()

    async with SessionManager(settings) as manager:
        assert [s.id for s in manager.list()] == [kept.id]
        session = manager.get(kept.id, Caller("alice"))
        assert session.paused and manager.owner_of(kept.id) == "alice"
        ex = await session.execute("int(arr.sum())")
        assert ex.outputs[0].data["text/plain"] == "45" and "arr" in ex.resumed
        await manager.close(kept.id)
    assert SessionRecords.at_home(settings.home).list() == []


async def test_a_corrupt_saved_state_resumes_a_fresh_kernel_and_says_so(sandbox_image: str, jb_home: Path) -> None:
    settings = docker_settings(jb_home / "corrupt", instance="durable-corrupt", durable=True)
    async with SessionManager(settings) as manager:
        session = await manager.create()
        await session.execute("y = 3")
        await manager.pause(session.id)
        state = session.workspace.root / STATE_DIR
        for f in state.rglob("*.json"):
            f.write_text("{not json")
        ex = await session.execute("print('y' in dir())")
        assert ex.ok and ex.stdout == "False\n"
        assert ex.resumed and "could not be read" in ex.resumed


def test_records_live_in_the_users_store_file(jb_home: Path) -> None:
    from store import SessionRecord, UserStore

    home = jb_home / "records"
    records = SessionRecords.at_home(home)
    records.put(SessionRecord("abc", "inst", owner="alice", limits={"memory_mb": 512}, conversation={"k": [1]}))
    UserStore.at_home(home).add("alice")  # the same file takes users too
    records.update("abc", state="paused", note="x saved")
    got = records.get("abc")
    assert got.state == "paused" and got.conversation == {"k": [1]} and got.limits == {"memory_mb": 512}
    assert [r.id for r in records.list(owner="alice")] == ["abc"] and records.list(owner="bob") == []
    with sqlite3.connect(home / "jupybox.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"users", "sessions"}
    with pytest.raises(ValueError):
        records.update("abc", nonsense=1)


def test_a_store_made_before_a_column_was_added_gets_it_and_keeps_its_records(jb_home: Path) -> None:
    """An earlier version's ``sessions`` table (no ``chat`` column) is brought up to date when the
    records are opened, instead of every read failing as if the file were not a store at all."""
    from store import SessionRecord, UserStore

    home = jb_home / "older"
    UserStore.at_home(home).add("alice")  # the store file as the users' commands make it
    with sqlite3.connect(home / "jupybox.db") as conn:
        conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, instance TEXT NOT NULL, owner TEXT, "
                     "state TEXT NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL, paused REAL, "
                     "limits TEXT NOT NULL, isolation TEXT, title TEXT NOT NULL DEFAULT '', note TEXT, "
                     "disk_bytes INTEGER NOT NULL DEFAULT 0, conversation TEXT)")
        conn.execute("INSERT INTO sessions (id, instance, owner, state, created, last_used, limits) "
                     "VALUES ('old1', 'inst', 'alice', 'paused', 1.0, 2.0, '{}')")
    records = SessionRecords.at_home(home)
    [old] = records.list("inst")
    assert old.id == "old1" and old.owner == "alice" and old.chat is None
    records.put(SessionRecord("new1", "inst", owner="alice", limits={}, chat="web:alice:1"))
    assert [r.id for r in records.list("inst", chat="web:alice:1")] == ["new1"]


# -- the server, as a process ---------------------------------------------------------------------
class Server:
    """`jupybox serve` as a process on a home of its own, started again on the same home."""

    def __init__(self, home: Path, instance: str) -> None:
        self.home, self.instance = home, instance
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "JUPYBOX_")) or k == "JUPYBOX_IMAGE"}
        env.update(JUPYBOX_HOME=str(self.home), JUPYBOX_INSTANCE=self.instance, PYTHONPATH=str(ROOT))
        # a remote model that is never asked: no model library is loaded
        self.proc = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--port", str(self.port),
                                      "--openai-base-url", "http://127.0.0.1:9/v1", "--openai-model", "none"],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    def stop(self, sig: int) -> str:
        assert self.proc is not None
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=90)
        return out


def sessions_list(home: Path, *args: str, as_json: bool = True) -> str:
    """What `jupybox sessions list` prints for ``home``, as a separate process reading the store."""
    return subprocess.run([sys.executable, "-m", "ui.cli", "sessions", "list", *args, *(["--json"] if as_json else [])],
                          cwd=ROOT, env={**os.environ, "JUPYBOX_HOME": str(home), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def server_home(jb_home: Path) -> Iterator[Path]:
    home = jb_home / "serve"
    yield home
    subprocess.run(["docker", "ps", "-aq", "--filter", "label=jupybox.owner"], capture_output=True)


def test_the_server_killed_or_stopped_keeps_sessions_files_variables_and_cells(sandbox_image: str,
                                                                                server_home: Path) -> None:
    server = Server(server_home, "durable-serve").start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            sid = c.post("/api/sessions").json()["id"]
            r = c.post(f"/api/sessions/{sid}/files", files={"file": ("data.csv", b"v\n1.5\n2.5\n3\n")})
            assert r.status_code in (200, 201), r.text
            ex = c.post(f"/api/sessions/{sid}/execute",
                        json={"code": "import pandas as pd\nx = 41\ndf = pd.read_csv('data.csv')\n"
                                      "open('result.txt', 'w').write('done')"}).json()
            assert ex["status"] == "ok", ex
        out = server.stop(signal.SIGKILL)
        assert container_running(sid), out  # the kernel outlives a killed server
        cleanup = subprocess.run([sys.executable, "-m", "ui.cli", "sandbox", "cleanup"], cwd=ROOT, text=True,
                                 capture_output=True, env={**os.environ, "JUPYBOX_HOME": str(server_home),
                                                           "JUPYBOX_INSTANCE": "durable-serve", "PYTHONPATH": str(ROOT)})
        assert cleanup.returncode == 0 and container_running(sid), cleanup  # a recorded session is no orphan

        server = Server(server_home, "durable-serve").start()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            listed = c.get("/api/sessions").json()["sessions"]
            assert [(s["id"], s["state"]) for s in listed] == [(sid, "running")]
            ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "print(x + 1, df['v'].sum())"}).json()
            assert ex["outputs"][0]["text"] == "42 7.0\n" and not ex.get("resumed"), ex  # the same kernel
            names = {f["path"] for f in c.get(f"/api/sessions/{sid}/files").json()["files"]}
            assert {"data.csv", "result.txt"} <= names
            cells = c.get(f"/api/sessions/{sid}/notebook").json()["cells"]
            assert any("read_csv" in "".join(cell["source"]) for cell in cells)  # the cell before the kill
        out = server.stop(signal.SIGTERM)
        assert server.proc.returncode == 0, out
        assert not container_exists(sid), out  # SIGTERM leaves no container: the session was paused

        server = Server(server_home, "durable-serve").start()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            listed = c.get("/api/sessions").json()["sessions"]
            assert [(s["id"], s["state"]) for s in listed] == [(sid, "paused")]
            assert "df" in listed[0]["note"]
            ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "print(x + 1, df['v'].sum())"}).json()
            assert ex["outputs"][0]["text"] == "42 7.0\n" and "x" in ex["resumed"], ex
            assert c.get(f"/api/sessions/{sid}/files/result.txt").content == b"done"
            report = c.post(f"/api/sessions/{sid}/pause").json()
            assert "x" in report["saved"] and not container_exists(sid)
            (kept,) = [json.loads(line) for line in sessions_list(server_home).splitlines()]
            assert kept["id"] == sid and kept["state"] == "paused" and kept["disk_bytes"] >= report["bytes"] > 0
            table = sessions_list(server_home, as_json=False)  # the table for people
            assert table.startswith("ID") and sid in table and "paused" in table
            assert sessions_list(server_home, "--user", "nobody") == ""
            assert c.delete(f"/api/sessions/{sid}").status_code == 204
            assert not (server_home / "sessions" / sid).exists()
            assert sid not in sessions_list(server_home)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop(signal.SIGTERM)
    assert not container_exists(sid)


async def test_a_front_end_conversation_continues_in_its_session_after_a_restart(sandbox_image: str,
                                                                                  jb_home: Path) -> None:
    """A conversation a front end names itself (an OpenAI client's ``user``) finds its session and
    its cells again when the server comes back; another user's name for it finds nothing."""
    from interpreter import ConversationService

    settings = docker_settings(jb_home / "chat", instance="durable-chat", durable=True)
    alice = Caller("alice")
    async with SessionManager(settings) as manager:
        service = ConversationService(manager)
        chat = service.open("openai:alice:u1", "openai", caller=alice)
        events = [e async for e in service.execute(chat, "v = 'first'")]
        assert events[-1].execution.ok
        sid = chat.conversation.session_id
    async with SessionManager(settings) as manager:
        service = ConversationService(manager)
        assert manager.recorded_chat("openai:alice:u1", Caller("bob")) is None  # not hers to find
        chat = service.open("openai:alice:u1", "openai", caller=alice)
        assert chat.conversation.session_id == sid and [c.code for c in chat.conversation.cells] == ["v = 'first'"]
        events = [e async for e in service.execute(chat, "print(v)")]
        assert events[-1].execution.stdout == "first\n" and "v" in events[-1].execution.resumed
        assert len(chat.conversation.cells) == 2
        await manager.close(sid)
