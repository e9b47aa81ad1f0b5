"""The Jupyter kernels API with real Jupyter clients: a `jupybox serve` subprocess (token set) on the
real docker sandbox, JupyterLab from PyPI started with ``--gateway-url`` at it (so Jupyter Server's own
gateway client code speaks to jupybox), a Python client on Lab's and on jupybox's websockets built
from jupyter_client's and jupyter_server's own message code, and Lab in Debian's Chromium.

Screenshots of the browser test land in ``artifacts/kernels/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import (deserialize_binary_message, deserialize_msg_from_ws_v1,
                                                             serialize_binary_message, serialize_msg_to_ws_v1)

from sandbox.config import SANDBOX_UID
from tests.support.lab import LAB_TOKEN, Lab, free_port, running_lab, stop, wait_http
from tests.support.sandboxes import ROOT

TOKEN = "kernels-token-1"
INSTANCE = "kernels-tests"
V1 = "v1.kernel.websocket.jupyter.org"
ARTIFACTS = ROOT / "artifacts" / "kernels"


def containers(label: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"],
                          capture_output=True, text=True, check=True).stdout.split()


@dataclass
class Jupybox:
    url: str
    ws: str
    pid: int
    log: Path

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"token {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def jupybox(sandbox_image: str, jb_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupybox]:
    port = free_port()
    log = tmp_path_factory.mktemp("kernels-serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "JUPYBOX_")) or k == "JUPYBOX_IMAGE"}
    env.update(JUPYBOX_HOME=str(jb_home / "k"), JUPYBOX_INSTANCE=INSTANCE, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--port", str(port), "--api-token", TOKEN,
                                 "--idle-ttl", "600"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
        yield Jupybox(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", proc.pid, log)
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-4000:]
    owners = subprocess.run(["docker", "ps", "-a", "--filter", "label=jupybox", "--format", '{{.Label "jupybox.owner"}}'],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not [o for o in owners if o.startswith(f"{INSTANCE}.{proc.pid}.")], "the server left containers behind"


@pytest.fixture(autouse=True)
def server_log_when_failed(request: pytest.FixtureRequest) -> Iterator[None]:
    """A failed test prints the end of the server's log: pytest keeps only its last few temporary
    folders, so a failure that does not repeat must be explained by its own run's output."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "jupybox" in request.fixturenames:
        log = request.getfixturevalue("jupybox").log
        print(f"--- the end of the server's log ({log}) ---\n{log.read_text(errors='replace')[-6000:]}")


@pytest.fixture(scope="module")
def lab(jupybox: Jupybox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(jupybox.url, tmp_path_factory.mktemp("lab"), token=TOKEN) as running:
        yield running


# -- a small Jupyter client over a websocket, on jupyter_client's and jupyter_server's message code
class Channels:
    """One kernel channels websocket; ``request`` sends a message and collects the reply and the
    iopub messages of that request, answering ``input()`` with ``stdin_replies``."""

    def __init__(self, ws: Any, v1: bool) -> None:
        self.ws, self.v1 = ws, v1
        self.session = Session(username="tests")

    async def send(self, msg: dict[str, Any], channel: str) -> None:
        if self.v1:
            parts = [self.session.pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")]
            await self.ws.send(serialize_msg_to_ws_v1([*parts, *msg.get("buffers", [])], channel))
        elif msg.get("buffers"):  # the legacy format's binary frame: offsets, the JSON, the buffers
            await self.ws.send(serialize_binary_message({**msg, "channel": channel}))  # dates: its json_default
        else:
            await self.ws.send(json.dumps({**msg, "channel": channel}, default=json_default))

    async def recv(self, timeout: float = 60) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        if self.v1:
            channel, parts = deserialize_msg_from_ws_v1(raw)
            header, parent, metadata, content = (json.loads(p) for p in parts[:4])
            return {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata,
                    "content": content, "msg_type": header["msg_type"], "buffers": [bytes(b) for b in parts[4:]]}
        if isinstance(raw, bytes):
            msg = deserialize_binary_message(raw)
            return {**msg, "buffers": [bytes(b) for b in msg["buffers"]]}
        return json.loads(raw)

    async def request(self, msg_type: str, content: dict[str, Any], channel: str = "shell",
                      stdin_replies: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        msg = self.session.msg(msg_type, content)
        await self.send(msg, channel)
        reply, iopub, idle, replies = None, [], False, list(stdin_replies)
        while reply is None or not idle:
            m = await self.recv()
            if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if m["channel"] == "stdin" and m["msg_type"] == "input_request":
                answer = self.session.msg("input_reply", {"value": replies.pop(0)}, parent=m["header"])
                await self.send(answer, "stdin")
            elif m["channel"] == "iopub" and m["msg_type"] == "status":
                idle = idle or m["content"]["execution_state"] == "idle"
            elif m["channel"] == "iopub":
                iopub.append(m)
            elif m["channel"] in ("shell", "control"):
                reply = m
        return reply, iopub

    async def execute(self, code: str, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return await self.request("execute_request", {"code": code, "silent": False, "store_history": True,
                                                      "user_expressions": {}, "allow_stdin": True,
                                                      "stop_on_error": True}, **kw)


def text_of(iopub: list[dict[str, Any]]) -> str:
    out = []
    for m in iopub:
        c = m["content"]
        out.append(c.get("text") or (c.get("data") or {}).get("text/plain", "") or "\n".join(c.get("traceback", [])))
    return "".join(out)


def connect(base: str, kernel_id: str, token: str, v1: bool, query: str = "") -> Any:
    return websockets.connect(f"{base}/api/kernels/{kernel_id}/channels{query}", max_size=None,
                              additional_headers={"Authorization": f"token {token}"},
                              subprotocols=[V1] if v1 else None, open_timeout=120)


# -- tests -------------------------------------------------------------------------------------
def test_jupyter_server_runs_a_notebook_kernel_in_the_sandbox(jupybox: Jupybox, lab: Lab) -> None:
    """Through Lab's own server (Jupyter Server's gateway client): specs, a notebook session whose
    kernel is a jupybox session with its files in the files API, the messages a front end uses,
    interrupt and restart over REST, shutdown."""
    with lab.client() as lc, jupybox.client() as jc:
        specs = lc.get("/api/kernelspecs").json()
        assert specs["default"] == "python3" and "jupybox sandbox" in specs["kernelspecs"]["python3"]["spec"]["display_name"]
        r = lc.post("/api/sessions", json={"path": "proto.ipynb", "type": "notebook", "name": "proto.ipynb",
                                           "kernel": {"name": "python3"}})
        assert r.status_code == 201, r.text
        notebook_session, kernel_id = r.json()["id"], r.json()["kernel"]["id"]
        kernel = jc.get(f"/api/kernels/{kernel_id}").json()
        sid = kernel["jupybox"]["session"]
        assert sid in [s["id"] for s in jc.get("/api/sessions").json()["sessions"]]

        async def talk() -> None:
            async with connect(lab.ws, kernel_id, LAB_TOKEN, v1=False) as ws:
                ch = Channels(ws, v1=False)
                info, _ = await ch.request("kernel_info_request", {})
                assert info["content"]["language_info"]["name"] == "python"
                reply, out = await ch.execute("import os\nvalue = 6 * 7\nprint(os.getuid(), os.getcwd())\n"
                                              "open('from_lab.txt', 'w').write('written in the sandbox')")
                assert reply["content"]["status"] == "ok" and text_of(out).startswith(f"{SANDBOX_UID} /mnt/data")
                reply, _ = await ch.request("complete_request", {"code": "val", "cursor_pos": 3})
                assert "value" in reply["content"]["matches"]
                reply, _ = await ch.request("inspect_request", {"code": "value", "cursor_pos": 5, "detail_level": 0})
                assert reply["content"]["found"] and "42" in reply["content"]["data"]["text/plain"]
                reply, _ = await ch.request("history_request", {"output": False, "raw": True, "hist_access_type": "tail",
                                                                "n": 10})
                assert reply["content"]["status"] == "ok"
                reply, _ = await ch.execute(
                    "def _echo(comm, msg):\n"
                    "    comm.on_msg(lambda m: comm.send({'echo': m['content']['data']['x'] * 2}))\n"
                    "get_ipython().kernel.comm_manager.register_target('jupybox-echo', _echo)")
                assert reply["content"]["status"] == "ok", reply["content"]
                comm_id = uuid.uuid4().hex
                await ch.send(ch.session.msg("comm_open", {"comm_id": comm_id, "target_name": "jupybox-echo", "data": {}}),
                              "shell")
                await ch.send(ch.session.msg("comm_msg", {"comm_id": comm_id, "data": {"x": 21}}), "shell")
                while True:
                    m = await ch.recv()
                    if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id:
                        assert m["content"]["data"] == {"echo": 42}
                        break
                reply, out = await ch.execute("name = input('name? ')\nprint('hello', name)", stdin_replies=("ada",))
                assert "hello ada" in text_of(out)
                sleeper = ch.session.msg("execute_request", {"code": "import time\nprint('asleep', flush=True)\ntime.sleep(60)", "silent": False,
                                                             "store_history": True, "user_expressions": {},
                                                             "allow_stdin": False, "stop_on_error": True})
                await ch.send(sleeper, "shell")
                # interrupt once the cell's own code runs (its first line printed): what this checks is that a
                # running cell is interrupted, not restarted
                while not ((m := await ch.recv())["msg_type"] == "stream" and "asleep" in m["content"]["text"]
                           and m["parent_header"].get("msg_id") == sleeper["header"]["msg_id"]):
                    pass
                assert lc.post(f"/api/kernels/{kernel_id}/interrupt").status_code == 204
                while not ((m := await ch.recv())["msg_type"] == "execute_reply"
                           and m["parent_header"].get("msg_id") == sleeper["header"]["msg_id"]):
                    pass
                assert m["content"]["status"] == "error" and m["content"]["ename"] == "KeyboardInterrupt"
                _, out = await ch.execute("print(value)")
                assert text_of(out) == "42\n"  # interrupted, not restarted

        asyncio.run(talk())
        download = jc.get(f"/api/sessions/{sid}/files/from_lab.txt")
        assert download.status_code == 200 and download.text == "written in the sandbox"

        assert lc.post(f"/api/kernels/{kernel_id}/restart").status_code == 200

        async def after_restart() -> None:
            async with connect(lab.ws, kernel_id, LAB_TOKEN, v1=False) as ws:
                _, out = await Channels(ws, v1=False).execute("print('value' in globals(), open('from_lab.txt').read())")
                assert text_of(out) == "False written in the sandbox\n"  # variables lost, files kept

        asyncio.run(after_restart())
        assert lc.delete(f"/api/sessions/{notebook_session}").status_code == 204
        assert jc.get(f"/api/kernels/{kernel_id}").status_code == 404
        assert jc.get(f"/api/sessions/{sid}").status_code == 404
        assert not containers(f"jupybox.session={sid}")


def test_v1_protocol_direct_with_the_output_budget(jupybox: Jupybox) -> None:
    """The v1 wire format straight to jupybox; a kernel that publishes past the output budget by
    going around the kernel's own cap still reaches the client bounded, with a note."""
    with jupybox.client() as jc:
        kernel_id = jc.post("/api/kernels", json={"name": "python3"}).json()["id"]

        async def talk() -> None:
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:
                assert ws.subprotocol == V1
                ch = Channels(ws, v1=True)
                reply, out = await ch.execute("1 + 1")
                assert reply["content"]["status"] == "ok" and out[-1]["content"]["data"]["text/plain"] == "2"
                _, out = await ch.execute("print('x' * 1_000_000)")
                assert "bytes of output truncated" in text_of(out) and len(text_of(out)) < 120_000
                # straight onto iopub, past the kernel's own budget: 40 messages of 100 kB
                _, out = await ch.execute(
                    "k = get_ipython().kernel\n"
                    "for _ in range(40):\n"
                    "    k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'y' * 100_000},\n"
                    "                   parent=k.get_parent('shell'))")
                text = text_of(out)
                assert "over the session's output budget" in text and len(text) < 400_000
                await ch.execute("doomed = 1")
                await ch.send(ch.session.msg("execute_request", {"code": "import os\nos._exit(3)", "silent": False}),
                              "shell")
                states = []
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        m = await ch.recv()
                        if m["msg_type"] == "status":
                            states.append(m["content"]["execution_state"])
                assert states[-1] == "autorestarting" and closed.value.rcvd.code == 1012
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:  # as clients do: reconnect
                ch = Channels(ws, v1=True)
                _, out = await ch.execute("print('doomed' in globals()); doomed = 2")
                assert text_of(out) == "False\n"
                await ch.send(ch.session.msg("shutdown_request", {"restart": False}), "control")  # a client's own
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        await ch.recv()
                assert closed.value.rcvd.code == 1012
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:
                _, out = await Channels(ws, v1=True).execute("print('doomed' in globals())")
                assert text_of(out) == "False\n"

        asyncio.run(talk())
        assert jc.delete(f"/api/kernels/{kernel_id}").status_code == 204


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "legacy"])
def test_binary_buffers_cross_both_ways(jupybox: Jupybox, v1: bool) -> None:
    """Widgets send arrays as binary buffers of comm messages: in the v1 format's frame and the
    legacy format's binary frame, client to kernel and back, byte for byte."""
    with jupybox.client() as jc:
        kernel_id = jc.post("/api/kernels", json={"name": "python3"}).json()["id"]

        async def talk() -> None:
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=v1) as ws:
                ch = Channels(ws, v1=v1)
                reply, _ = await ch.execute(
                    "def _mirror(comm, msg):\n"
                    "    comm.on_msg(lambda m: comm.send({'sizes': [len(bytes(b)) for b in m['buffers']]},\n"
                    "                                    buffers=[bytes(b)[::-1] for b in m['buffers']]))\n"
                    "get_ipython().kernel.comm_manager.register_target('jupybox-mirror', _mirror)")
                assert reply["content"]["status"] == "ok", reply["content"]
                comm_id = uuid.uuid4().hex
                await ch.send(ch.session.msg("comm_open", {"comm_id": comm_id, "target_name": "jupybox-mirror",
                                                           "data": {}}), "shell")
                sent = [bytes(range(256)) * 40, b"\x00", b"\xff\xfe{not json"]
                await ch.send(ch.session.msg("comm_msg", {"comm_id": comm_id, "data": {}}) | {"buffers": sent}, "shell")
                while not ((m := await ch.recv())["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id):
                    pass
                assert m["content"]["data"] == {"sizes": [len(b) for b in sent]}
                assert m["buffers"] == [b[::-1] for b in sent]

        asyncio.run(talk())
        assert jc.delete(f"/api/kernels/{kernel_id}").status_code == 204


def test_a_notebook_kernel_can_ask_for_gvisor(gvisor_runtime: str, jupybox: Jupybox) -> None:
    """With gVisor registered, the specs offer it beside the default, and its kernel runs there."""
    with jupybox.client() as jc:
        specs = jc.get("/api/kernelspecs").json()
        assert specs["default"] == "python3" and "gVisor" not in specs["kernelspecs"]["python3"]["spec"]["display_name"]
        assert specs["kernelspecs"]["python3-gvisor"]["spec"]["display_name"] == "Python 3 (jupybox sandbox, docker, gVisor)"
        kernel = jc.post("/api/kernels", json={"name": "python3-gvisor"}).json()
        assert kernel["name"] == "python3-gvisor"
        sid = kernel["jupybox"]["session"]
        inspect = subprocess.run(["docker", "inspect", f"jupybox-{sid}"], capture_output=True, text=True, check=True)
        assert json.loads(inspect.stdout)[0]["HostConfig"]["Runtime"] == "runsc"

        async def talk() -> None:
            async with connect(jupybox.ws, kernel["id"], TOKEN, v1=True) as ws:
                # gVisor's own kernel reports its own release, not the host's (its boot log, which
                # dmesg printed, is closed by the syscall filter that now applies under gVisor too)
                _, out = await Channels(ws, v1=True).execute("import os\nprint(os.uname().release)")
                assert text_of(out).strip() not in ("", os.uname().release)

        asyncio.run(talk())
        assert jc.delete(f"/api/kernels/{kernel['id']}").status_code == 204


def test_refusals_leave_the_kernel_working(jupybox: Jupybox) -> None:
    with jupybox.client() as jc, jupybox.client(token=None) as anonymous:
        kernel_id = jc.post("/api/kernels").json()["id"]
        other = jc.post("/api/sessions").json()["id"]  # a session, not a kernel
        assert anonymous.get("/api/kernels").status_code == 401
        assert jc.get("/api/kernels", headers={"Authorization": "token wrong"}).status_code == 401
        assert jc.get(f"/api/kernels/{other}").status_code == 404
        assert jc.get(f"/api/kernels/{uuid.uuid4()}").status_code == 404
        assert jc.post("/api/kernels", json={"name": "ruby"}).status_code == 404
        assert jc.post("/api/kernels", content=b'{"name": 3}').status_code == 400

        async def refused() -> None:
            for token, kid, status in ((None, kernel_id, 401), ("wrong", kernel_id, 401), (TOKEN, other, 404),
                                       (TOKEN, str(uuid.uuid4()), 404)):
                headers = {"Authorization": f"token {token}"} if token else {}
                with pytest.raises(websockets.InvalidStatus) as err:
                    async with websockets.connect(f"{jupybox.ws}/api/kernels/{kid}/channels", additional_headers=headers):
                        pass
                assert err.value.response.status_code == status
                assert "error" in json.loads(err.value.response.body)
            for frame, code in ((b"\x00" * (8 << 20) + b"!", 1009), ("x" * ((8 << 20) + 1), 1009),
                                (json.dumps({"channel": "iopub", "header": {"msg_id": "a", "msg_type": "x", "session": "s"}}), 1008),
                                (json.dumps({"channel": "shell", "header": {"msg_type": "x"}}), 1008),
                                ("[not json", 1007)):
                async with connect(jupybox.ws, kernel_id, TOKEN, v1=False) as ws:
                    await ws.send(frame)
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        while True:
                            await ws.recv()
                    assert closed.value.rcvd.code == code and closed.value.rcvd.reason
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:
                await ws.send(b"\x07" + b"\x00" * 7 + b"garbage")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == 1007
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:
                _, out = await Channels(ws, v1=True).execute("print('still here')")
                assert text_of(out) == "still here\n"

        asyncio.run(refused())
        metrics = jc.get("/metrics").text
        assert re.search(r"jupybox_kernel_messages_refused_total [1-9]", metrics)
        assert jc.delete(f"/api/kernels/{kernel_id}").status_code == 204
        assert jc.delete(f"/api/sessions/{other}").status_code == 204


def test_a_paused_kernel_tells_its_client_and_resumes_on_the_next_connect(jupybox: Jupybox) -> None:
    """The server is durable: pausing the kernel's session saves its variables and removes its
    container; the client attached hears ``autorestarting`` (as after a restart) and, connecting
    again, finds its variables on the kernel that resumed."""
    with jupybox.client() as jc:
        before = {s["id"] for s in jc.get("/api/sessions").json()["sessions"]}
        kernel_id = jc.post("/api/kernels").json()["id"]
        (sid,) = {s["id"] for s in jc.get("/api/sessions").json()["sessions"]} - before

        async def talk() -> None:
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:
                channels = Channels(ws, v1=True)
                await channels.execute("x = 5")
                report = await asyncio.to_thread(jc.post, f"/api/sessions/{sid}/pause")
                assert report.status_code == 200 and "x" in report.json()["saved"], report.text
                states = []
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        m = await channels.recv(timeout=30)
                        if m["msg_type"] == "status":
                            states.append(m["content"]["execution_state"])
                assert "autorestarting" in states
            assert jc.get(f"/api/sessions/{sid}").json()["state"] == "paused"
            async with connect(jupybox.ws, kernel_id, TOKEN, v1=True) as ws:
                _, out = await Channels(ws, v1=True).execute("print(x * 2)")
                assert text_of(out) == "10\n"

        asyncio.run(talk())
        assert jc.get(f"/api/sessions/{sid}").json()["state"] == "running"
        assert jc.delete(f"/api/kernels/{kernel_id}").status_code == 204


# -- JupyterLab in a browser -------------------------------------------------------------------
NOTEBOOK_CELLS = [
    "import os, socket\nprint('uid', os.getuid())\ntry:\n    socket.create_connection(('pypi.org', 443), timeout=5)\n"
    "    print('network: reachable')\nexcept OSError as exc:\n    print('network: none,', type(exc).__name__)",
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()",
    "x = 41",
    "while True:\n    pass",
    "print('x + 1 =', x + 1)",
]


def _notebook(cells: list[str]) -> str:
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                   "source": src} for i, src in enumerate(cells)]})


@pytest.mark.slow
def test_jupyterlab_in_a_browser_runs_cells_in_the_sandbox(jupybox: Jupybox, lab: Lab, browser: Any) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (lab.root / "sandbox.ipynb").write_text(_notebook(NOTEBOOK_CELLS))
    blocked: list[str] = []

    def guard(route: Any) -> None:
        host = re.sub(r"^\w+://([^/:]+).*$", r"\1", route.request.url)
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with jupybox.client() as jc:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.route("**/*", guard)
        try:
            page.goto(f"{lab.url}/lab/tree/sandbox.ipynb?token={LAB_TOKEN}")
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            expect(cells).to_have_count(len(NOTEBOOK_CELLS), timeout=120_000)
            # the status bar names the kernel once Lab has it: "Python 3 (jupybox sandbox, docker) | Idle"
            expect(page.locator("#jp-main-statusbar")).to_contain_text(re.compile(r"jupybox sandbox.*\| Idle"),
                                                                       timeout=120_000)
            kernels = jc.get("/api/kernels").json()
            assert len(kernels) == 1, kernels
            sid = kernels[0]["jupybox"]["session"]
            assert containers(f"jupybox.session={sid}")

            def output(i: int) -> Any:
                return cells.nth(i).locator(".jp-OutputArea-output")

            cells.nth(0).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            expect(output(0)).to_contain_text(f"uid {SANDBOX_UID}", timeout=60_000)
            expect(output(0)).to_contain_text("network: none")
            page.keyboard.press("Shift+Enter")
            expect(output(1).locator("img")).to_be_visible(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "outputs.png"))
            page.keyboard.press("Shift+Enter")
            expect(cells.nth(2).locator(".jp-InputPrompt")).to_contain_text("[3]", timeout=60_000)
            page.keyboard.press("Shift+Enter")
            expect(cells.nth(3).locator(".jp-InputPrompt")).to_contain_text("[*]", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "running.png"))
            page.locator("[data-command='notebook:interrupt-kernel']").first.click()
            expect(output(3)).to_contain_text("KeyboardInterrupt", timeout=60_000)
            page.keyboard.press("Shift+Enter")
            expect(output(4)).to_contain_text("x + 1 = 42", timeout=60_000)  # interrupted, variables kept
            page.screenshot(path=str(ARTIFACTS / "notebook.png"), full_page=True)

            page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").click()
            page.locator(".lm-Menu-itemLabel", has_text="Shut Down Kernel").click()
            deadline = time.monotonic() + 60
            while containers(f"jupybox.session={sid}"):
                assert time.monotonic() < deadline, "the kernel's container is still there after Lab shut it down"
                time.sleep(0.2)
            assert jc.get("/api/kernels").json() == [] and jc.get(f"/api/sessions/{sid}").status_code == 404
            page.screenshot(path=str(ARTIFACTS / "shut-down.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
            raise
        finally:
            page.close()
    assert not blocked, f"the page tried to reach outside this machine: {blocked}"
