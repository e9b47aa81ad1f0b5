"""One server for a team: two users and an admin on one real server (uvicorn in a thread, real
Docker sandboxes, the scripted model behind the real OpenAI protocol), through the JSON API with
httpx, ``/v1`` with the official openai client, MCP with the official mcp client, the kernels
API's channels websocket and Jupyter Server's gateway client, and the page in Chromium. Each
user sees only their own work, another user's id answers exactly as an id that does not exist,
an admin sees and closes everyone's, limits are per user, and the audit log says who did what
without any key or code in it."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import openai
import pytest
import websockets.sync.client as ws_client
from gradio_client import Client as PageClient
from gradio_client import handle_file
from websockets.exceptions import InvalidStatus

from bench.scripted_model import ScriptedModel, last_observation, scripted_settings
from sandbox import Caller, SessionClosed, SessionManager
from store import UserStore
from tests.support.browser import Chromium, ask, attach
from tests.support.jupyter import TOKEN as JUPYTER_TOKEN
from tests.support.jupyter import auth, jupyter_server, run_cell
from tests.support.mcp import mcp_client
from tests.support.replies import code_reply, fenced
from tests.support.sandboxes import docker_settings, local_settings
from tests.support.server import EXAMPLE_CSV, AppServer
from ui.services import ServeSettings

TOKEN = "ownership-admin-token-41d2"
MISSING = "0123456789ab"  # a session id that never existed


@pytest.fixture(scope="module")
def keys(jb_home: Path) -> dict[str, str]:
    store = UserStore.at_home(jb_home / "own")
    return {"alice": store.add("alice", max_sessions=2)[1], "bob": store.add("bob", memory_mb=1536)[1],
            "carol": store.add("carol", admin=True)[1]}


@pytest.fixture(scope="module")
def server(sandbox_image: str, jb_home: Path, scripted_model: ScriptedModel,
           keys: dict[str, str]) -> Iterator[AppServer]:
    settings = ServeSettings(sandbox=docker_settings(jb_home / "own", instance="own-tests", pool_size=0,
                                                     max_sessions=12, memory_budget_mb=8 * 1024),
                             api_token=TOKEN, model=scripted_settings(scripted_model))
    with AppServer(settings, ui=True) as srv:
        yield srv
        for session in srv.services.manager.list():  # what a failed test left: closed by the server's stop too
            httpx.delete(f"{srv.url}/api/sessions/{session.id}", headers=bearer(TOKEN), timeout=60)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def clients(server: AppServer, keys: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    made = {name: httpx.Client(base_url=server.url, headers=bearer(key), timeout=120) for name, key in keys.items()}
    made["token"] = httpx.Client(base_url=server.url, headers=bearer(TOKEN), timeout=120)
    yield made
    for client in made.values():
        client.close()


def audit(server: AppServer) -> list[dict]:
    path = server.services.audit.path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_audit(server: AppServer, action: str, **match: object) -> dict:
    """The first audit line with ``action`` and the given fields (written off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        for event in audit(server):
            if event["action"] == action and all(event.get(k) == v for k, v in match.items()):
                return event
        assert time.monotonic() < deadline, (action, match, audit(server)[-20:])
        time.sleep(0.05)


def same_as_missing(got: httpx.Response, missing: httpx.Response, sid: str) -> None:
    """``got`` (another user's id) answers exactly as ``missing`` (an id that never existed)."""
    assert got.status_code == missing.status_code == 404, (got.text, missing.text)
    assert got.text.replace(sid, "ID") == missing.text.replace(MISSING, "ID")


# -- the JSON API ----------------------------------------------------------------------------------
def test_another_users_session_answers_as_one_that_does_not_exist(
        server: AppServer, clients: dict[str, httpx.Client]) -> None:
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    sid = alice.post("/api/sessions").json()["id"]
    assert alice.post(f"/api/sessions/{sid}/execute", json={"code": "secret = 'alice-only'"}).status_code == 200
    assert alice.post(f"/api/sessions/{sid}/files", files={"file": ("data.csv", b"a,b\n1,2\n")}).status_code == 201

    requests = [("GET", ""), ("POST", "/execute", {"json": {"code": "print(secret)"}}),
                ("POST", "/chat", {"json": {"message": "hi", "stream": False}}), ("GET", "/files"),
                ("POST", "/files", {"files": {"file": ("x.txt", b"x")}}), ("GET", "/files/data.csv"),
                ("DELETE", "/files/data.csv"), ("GET", "/notebook"), ("POST", "/interrupt"),
                ("POST", "/restart"), ("DELETE", "")]
    for method, tail, *kw in requests:
        got = bob.request(method, f"/api/sessions/{sid}{tail}", **(kw[0] if kw else {}))
        missing = bob.request(method, f"/api/sessions/{MISSING}{tail}", **(kw[0] if kw else {}))
        same_as_missing(got, missing, sid)

    # nothing of bob's reached it: alice's variable and file are still there
    out = alice.post(f"/api/sessions/{sid}/execute", json={"code": "print(secret)"}).json()
    assert "".join(o.get("text", "") for o in out["outputs"]).strip() == "alice-only"
    assert [f["path"] for f in alice.get(f"/api/sessions/{sid}/files").json()["files"]] == ["data.csv"]

    bobs = bob.post("/api/sessions").json()["id"]
    assert {s["id"] for s in alice.get("/api/sessions").json()["sessions"]} == {sid}
    assert {s["id"] for s in bob.get("/api/sessions").json()["sessions"]} == {bobs}
    everyone = {s["id"] for s in carol.get("/api/sessions").json()["sessions"]}
    assert {sid, bobs} <= everyone
    assert {sid, bobs} <= {s["id"] for s in clients["token"].get("/api/sessions").json()["sessions"]}

    assert carol.get(f"/api/sessions/{sid}").status_code == 200  # an admin sees and closes everyone's
    assert carol.delete(f"/api/sessions/{bobs}").status_code == 204
    assert bob.get("/api/sessions").json()["sessions"] == []
    assert alice.delete(f"/api/sessions/{sid}").status_code == 204

    created = wait_for_audit(server, "session.create", user="alice", target=sid)
    assert created["result"] == "ok"
    ran = wait_for_audit(server, "execute", user="alice", target=sid)
    assert set(ran["detail"]) >= {"sha256", "chars"} and "code" not in ran["detail"]
    assert ran["detail"]["chars"] == len("secret = 'alice-only'")
    assert wait_for_audit(server, "file.upload", user="alice", target=sid)["detail"] == {"name": "data.csv", "size": 8}
    wait_for_audit(server, "session.close", user="bob", target=bobs)  # the owner, closed by the admin
    wait_for_audit(server, "session.close", user="alice", target=sid)
    text = server.services.audit.path.read_text()
    assert "alice-only" not in text  # the code's hash and length only


def test_limits_are_per_user(clients: dict[str, httpx.Client]) -> None:
    alice, bob = clients["alice"], clients["bob"]
    mine = [alice.post("/api/sessions").json()["id"] for _ in range(2)]
    try:
        refused = alice.post("/api/sessions")
        assert refused.status_code == 429
        assert "alice" in refused.json()["error"] and "may hold 2" in refused.json()["error"]
        # other users still start sessions; bob's own limit is memory: one 1024 MiB session of his 1536
        theirs = bob.post("/api/sessions")
        assert theirs.status_code == 201, theirs.text
        more = bob.post("/api/sessions")
        assert more.status_code == 429 and "1536 MiB" in more.json()["error"], more.text
        assert bob.post("/api/sessions", json={"limits": {"memory_mb": 512}}).status_code == 201  # what fits
        for s in bob.get("/api/sessions").json()["sessions"]:
            assert bob.delete(f"/api/sessions/{s['id']}").status_code == 204
    finally:
        for sid in mine:
            alice.delete(f"/api/sessions/{sid}")
    assert alice.post("/api/sessions").status_code == 201  # room again once one is closed
    for s in alice.get("/api/sessions").json()["sessions"]:
        alice.delete(f"/api/sessions/{s['id']}")


def test_metrics_are_for_admins(clients: dict[str, httpx.Client]) -> None:
    assert clients["bob"].get("/metrics").status_code == 403
    assert "admin" in clients["bob"].get("/metrics").json()["error"]
    assert clients["carol"].get("/metrics").status_code == 200
    assert clients["token"].get("/metrics").status_code == 200


# -- the kernels API and its channels websocket ---------------------------------------------------
def test_kernels_are_their_starters(server: AppServer, clients: dict[str, httpx.Client], keys: dict[str, str]) -> None:
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    kid = alice.post("/api/kernels", json={}).json()["id"]
    other = "00000000-0000-0000-0000-000000000000"
    for method, tail in [("GET", ""), ("POST", "/interrupt"), ("POST", "/restart"), ("DELETE", "")]:
        got = bob.request(method, f"/api/kernels/{kid}{tail}")
        missing = bob.request(method, f"/api/kernels/{other}{tail}")
        assert got.status_code == missing.status_code == 404
        assert got.text.replace(kid, "ID") == missing.text.replace(other, "ID")
    assert [k["id"] for k in alice.get("/api/kernels").json()] == [kid]
    assert bob.get("/api/kernels").json() == []
    assert kid in [k["id"] for k in carol.get("/api/kernels").json()]

    ws_url = server.url.replace("http", "ws") + f"/api/kernels/{kid}/channels"
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(ws_url, additional_headers=bearer(keys["bob"]), open_timeout=30)
    assert refused.value.response.status_code == 404
    with ws_client.connect(ws_url, additional_headers=bearer(keys["alice"]), open_timeout=30) as ws:
        assert ws.protocol.state.name == "OPEN"

    assert alice.delete(f"/api/kernels/{kid}").status_code == 204
    wait_for_audit(server, "kernel.start", user="alice", target=kid)
    wait_for_audit(server, "kernel.shutdown", user="alice", target=kid)


def test_a_jupyter_server_with_a_users_key_starts_and_sees_that_users_kernels(
        server: AppServer, clients: dict[str, httpx.Client], keys: dict[str, str], tmp_path: Path) -> None:
    """``--GatewayClient.auth_token=KEY`` with a user's key: Jupyter Server starts and talks to a
    kernel of that user's, which another user's key does not list or reach."""
    alice, bob = clients["alice"], clients["bob"]
    with jupyter_server(server.url, keys["alice"], tmp_path) as url, \
            httpx.Client(base_url=url, headers=auth(JUPYTER_TOKEN), timeout=120) as jupyter:
        started = jupyter.post("/api/kernels", json={"name": "python3"})
        assert started.status_code == 201, started.text
        kid = started.json()["id"]
        ws_url = url.replace("http", "ws") + f"/api/kernels/{kid}/channels"
        assert run_cell(ws_url, "print(6 * 7)") == "42\n"

        assert [k["id"] for k in alice.get("/api/kernels").json()] == [kid]
        assert server.services.manager.owner_of(alice.get(f"/api/kernels/{kid}").json()["jupybox"]["session"]) \
            == "alice"
        assert kid not in [k["id"] for k in bob.get("/api/kernels").json()]
        assert bob.get(f"/api/kernels/{kid}").status_code == 404
        assert [k["id"] for k in jupyter.get("/api/kernels").json()] == [kid]

        assert jupyter.delete(f"/api/kernels/{kid}").status_code == 204
    assert alice.get("/api/kernels").json() == []


# -- /v1 ---------------------------------------------------------------------------------------------
def test_v1_conversations_are_keyed_by_user_and_the_user_field(
        server: AppServer, model: ScriptedModel, keys: dict[str, str]) -> None:
    alice = openai.OpenAI(base_url=f"{server.url}/v1", api_key=keys["alice"], timeout=120, max_retries=0)
    bob = openai.OpenAI(base_url=f"{server.url}/v1", api_key=keys["bob"], timeout=120, max_retries=0)
    model.enqueue(code_reply("secret = 'from-alice'\nprint(secret)"), lambda body: f"Saw {last_observation(body)}.")
    said = alice.chat.completions.create(model="m", user="shared", messages=[{"role": "user", "content": "go"}])
    assert "Saw from-alice" in said.choices[0].message.content
    # bob names the same `user`: a conversation and sandbox of his own, where alice's variable is not
    model.enqueue(code_reply("print(secret)"), lambda body: f"Saw {last_observation(body)}.")
    said = bob.chat.completions.create(model="m", user="shared", messages=[{"role": "user", "content": "go"}])
    assert "NameError" in said.choices[0].message.content
    owners = {server.services.manager.owner_of(s.id) for s in server.services.manager.list()}
    assert {"alice", "bob"} <= owners
    wait_for_audit(server, "chat.turn", user="alice")
    wait_for_audit(server, "chat.turn", user="bob")
    admin = httpx.Client(base_url=server.url, headers=bearer(keys["carol"]), timeout=120)
    with admin:  # an admin closes both sandboxes
        for s in admin.get("/api/sessions").json()["sessions"]:
            assert admin.delete(f"/api/sessions/{s['id']}").status_code == 204


# -- MCP -----------------------------------------------------------------------------------------------
async def test_an_mcp_session_is_its_users_alone(server: AppServer, keys: dict[str, str]) -> None:
    async with mcp_client(server, keys["alice"]) as client:
        result = await client.call_tool("run_python", {"code": "print('mcp-alice')"})
        assert "mcp-alice" in result.content[0].text
        [sid] = mcp_session_ids(server)
        replay = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                  "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
        async with httpx.AsyncClient(timeout=60) as raw:
            stolen = await raw.post(f"{server.url}/mcp", json=body, headers={**replay, **bearer(keys["bob"])})
            unknown = await raw.post(f"{server.url}/mcp", json=body,
                                     headers={**replay, "mcp-session-id": "f" * 32, **bearer(keys["bob"])})
        assert stolen.status_code == unknown.status_code == 404
        assert stolen.text == unknown.text
        # the sandbox behind the MCP session is alice's, within her limits
        [chat] = [c for c in server.services.service.chats() if c.key.startswith("mcp:")]
        assert server.services.manager.owner_of(chat.conversation.session_id) == "alice"
    event = wait_for_audit(server, "mcp.tool", user="alice")
    assert event["detail"]["tool"] == "run_python"


def mcp_session_ids(server: AppServer) -> list[str]:
    return [c.key.split(":")[1] for c in server.services.service.chats() if c.key.startswith("mcp:")]


# -- the browser page ---------------------------------------------------------------------------------
def test_the_page_of_one_user_never_offers_another_users_files(server: AppServer, keys: dict[str, str],
                                                              tmp_path: Path) -> None:
    alice = PageClient(server.url, headers=bearer(keys["alice"]), verbose=False, download_files=str(tmp_path))
    files, _ = alice.predict([handle_file(str(EXAMPLE_CSV))], "fenced", api_name="/upload")
    assert [Path(f).name for f in files] == ["sales.csv"]
    [tab] = [c for c in server.services.service.chats() if c.key.startswith("web:")]
    assert server.services.manager.owner_of(tab.conversation.session_id) == "alice"  # against her limits

    bob = PageClient(server.url, headers=bearer(keys["bob"]), verbose=False)
    assert bob.predict(api_name="/files") in ([], None)
    bob.session_hash = alice.session_hash  # alice's page session id, sent with bob's key
    assert bob.predict(api_name="/files") in ([], None)
    assert [Path(f).name for f in alice.predict(api_name="/files")] == ["sales.csv"]
    size = EXAMPLE_CSV.stat().st_size
    wait_for_audit(server, "file.upload", user="alice", detail={"name": "sales.csv", "size": size})

    # the exported notebook holds her data: the server keeps it in the UI's private folder only
    name = Path(alice.predict(api_name="/notebook")).name
    ui_folder = server.services.settings.sandbox.home / "ui"
    assert list(ui_folder.rglob(name))
    assert ui_folder.stat().st_mode & 0o777 == 0o700  # no one but the server's user reads below it
    assert not list((Path(tempfile.gettempdir()) / "gradio").rglob(name))  # not in Gradio's shared default

    # a file the page serves her is served to her alone: bob's key gets a 404 for its very path
    [served] = list(ui_folder.rglob(name))
    url = f"{server.url}/gradio_api/file={served}"
    assert httpx.get(url, headers=bearer(keys["alice"]), timeout=30).status_code == 200
    stolen = httpx.get(url, headers=bearer(keys["bob"]), timeout=30)
    missing = httpx.get(f"{server.url}/gradio_api/file={served.with_name('nothing.ipynb')}", headers=bearer(keys["bob"]),
                        timeout=30)
    assert stolen.status_code == missing.status_code == 404 and stolen.text == missing.text

    # an upload the page stored for her cannot be named in a request with bob's key
    stored = httpx.post(f"{server.url}/gradio_api/upload", headers=bearer(keys["alice"]), timeout=30,
                        files={"files": ("mine.csv", b"a\n1\n")})
    assert stored.status_code == 200, stored.text
    [upload] = stored.json()
    call = {"data": [[{"path": upload, "meta": {"_type": "gradio.FileData"}}], "fenced"]}
    taken = httpx.post(f"{server.url}/gradio_api/call/upload", json=call, headers=bearer(keys["bob"]), timeout=30)
    assert taken.status_code == 400 and "only files uploaded through this page" in taken.json()["error"]
    own = httpx.post(f"{server.url}/gradio_api/call/upload", json=call, headers=bearer(keys["alice"]), timeout=30)
    assert own.status_code == 200, own.text
    alice.predict(api_name="/new_session")  # closes her tab's sandbox


def test_in_chromium_one_users_page_never_shows_another_users_work(
        server: AppServer, model: ScriptedModel, keys: dict[str, str], chromium: Chromium,
        clients: dict[str, httpx.Client]) -> None:
    """Two users' pages in Chromium, each logged in with ``/?token=KEY``: alice uploads data and
    her turn writes a file; dave's page, files panel and sandbox hold none of it, her file's
    download address and its JSON API address are a 404 with his cookie, and once his key is
    revoked his page is refused on its next request."""
    from playwright.sync_api import expect

    store = UserStore.at_home(server.services.settings.sandbox.home)
    dave_key = store.add("dave")[1]
    with attach(chromium) as browser:
        ctx_a, page_a = open_page(browser, server, keys["alice"])
        ctx_d, page_d = open_page(browser, server, dave_key)
        page_a.locator("input[data-testid$='upload-button']").set_input_files(str(EXAMPLE_CSV))
        expect(listed(page_a, "sales.csv")).to_have_count(1, timeout=30_000)
        model.enqueue(fenced("import pandas as pd\ndf = pd.read_csv('sales.csv')\n"
                             "open('alice-summary.txt', 'w').write(f'alice rows {len(df)}')\nprint('rows', len(df))"),
                      lambda body: f"Alice's summary: {last_observation(body)}.")
        ask(page_a, "Summarise my data")
        expect(page_a.locator("#jb-chat")).to_contain_text("Alice's summary: rows", timeout=60_000)
        expect(listed(page_a, "alice-summary.txt")).to_have_count(1, timeout=30_000)
        href = listed(page_a, "alice-summary.txt").get_attribute("href")
        download = urljoin(server.url + "/", href)
        assert ctx_a.request.get(download).text().startswith("alice rows")
        [sid] = [s.id for s in server.services.manager.list() if s.workspace.exists("alice-summary.txt")]
        assert server.services.manager.owner_of(sid) == "alice"
        api_file = f"{server.url}/api/sessions/{sid}/files/alice-summary.txt"
        assert ctx_a.request.get(api_file).status == 200

        model.enqueue(fenced("import os\nprint(sorted(os.listdir('.')), 'df' in globals())"),
                      lambda body: f"Dave sees {last_observation(body)}")
        ask(page_d, "Which files do I have?")
        chat_d = page_d.locator("#jb-chat")
        expect(chat_d).to_contain_text("Dave sees [] False", timeout=60_000)
        assert "alice" not in chat_d.inner_text().lower() and "sales.csv" not in chat_d.inner_text()
        expect(page_d.locator("#jb-files a")).to_have_count(0)
        stolen = page_d.goto(download)  # her download address, opened with his cookie
        missing = ctx_d.request.get(download.replace("alice-summary.txt", "nothing.txt"))
        assert stolen.status == missing.status == 404 and stolen.text() == missing.text()
        assert ctx_d.request.get(api_file).status == 404

        store.revoke("dave")
        refused = page_d.goto(server.url + "/")
        assert refused.status == 401 and "not valid" in refused.text()
        assert ctx_a.request.get(download).status == 200  # alice's key still works
        ctx_a.close()
        ctx_d.close()
    for s in clients["token"].get("/api/sessions").json()["sessions"]:  # the tabs' sandboxes, if still open
        if server.services.manager.owner_of(s["id"]) in ("alice", "dave"):
            clients["token"].delete(f"/api/sessions/{s['id']}")


def open_page(browser: Any, server: AppServer, key: str) -> tuple[Any, Any]:
    """A fresh browser context logged in with ``key`` (``/?token=`` sets the cookie); its page,
    ready. Any request off loopback is refused."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="en-US")
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        ("http://127.0.0.1:", "data:", "blob:")) else route.abort())
    page = context.new_page()
    page.goto(f"{server.url}/?token={key}")
    assert page.url == f"{server.url}/"  # the key left the address
    page.locator("#jb-input textarea").wait_for(timeout=30_000)
    return context, page


def listed(page: Any, name: str) -> Any:
    """The download link of a workspace file in the page's files panel."""
    return page.locator(f"#jb-files a[href$='/{name}']")


# -- no key anywhere --------------------------------------------------------------------------------
def test_the_audit_log_names_users_and_holds_no_key(server: AppServer, keys: dict[str, str],
                                                    clients: dict[str, httpx.Client]) -> None:
    sid = clients["alice"].post("/api/sessions").json()["id"]
    assert clients["alice"].delete(f"/api/sessions/{sid}").status_code == 204
    deadline = time.monotonic() + 10  # lines are written by the audit worker, after the answer
    while '"session.close"' not in (text := server.services.audit.path.read_text()) or sid not in text:
        assert time.monotonic() < deadline, "no session.close line for the session"
        time.sleep(0.1)
    for key in (*keys.values(), TOKEN):
        assert key not in text
    events = [json.loads(line) for line in text.splitlines()]
    assert {"alice", "bob", "carol"} <= {e.get("user") for e in events}
    # what the layers below a request write on its behalf names the client's address too
    mine = [e for e in events if e.get("target") == sid]
    assert {e["action"] for e in mine} >= {"session.create", "session.close"}
    assert all(e.get("user") == "alice" and e.get("client") == "127.0.0.1" for e in mine), mine


# -- the registry itself: an idle session's end is audited with its owner -----------------------
async def test_an_expired_session_is_audited_with_its_owner(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, instance="own-expire", idle_ttl_s=1.0, pool_size=0)
    events: list[tuple[str, str, str | None]] = []
    async with SessionManager(settings) as manager:
        manager.on_event = lambda action, sid, owner, detail: events.append((action, sid, owner))
        session = await manager.create(caller=Caller("alice"))
        with pytest.raises(SessionClosed):
            manager.get(session.id, Caller("bob"))
        assert manager.get(session.id, Caller("carol", admin=True)) is session
        deadline = time.monotonic() + 20
        while ("session.expire", session.id, "alice") not in events:
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.1)
    assert events[0] == ("session.create", session.id, "alice")
    assert manager.owner_of(session.id) is None  # forgotten with the session


async def test_sessions_open_at_shutdown_are_audited_as_closed_by_it(tmp_path: Path) -> None:
    settings = local_settings(tmp_path, instance="own-shutdown", pool_size=0)
    events: list[tuple[str, str, str | None, dict]] = []
    async with SessionManager(settings) as manager:
        manager.on_event = lambda action, sid, owner, detail: events.append((action, sid, owner, detail))
        session = await manager.create(caller=Caller("alice"))
    assert events[-1] == ("session.close", session.id, "alice", {"by": "shutdown"})
