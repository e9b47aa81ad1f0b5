"""A soak of the server under a hostile kernel and hostile clients at once: what it costs the server
process in memory and file descriptors over a few minutes. Figures, never assertions.

    python -m bench.soak [--seconds 180] [--every 5]

Starts ``jupybox serve`` (a token, 10 MB files, a 30 MB workspace) on loopback and runs, together,
until the time is up:

* MCP (the official client): a 13000x13000 PNG shown by ``run_python``; ``read_file`` of a file a
  kernel thread flips between 1 byte and 9.9 MB (sparse);
* the kernels API: 16 idle websockets on one kernel, and a 17th asked for again and again; four
  websockets on another kernel that read nothing while its kernel floods 8 MB comm messages;
* the JSON API: a session that makes sparse files claiming the workspace many times over, and
  downloads and lists them.

Every ``--every`` seconds it samples the server's resident memory (VmRSS) and open descriptors, then
prints them, with the first, the largest and the last sample, and refusals counted by kind.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

TOKEN = secrets.token_hex(16)
FLIP = ("import threading\nstop = False\ndef flip():\n    while not stop:\n        open('flip.txt', 'w').write('x')\n"
        "        open('flip.txt', 'r+b').truncate(9_900_000)\nthreading.Thread(target=flip, daemon=True).start()")
FLOOD = ("from ipykernel.comm import Comm\nc = Comm(target_name='flood', data={})\n"
         "for _ in range(20):\n    c.send(data={'blob': 'x' * 8_000_000})")
SPARSE = "for i in range(40):\n    open(f'sparse{i}.bin', 'wb').truncate(9_900_000)"


def huge_png(side: int = 13000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (side + 1) * side, 9)) + chunk(b"IEND", b""))


def sample(pid: int) -> tuple[float, int]:
    """The process's resident memory (MB) and open descriptors."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def kernel_message(msg_type: str, content: dict) -> str:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": "soak", "username": "soak",
              "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}
    return json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"})


class Soak:
    def __init__(self, url: str, deadline: float) -> None:
        self.url, self.ws = url, url.replace("http://", "ws://")
        self.deadline = deadline
        self.counts: Counter[str] = Counter()
        self.headers = {"Authorization": f"token {TOKEN}"}

    def going(self) -> bool:
        return time.monotonic() < self.deadline

    async def mcp(self) -> None:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx2.Timeout(60, read=300)) as http:
            async with Client(streamable_http_client(f"{self.url}/mcp", http_client=http)) as client:
                await client.call_tool("write_file", {"path": "huge.png", "content": base64.b64encode(huge_png()).decode(),
                                                      "encoding": "base64"})
                await client.call_tool("run_python", {"code": FLIP})
                while self.going():
                    shown = await client.call_tool("run_python", {"code": (
                        "from IPython.display import Image, display\ndisplay(Image(filename='huge.png'))")})
                    self.counts["mcp image refused"] += any("is not shown" in getattr(c, "text", "") for c in shown.content)
                    read = await client.call_tool("read_file", {"path": "flip.txt"})
                    self.counts["mcp read refused" if read.is_error else "mcp read served"] += 1
                await client.call_tool("run_python", {"code": "stop = True"})

    async def idle_websockets(self, api) -> None:
        import websockets

        kernel = (await api.post("/api/kernels", json={"name": "python3"})).json()["id"]
        url = f"{self.ws}/api/kernels/{kernel}/channels"
        held = [await websockets.connect(url, additional_headers=self.headers) for _ in range(16)]
        try:
            while self.going():
                try:
                    extra = await websockets.connect(url, additional_headers=self.headers)
                    held.append(extra)
                    self.counts["17th websocket accepted"] += 1
                except websockets.InvalidStatus as exc:
                    self.counts[f"17th websocket refused {exc.response.status_code}"] += 1
                await asyncio.sleep(1)
        finally:
            await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
            await api.delete(f"/api/kernels/{kernel}")

    async def flood(self, api) -> None:
        import websockets

        kernel = (await api.post("/api/kernels", json={"name": "python3"})).json()["id"]
        url = f"{self.ws}/api/kernels/{kernel}/channels"
        try:
            while self.going():
                silent = [await websockets.connect(url, additional_headers=self.headers, max_size=None)
                          for _ in range(4)]
                async with websockets.connect(url, additional_headers=self.headers, max_size=None) as driver:
                    await driver.send(kernel_message("execute_request", {"code": FLOOD, "silent": False}))
                    end = time.monotonic() + 40
                    while time.monotonic() < end:
                        try:
                            msg = json.loads(await asyncio.wait_for(driver.recv(), 5))
                        except (asyncio.TimeoutError, TimeoutError):
                            continue
                        if msg.get("msg_type") == "execute_reply":
                            break
                self.counts["comm floods"] += 1
                await asyncio.sleep(35)  # past the relays' stall time (30 s): the silent ones are closed
                for ws in silent:
                    self.counts["silent websocket closed by the server"] += ws.close_code is not None
                await asyncio.gather(*(ws.close() for ws in silent), return_exceptions=True)
        finally:
            await api.delete(f"/api/kernels/{kernel}")

    async def sparse(self, api) -> None:
        session = (await api.post("/api/sessions", json={})).json()["id"]
        try:
            await api.post(f"/api/sessions/{session}/execute", json={"code": SPARSE, "timeout": 60})
            while self.going():
                listed = (await api.get(f"/api/sessions/{session}/files")).json()
                for f in listed["files"][:5]:
                    r = await api.get(f"/api/sessions/{session}/files/{f['path']}")
                    self.counts[f"download {r.status_code}"] += 1
                await asyncio.sleep(1)
        finally:
            await api.delete(f"/api/sessions/{session}")


ATTACKS = ("mcp", "idle", "flood", "sparse")


async def attack(url: str, seconds: float, which: tuple[str, ...] = ATTACKS) -> Counter[str]:
    import httpx

    soak = Soak(url, time.monotonic() + seconds)
    async with httpx.AsyncClient(base_url=url, headers=soak.headers, timeout=120) as api:
        runs = {"mcp": soak.mcp, "idle": lambda: soak.idle_websockets(api), "flood": lambda: soak.flood(api),
                "sparse": lambda: soak.sparse(api)}
        results = await asyncio.gather(*(runs[name]() for name in which), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            soak.counts[f"attack failed: {type(r).__name__}: {str(r)[:120]}"] += 1
    return soak.counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--every", type=float, default=5)
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"which, comma-separated (default {','.join(ATTACKS)})")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="soak-"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "JUPYBOX_"))},
           "JUPYBOX_HOME": str(home), "JUPYBOX_INSTANCE": "bench-soak", "JUPYBOX_API_TOKEN": TOKEN,
           "JUPYBOX_FILE_MB": "10", "JUPYBOX_WORKSPACE_MB": "30", "HF_HUB_OFFLINE": "1"}
    if os.environ.get("JUPYBOX_IMAGE"):
        env["JUPYBOX_IMAGE"] = os.environ["JUPYBOX_IMAGE"]
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        samples: list[tuple[float, float, int]] = []
        started = time.monotonic()
        samples.append((0.0, *sample(proc.pid)))

        async def run() -> Counter[str]:
            task = asyncio.create_task(attack(url, args.seconds, tuple(args.attacks.split(","))))
            while not task.done():
                await asyncio.sleep(args.every)
                samples.append((time.monotonic() - started, *sample(proc.pid)))
            return await task

        counts = asyncio.run(run())
        time.sleep(args.every)
        samples.append((time.monotonic() - started, *sample(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    print(f"{'t (s)':>7} {'RSS (MB)':>9} {'fds':>5}")
    for t, rss, fds in samples:
        print(f"{t:7.0f} {rss:9.0f} {fds:5d}")
    first, last = samples[0], samples[-1]
    print(f"RSS: first {first[1]:.0f} MB, largest {max(s[1] for s in samples):.0f} MB, last {last[1]:.0f} MB; "
          f"descriptors: first {first[2]}, largest {max(s[2] for s in samples)}, last {last[2]}")
    for kind, n in sorted(counts.items()):
        print(f"  {kind}: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
