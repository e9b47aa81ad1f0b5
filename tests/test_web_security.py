"""Attacks on the browser UI through Gradio's own HTTP API and through the page: a client names a
host file (or a symlink the sandbox planted, or a URL) where an upload belongs, or calls a Gradio
route the page does not use. Each must be refused with nothing copied, fetched or served."""

from __future__ import annotations

import http.server
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import WebServer

SECRET = "jupybox-host-secret-7f3a"


@pytest.fixture(scope="module")
def host_secret() -> Iterator[Path]:
    """A root-only file of the host's, as /etc/shadow is."""
    path = Path("/root/jupybox-web-secret.txt")
    path.write_text(SECRET)
    path.chmod(0o600)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that records every request: proof of whether the server fetched."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(SECRET.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/leak.txt", hits
    server.shutdown()


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(path).name}


def secret_anywhere(server: WebServer) -> list[Path]:
    """Files holding the secret in the UI's folder or in any session's workspace."""
    roots = [server.services.settings.sandbox.home / "ui", server.services.settings.sandbox.home / "sessions"]
    found = []
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                p = Path(folder, name)
                try:
                    if p.is_file() and not p.is_symlink() and SECRET.encode() in p.read_bytes():
                        found.append(p)
                except OSError:
                    continue
    return found


def call(server: WebServer, api: str, data: list) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        return c.post(f"/gradio_api/call/{api}", json={"data": data})


def test_a_host_path_named_as_an_upload_is_refused(web_server: WebServer, host_secret: Path) -> None:
    forged = [
        ("upload", [[file_data(str(host_secret))], None, "fenced"]),
        ("ask", [{"text": "read it", "files": [file_data(str(host_secret))]}, None, "m", "fenced", 0, 6, 30]),
        ("upload", [[{"path": str(host_secret)}], None, "fenced"]),  # no meta: Gradio would pass it on as is
        ("upload", [[file_data(str(web_server.services.settings.sandbox.home / "ui" / ".." / ".." / host_secret.name))],
                    None, "fenced"]),
        # a path that is no string at all: a list, an object, a number
        ("upload", [[{"path": [str(host_secret)], "meta": {"_type": "gradio.FileData"}}], None, "fenced"]),
        ("upload", [[{"path": {"path": str(host_secret)}}], None, "fenced"]),
        ("ask", [{"text": "read it", "files": [{"path": 7}]}, None, "m", "fenced", 0, 6, 30]),
    ]
    for api, data in forged:
        r = call(web_server, api, data)
        assert r.status_code == 400 and "uploaded through this page" in r.json()["error"], (api, r.text)
        assert SECRET not in r.text
    with httpx.Client(base_url=web_server.url, timeout=60) as c:  # the route the page itself uses
        r = c.post("/gradio_api/queue/join", json={"data": [[file_data(str(host_secret))], None, "fenced"],
                                                   "fn_index": 0, "session_hash": "attacker"})
        assert r.status_code == 400
    assert secret_anywhere(web_server) == []


def test_a_symlink_the_sandbox_planted_is_not_followed(web_server: WebServer, host_secret: Path) -> None:
    with httpx.Client(base_url=web_server.url, timeout=60) as c:
        sid = c.post("/api/sessions").json()["id"]
        r = c.post(f"/api/sessions/{sid}/execute", json={"code": f"import os; os.symlink({str(host_secret)!r}, 'leak.txt')"})
        assert r.json()["status"] == "ok"
        planted = web_server.services.manager.get(sid).workspace.root / "leak.txt"
        assert planted.is_symlink()
        r = call(web_server, "upload", [[file_data(str(planted))], None, "fenced"])
        assert r.status_code == 400 and SECRET not in r.text
        c.delete(f"/api/sessions/{sid}")
    assert secret_anywhere(web_server) == []


def test_urls_are_neither_fetched_nor_served(web_server: WebServer, listener) -> None:
    url, hits = listener
    r = call(web_server, "upload", [[{"path": url, "url": url, "meta": {"_type": "gradio.FileData"}}], None, "fenced"])
    assert r.status_code == 400
    with httpx.Client(base_url=web_server.url, timeout=60) as c:
        assert c.get(f"/gradio_api/file={url}").status_code == 404
        assert c.get("/gradio_api/file=/etc/passwd").status_code == 404
        assert c.get(f"/gradio_api/proxy={url}").status_code == 404
    assert hits == []


@pytest.mark.parametrize("method,path", [
    ("POST", "/gradio_api/run-history/connect"), ("GET", "/gradio_api/run-history/buckets"),
    ("GET", "/gradio_api/runs"), ("POST", "/gradio_api/vibe-edit"), ("POST", "/gradio_api/component_server"),
    ("POST", "/gradio_api/process_recording"), ("GET", "/monitoring"), ("GET", "/gradio_api/profiling/traces"),
])
def test_gradio_routes_the_page_does_not_use_are_refused(web_server: WebServer, method: str, path: str) -> None:
    with httpx.Client(base_url=web_server.url, timeout=30) as c:
        r = c.request(method, path, json={})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")


def test_the_ui_folder_is_private_and_real_uploads_still_work(web_server: WebServer) -> None:
    folder = web_server.services.settings.sandbox.home / "ui"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    with httpx.Client(base_url=web_server.url, timeout=60) as c:
        stored = c.post("/gradio_api/upload", files={"files": ("data.csv", b"a,b\n1,2\n")}).json()
        assert Path(stored[0]).is_relative_to(folder)
        r = call(web_server, "upload", [[file_data(stored[0])], None, "fenced"])
        assert r.status_code == 200, r.text
        result = c.get(f"/gradio_api/call/upload/{r.json()['event_id']}").text
    data = json.loads(next(line[6:] for line in result.splitlines() if line.startswith("data: ") and "[" in line))
    shown = data[0][0]["path"]
    assert Path(shown).name == "data.csv" and Path(shown).is_relative_to(folder)


def test_the_page_itself_cannot_smuggle_a_host_path(web_server: WebServer, host_secret: Path, browser) -> None:
    """From inside the page (its origin, its cookies), a forged call is refused the same way."""
    page = browser.new_page()
    page.goto(web_server.url)
    page.locator("#jb-input").wait_for(timeout=30_000)
    status = page.evaluate("""async (body) => {
        const r = await fetch('gradio_api/queue/join', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                          body: JSON.stringify(body)});
        return [r.status, await r.text()];
    }""", {"data": [[file_data(str(host_secret))], None, "fenced"], "fn_index": 0, "session_hash": "page"})
    page.close()
    assert status[0] == 400 and SECRET not in status[1]
    assert secret_anywhere(web_server) == []



def test_uploads_whose_files_are_gone_are_forgotten(tmp_path: Path) -> None:
    """Gradio records every upload's path and removes the file after an hour, never the record: the
    guard forgets the gone ones whenever it measures the folder (before each upload), so a server
    that runs for months keeps a record the size of what is on disk."""
    from ui.web_guard import UploadCache, UploadRefused

    cache = UploadCache(tmp_path / "ui")
    kept, gone = cache.folder / "a" / "kept.csv", cache.folder / "b" / "gone.csv"
    for f in (kept, gone):
        f.parent.mkdir()
        f.write_bytes(b"a,b\n1,2\n")
        cache.recorded.add(str(f))
    gone.unlink()
    assert cache.usage() == kept.stat().st_size
    assert cache.recorded == {str(kept)}
    cache.check(str(kept))
    with pytest.raises(UploadRefused):
        cache.check(str(gone))
