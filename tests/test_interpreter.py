"""The loop end to end: a scripted model on loopback (the only fake) writes code, the real docker
sandbox runs it, and the model's next reply can only contain what the sandbox really printed."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator

import nbformat
import pytest

from interpreter import Conversation, Event, Interpreter, InterpreterSettings
from interpreter.llm.openai import OpenAILLM
from sandbox import SessionManager
from tests.scripted_model import ScriptedModel, ToolCalls, last_observation, prompt_text

FORMATS = ["react", "fenced", "tools"]


def code_reply(fmt: str, code: str):
    if fmt == "react":
        return f"Thought: I will run code.\nAction: code_interpreter\nAction Input:\n```py\n{code}\n```\nObservation: made up"
    if fmt == "fenced":
        return f"Let me compute that.\n```python\n{code}\n```"
    return ToolCalls([("python", json.dumps({"code": code}))])


def answer_reply(fmt: str, make_text):
    """A reply computed from the request: the scripted model quotes the sandbox's output."""

    def reply(body):
        text = make_text(last_observation(body), body)
        return f"Thought: I now know the final answer\nFinal Answer: {text}" if fmt == "react" else text

    return reply


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    m = ScriptedModel().start()
    yield m
    m.stop()


def make_interpreter(model: ScriptedModel, manager: SessionManager, fmt: str, **settings) -> Interpreter:
    llm = OpenAILLM(model="scripted-model", base_url=model.url, backoff=0.01)
    return Interpreter(llm, manager, fmt, InterpreterSettings(**settings))


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_csv_question_answered_with_the_number_the_code_computed(
        model: ScriptedModel, docker_manager: SessionManager, fmt: str) -> None:
    interp = make_interpreter(model, docker_manager, fmt)
    conv = await interp.new_conversation()
    rows = "\n".join(f"r{i},{i * 7 % 13}" for i in range(50))
    model.enqueue(code_reply(fmt, "import pandas as pd\ndf = pd.read_csv('sales.csv', names=['id', 'v'])\nprint('total', df.v.sum())"),
                  answer_reply(fmt, lambda obs, body: "The total is " + re.search(r"total (\d+)", obs).group(1) + "."))
    events = await collect(interp.run(conv, "What is the total of v?", files=[("sales.csv", rows.encode())]))
    expected = sum(i * 7 % 13 for i in range(50))
    kinds = [e.type for e in events]
    assert kinds[0] == ("code" if fmt == "tools" else "text_delta") and "code" in kinds and "output" in kinds and "execution" in kinds
    assert events[-1].type == "answer" and events[-1].text == f"The total is {expected}."
    assert "sales.csv" in prompt_text(model.history[0])  # the upload was announced
    if fmt == "react":
        assert "[Upload file sales.csv]" in model.history[0]["prompt"]
        assert model.paths[0].endswith("/completions") and "Observation:" in model.history[0]["stop"]
        assert model.history[1]["prompt"].rstrip().endswith("Thought:")
    await interp.close(conv)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_plot_png_path_reaches_the_model(model: ScriptedModel, docker_manager: SessionManager, fmt: str) -> None:
    interp = make_interpreter(model, docker_manager, fmt)
    conv = await interp.new_conversation()
    model.enqueue(code_reply(fmt, "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.show()"),
                  answer_reply(fmt, lambda obs, body: "Here is the chart: " + re.search(r"!\[[^]]*\]\([^)]+\)", obs).group(0)))
    events = await collect(interp.run(conv, "Plot a and b"))
    execution = next(e.execution for e in events if e.type == "execution")
    path = execution.images[0].path
    assert path.endswith(".png") and path in prompt_text(model.history[1])
    assert events[-1].type == "answer" and path in events[-1].text
    session = docker_manager.get(conv.session_id)
    assert session.workspace.read(path).startswith(b"\x89PNG")
    await interp.close(conv)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_bug_gets_its_traceback_back_and_the_fix_runs(
        model: ScriptedModel, docker_manager: SessionManager, fmt: str) -> None:
    interp = make_interpreter(model, docker_manager, fmt)
    conv = await interp.new_conversation()
    model.enqueue(code_reply(fmt, "print(totl)"),
                  lambda body: code_reply(fmt, "total = 6 * 7\nprint(total)") if "NameError" in last_observation(body)
                  else "Final Answer: no traceback seen",
                  answer_reply(fmt, lambda obs, body: f"It is {obs.strip()}"))
    events = await collect(interp.run(conv, "compute"))
    statuses = [e.execution.status.value for e in events if e.type == "execution"]
    assert statuses == ["error", "ok"]
    assert "name 'totl' is not defined" in prompt_text(model.history[1])
    assert events[-1].text == "It is 42"
    await interp.close(conv)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_state_persists_across_turns_and_notebook_export(
        model: ScriptedModel, docker_manager: SessionManager, fmt: str, tmp_path) -> None:
    interp = make_interpreter(model, docker_manager, fmt)
    conv = await interp.new_conversation()
    model.enqueue(code_reply(fmt, "secret = 1234"), answer_reply(fmt, lambda o, b: "stored"),
                  code_reply(fmt, "print(secret + 1)"), answer_reply(fmt, lambda o, b: f"value {o}"))
    first = await collect(interp.run(conv, "store a number"))
    second = await collect(interp.run(conv, "add one"))
    assert first[-1].text == "stored" and second[-1].text == "value 1235"
    if fmt == "react":  # the second turn's prompt carries the first turn as history
        assert "store a number" in model.history[2]["prompt"]
    # save, reload, export
    conv.save(tmp_path / "c.json")
    loaded, files = Conversation.load(tmp_path / "c.json")
    assert [c.code for c in loaded.cells] == ["secret = 1234", "print(secret + 1)"]
    assert loaded.cells[1].execution.stdout == "1235\n" and loaded.messages == conv.messages
    nb = loaded.to_notebook()
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells[1].outputs[0]["text"] == "1235\n"
    await interp.close(conv)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_timeout_is_reported_to_the_model(model: ScriptedModel, docker_manager: SessionManager, fmt: str) -> None:
    interp = make_interpreter(model, docker_manager, fmt, execution_timeout=1.5)
    conv = await interp.new_conversation()
    model.enqueue(code_reply(fmt, "import time\nwhile True:\n    time.sleep(0.1)"),
                  answer_reply(fmt, lambda o, b: "timed out" if "timed out after 1.5 s" in o else f"no: {o}"))
    events = await collect(interp.run(conv, "loop"))
    assert next(e.execution for e in events if e.type == "execution").status.value == "timeout"
    assert events[-1].text == "timed out"
    await interp.close(conv)


async def test_answer_without_code_is_the_answer(model: ScriptedModel, docker_manager: SessionManager) -> None:
    interp = make_interpreter(model, docker_manager, "fenced")
    conv = await interp.new_conversation()
    model.enqueue("Paris is the capital of France.")
    events = await collect(interp.run(conv, "capital of France?"))
    assert [e.type for e in events if e.type not in ("text_delta", "usage")] == ["answer"]
    assert events[-1].text == "Paris is the capital of France."
    await interp.close(conv)


async def test_code_in_another_language_gets_a_clear_message(model: ScriptedModel, docker_manager: SessionManager) -> None:
    interp = make_interpreter(model, docker_manager, "fenced")
    conv = await interp.new_conversation()
    model.enqueue("```bash\nls -la\n```", code_reply("fenced", "import os\nprint(sorted(os.listdir('.')))"),
                  answer_reply("fenced", lambda o, b: o))
    events = await collect(interp.run(conv, "list files", files=[("a.txt", b"x")]))
    assert "sandbox runs Python only" in prompt_text(model.history[1]) and "```bash" in prompt_text(model.history[1])
    assert events[-1].type == "answer" and "a.txt" in events[-1].text
    await interp.close(conv)


async def test_files_already_in_the_workspace_are_announced_without_being_written_again(
        model: ScriptedModel, docker_manager: SessionManager) -> None:
    interp = make_interpreter(model, docker_manager, "fenced")
    conv = await interp.new_conversation()
    session = await interp._session(conv)
    session.workspace.write("early.csv", b"a,b\n1,2\n")
    before = (session.workspace.root / "early.csv").stat()
    model.enqueue("Noted.")
    events = await collect(interp.run(conv, "what did I upload?", present=["early.csv", "never-uploaded.csv"]))
    assert events[-1].type == "answer"
    announced = prompt_text(model.history[0])
    assert "early.csv" in announced and "never-uploaded.csv" not in announced
    assert conv.files == ["early.csv"]
    after = (session.workspace.root / "early.csv").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    await interp.close(conv)


async def test_malformed_tool_call_json_is_explained_to_the_model(model: ScriptedModel, docker_manager: SessionManager) -> None:
    interp = make_interpreter(model, docker_manager, "tools")
    conv = await interp.new_conversation()
    model.enqueue(ToolCalls([("python", '{"code": "print(1)"')]),  # unterminated JSON
                  ToolCalls([("python", json.dumps({"code": "print(2)"}))]),
                  answer_reply("tools", lambda o, b: o))
    events = await collect(interp.run(conv, "go"))
    tool_msgs = [m for m in model.history[1]["messages"] if m["role"] == "tool"]
    assert "not valid JSON" in tool_msgs[0]["content"]
    assert events[-1].text == "2"
    await interp.close(conv)


async def test_unreachable_endpoint_is_a_clear_error(docker_manager: SessionManager) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    llm = OpenAILLM(model="m", base_url=f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01)
    interp = Interpreter(llm, docker_manager, "fenced")
    conv = await interp.new_conversation()
    events = await collect(interp.run(conv, "hi"))
    assert events[-1].type == "error" and "cannot reach the model server" in events[-1].text
    assert "Traceback" not in events[-1].text
    await interp.close(conv)


async def test_execution_limit_bounds_a_turn(model: ScriptedModel, docker_manager: SessionManager) -> None:
    interp = make_interpreter(model, docker_manager, "fenced", max_executions=2)
    conv = await interp.new_conversation()
    model.enqueue(*[code_reply("fenced", f"print({i})") for i in range(5)])
    events = await collect(interp.run(conv, "loop forever"))
    assert sum(e.type == "execution" for e in events) == 2
    assert events[-1].type == "error" and "max_executions" in events[-1].text
    await interp.close(conv)
