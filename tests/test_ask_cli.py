"""`jupybox ask` as a user runs it: the real console script, the real sandbox, a scripted model
server on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat

from bench.scripted_model import ScriptedModel, last_observation

JUPYBOX = str(Path(sys.executable).parent / "jupybox")


def test_ask_answers_a_question_about_an_uploaded_file(sandbox_image: str, tmp_path: Path) -> None:
    csv = tmp_path / "sales.csv"
    csv.write_text("month,amount\n1,120\n2,80\n3,135\n")
    model = ScriptedModel().start()
    model.enqueue(
        "Thought: read it\nAction: code_interpreter\nAction Input:\n```py\nimport pandas as pd\n"
        "import matplotlib.pyplot as plt\ndf = pd.read_csv('sales.csv')\ndf.plot(x='month', y='amount')\nplt.show()\n"
        "df.to_csv('clean.csv', index=False)\nprint('mean', df.amount.mean())\n```\n",
        lambda body: "Thought: done\nFinal Answer: The mean is " + re.search(r"mean ([\d.]+)", last_observation(body)).group(1),
    )
    try:
        proc = subprocess.run(
            [JUPYBOX, "ask", "What is the mean amount?", "--file", str(csv), "--openai-base-url", model.url,
             "--openai-model", "Qwen-test", "--notebook", str(tmp_path / "c.ipynb"), "--out", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        model.stop()
    assert proc.returncode == 0, proc.stderr
    assert "┌── code ──" in proc.stdout and "mean 111.666" in proc.stdout
    assert proc.stdout.rstrip().endswith("The mean is 111.66666666666667")
    assert proc.stdout.count("The mean is 111.666") == 1  # streamed once, not printed again
    assert "[image saved: figures/fig-001.png]" in proc.stdout
    # the Qwen model family gets the ReAct format on the completions endpoint
    assert model.paths[0] == "/v1/completions" and "[Upload file sales.csv]" in model.history[0]["prompt"]
    saved = list((tmp_path / "out").glob("*/figures/fig-001.png"))
    assert saved and saved[0].read_bytes().startswith(b"\x89PNG")
    assert list((tmp_path / "out").glob("*/clean.csv"))
    assert not list((tmp_path / "out").glob("*/sales.csv"))  # the user's own upload, unchanged: not copied back
    nb = nbformat.read(str(tmp_path / "c.ipynb"), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_ask_json_streams_one_event_per_line(sandbox_image: str, tmp_path: Path) -> None:
    model = ScriptedModel().start()
    model.enqueue("```python\nprint(2 ** 10)\n```", lambda body: "It is " + last_observation(body))
    try:
        proc = subprocess.run(
            [JUPYBOX, "ask", "2**10?", "--json", "--format", "fenced", "--openai-base-url", model.url,
             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    finally:
        model.stop()
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {"text_delta", "code", "output", "execution", "answer"} <= {e["type"] for e in events}
    assert events[-1] == {"type": "answer", "text": "It is 1024", "data": {"finish_reason": "stop"}}
    assert events[-2]["type"] == "usage" and events[-2]["data"]["completion_tokens"] > 0


def test_missing_model_gives_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run([JUPYBOX, "ask", "hi", "--model", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("jupybox: ")


def test_json_ends_with_an_error_event_when_no_turn_can_run(tmp_path: Path) -> None:
    """A program reading --json gets why on stdout too, not only a message on stderr."""
    proc = subprocess.run([JUPYBOX, "ask", "hi", "--json", "--model", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["type"] for e in events] == ["error"] and "no-such-model" in events[0]["text"]
    assert proc.stderr == f"jupybox: {events[0]['text']}\n"


def test_a_format_the_backend_cannot_serve_is_refused_before_loading(tmp_path: Path) -> None:
    proc = subprocess.run([JUPYBOX, "ask", "hi", "--format", "tools", "--model", str(tmp_path / "no-such-model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no tool calling" in proc.stderr and "no-such-model" not in proc.stderr


def test_chat_keeps_state_across_turns_and_saves(sandbox_image: str, tmp_path: Path) -> None:
    model = ScriptedModel().start()
    model.enqueue("```python\nbase = 40\n```", "Stored.",
                  "```python\nprint(base + 2)\n```", lambda body: "Now it is " + last_observation(body))
    try:
        proc = subprocess.run(
            [JUPYBOX, "chat", "--format", "fenced", "--openai-base-url", model.url, "--out", str(tmp_path)],
            input=f"remember 40\nadd two\n/save {tmp_path / 'chat.json'}\n/exit\n",
            capture_output=True, text=True, timeout=120)
    finally:
        model.stop()
    assert proc.returncode == 0, proc.stderr
    assert "Stored." in proc.stdout and "Now it is 42\n" in proc.stdout
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [c["code"] for c in saved["cells"]] == ["base = 40", "print(base + 2)"]
