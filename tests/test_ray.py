"""Sessions spread over a real Ray cluster: a head and two worker nodes started here on loopback,
each a sandbox node with its own name and home, all on this machine's one Docker daemon (so every
container's node is proved by its ``jupybox.node`` label). Nothing is faked: real agents, real
containers, real kernels, a real node taken away mid-execution."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session as JupyterSession

from sandbox import (CapacityError, Execution, ExecutionStatus, Output, QuotaExceeded, SandboxSettings,
                     SessionClosed, SessionManager, WorkspacePathError)
from bench.packages import pure_wheel
from sandbox.cluster import SLOT, import_ray
from sandbox.diskfs import mounts_under
from sandbox.cluster.node import NODE_LABEL
from tests.support.lab import LAB_TOKEN, running_lab

ray = import_ray("127.0.0.1")  # before anything else imports Ray: no usage stats, loopback stays loopback
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
SLOTS = 4  # per node: three nodes hold twelve sessions
PREFIX = f"t{os.getpid()}"  # node names of this run only: other runs' nodes on this daemon are not ours


@dataclass
class LocalCluster:
    cluster: Any
    base: Path
    workers: dict[str, Any]  # role -> Ray node

    @staticmethod
    def name(role: str) -> str:
        return f"{PREFIX}-{role}"

    def home(self, role: str) -> Path:
        return self.base / role

    def node_args(self, role: str) -> dict[str, Any]:
        return {"node_ip_address": "127.0.0.1", "num_cpus": 1, "resources": {SLOT: SLOTS},
                "env_vars": {"JUPYBOX_NODE": self.name(role), "JUPYBOX_HOME": str(self.home(role))}}

    def add(self, role: str, wait: bool = True) -> None:
        self.workers[role] = self.cluster.add_node(wait=wait, **self.node_args(role))


def containers(node: str | None = None) -> list[dict[str, str]]:
    """The containers labelled as belonging to ``node`` (to any node of this run: None), running or not."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label={NODE_LABEL}" + (f"={node}" if node else ""),
                          "--format", '{{.ID}} {{.Label "jupybox.session"}} {{.Label "jupybox.node"}}'],
                         capture_output=True, text=True, check=True).stdout
    found = [dict(zip(("id", "session", "node"), line.split())) for line in out.splitlines()]
    return [c for c in found if c["node"].startswith(f"{PREFIX}-")]


@pytest.fixture(scope="module")
def ray_cluster(sandbox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tc = LocalCluster(None, tmp_path_factory.mktemp("ray"), {})
    tc.cluster = Cluster(initialize_head=True, head_node_args={**tc.node_args("head"), "include_dashboard": False})
    try:
        tc.add("w1", wait=False)  # both start at once
        tc.add("w2", wait=False)
        tc.cluster.wait_for_nodes()
        yield tc
    finally:
        ray.shutdown()
        tc.cluster.shutdown()
        for role in ("head", "w1", "w2"):  # every session closed: nothing of any node is left
            assert containers(tc.name(role)) == []


@pytest.fixture(scope="module")
async def manager(ray_cluster: LocalCluster, sandbox_image: str, jb_home: Path) -> AsyncIterator[SessionManager]:
    settings = SandboxSettings(backend="ray", ray_address=ray_cluster.cluster.address, image=sandbox_image,
                               home=jb_home / "ray-server", instance="ray-tests")
    async with SessionManager(settings) as m:
        yield m


async def _last(items: AsyncIterator[Output | Execution]) -> Execution:
    async with aclosing(items):
        found = [item async for item in items]
    assert isinstance(found[-1], Execution)
    return found[-1]


async def test_each_node_installs_from_its_own_wheelhouse(manager: SessionManager, ray_cluster: LocalCluster) -> None:
    for role in ("head", "w1", "w2"):  # one package name, a different wheel on each node
        house = ray_cluster.home(role) / "wheelhouse"
        house.mkdir(parents=True, exist_ok=True)
        pure_wheel(house, "jbnode", code=f"WHERE = {ray_cluster.name(role)!r}\n")
    sessions = await asyncio.gather(*(manager.create() for _ in range(3)))
    try:
        runs = await asyncio.gather(*(s.execute("%pip install jbnode\nimport jbnode\nprint(jbnode.WHERE)", timeout=90)
                                      for s in sessions))
        for session, ex in zip(sessions, runs):
            assert ex.ok and ex.stdout.rstrip().endswith(session.node), ex.text()
            assert "jupybox-pip" not in ex.stdout
    finally:
        await asyncio.gather(*(manager.close(s.id) for s in sessions))


async def test_twelve_sessions_run_at_once_spread_evenly_keep_their_state_and_fill_the_cluster(
        manager: SessionManager, ray_cluster: LocalCluster) -> None:
    sessions = await asyncio.gather(*(manager.create() for _ in range(3 * SLOTS)))
    try:
        # least loaded first: four on each node, and each container's label names the session's node
        assert sorted(collections.Counter(s.node for s in sessions).values()) == [SLOTS] * 3
        assert {s.node for s in sessions} == {ray_cluster.name(r) for r in ("head", "w1", "w2")}
        labelled = {c["session"]: c["node"] for c in containers()}
        assert all(labelled[s.id] == s.node for s in sessions)
        await asyncio.gather(*(s.execute(f"x = {i}") for i, s in enumerate(sessions)))

        # all twelve run at once: each prints, then waits in its kernel until interrupted
        streams = [s.stream("print(x * 3, flush=True)\nimport time\ntime.sleep(300)", timeout=600) for s in sessions]
        firsts = await asyncio.gather(*(anext(it) for it in streams))
        assert [o.text for o in firsts] == [f"{i * 3}\n" for i in range(len(sessions))]  # state kept
        assert all(s.busy for s in sessions)
        for s in sessions:
            s.interrupt()
        lasts = await asyncio.gather(*(_last(it) for it in streams))
        assert all(ex.error is not None and ex.error.ename == "KeyboardInterrupt" for ex in lasts)
        with pytest.raises(CapacityError, match="all 12 sandbox slots"):  # the API's 429
            await manager.create()
        # the sandbox still has no network: not even the cluster's own ports on this host
        gcs_port = int(ray_cluster.cluster.address.rsplit(":", 1)[1])
        probe = await sessions[0].execute(
            "import socket\n"
            "for host in ('127.0.0.1', 'pypi.org'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {gcs_port} if host[0] == '1' else 443), timeout=3)\n"
            "        print(host, 'reached')\n"
            "    except OSError as exc:\n"
            "        print(host, 'refused', type(exc).__name__)")
        assert "reached" not in probe.stdout and probe.stdout.count("refused") == 2, probe.stdout
    finally:
        await asyncio.gather(*(manager.close(s.id) for s in sessions))
    assert not any(containers(ray_cluster.name(r)) for r in ("head", "w1", "w2"))


async def test_a_plot_and_files_cross_the_cluster_in_chunks_within_the_quotas(manager: SessionManager) -> None:
    limits = dataclasses.replace(manager.settings.limits, file_bytes=4_000_000)
    s = await manager.create(limits=limits)
    rows = "".join(f"{i},{i * i % 97}\n" for i in range(250_000))
    data = ("x,y\n" + rows).encode()  # about 2.7 MB: three chunks up
    stored = await asyncio.to_thread(s.workspace.write, "in/points.csv", io.BytesIO(data))
    assert stored.size == len(data) and stored.path == "in/points.csv"
    ex = await s.execute(
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "df = pd.read_csv('in/points.csv')\n"
        "df.head(500).plot(x='x', y='y'); plt.show()\n"
        "open('out.bin', 'wb').write(bytes(range(256)) * 8192)\n"
        "print(len(df), df.y.sum())", timeout=120)
    assert ex.ok, ex.text()
    assert ex.stdout == f"250000 {sum(i * i % 97 for i in range(250_000))}\n"
    assert len(ex.images) == 1 and ex.images[0].mime == "image/png"
    assert (await asyncio.to_thread(s.workspace.read, ex.images[0].path)).startswith(b"\x89PNG")

    def download(name: str) -> bytes:
        with s.workspace.open(name) as fh:
            return fh.read()

    assert await asyncio.to_thread(download, "out.bin") == bytes(range(256)) * 8192  # 2 MiB: chunks down
    assert await asyncio.to_thread(download, "in/points.csv") == data
    names = {f.path for f in await asyncio.to_thread(s.workspace.list)}
    assert {"in/points.csv", "out.bin", ex.images[0].path} <= names

    # the quota holds as the chunks arrive: refused mid-way, the old file kept, nothing partial left
    with pytest.raises(QuotaExceeded) as refused:
        await asyncio.to_thread(s.workspace.write, "in/points.csv", io.BytesIO(b"\0" * 5_000_000))
    assert "4,000,000" in str(refused.value) and "Traceback" not in str(refused.value)
    assert await asyncio.to_thread(download, "in/points.csv") == data
    assert {f.path for f in await asyncio.to_thread(s.workspace.list)} == names
    with pytest.raises(WorkspacePathError):
        await asyncio.to_thread(s.workspace.write, "../escape.txt", b"x")

    def upload_in_parts(name: str, parts: list[bytes], size_hint: int | None = None, fail: bool = False) -> Any:
        with s.workspace.writer(name, size_hint) as out:  # as the API streams an upload
            for part in parts:
                out.write(part)
            if fail:
                raise ConnectionError("the client went away")
            return out.commit()

    parts = [bytes([i]) * 700_000 for i in range(3)]  # pieces of any size, sent on in chunks
    assert (await asyncio.to_thread(upload_in_parts, "parts.bin", parts)).size == 2_100_000
    assert await asyncio.to_thread(download, "parts.bin") == b"".join(parts)
    with pytest.raises(ConnectionError):
        await asyncio.to_thread(upload_in_parts, "gone.bin", parts, None, True)
    with pytest.raises(QuotaExceeded):  # refused before any data moves
        await asyncio.to_thread(upload_in_parts, "big.bin", [], 5_000_000)
    assert not {"gone.bin", "big.bin"} & {f.path for f in await asyncio.to_thread(s.workspace.list)}
    await manager.close(s.id)


async def test_outputs_stream_as_they_come_and_interrupts_reach_a_running_execution(
        manager: SessionManager) -> None:
    s = await manager.create()
    items: list[Output | Execution] = []
    async with aclosing(s.stream("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=120)) as it:
        async for item in it:
            items.append(item)
            if isinstance(item, Output):  # it arrived while the code still sleeps
                assert s.busy
                s.interrupt()
    execution = items[-1]
    assert isinstance(execution, Execution) and execution.status is ExecutionStatus.ERROR
    assert execution.error is not None and execution.error.ename == "KeyboardInterrupt"

    cancel = asyncio.Event()
    seen: list[Output] = []

    def on_output(out: Output) -> None:
        seen.append(out)
        cancel.set()  # stops this run only

    ex = await s.execute("print('again', flush=True)\ntime.sleep(60)", timeout=120, on_output=on_output, cancel=cancel)
    assert [o.text for o in seen if o.kind == "stream"] == ["again\n"] and ex.error is not None and ex.error.ename == "KeyboardInterrupt"

    async with aclosing(s.stream("print('left', flush=True)\ntime.sleep(60)", timeout=120)) as it:
        async for _ in it:
            break  # a consumer that leaves interrupts the run on the node
    follow = await s.execute("'still here'", timeout=30)  # would time out behind a 60 s sleep
    assert follow.ok and follow.results[0].data["text/plain"] == "'still here'"

    # a restart: a fresh kernel on the node, reached again over the relay, its variables gone
    assert (await s.execute("kept = 7")).ok
    await s.restart()
    gone = await s.execute("print('kept' in dir())\nprint('fresh', flush=True)", timeout=60)
    assert gone.ok and gone.stdout == "False\nfresh\n"
    await manager.close(s.id)


async def test_a_lost_node_takes_only_its_sessions_and_its_successor_removes_what_they_left(
        manager: SessionManager, ray_cluster: LocalCluster) -> None:
    sessions = await asyncio.gather(*(manager.create() for _ in range(3)))
    lost_name = ray_cluster.name("w2")
    (victim,) = [s for s in sessions if s.node == lost_name]
    others = [s for s in sessions if s is not victim]
    assert (await victim.execute("x = 1")).ok

    async with aclosing(victim.stream("print('sleeping', flush=True)\nimport time\ntime.sleep(120)", timeout=300)) as it:
        first = await anext(it)
        assert isinstance(first, Output) and first.text == "sleeping\n"
        left = containers(lost_name)
        assert [c["session"] for c in left] == [victim.id]
        await asyncio.to_thread(ray_cluster.cluster.remove_node, ray_cluster.workers.pop("w2"))
        rest = [item async for item in it]
    crashed = rest[-1]
    assert isinstance(crashed, Execution) and crashed.status is ExecutionStatus.CRASHED
    assert f"cluster node {lost_name!r}" in (crashed.reason or "") and "lost" in (crashed.reason or "")
    again = await victim.execute("x")
    assert again.status is ExecutionStatus.CRASHED and again.reason == crashed.reason
    with pytest.raises(SessionClosed, match="lost"):
        await asyncio.to_thread(victim.workspace.list)
    for s in others:  # the other nodes never noticed
        assert (await s.execute("21 * 2")).results[0].data["text/plain"] == "42"

    fresh = await asyncio.gather(*(manager.create() for _ in range(2)))
    assert {s.node for s in fresh} <= {ray_cluster.name("head"), ray_cluster.name("w1")}
    assert containers(lost_name) == left  # nobody on that node to remove them yet

    ray_cluster.add("w2")  # the node comes back: same name, same home (Ray starts nodes from the main thread only)
    home = ray_cluster.home("w2")
    deadline = time.monotonic() + 90
    while containers(lost_name) or list((home / "sessions").iterdir()) or mounts_under(home):
        assert time.monotonic() < deadline, "the returning node did not remove its predecessor's leftovers"
        await asyncio.sleep(0.2)
    await asyncio.gather(*(manager.close(s.id) for s in [*sessions, *fresh]))


def test_a_server_keeps_a_warm_session_per_node_and_sigterm_leaves_no_container(
        ray_cluster: LocalCluster, sandbox_image: str, tmp_path: Path) -> None:
    roles = ("head", "w1", "w2")

    def per_node() -> dict[str, list[str]]:
        found = containers()
        return {r: [c["session"] for c in found if c["node"] == ray_cluster.name(r)] for r in roles}

    assert per_node() == {r: [] for r in roles}  # the other tests closed theirs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "JUPYBOX_", "RAY_ADDRESS"))}
    env.update(JUPYBOX_IMAGE=sandbox_image, JUPYBOX_HOME=str(tmp_path), JUPYBOX_INSTANCE="ray-serve",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    # a model URL that is never called (no chat here): the server loads no local model
    proc = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--port", str(port), "--backend", "ray",
                             "--ray-address", ray_cluster.cluster.address, "--pool-size", "1",
                             "--openai-model", "unused", "--openai-base-url", f"http://127.0.0.1:{port}/unused/v1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not all(len(found) == 1 for found in per_node().values()):  # one warm session on each node
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, per_node()
            time.sleep(0.2)
        warm = {s for found in per_node().values() for s in found}
        while True:  # the pools may fill before the server listens
            assert proc.poll() is None and time.monotonic() < deadline, "the server never answered"
            try:
                assert httpx.get(f"{url}/healthz").status_code == 200
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=120) as c:
            sid = c.post("/api/sessions").json()["id"]
            assert sid in warm  # handed out from a pool, not started now
            ex = c.post(f"/api/sessions/{sid}/execute", json={"code": "print(2 ** 10)"}).json()
            assert ex["outputs"][0]["text"] == "1024\n"
            # notebook kernels on the cluster: the kernels API over the node's CurveZMQ relay
            r = c.post("/api/kernels", json={"name": "python3"})
            assert r.status_code == 201, r.text
            assert asyncio.run(_notebook_client(url.replace("http", "ws"), r.json()["id"])) == ["42\n", "hello ray\n"]
            assert c.delete(f"/api/kernels/{r.json()['id']}").status_code == 204
            # and JupyterLab's own server as the client (Jupyter Server's gateway client)
            with running_lab(url, tmp_path / "lab") as lab, lab.client() as lc:
                r = lc.post("/api/sessions", json={"path": "on-ray.ipynb", "type": "notebook", "name": "on-ray.ipynb",
                                                   "kernel": {"name": "python3"}})
                assert r.status_code == 201, r.text
                kernel_id = r.json()["kernel"]["id"]
                on_node = c.get(f"/api/kernels/{kernel_id}").json()["jupybox"]["session"]
                assert any(on_node in found for found in per_node().values())  # a session on a cluster node
                printed = asyncio.run(_notebook_client(lab.ws, kernel_id, f"?token={LAB_TOKEN}"))
                assert printed == ["42\n", "hello ray\n"]
                assert lc.delete(f"/api/sessions/{r.json()['id']}").status_code == 204
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert per_node() == {r: [] for r in roles}  # the session, the warm ones and any refill: all gone


async def _notebook_client(ws_url: str, kernel_id: str, query: str = "") -> list[str]:
    """A notebook front end on the kernels API's websocket (the legacy JSON format), messages made
    by jupyter_client's own ``Session``: a cell, ``input()`` answered, a sleep interrupted."""
    session = JupyterSession(username="tests")
    printed: list[str] = []
    async with websockets.connect(f"{ws_url}/api/kernels/{kernel_id}/channels{query}", open_timeout=120) as ws:

        async def run(code: str, answer: str | None = None, interrupt: bool = False) -> dict[str, Any]:
            msg = session.msg("execute_request", {"code": code, "silent": False, "allow_stdin": True})
            await ws.send(json.dumps({**msg, "channel": "shell"}, default=json_default))
            reply: dict[str, Any] | None = None
            idle = False
            while reply is None or not idle:
                m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                    continue
                kind = m["header"]["msg_type"]
                if kind == "execute_input" and interrupt:  # it runs: stop it
                    await ws.send(json.dumps({**session.msg("interrupt_request", {}), "channel": "control"},
                                             default=json_default))
                elif kind == "input_request" and answer is not None:
                    await ws.send(json.dumps({**session.msg("input_reply", {"value": answer}, parent=m["header"]),
                                              "channel": "stdin"}, default=json_default))
                elif kind == "stream":
                    printed.append(m["content"]["text"])
                elif kind == "execute_reply":
                    reply = m
                elif kind == "status" and m["content"]["execution_state"] == "idle":
                    idle = True
            return reply

        assert (await run("print(6 * 7)"))["content"]["status"] == "ok"
        assert (await run("print('hello', input('who? '))", answer="ray"))["content"]["status"] == "ok"
        stopped = await run("import time; time.sleep(60)", interrupt=True)
        assert stopped["content"]["status"] == "error" and stopped["content"]["ename"] == "KeyboardInterrupt"
    return printed


def test_a_killed_server_leaves_containers_that_the_next_start_removes(
        ray_cluster: LocalCluster, sandbox_image: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(JUPYBOX_HOME=str(tmp_path), JUPYBOX_IMAGE=sandbox_image)
    jupybox = str(Path(sys.executable).parent / "jupybox")
    address = ["--backend", "ray", "--ray-address", ray_cluster.cluster.address]
    proc = subprocess.Popen([jupybox, "exec", *address, "import time; time.sleep(120)"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (found := containers()):
            assert proc.poll() is None and time.monotonic() < deadline, "no session started"
            time.sleep(0.2)
        (left,) = found
        owner = subprocess.run(["docker", "inspect", "-f", '{{index .Config.Labels "jupybox.owner"}}', left["id"]],
                               capture_output=True, text=True, check=True).stdout.strip()
        agent_pid = int(owner.split(".")[-2])  # the node agent's process, which held the session
    finally:
        proc.kill()  # no clean-up of its own: SIGKILL
        proc.wait()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{agent_pid}").exists():  # Ray ends a dead server's agents
        assert time.monotonic() < deadline, "the agent outlived its server"
        time.sleep(0.1)
    assert containers() == found  # its container is left behind...
    cleanup = subprocess.run([jupybox, "sandbox", "cleanup", *address], env=env, capture_output=True, text=True,
                             timeout=120)
    assert cleanup.returncode == 0 and "removed 1 orphaned" in cleanup.stdout, cleanup.stdout + cleanup.stderr
    assert containers() == []  # ...until a server (here the cleanup command) starts and prepares the nodes


def test_a_wrong_cluster_address_is_one_sentence_with_the_fix_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "JUPYBOX_HOME": str(tmp_path)}
    jupybox = str(Path(sys.executable).parent / "jupybox")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # a port where nothing listens (Ray alone would retry for minutes)
        free = sock.getsockname()[1]
    for address, says in ((f"127.0.0.1:{free}", "nothing answers at"), ("head-without-port", "host:port")):
        proc = subprocess.run([jupybox, "exec", "--backend", "ray", "--ray-address", address, "1"],
                              capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_without_a_cluster_address_exec_starts_a_one_node_ray_on_loopback(sandbox_image: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(JUPYBOX_HOME=str(tmp_path), JUPYBOX_IMAGE=sandbox_image, JUPYBOX_NODE=f"{PREFIX}-local")
    jupybox = str(Path(sys.executable).parent / "jupybox")
    proc = subprocess.run([jupybox, "exec", "--backend", "ray", "print(6 * 7)"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "42\n", proc.stdout + proc.stderr
    assert containers(f"{PREFIX}-local") == []  # closed on the way out, like any session
