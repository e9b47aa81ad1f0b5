"""The front ends' side doors go through the conversation service like every other way in: a file
uploaded through the HTTP API or MCP's ``write_file`` is announced to the model with the next
question, code run through ``POST /api/sessions/{id}/execute`` becomes a cell of that session's
notebook and is counted once, and MCP's sandboxes are the service's conversations.

A real server on loopback (uvicorn, the app ``jupybox serve`` runs), real HTTP and the official MCP
client, real Jupyter kernels, the scripted model (the only fake) behind the interpreter. What these
tests check is the protocol, not the isolation, so the kernels run on the local backend.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.scripted_model import ScriptedModel, scripted_settings
from sandbox import SandboxSettings
from tests.support.server import AppServer
from ui.services import ServeSettings

TOKEN = "side-door-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, scripted_model: ScriptedModel) -> Iterator[AppServer]:
    home = tmp_path_factory.mktemp("sd")  # short: Unix socket paths are limited to 107 bytes
    sandbox = SandboxSettings(backend="local", allow_unsafe_local=True, home=home, instance="side-doors")
    with AppServer(ServeSettings(sandbox=sandbox, api_token=TOKEN, model=scripted_settings(scripted_model))) as srv:
        yield srv


@pytest.fixture
def client(server: AppServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def session_id(client: httpx.Client) -> Iterator[str]:
    r = client.post("/api/sessions")
    assert r.status_code == 201, r.text
    yield r.json()["id"]
    client.delete(f"/api/sessions/{r.json()['id']}")


@asynccontextmanager
async def mcp_client(server: AppServer) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers=AUTH, timeout=httpx2.Timeout(60, read=120)) as http:
        async with Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as c:
            yield c


def executions_counted(client: httpx.Client, status: str = "ok", source: str = "api") -> float:
    text = client.get("/metrics").text
    m = re.search(rf'^jupybox_executions_total\{{source="{source}",status="{status}"\}} (\S+)$', text, re.M)
    if m is None:
        m = re.search(rf'^jupybox_executions_total\{{status="{status}",source="{source}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_an_api_upload_is_announced_with_the_next_chat_turn(client: httpx.Client, session_id: str,
                                                            model: ScriptedModel) -> None:
    r = client.post(f"/api/sessions/{session_id}/files", files={"file": ("sales.csv", b"month,total\n1,10\n")})
    assert r.status_code == 201, r.text
    model.enqueue("I see the file.")
    r = client.post(f"/api/sessions/{session_id}/chat", json={"message": "What did I upload?", "stream": False})
    assert r.status_code == 200 and r.json()["answer"] == "I see the file.", r.text
    assert "Uploaded files: sales.csv" in model.last_prompt()
    # announced once: the turn after does not repeat it
    model.enqueue("Still here.")
    client.post(f"/api/sessions/{session_id}/chat", json={"message": "And now?", "stream": False})
    assert model.last_prompt().count("Uploaded files: sales.csv") == 1


def test_an_api_upload_under_a_chosen_name_is_announced_by_that_name(client: httpx.Client, session_id: str,
                                                                     model: ScriptedModel) -> None:
    r = client.post(f"/api/sessions/{session_id}/files", params={"path": "in/a.txt"},
                    files={"file": ("whatever.txt", b"hello")})
    assert r.status_code == 201 and [f["path"] for f in r.json()["files"]] == ["in/a.txt"], r.text
    model.enqueue("Noted.")
    client.post(f"/api/sessions/{session_id}/chat", json={"message": "Read it.", "stream": False})
    assert "Uploaded files: in/a.txt" in model.last_prompt()


def test_api_executions_are_cells_of_the_notebook_and_counted_once(client: httpx.Client, session_id: str) -> None:
    before = executions_counted(client)
    r = client.post(f"/api/sessions/{session_id}/execute", json={"code": "x = 6 * 7\nprint(x)"})
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    with client.stream("POST", f"/api/sessions/{session_id}/execute",
                       json={"code": "print(x + 1)", "stream": True}) as r:
        types = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"execution"' in types[-1] and "43" in "".join(types)
    assert executions_counted(client) == before + 2
    info = client.get(f"/api/sessions/{session_id}").json()
    assert info["has_conversation"] and info["executions"] == 2
    nb = client.get(f"/api/sessions/{session_id}/notebook")
    assert nb.status_code == 200, nb.text
    cells = [c for c in nb.json()["cells"] if c["cell_type"] == "code"]
    assert ["".join(c["source"]) for c in cells] == ["x = 6 * 7\nprint(x)", "print(x + 1)"]
    assert "42" in "".join("".join(o.get("text", "")) for o in cells[0]["outputs"])


def test_an_api_execution_that_fails_is_counted_as_an_error(client: httpx.Client, session_id: str) -> None:
    before = executions_counted(client, "error")
    r = client.post(f"/api/sessions/{session_id}/execute", json={"code": "1 / 0"})
    assert r.json()["status"] == "error" and r.json()["outputs"][0]["ename"] == "ZeroDivisionError"
    assert executions_counted(client, "error") == before + 1


async def test_an_mcp_write_file_is_announced_with_the_next_ask(server: AppServer, model: ScriptedModel) -> None:
    async with mcp_client(server) as mcp:
        result = await mcp.call_tool("write_file", {"path": "notes/todo.txt", "content": "buy milk"})
        assert not result.is_error
        model.enqueue("You want milk.")
        result = await mcp.call_tool("ask", {"question": "What is on my list?"})
        assert not result.is_error and "You want milk." in result.content[0].text
        assert "Uploaded files: notes/todo.txt" in model.last_prompt()


async def test_mcp_sandboxes_are_the_services_conversations(server: AppServer) -> None:
    service = server.services.service
    async with mcp_client(server) as one, mcp_client(server) as two:
        await one.call_tool("write_file", {"path": "a.txt", "content": "1"})
        await one.call_tool("write_file", {"session": "other", "path": "b.txt", "content": "2"})
        await two.call_tool("write_file", {"path": "c.txt", "content": "3"})
        mcp_keys = sorted(c.key.rsplit(":", 1)[-1] for c in service.chats() if c.source == "mcp")
        assert mcp_keys == ["default", "default", "other"]
        uris = sorted(str(r.uri) for r in (await one.list_resources()).resources)
        assert uris == ["jupybox://files/default/a.txt", "jupybox://files/other/b.txt"]
        assert [str(r.uri) for r in (await two.list_resources()).resources] == ["jupybox://files/default/c.txt"]
        # a sandbox closed by another way in (here the HTTP API) is no longer listed
        other = next(c.conversation.session_id for c in service.chats() if c.key.endswith(":other"))
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as http:
            assert (await http.delete(f"/api/sessions/{other}")).status_code == 204
        assert sorted(str(r.uri) for r in (await one.list_resources()).resources) == ["jupybox://files/default/a.txt"]
    # both MCP sessions ended (the client's DELETE): their conversations and sandboxes go with them
    deadline = time.monotonic() + 30
    while (server.sessions() or any(c.source == "mcp" for c in service.chats())) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.sessions() == 0 and not [c for c in service.chats() if c.source == "mcp"]
