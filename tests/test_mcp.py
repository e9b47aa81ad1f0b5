"""MCP as an agent meets it: the official SDK's client over streamable HTTP against a running
`jupybox serve` (token set) and over stdio against `jupybox mcp`, the scripted model (the only
fake) behind the `ask` tool. The tools' semantics run on the local backend; what MCP promises of
containers (closed sessions free theirs, none outlives the server) on real ones."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from bench.scripted_model import ScriptedModel
from tests.support.mcp import TOKEN, mcp_client, text
from tests.support.ports import free_port
from tests.support.sandboxes import ROOT, jupybox_containers, serve_settings
from tests.support.server import AppServer

JUPYBOX = str(Path(sys.executable).parent / "jupybox")
#: What a test needs of the container itself runs on Docker: ``@ON_DOCKER`` picks this module's
#: own server for its ``server``; the tools' semantics are tested on the run's local-backend server.
ON_DOCKER = pytest.mark.parametrize("server", ["docker"], indirect=True)


@pytest.fixture(scope="module")
def docker_server(sandbox_image: str, jb_home: Path, scripted_model: ScriptedModel) -> Iterator[AppServer]:
    with AppServer(serve_settings(jb_home / "mcp", "mcp-tests", scripted_model, api_token=TOKEN)) as srv:
        yield srv


@pytest.fixture
def server(request: pytest.FixtureRequest, api_server: AppServer) -> AppServer:
    return request.getfixturevalue("docker_server") if getattr(request, "param", None) == "docker" else api_server


async def test_tools_state_files_plots_and_errors(server: AppServer) -> None:
    async with mcp_client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"run_python", "list_files", "read_file", "write_file", "restart_session", "close_session",
                "ask"} <= set(tools)
        assert tools["run_python"].input_schema["required"] == ["code"] and tools["run_python"].description
        # state persists across calls
        await client.call_tool("run_python", {"code": "x = 21"})
        result = await client.call_tool("run_python", {"code": "print(x * 2)"})
        assert not result.is_error and text(result).strip() == "42"
        # a file written by one call is read by the next, and listed as a resource
        await client.call_tool("write_file", {"path": "in/data.csv", "content": "a,b\n1,2\n3,4\n"})
        result = await client.call_tool("run_python", {"code": "import pandas as pd\npd.read_csv('in/data.csv').sum()"})
        assert "a    4" in text(result) and "b    6" in text(result)  # a table as text
        await client.call_tool("run_python", {"code": "open('out.txt', 'w').write('made by code')"})
        assert text(await client.call_tool("read_file", {"path": "out.txt"})) == "made by code"
        uris = [str(r.uri) for r in (await client.list_resources()).resources]
        assert "jupybox://files/default/out.txt" in uris and "jupybox://files/default/in/data.csv" in uris
        contents = (await client.read_resource("jupybox://files/default/out.txt")).contents
        assert contents[0].text == "made by code"
        # a plot arrives as image content under the cap, with the full-size file's path
        result = await client.call_tool("run_python", {"code": (
            "import matplotlib.pyplot as plt\nplt.figure(figsize=(8, 6), dpi=100)\n"
            "plt.imshow(__import__('numpy').random.rand(400, 400))\nplt.show()")})
        images = [c for c in result.content if c.type == "image"]
        assert len(images) == 1 and len(images[0].data) <= 60_000
        assert base64.b64decode(images[0].data)[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
        assert "figures/fig-001.png" in text(result)
        full = await client.call_tool("read_file", {"path": "figures/fig-001.png"})
        assert full.content[0].type == "resource" and len(full.content[0].resource.blob) > len(images[0].data)
        # a file too large for a result is refused with its size and where to get it
        await client.call_tool("run_python", {"code": "open('big.bin', 'wb').write(__import__('os').urandom(3 << 20))"})
        big = await client.call_tool("read_file", {"path": "big.bin"})
        assert big.is_error and "3,145,728 bytes" in text(big) and "/api/sessions/" in text(big)
        # an error is isError with a readable, ANSI-free traceback
        result = await client.call_tool("run_python", {"code": "1 / 0"})
        assert result.is_error and "ZeroDivisionError" in text(result) and "\x1b[" not in text(result)
        # bad arguments and unknown files are refusals in words
        result = await client.call_tool("run_python", {"code": "1", "timeout_s": "soon"})
        assert result.is_error and "'timeout_s' must be a number" in text(result)
        result = await client.call_tool("read_file", {"path": "../../etc/passwd"})
        assert result.is_error and "'..'" in text(result)
        # named sessions are separate kernels
        await client.call_tool("run_python", {"code": "x = 'other'", "session": "second"})
        assert text(await client.call_tool("run_python", {"code": "print(x)"})).strip() == "21"
        # restart keeps files, loses variables
        await client.call_tool("restart_session", {})
        result = await client.call_tool("run_python", {"code": "print('x' in globals(), open('out.txt').read())"})
        assert text(result).strip() == "False made by code"


async def test_a_timeout_keeps_variables_and_a_cancel_interrupts(server: AppServer) -> None:
    async with mcp_client(server) as client:
        await client.call_tool("run_python", {"code": "kept = 'yes'"})
        result = await client.call_tool("run_python", {"code": "import time\nwhile True:\n    time.sleep(0.1)",
                                                       "timeout_s": 2})
        assert result.is_error and "timed out after 2 s" in text(result) and "variables are kept" in text(result)
        assert text(await client.call_tool("run_python", {"code": "print(kept)"})).strip() == "yes"
        # progress while a long cell runs, then the client cancels: the kernel is interrupted, state kept
        progress: list[float] = []
        started = asyncio.Event()

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)
            started.set()

        call = asyncio.ensure_future(client.call_tool(
            "run_python", {"code": "import time\nfor i in range(600):\n    time.sleep(0.1)", "timeout_s": 300},
            progress_callback=on_progress))
        await asyncio.wait_for(started.wait(), 60)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        t0 = time.monotonic()
        result = await client.call_tool("run_python", {"code": "print(kept, i < 599)"})
        assert text(result).strip() == "yes True" and time.monotonic() - t0 < 20
        assert progress and progress[0] >= 1


async def test_ask_runs_a_model_turn_in_the_session(server: AppServer, model: ScriptedModel) -> None:
    model.enqueue("Let me compute.\n```python\nprint(sum(range(10)))\n```",
                  lambda body: "The sum is 45.")
    async with mcp_client(server) as client:
        result = await client.call_tool("ask", {"question": "sum of 0..9?"})
        assert not result.is_error and "Answer: The sum is 45." in text(result) and "print(sum(range(10)))" in text(result)
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert 'jupybox_chat_turns_total{outcome="answer",source="mcp"}' in metrics


@ON_DOCKER
async def test_clients_are_isolated_and_a_closed_session_frees_its_sandbox(server: AppServer) -> None:
    async with mcp_client(server) as alice, mcp_client(server) as bob:
        await alice.call_tool("run_python", {"code": "secret = 'alice'\nopen('mine.txt', 'w').write('a')"})
        result = await bob.call_tool("run_python", {"code": "import os\nprint('secret' in globals(), os.listdir('.'))"})
        assert text(result).strip() == "False []"
        before = len(server.services.manager.list())
    # both clients hung up (DELETE of their MCP sessions): their sandboxes are closed
    deadline = time.monotonic() + 30
    while len(server.services.manager.list()) > before - 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert len(server.services.manager.list()) <= before - 2


async def test_no_token_and_a_foreign_origin_are_refused(server: AppServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server.url}/mcp", headers={**headers, "Accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status_code == 401
    with pytest.raises(Exception):  # the SDK's client cannot even initialize
        async with mcp_client(server, token=None) as client:
            await client.list_tools()
    r = httpx.post(f"{server.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                   headers={"Authorization": f"Bearer {TOKEN}", "Origin": "http://localhost:3000"})
    assert r.status_code == 403


async def test_stdio_for_a_desktop_agent(sandbox_image: str, jb_home: Path) -> None:
    env = {**os.environ, "JUPYBOX_HOME": str(jb_home / "mcpio"), "JUPYBOX_INSTANCE": "mcp-stdio"}
    env = {k: v for k, v in env.items() if not k.startswith("OPENAI_")}
    params = StdioServerParameters(command=JUPYBOX, args=["mcp"], env=env, cwd=str(ROOT))
    async with Client(params) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "run_python" in names and "ask" not in names  # no model configured: no ask
        await client.call_tool("write_file", {"path": "n.txt", "content": "7"})
        await client.call_tool("run_python", {"code": "n = int(open('n.txt').read())"})
        assert text(await client.call_tool("run_python", {"code": "print(n * 6)"})).strip() == "42"
    owners = subprocess.run(["docker", "ps", "-a", "--filter", "label=jupybox", "--format",
                             '{{.Label "jupybox.owner"}}'], capture_output=True, text=True).stdout.split()
    assert not [o for o in owners if o.startswith("mcp-stdio.")]  # the agent hung up: nothing left


def test_sigterm_to_the_server_leaves_no_container(sandbox_image: str, jb_home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(JUPYBOX_HOME=str(jb_home / "mcpterm"), JUPYBOX_INSTANCE="mcp-sigterm", JUPYBOX_API_TOKEN=TOKEN)
    port = free_port()
    proc = subprocess.Popen([JUPYBOX, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        async def use() -> None:
            async with mcp_client(url) as client:
                await client.call_tool("run_python", {"code": "print(1)"})
                await client.call_tool("run_python", {"code": "print(2)", "session": "b"})
                proc.send_signal(signal.SIGTERM)  # while the client still holds its MCP session

        try:
            asyncio.run(use())
        except Exception:  # noqa: BLE001 - the server may go away under the client: that is the point
            pass
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    assert not [c for c in jupybox_containers() if _owner(c).startswith(f"mcp-sigterm.{proc.pid}.")]


def _owner(container_id: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", '{{index .Config.Labels "jupybox.owner"}}', container_id],
                          capture_output=True, text=True).stdout.strip()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_images_are_scaled_under_the_cap() -> None:
    from ui.mcp import fit_image

    import numpy as np
    from PIL import Image

    noisy = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((900, 1200, 3)) * 255).astype("uint8")).save(noisy, "PNG")
    data, mime = fit_image(noisy.getvalue(), "image/png", 60_000)
    assert data is not None and len(base64.b64encode(data)) <= 60_000 and mime in ("image/png", "image/jpeg")
    small = _png(10, 10)
    assert fit_image(small, "image/png", 60_000) == (small, "image/png")
