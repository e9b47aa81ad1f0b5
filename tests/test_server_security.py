"""`jupybox serve` under attack from clients on this machine: other sites' pages (another port on
localhost), slow and half-sent requests, malformed bodies and text, odd file names, limits meant to
lift the sandbox's bounds. Each test runs the real app under the real uvicorn configuration."""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.sandboxes import docker_settings
from tests.support.server import AppServer
from ui.serve import RedactToken, add_serve_flags, serve_settings
from ui.services import ServeSettings

EVIL = "http://localhost:3000"
TOKEN = "sec-token-4242"


@pytest.fixture(scope="module")
def server(sandbox_image: str, jb_home: Path) -> Iterator[AppServer]:
    settings = ServeSettings(sandbox=docker_settings(jb_home / "sec", instance="sec-tests", memory_budget_mb=3 * 1024),
                             header_timeout_s=1.0, body_idle_s=1.0, max_connections=20, ui_cache_mb=2)
    with AppServer(settings, ui=True) as srv:
        yield srv


# -- other sites' pages ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,kind", [
    ("OPTIONS", "/api/sessions", "preflight"), ("OPTIONS", "/v1/chat/completions", "preflight"),
    ("OPTIONS", "/gradio_api/queue/join", "preflight"), ("POST", "/api/sessions", "empty"),
    ("POST", "/api/sessions", "json"), ("POST", "/v1/chat/completions", "json"),
    ("POST", "/gradio_api/call/new_session", "json"), ("POST", "/gradio_api/upload", "multipart"),
    ("GET", "/api/sessions", "empty"), ("GET", "/gradio_api/info", "empty"),
])
def test_requests_from_another_sites_page_are_refused(server: AppServer, method: str, path: str, kind: str) -> None:
    before = server.sessions()
    for origin in (EVIL, "null", "http://127.0.0.1.evil.example"):
        headers = {"Origin": origin}
        if kind == "preflight":
            headers |= {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        kw: dict = {"json": {"data": []}} if kind == "json" else {}
        if kind == "multipart":
            kw = {"files": {"files": ("x.csv", b"a\n1\n")}}
        r = httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)
        assert r.status_code == 403, (origin, r.status_code, r.text)
        assert not any(h.startswith("access-control-allow") for h in r.headers), r.headers
    assert server.sessions() == before


def test_browser_marked_cross_site_requests_without_origin_are_refused(server: AppServer) -> None:
    r = httpx.post(server.url + "/api/sessions", headers={"Sec-Fetch-Site": "cross-site"}, timeout=30)
    assert r.status_code == 403
    r = httpx.get(server.url + "/healthz", headers={"Origin": EVIL}, timeout=30)  # open to all, as documented
    assert r.status_code == 200


def test_the_servers_own_pages_and_non_browser_clients_pass(server: AppServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        own = c.post("/api/sessions", headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"})
        plain = c.post("/api/sessions")
        assert own.status_code == plain.status_code == 201
        for sid in (own.json()["id"], plain.json()["id"]):
            assert c.delete(f"/api/sessions/{sid}", headers={"Origin": server.url}).status_code == 204


def test_a_page_on_another_localhost_port_cannot_use_the_server(server: AppServer, browser) -> None:
    """The attack as a browser runs it: a page served from another port posts to the server (a
    CORS fetch, a "simple" no-cors fetch, a form) and tries to read what comes back."""
    page_html = f"""<!doctype html><html><body>
<form id="f" method="POST" action="{server.url}/api/sessions" target="sink"></form>
<iframe name="sink"></iframe>
<script>
(async () => {{
  const results = [];
  for (const opts of [{{method: 'POST', headers: {{'Content-Type': 'application/json'}}, body: '{{}}'}},
                      {{method: 'POST', mode: 'no-cors'}}, {{method: 'GET', credentials: 'include'}}]) {{
    try {{ const r = await fetch('{server.url}/api/sessions', opts); results.push(r.type + ':' + r.status); }}
    catch (e) {{ results.push('blocked'); }}
  }}
  document.getElementById('f').submit();
  setTimeout(() => {{ document.title = 'done ' + results.join(','); }}, 1500);
}})();
</script></body></html>"""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page_html.encode())

        def log_message(self, *args: object) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    before = server.sessions()
    try:
        page = browser.new_page()
        page.goto(f"http://localhost:{evil.server_address[1]}/")
        page.wait_for_function("document.title.startsWith('done')", timeout=30_000)
        outcome = page.title()
        page.close()
    finally:
        evil.shutdown()
    # the CORS fetches fail, the no-cors one is opaque, and above all no session was made
    assert "blocked" in outcome and "cors:201" not in outcome, outcome
    assert server.sessions() == before


def test_origins_listed_with_cors_origin_are_answered(sandbox_image: str, jb_home: Path) -> None:
    settings = ServeSettings(sandbox=docker_settings(jb_home / "cors", instance="sec-cors"), cors_origins=[EVIL])
    with AppServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        pre = c.options("/api/sessions", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == EVIL
        r = c.post("/api/sessions", headers={"Origin": EVIL})
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == EVIL
        assert c.post("/api/sessions", headers={"Origin": "http://localhost:4000"}).status_code == 403


# -- slow and half-sent requests ------------------------------------------------------------------
def test_half_sent_requests_are_dropped_and_connections_are_bounded(server: AppServer) -> None:
    socks = []
    for _ in range(30):  # more than max_connections (20)
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        s.settimeout(15)
        socks.append(s)
    t0 = time.monotonic()
    assert all(closed_by_server(s) for s in socks) and time.monotonic() - t0 < 12
    for s in socks:
        s.close()
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200  # the server itself is fine


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closes the connection (an end of stream, or a reset when it closed
    with our bytes unread) before the socket's timeout."""
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_request_body_that_stops_arriving_is_given_up(server: AppServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"limits\":")
        s.settimeout(15)
        answer = b""
        while b"stopped arriving" not in answer and (piece := s.recv(4096)):
            answer += piece
    assert answer.startswith(b"HTTP/1.1 408") and b"stopped arriving" in answer


# -- bad input ------------------------------------------------------------------------------------
def test_text_that_is_not_unicode_and_malformed_bodies_get_a_4xx(server: AppServer) -> None:
    lone = b'{"code": "print(1) # \\ud800"}'
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/api/sessions").json()["id"]
        for path in (f"/api/sessions/{sid}/execute", f"/api/sessions/{sid}/execute?stream=true"):
            r = c.post(path, content=lone, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and "surrogate" in r.json()["error"]
        r = c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
                   headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and "surrogate" in r.text
        r = c.post("/gradio_api/call/ask", content=b'{"data": [{"text": "\\ud800", "files": []}]}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]
        garbage = b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.csv\"\r\n\r\n1,2\r\n--XyZ--junk"
        for path in (f"/api/sessions/{sid}/files", "/gradio_api/upload"):
            r = c.post(path, content=b"\x00\x01not multipart at all" + garbage,
                       headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
            assert r.status_code == 400, (path, r.status_code, r.text)
        assert c.post(f"/api/sessions/{sid}/execute", json={"code": "print('still fine')"}).json()["status"] == "ok"
        c.delete(f"/api/sessions/{sid}")


def test_files_with_any_name_code_can_make_are_listed_downloaded_and_deleted(server: AppServer) -> None:
    names = ["back\\slash.txt", "   ", "new\nline.txt", "c:colon.txt", "sp ace.txt"]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/api/sessions").json()["id"]
        code = "for i, n in enumerate(%r):\n    open(n, 'w').write(str(i))" % names
        assert c.post(f"/api/sessions/{sid}/execute", json={"code": code}).json()["status"] == "ok"
        assert sorted(f["path"] for f in c.get(f"/api/sessions/{sid}/files").json()["files"]) == sorted(names)
        for i, name in enumerate(names):
            url = f"/api/sessions/{sid}/files/{quote(name, safe='')}"
            r = c.get(url)
            assert r.status_code == 200 and r.text == str(i), (name, r.status_code, r.text)
            assert c.delete(url).status_code == 204
        assert c.get(f"/api/sessions/{sid}/files").json()["files"] == []
        c.delete(f"/api/sessions/{sid}")


@pytest.mark.parametrize("limits,word", [({"cpus": 1e-9}, "cpus"), ({"cpus": 0.001}, "cpus"),
                                         ({"cpus": 0.005}, "cpus"), ({"memory_mb": 5}, "memory_mb"),
                                         ({"pids": 0}, "pids"), ({"memory_mb": 10**6}, "above the server's")])
def test_limits_a_client_asks_for_are_checked(server: AppServer, limits: dict, word: str) -> None:
    before = server.sessions()
    r = httpx.post(server.url + "/api/sessions", json={"limits": limits}, timeout=60)
    assert r.status_code == 400 and word in r.json()["error"], r.text
    assert "Docker" not in r.text and "cgroup" not in r.text
    assert server.sessions() == before


def test_sessions_past_the_memory_budget_get_a_429(server: AppServer) -> None:
    """The server's budget is 3 GiB and a session asks for 1 GiB."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for left in c.get("/api/sessions").json()["sessions"]:  # whatever an earlier test left open
            c.delete(f"/api/sessions/{left['id']}")
        made = [c.post("/api/sessions") for _ in range(3)]
        assert [r.status_code for r in made] == [201, 201, 201]
        r = c.post("/api/sessions")
        assert r.status_code == 429 and "memory" in r.json()["error"] and r.headers["retry-after"]
        for m in made:
            c.delete(f"/api/sessions/{m.json()['id']}")
        assert c.post("/api/sessions", json={"limits": {"memory_mb": 512}}).status_code == 201


# -- tokens, headers, docs ------------------------------------------------------------------------
def test_the_token_never_reaches_the_log_however_it_is_spelled() -> None:
    for target in (f"/?%74oken={TOKEN}", f"/?lang=zh&token={TOKEN}", f"/?TOKEN={TOKEN}", f"/?%20token={TOKEN}&a=1"):
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:5000", "GET", target, "1.1", 303), None)
        assert RedactToken().filter(record)
        assert TOKEN not in record.getMessage(), target


def test_token_from_a_file_and_a_secure_cookie_behind_a_trusted_proxy(sandbox_image: str, jb_home: Path,
                                                                      tmp_path: Path, caplog) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    sandbox = docker_settings(jb_home / "tok", instance="sec-tok")
    for trusted, secure in (([], False), (["127.0.0.1"], True)):
        settings = ServeSettings.from_env(api_token_file=str(token_file), trusted_proxies=trusted, sandbox=sandbox)
        assert settings.api_token == TOKEN
        with AppServer(settings) as srv:
            r = httpx.get(srv.url + "/", params={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"}, timeout=30)
            assert r.status_code == 303
            assert ("; secure" in r.headers["set-cookie"].lower()) is secure, r.headers["set-cookie"]
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    with caplog.at_level(logging.WARNING):
        serve_settings(parser.parse_args(["--api-token", TOKEN]), sandbox)
    assert "ps" in caplog.text and "--api-token-file" in caplog.text


def test_no_third_party_scripts_and_nosniff_everywhere(server: AppServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
        assert c.get("/openapi.json").json()["info"]["title"] == "jupybox"
        for path in ("/", "/openapi.json", "/api/sessions", "/nope", "/gradio_api/info"):
            r = c.get(path)
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert "default-src 'self'" in r.headers["content-security-policy"], path


def test_the_ui_folder_is_private_and_bounded(server: AppServer) -> None:
    """Uploads through the page land on the host's disk: the folder is 0700 and has a size cap (2 MiB here)."""
    folder = server.services.settings.sandbox.home / "ui"
    assert (os.stat(folder).st_mode & 0o777) == 0o700
    with httpx.Client(base_url=server.url, timeout=60) as c:
        answers = [c.post("/gradio_api/upload", files={"files": (f"{i}.bin", os.urandom(900_000))}) for i in range(4)]
    assert [r.status_code for r in answers[:2]] == [200, 200]
    assert answers[3].status_code == 507 and "upload space is full" in answers[3].json()["error"]
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 2 << 20
