"""Earlier conversations in the browser page, on a server whose sessions outlive their tabs (as
``jupybox serve`` runs): a reload shows the same conversation and continues it in the same
session, "New session" keeps the earlier one in the history, picking it shows it again, Delete
closes it, and another user's session id answers through the page's API as one that never
existed. Headless Chromium and ``gradio_client`` against a real server on loopback, real Docker
sandboxes, and the scripted model behind the OpenAI protocol (the only fake)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client as PageClient
from gradio_client import handle_file

from bench.scripted_model import ScriptedModel, last_observation, scripted_settings
from store import PAUSED, UserStore
from tests.support.browser import ask
from tests.support.replies import fenced
from tests.support.sandboxes import ROOT, docker_settings
from tests.support.server import EXAMPLE_CSV, AppServer
from ui.services import ServeSettings
from ui.web_history import GONE

ARTIFACTS = ROOT / "artifacts" / "web"
TOKEN = "web-history-admin-token-77c1"
MISSING = "0123456789ab"  # a session id that never existed


@pytest.fixture(scope="module")
def keys(jb_home: Path) -> dict[str, str]:
    store = UserStore.at_home(jb_home / "webhist")
    return {"alice": store.add("alice")[1], "bob": store.add("bob")[1]}


@pytest.fixture(scope="module")
def durable_server(sandbox_image: str, jb_home: Path, scripted_model: ScriptedModel,
                   keys: dict[str, str]) -> Iterator[tuple[AppServer, str]]:
    """The page on a durable server of its own (its own home and instance), two users; with the
    Gradio folder its UI was mounted with."""
    settings = ServeSettings(sandbox=docker_settings(jb_home / "webhist", instance="webhist", durable=True,
                                                     pool_size=0),
                             api_token=TOKEN, model=scripted_settings(scripted_model))
    with AppServer(settings, ui=True) as server:
        yield server, os.environ["GRADIO_TEMP_DIR"]


@pytest.fixture
def server(durable_server: tuple[AppServer, str], monkeypatch: pytest.MonkeyPatch) -> AppServer:
    """The module's server, its Gradio folder in force (another module's UI may have moved it)."""
    server, folder = durable_server
    monkeypatch.setenv("GRADIO_TEMP_DIR", folder)
    return server


def open_page(browser: Any, server: AppServer, key: str) -> tuple[Any, Any]:
    """A fresh browser context logged in with ``key``; its page, ready. Requests off loopback are
    refused."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, locale="en-US")
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        ("http://127.0.0.1", "data:", "blob:")) else route.abort())
    page = context.new_page()
    page.goto(f"{server.url}/?token={key}")
    page.locator("#jb-input textarea").wait_for(timeout=30_000)
    return context, page


def pick(page: Any, title: str, tries: int = 3) -> None:
    """Choose the earlier conversation whose label starts with ``title`` in the page's history;
    returns once the page says it reopened it. A click while the list is redrawn (the history was
    just updated after a turn) can select nothing, or reach the server with the choice shown before
    it (the page then says that conversation is open already): then another entry is chosen first,
    so that choosing this one again is a change the page reports. The page's last notice is in the
    error otherwise."""
    from playwright.sync_api import expect

    options = page.locator("#jb-history li[role='option']")
    notice = page.locator("#jb-notice")

    def choose(label: str) -> None:
        if not options.first.is_visible():  # the list is closed: open it
            page.locator("#jb-history input").click()
        options.filter(has_text=label).first.click()

    for attempt in range(tries):
        choose(title)
        try:
            expect(page.locator("#jb-history input")).to_have_value(re.compile("^" + re.escape(title)),
                                                                    timeout=10_000)
            expect(notice).to_contain_text("Reopened", timeout=10_000)
            return
        except AssertionError as exc:
            if attempt == tries - 1:
                raise AssertionError(f"not reopened; the page's notice: {notice.inner_text()!r}") from exc
            if not options.first.is_visible():
                page.locator("#jb-history input").click()
            others = [t.split(" · ")[0] for t in options.all_inner_texts() if not t.startswith(title)]
            if others:  # away and back: the next choice of ``title`` is a change again
                choose(others[0])
                expect(page.locator("#jb-history input")).to_have_value(re.compile("^" + re.escape(others[0])),
                                                                        timeout=10_000)
                page.wait_for_timeout(1000)  # that choice's answer, before choosing again


def said(body: dict) -> str:
    """The first line the last cell printed: the observation also names the images it saved, and
    says when the session was resumed, each on a line of its own."""
    return next(line for line in last_observation(body).splitlines() if line and not line.startswith(("[", "!")))


def sessions_of(server: AppServer, user: str) -> list[str]:
    return [r.id for r in server.services.manager.history() if r.owner == user]


def test_a_reload_shows_the_conversation_and_continues_its_session(server: AppServer, model: ScriptedModel,
                                                                 keys: dict[str, str], browser: Any) -> None:
    from playwright.sync_api import expect

    manager = server.services.manager
    context, page = open_page(browser, server, keys["alice"])
    chat = page.locator("#jb-chat")
    model.enqueue(fenced("import matplotlib.pyplot as plt\nsecret = 41 + 1\nplt.plot([1, 4, 2])\n"
                         "plt.title('kept across reloads')\nplt.show()\nprint('secret is', secret)"),
                  lambda body: f"Done: {said(body)}, and the chart is drawn.")
    ask(page, "Set a secret and draw a chart")
    expect(chat).to_contain_text("Done: secret is 42, and the chart is drawn.", timeout=60_000)
    expect(chat.locator("img[src*='/gradio_api/file='][src$='/fig-001.png']")).to_be_visible(timeout=20_000)
    [first] = sessions_of(server, "alice")
    expect(page.locator("#jb-history input")).to_have_value(
        re.compile(r"^Set a secret and draw a chart · .* · running$"), timeout=20_000)

    # the kernel is paused meanwhile (as the idle reaper would): variables saved, container gone
    server.run(manager.pause(first))
    assert manager.record_of(first).state == PAUSED
    page.reload()
    page.locator("#jb-input textarea").wait_for(timeout=30_000)
    for shown in ("Set a secret and draw a chart", "secret = 41 + 1", "secret is 42",
                  "Done: secret is 42, and the chart is drawn."):
        expect(chat).to_contain_text(shown, timeout=30_000)
    figure = chat.locator("img[src*='/gradio_api/file='][src$='/fig-001.png']")
    expect(figure).to_be_visible(timeout=20_000)
    assert figure.evaluate("img => img.complete && img.naturalWidth > 100")
    assert "Figure size" not in chat.inner_text()  # the record's stand-in for the image is not shown
    expect(page.locator("#jb-files a[href$='/fig-001.png']")).to_have_count(1)
    expect(page.locator("#jb-history input")).to_have_value(re.compile(r"^Set a secret and draw a chart · .* · paused$"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "history-after-reload.png"), full_page=True)

    model.enqueue(fenced("print('twice', secret * 2)"), lambda body: f"Still here: {said(body)}.")
    ask(page, "Double the secret")
    expect(chat).to_contain_text("Still here: twice 84.", timeout=60_000)  # the same session, its variable restored
    assert sessions_of(server, "alice") == [first]

    # a second conversation; the first stays in the history, and picking it shows it again
    page.locator("#jb-new").click()
    expect(chat).not_to_contain_text("Double the secret", timeout=20_000)
    model.enqueue(fenced("print('secret' in globals())"), lambda body: f"Fresh kernel: {said(body)}.")
    ask(page, "Is there a secret here?")
    expect(chat).to_contain_text("Fresh kernel: False.", timeout=60_000)
    assert len(sessions_of(server, "alice")) == 2 and first in sessions_of(server, "alice")
    expect(page.locator("#jb-files a[href$='/fig-001.png']")).to_have_count(0)
    expect(page.locator("#jb-history input")).to_have_value(re.compile(r"^Is there a secret here\? · "),
                                                            timeout=20_000)  # the history followed the turn
    pick(page, "Set a secret and draw a chart")
    expect(chat).to_contain_text("Still here: twice 84.", timeout=30_000)
    expect(chat).not_to_contain_text("Is there a secret here?")
    expect(chat.locator("img[src*='/gradio_api/file='][src$='/fig-001.png']")).to_be_visible(timeout=20_000)
    expect(page.locator("#jb-files a[href$='/fig-001.png']")).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "history-picked.png"), full_page=True)

    # the one picked last is what a reload shows; Delete closes it, files and all
    page.reload()
    expect(chat).to_contain_text("Still here: twice 84.", timeout=30_000)
    folder = manager.get(first).folder
    page.locator("#jb-delete").click()
    expect(page.locator("#jb-notice")).to_contain_text("Deleted", timeout=20_000)
    expect(chat).not_to_contain_text("Still here", timeout=20_000)
    assert first not in sessions_of(server, "alice") and len(sessions_of(server, "alice")) == 1
    deadline = time.monotonic() + 20
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not folder.exists()
    page.locator("#jb-history input").click()
    expect(page.locator("#jb-history li[role='option']")).to_have_count(1)
    expect(page.locator("#jb-history li[role='option']").first).to_contain_text("Is there a secret here?")
    context.close()


def test_one_conversation_is_held_by_one_tab(server: AppServer, model: ScriptedModel, keys: dict[str, str],
                                             browser: Any) -> None:
    """A second tab of the same user does not open the conversation the first one holds; picked
    there, it moves, and the first tab says so instead of asking in a session it let go of."""
    from playwright.sync_api import expect

    ctx_a, page_a = open_page(browser, server, keys["bob"])
    model.enqueue(fenced("mine = 'from tab a'\nprint(mine)"), lambda body: f"Tab A: {said(body)}.")
    ask(page_a, "Remember something in tab A")
    expect(page_a.locator("#jb-chat")).to_contain_text("Tab A: from tab a.", timeout=60_000)
    expect(page_a.locator("#jb-history input")).to_have_value(re.compile("^Remember something in tab A"),
                                                              timeout=20_000)

    ctx_b, page_b = open_page(browser, server, keys["bob"])
    page_b.locator("#jb-history input").click()
    expect(page_b.locator("#jb-history li[role='option']")).to_have_count(1, timeout=20_000)  # loaded
    expect(page_b.locator("#jb-history input")).to_have_value("")
    assert "Remember something" not in page_b.locator("#jb-chat").inner_text()
    pick(page_b, "Remember something in tab A")
    expect(page_b.locator("#jb-chat")).to_contain_text("Tab A: from tab a.", timeout=30_000)

    before = len(model.history)
    ask(page_a, "Anything else?")
    expect(page_a.locator("#jb-chat")).to_contain_text("now open in another tab", timeout=30_000)
    assert len(model.history) == before  # not asked: tab B holds the conversation
    model.enqueue(fenced("print(mine)"), lambda body: f"Tab B: {said(body)}.")
    ask(page_b, "What did tab A remember?")
    expect(page_b.locator("#jb-chat")).to_contain_text("Tab B: from tab a.", timeout=60_000)
    ctx_a.close()
    ctx_b.close()


def test_another_users_session_id_is_refused_by_the_page_api(server: AppServer, keys: dict[str, str]) -> None:
    """The session id the history sends comes from the client: bob naming alice's session (also
    with her page session id) gets exactly what an id that never existed gets, and her session,
    conversation and files stay hers."""
    manager = server.services.manager
    alice = PageClient(server.url, headers={"Authorization": f"Bearer {keys['alice']}"}, verbose=False)
    alice.predict([handle_file(str(EXAMPLE_CSV))], "fenced", api_name="/upload")
    [sid] = [s for s in sessions_of(server, "alice") if manager.get(s).workspace.exists("sales.csv")]

    bob = PageClient(server.url, headers={"Authorization": f"Bearer {keys['bob']}"}, verbose=False)
    for client in (bob, _replayed(server, keys["bob"], alice.session_hash)):
        for endpoint in ("/reopen", "/delete_session"):
            chat, files, notice, _ = client.predict(sid, api_name=endpoint)
            assert (chat, files, notice) == ([], [], GONE), endpoint
            missing = client.predict(MISSING, api_name=endpoint)
            assert missing[:3] == ([], [], GONE), endpoint
        for junk in ("../" + sid, sid.upper(), "x" * 10_000, ""):
            assert client.predict(junk, api_name="/reopen")[2] == GONE
    assert not [c for c in server.services.service.chats() if c.user == "bob"]
    assert manager.owner_of(sid) == "alice" and manager.get(sid).workspace.exists("sales.csv")

    # her own id is hers through the same endpoint (her page holds it already); then she deletes it
    _, files, notice, listed = alice.predict(sid, api_name="/reopen")
    assert [Path(f).name for f in files] == ["sales.csv"]
    assert notice == "That conversation is the one open here already."
    assert listed["value"] == sid and sid in [value for _, value in listed["choices"]]
    _, files, notice, listed = alice.predict(sid, api_name="/delete_session")
    assert "Deleted" in notice and files == [] and listed["value"] is None
    assert sid not in [value for _, value in listed["choices"]]
    assert sid not in sessions_of(server, "alice")


def _replayed(server: AppServer, key: str, session_hash: str) -> PageClient:
    """A page client with ``key`` that sends another page's session id as its own."""
    client = PageClient(server.url, headers={"Authorization": f"Bearer {key}"}, verbose=False)
    client.session_hash = session_hash
    return client
