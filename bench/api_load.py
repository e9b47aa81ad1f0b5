"""Load on the HTTP API: N sessions created and executing code concurrently through ``/api``.

    python -m bench.api_load [--sessions 20] [--rounds 10] [--url http://127.0.0.1:7860 --token T]

Without ``--url`` it starts ``jupybox serve`` in a child process (free loopback port, the sandbox
backend configured by ``JUPYBOX_*``, no model needed) and first measures, in the same run, the
baseline the API adds to: the same execution called on a session directly, without HTTP. Beside
the JSON API's execute of ``1+1`` it times the same round trip through the Jupyter kernels API's
channels websocket (v1 wire format, execute request to reply and idle) and through an MCP
``run_python`` call (the SDK's client over streamable HTTP), interleaved in one run.
It prints latencies (p50 / p95 / max) and counts errors; it never asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

from sandbox.kernel_wire import V1_PROTOCOL, KernelMessage, decode_v1, encode_v1

CODE = "total = sum(i * i for i in range({n}))\nprint(total)"


@dataclass
class Figures:
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for name, xs in self.samples.items():
            xs = sorted(xs)
            p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
            out.append({"figure": name, "n": len(xs), "p50_ms": statistics.median(xs) * 1e3,
                        "p95_ms": p95 * 1e3, "max_ms": xs[-1] * 1e3})
        return out


class ServerProcess:
    """``jupybox serve`` in a child process on a free loopback port (its own interpreter, so the
    load generator here does not share a GIL with the server)."""

    def __init__(self, sessions: int, pool_size: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jupybox-bench-", suffix=".log")
        env = {**os.environ, "JUPYBOX_INSTANCE": "bench-api", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ui.cli", "serve", "--port", str(self.port), "--max-sessions", str(sessions + 4),
             "--pool-size", str(pool_size)], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def start(self) -> ServerProcess:
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise SystemExit(f"the server did not start:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def baseline(figures: Figures, rounds: int) -> None:
    """The same execution on a session called directly (no HTTP, no server): what the API adds to."""
    from sandbox import SandboxSettings, SessionManager

    async with SessionManager(SandboxSettings.from_env(instance="bench-api-direct")) as manager:
        session = await manager.create()
        for i in range(rounds * 2):
            t0 = time.perf_counter()
            ex = await session.execute(CODE.format(n=10_000 + i))
            figures.add("baseline: execute, direct (no HTTP), 1 session", time.perf_counter() - t0)
            if not ex.ok:
                figures.errors.append(f"baseline: {ex.status.value}")


async def _one_client_over_http(client: httpx.AsyncClient, figures: Figures, rounds: int) -> None:
    r = await client.post("/api/sessions")
    r.raise_for_status()
    sid = r.json()["id"]
    try:
        for i in range(rounds * 2):
            t0 = time.perf_counter()
            r = await client.post(f"/api/sessions/{sid}/execute", json={"code": CODE.format(n=10_000 + i)})
            figures.add("execute over HTTP, 1 session alone", time.perf_counter() - t0)
            if r.status_code != 200 or r.json()["status"] != "ok":
                figures.errors.append(f"single: HTTP {r.status_code} {r.text[:200]}")
    finally:
        await client.delete(f"/api/sessions/{sid}")


WS_FIGURE = "1+1: kernels API websocket (v1), 1 kernel alone"
JSON_FIGURE = "1+1: JSON API execute (HTTP), 1 session alone"
MCP_FIGURE = "1+1: MCP run_python (streamable HTTP), 1 session"


async def _websocket_beside_json(client: httpx.AsyncClient, url: str, token: str | None, figures: Figures,
                                 rounds: int) -> None:
    """``1+1`` through the channels websocket and through ``/execute``, taking turns, same server."""
    sid = (await client.post("/api/sessions")).raise_for_status().json()["id"]
    kid = (await client.post("/api/kernels", json={"name": "python3"})).raise_for_status().json()["id"]
    headers = {"Authorization": f"token {token}"} if token else {}
    ws_url = "ws" + url[len("http"):] + f"/api/kernels/{kid}/channels"
    try:
        async with websockets.connect(ws_url, additional_headers=headers, subprotocols=[V1_PROTOCOL],
                                      max_size=None, open_timeout=120) as ws, _mcp_client(url, token) as mcp:
            await mcp.call_tool("run_python", {"code": "1+1"})  # its sandbox starts here, not in the figure
            for _ in range(rounds * 2):
                t0 = time.perf_counter()
                r = await client.post(f"/api/sessions/{sid}/execute", json={"code": "1+1"})
                figures.add(JSON_FIGURE, time.perf_counter() - t0)
                if r.status_code != 200 or r.json()["outputs"][0]["data"]["text/plain"] != "2":
                    figures.errors.append(f"json 1+1: HTTP {r.status_code} {r.text[:200]}")
                t0 = time.perf_counter()
                result = await _execute_over_websocket(ws, "1+1")
                figures.add(WS_FIGURE, time.perf_counter() - t0)
                if result != "2":
                    figures.errors.append(f"websocket 1+1: got {result!r}")
                t0 = time.perf_counter()
                answer = await mcp.call_tool("run_python", {"code": "1+1"})
                figures.add(MCP_FIGURE, time.perf_counter() - t0)
                if answer.is_error or answer.content[0].text.strip() != "2":
                    figures.errors.append(f"mcp 1+1: got {answer.content[0].text[:200]!r}")
    finally:
        await client.delete(f"/api/kernels/{kid}")
        await client.delete(f"/api/sessions/{sid}")


@asynccontextmanager
async def _mcp_client(url: str, token: str | None) -> AsyncIterator[Any]:
    """The MCP SDK's own client on the server's ``/mcp`` (one MCP session for the whole run)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120, read=300)) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
            yield client


async def _execute_over_websocket(ws: Any, code: str) -> str | None:
    """Send an execute request; wait for its reply and its idle; the result's text/plain."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": "bench", "username": "bench",
              "version": "5.3", "date": "1970-01-01T00:00:00Z"}
    await ws.send(encode_v1(KernelMessage("shell", header, content={
        "code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False})))
    result, replied, idle = None, False, False
    while not (replied and idle):
        msg = decode_v1(await asyncio.wait_for(ws.recv(), 120))
        if msg.parent_id != msg_id:
            continue
        replied = replied or msg.msg_type == "execute_reply"
        idle = idle or (msg.msg_type == "status" and msg.content.get("execution_state") == "idle")
        if msg.msg_type == "execute_result":
            result = msg.content["data"].get("text/plain")
    return result


async def _worker(client: httpx.AsyncClient, figures: Figures, index: int, rounds: int, start: asyncio.Event,
                  concurrency: int) -> None:
    t0 = time.perf_counter()
    r = await client.post("/api/sessions")
    figures.add(f"create session, {concurrency} concurrent", time.perf_counter() - t0)
    if r.status_code != 201:
        figures.errors.append(f"create: HTTP {r.status_code} {r.text[:200]}")
        return
    sid = r.json()["id"]
    await start.wait()  # every session exists: now they all execute at once
    try:
        for i in range(rounds):
            n = 10_000 + index * 100 + i
            t0 = time.perf_counter()
            r = await client.post(f"/api/sessions/{sid}/execute", json={"code": CODE.format(n=n)})
            figures.add(f"execute over HTTP, {concurrency} sessions concurrently", time.perf_counter() - t0)
            expected = f"{sum(k * k for k in range(n))}\n"
            if r.status_code != 200:
                figures.errors.append(f"execute: HTTP {r.status_code} {r.text[:200]}")
            elif r.json()["status"] != "ok" or r.json()["outputs"][0].get("text") != expected:
                figures.errors.append(f"execute: wrong result {r.text[:200]}")
    finally:
        t0 = time.perf_counter()
        r = await client.delete(f"/api/sessions/{sid}")
        figures.add(f"delete session, {concurrency} concurrent", time.perf_counter() - t0)
        if r.status_code != 204:
            figures.errors.append(f"delete: HTTP {r.status_code}")


async def run(url: str, token: str | None, sessions: int, rounds: int, figures: Figures) -> Figures:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=sessions + 8, max_keepalive_connections=sessions + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        await _one_client_over_http(client, figures, rounds)
        await _websocket_beside_json(client, url, token, figures, rounds)
        start = asyncio.Event()
        workers = [asyncio.create_task(_worker(client, figures, i, rounds, start, sessions)) for i in range(sessions)]
        while len(figures.samples.get(f"create session, {sessions} concurrent", [])) + len(figures.errors) < sessions:
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*workers)
        figures.add("wall: all concurrent executions", time.perf_counter() - t0)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10, help="executions per session")
    p.add_argument("--url", help="an already running jupybox server (default: start one here)")
    p.add_argument("--token", help="its API token")
    p.add_argument("--pool-size", type=int, default=0, help="warm pool of the server started here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    figures = Figures()
    if not args.url:
        asyncio.run(baseline(figures, args.rounds))
    server = None if args.url else ServerProcess(args.sessions, args.pool_size).start()
    try:
        asyncio.run(run(args.url or server.url, args.token, args.sessions, args.rounds, figures))
    finally:
        if server is not None:
            server.stop()
    rows = figures.rows()
    executions = args.sessions * args.rounds
    wall = figures.samples["wall: all concurrent executions"][0]
    if args.json:
        print(json.dumps({"rows": rows, "errors": figures.errors, "executions": executions,
                          "executions_per_s": executions / wall}))
    else:
        print(f"{args.sessions} sessions x {args.rounds} executions through {args.url or 'a jupybox serve process'} "
              f"({executions} concurrent executions in {wall:.2f} s, {executions / wall:.1f}/s)")
        print(f"{'figure':<50} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
        for r in rows:
            if not r["figure"].startswith("wall"):
                print(f"{r['figure']:<50} {r['n']:>5} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f} {r['max_ms']:>9.1f}")
        p50 = {r["figure"]: r["p50_ms"] for r in rows}
        if WS_FIGURE in p50 and JSON_FIGURE in p50:
            print(f"1+1 round trip, websocket / JSON API (p50): {p50[WS_FIGURE] / p50[JSON_FIGURE]:.2f}")
        if MCP_FIGURE in p50 and JSON_FIGURE in p50:
            p95 = {r["figure"]: r["p95_ms"] for r in rows}
            print(f"1+1 round trip, MCP minus JSON API: p50 {p50[MCP_FIGURE] - p50[JSON_FIGURE]:+.1f} ms, "
                  f"p95 {p95[MCP_FIGURE] - p95[JSON_FIGURE]:+.1f} ms")
        print(f"errors: {len(figures.errors)}")
        for e in figures.errors[:10]:
            print(f"  {e}")
    return 1 if figures.errors else 0


if __name__ == "__main__":
    sys.exit(main())
