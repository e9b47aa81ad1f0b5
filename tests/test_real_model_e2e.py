"""The whole pipeline with a real (small) instruct model: SmolLM2-135M-Instruct through the real
transformers backend on the CPU, greedy, asked a question whose answer needs code, through `jupybox
ask`, the JSON API's chat and the OpenAI endpoint. What is asserted is what the pipeline
guarantees (the code ran in the sandbox and its outputs are what the notebook and the transcript
say, every turn ends with its usage and one answer or error, the finish reason and the token
counts are right), not what a 135M model gets right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nbformat
import pytest

from interpreter import InterpreterSettings, ModelSettings
from tests.support.sandboxes import docker_settings
from tests.support.server import AppServer
from ui.services import ServeSettings

pytestmark = pytest.mark.slow
JUPYBOX = str(Path(sys.executable).parent / "jupybox")
QUESTION = "Use Python to compute 37 * 91 and print the result."
MAX_TOKENS = 128


def check_turn(events: list[dict]) -> list[tuple[str, dict]]:
    """The invariants of one turn's event stream; returns (code, execution) of each cell."""
    kinds = [e["type"] for e in events]
    assert set(kinds) <= {"text_delta", "code", "output", "execution", "notice", "usage", "answer", "error"}, kinds
    assert kinds[-1] in ("answer", "error") and kinds[-2] == "usage" and kinds.count("usage") == 1, kinds[-3:]
    usage = events[-2]["data"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    if kinds[-1] == "answer":
        assert events[-1]["data"]["finish_reason"] in ("stop", "length")
    cells, code = [], None
    for e in events:
        if e["type"] == "code":
            assert code is None, "a cell started before the last one finished"
            code = e["code"]
        elif e["type"] == "execution":
            assert code is not None and e["execution"]["status"] in ("ok", "error", "timeout", "crashed")
            cells.append((code, e["execution"]))
            code = None
    assert code is None and cells, "the question needs code: at least one cell ran"
    return cells


def check_notebook(nb: nbformat.NotebookNode, cells: list[tuple[str, dict]]) -> None:
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source for c in code_cells[-len(cells):]] == [code for code, _ in cells]
    for cell, (_, execution) in zip(code_cells[-len(cells):], cells):
        streams = "".join(o["text"] for o in execution["outputs"] if o["kind"] == "stream" and o["name"] == "stdout")
        assert "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout") == streams


def test_jupybox_ask_with_a_real_model(sandbox_image: str, smollm2: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(JUPYBOX_HOME=str(tmp_path / "h"), JUPYBOX_INSTANCE="real-model-ask")
    proc = subprocess.run([JUPYBOX, "ask", QUESTION, "--model", str(smollm2), "--json", "--max-new-tokens",
                           str(MAX_TOKENS), "--max-executions", "1", "--notebook", str(tmp_path / "c.ipynb"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env)
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is an event: --json is clean
    assert "usage" in [e["type"] for e in events], f"no turn ran (exit {proc.returncode}): {proc.stderr[-3000:]}"
    cells = check_turn(events)
    assert proc.returncode == (0 if events[-1]["type"] == "answer" else 1)
    check_notebook(nbformat.read(str(tmp_path / "c.ipynb"), as_version=4), cells)
    # quiet by default: no progress bars or library warnings around the events (torch, torchao, transformers)
    assert proc.stderr == "", proc.stderr[-2000:]


@pytest.fixture(scope="module")
def server(sandbox_image: str, smollm2: Path, jb_home: Path) -> Iterator[AppServer]:
    settings = ServeSettings(sandbox=docker_settings(jb_home / "real", instance="real-model-serve"),
                             model=ModelSettings(model=str(smollm2)),
                             interpreter=InterpreterSettings(max_tokens=MAX_TOKENS, max_executions=1))
    with AppServer(settings) as srv:
        deadline = time.monotonic() + 300
        while (health := httpx.get(f"{srv.url}/healthz").json())["status"] == "loading":
            assert time.monotonic() < deadline, "the model did not load within 300 s"
            time.sleep(0.5)
        assert health["model_available"], httpx.get(f"{srv.url}/api/status").json()
        yield srv


def test_json_api_chat_with_a_real_model(server: AppServer) -> None:
    with httpx.Client(base_url=server.url, timeout=600) as c:
        sid = c.post("/api/sessions").json()["id"]
        body = c.post(f"/api/sessions/{sid}/chat", json={"message": QUESTION, "stream": False}).json()
        cells = check_turn(body["events"])
        assert body["usage"] == body["events"][-2]["data"]
        assert body["finish_reason"] == (body["events"][-1].get("data") or {}).get("finish_reason")
        check_notebook(nbformat.reads(c.get(f"/api/sessions/{sid}/notebook").text, as_version=4), cells)
        c.delete(f"/api/sessions/{sid}")


def test_openai_endpoint_with_a_real_model(server: AppServer) -> None:
    with httpx.Client(base_url=server.url, timeout=600) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]}).json()
        choice = r["choices"][0]
        assert "```python" in choice["message"]["content"]  # the cell it ran, in the transcript
        assert choice["finish_reason"] in ("stop", "length")
        assert r["usage"]["completion_tokens"] > 0 and r["usage"]["total_tokens"] == (
            r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"])
        # two new tokens cannot hold an answer: the finish reason says the answer was cut
        r = c.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
            {"role": "user", "content": "In one sentence: what colour is a clear daytime sky?"}]}).json()
        assert r["choices"][0]["finish_reason"] == "length", r
        assert r["choices"][0]["message"]["content"].endswith("[the answer was cut at the model's token limit]")
        assert r["usage"]["completion_tokens"] == 2
