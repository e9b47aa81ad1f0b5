"""The loop through the conversation service, end to end: a scripted model on loopback (the only
fake) writes code, a real kernel runs it, and the model's next reply can only contain what the
kernel really printed. The kernel runs on the local backend (no isolation: the tests' own opt-in),
so this file takes seconds; the sandbox's promises are tested on Docker elsewhere."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nbformat
import pytest

from bench.scripted_model import ScriptedModel, Slow, ToolCalls, Truncated, last_observation, prompt_text
from interpreter import ConversationService, Event, InterpreterSettings, TurnBusy
from interpreter.llm.openai import OpenAILLM
from sandbox import SandboxSettings, SessionManager

FORMATS = ["react", "fenced", "tools"]
KEY, SOURCE = "t", "test"


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


@pytest.fixture(scope="module")
async def local_manager(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SessionManager]:
    home = tmp_path_factory.mktemp("lp")  # short: Unix socket paths are limited to 107 bytes
    settings = SandboxSettings(backend="local", allow_unsafe_local=True, home=home, instance="loop-tests")
    async with SessionManager(settings) as manager:
        yield manager


@pytest.fixture
async def service(model: ScriptedModel, local_manager: SessionManager) -> AsyncIterator[ConversationService]:
    svc = ConversationService(local_manager, OpenAILLM(model="scripted-model", base_url=model.url, backoff=0.01))
    yield svc
    for chat in svc.chats():
        await svc.close(chat.key)
    await svc.llm.close()


async def ask(svc: ConversationService, question: str, fmt: str | None = None,
              files: tuple[tuple[str, bytes], ...] = (), **settings) -> list[Event]:
    svc.open(KEY, SOURCE, fmt=fmt)
    for name, data in files:
        await svc.upload(KEY, SOURCE, name, data)
    turn = await svc.turn(KEY, SOURCE, question, InterpreterSettings(**settings) if settings else None)
    return [e async for e in turn.events()]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_csv_question_answered_with_the_number_the_code_computed(
        model: ScriptedModel, service: ConversationService, fmt: str) -> None:
    rows = "\n".join(f"r{i},{i * 7 % 13}" for i in range(50))
    model.enqueue(code_reply(fmt, "import pandas as pd\ndf = pd.read_csv('sales.csv', names=['id', 'v'])\nprint('total', df.v.sum())"),
                  answer_reply(fmt, lambda obs, body: "The total is " + re.search(r"total (\d+)", obs).group(1) + "."))
    events = await ask(service, "What is the total of v?", fmt, files=(("sales.csv", rows.encode()),))
    expected = sum(i * 7 % 13 for i in range(50))
    kinds = [e.type for e in events]
    assert kinds[0] == ("code" if fmt == "tools" else "text_delta") and "code" in kinds and "output" in kinds and "execution" in kinds
    assert kinds[-2:] == ["usage", "answer"] and events[-1].text == f"The total is {expected}."
    assert events[-1].finish_reason == "stop" and events[-2].usage.completion_tokens > 0
    assert "sales.csv" in prompt_text(model.history[0])  # the upload was announced
    if fmt == "react":
        assert "[Upload file sales.csv]" in model.history[0]["prompt"]
        assert model.paths[0].endswith("/completions") and "Observation:" in model.history[0]["stop"]
        assert model.history[1]["prompt"].rstrip().endswith("Thought:")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_plot_png_path_reaches_the_model(model: ScriptedModel, service: ConversationService, fmt: str) -> None:
    model.enqueue(code_reply(fmt, "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.show()"),
                  answer_reply(fmt, lambda obs, body: "Here is the chart: " + re.search(r"!\[[^]]*\]\([^)]+\)", obs).group(0)))
    events = await ask(service, "Plot a and b", fmt)
    execution = next(e.execution for e in events if e.type == "execution")
    path = execution.images[0].path
    assert path.endswith(".png") and path in prompt_text(model.history[1])
    assert events[-1].type == "answer" and path in events[-1].text
    ws = await service.workspace(KEY)
    assert ws is not None and ws.read(path).startswith(b"\x89PNG")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_bug_gets_its_traceback_back_and_the_fix_runs(
        model: ScriptedModel, service: ConversationService, fmt: str) -> None:
    model.enqueue(code_reply(fmt, "print(totl)"),
                  lambda body: code_reply(fmt, "total = 6 * 7\nprint(total)") if "NameError" in last_observation(body)
                  else "Final Answer: no traceback seen",
                  answer_reply(fmt, lambda obs, body: f"It is {obs.strip()}"))
    events = await ask(service, "compute", fmt)
    statuses = [e.execution.status.value for e in events if e.type == "execution"]
    assert statuses == ["error", "ok"]
    assert "name 'totl' is not defined" in prompt_text(model.history[1])
    assert events[-1].text == "It is 42"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_state_persists_across_turns_and_the_conversation_saves_and_loads(
        model: ScriptedModel, service: ConversationService, fmt: str) -> None:
    model.enqueue(code_reply(fmt, "secret = 1234\nopen('kept.txt', 'w').write('file kept')"),
                  answer_reply(fmt, lambda o, b: "stored"),
                  code_reply(fmt, "print(secret + 1)"), answer_reply(fmt, lambda o, b: f"value {o}"))
    first = await ask(service, "store a number", fmt)
    second = await ask(service, "add one", fmt)
    assert first[-1].text == "stored" and second[-1].text == "value 1235"
    if fmt == "react":  # the second turn's prompt carries the first turn as history
        assert "store a number" in model.history[2]["prompt"]
    saved = json.loads(json.dumps(await service.save(KEY)))
    loaded = await service.load("copy", SOURCE, saved)
    assert [c.code for c in loaded.conversation.cells] == [
        "secret = 1234\nopen('kept.txt', 'w').write('file kept')", "print(secret + 1)"]
    assert loaded.conversation.messages == service.get(KEY).conversation.messages
    ws = await service.workspace("copy")
    assert ws is not None and ws.read("kept.txt") == b"file kept"  # files come back, in a new session
    assert loaded.conversation.session_id != service.get(KEY).conversation.session_id
    nb = loaded.conversation.to_notebook()
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells[1].outputs[0]["text"] == "1235\n"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_timeout_is_reported_to_the_model(model: ScriptedModel, service: ConversationService, fmt: str) -> None:
    model.enqueue(code_reply(fmt, "import time\nwhile True:\n    time.sleep(0.1)"),
                  answer_reply(fmt, lambda o, b: "timed out" if "timed out after 1.5 s" in o else f"no: {o}"))
    events = await ask(service, "loop", fmt, execution_timeout=1.5)
    assert next(e.execution for e in events if e.type == "execution").status.value == "timeout"
    assert events[-1].text == "timed out"


async def test_answer_without_code_is_the_answer(model: ScriptedModel, service: ConversationService) -> None:
    model.enqueue("Paris is the capital of France.")
    events = await ask(service, "capital of France?", "fenced")
    assert [e.type for e in events if e.type not in ("text_delta", "usage")] == ["answer"]
    assert events[-1].text == "Paris is the capital of France."


async def test_an_answer_cut_at_the_token_limit_says_so(model: ScriptedModel, service: ConversationService) -> None:
    model.enqueue(Truncated("The first half of a long answer that never"))
    events = await ask(service, "explain everything", "fenced")
    assert events[-1].type == "answer" and events[-1].finish_reason == "length"


async def test_code_cut_at_the_token_limit_is_not_run(model: ScriptedModel, service: ConversationService) -> None:
    model.enqueue(Truncated("```python\nfor i in range(3):\n    print("), "Sorry, I will be shorter.")
    events = await ask(service, "go", "fenced")
    assert not any(e.type == "code" for e in events)
    assert "cut at the 1024-token limit" in prompt_text(model.history[1])
    assert events[-1].type == "answer"


async def test_react_without_the_action_line_still_runs_the_code(model: ScriptedModel,
                                                                  service: ConversationService) -> None:
    """A model not trained on ReAct writes a fenced block and no `Action:` line."""
    model.enqueue("I will compute it.\n```python\nprint(6 * 7)\n```\n",
                  "Thought: I now know the final answer\nFinal Answer: 42")
    events = await ask(service, "six times seven?", "react")
    assert [e.code for e in events if e.type == "code"] == ["print(6 * 7)"]
    assert "Observation: 42" in model.history[1]["prompt"]
    assert events[-1].text == "42"


async def test_usage_is_reported_when_a_turn_ends_without_an_answer(model: ScriptedModel,
                                                                    service: ConversationService) -> None:
    model.enqueue(*[code_reply("fenced", f"print({i})") for i in range(3)])
    events = await ask(service, "loop forever", "fenced", max_executions=2)
    assert sum(e.type == "execution" for e in events) == 2
    assert [e.type for e in events[-2:]] == ["usage", "error"] and "max_executions" in events[-1].text
    assert events[-2].usage.prompt_tokens > 0 and events[-2].usage.completion_tokens >= 3


async def test_code_in_another_language_gets_a_clear_message(model: ScriptedModel, service: ConversationService) -> None:
    model.enqueue("```bash\nls -la\n```", code_reply("fenced", "import os\nprint(sorted(os.listdir('.')))"),
                  answer_reply("fenced", lambda o, b: o))
    events = await ask(service, "list files", "fenced", files=(("a.txt", b"x"),))
    assert "sandbox runs Python only" in prompt_text(model.history[1]) and "```bash" in prompt_text(model.history[1])
    assert events[-1].type == "answer" and "a.txt" in events[-1].text


async def test_uploads_are_announced_once_with_the_next_question(model: ScriptedModel,
                                                                 service: ConversationService) -> None:
    model.enqueue("Noted.", "Still noted.")
    await ask(service, "what did I upload?", "fenced", files=(("early.csv", b"a,b\n1,2\n"),))
    await ask(service, "and now?", "fenced")
    assert "early.csv" in prompt_text(model.history[0])
    assert prompt_text(model.history[1]).count("early.csv") == 1  # not announced a second time
    assert service.get(KEY).conversation.files == ["early.csv"]


async def test_malformed_tool_call_json_is_explained_to_the_model(model: ScriptedModel, service: ConversationService) -> None:
    model.enqueue(ToolCalls([("python", '{"code": "print(1)"')]),  # unterminated JSON
                  ToolCalls([("python", json.dumps({"code": "print(2)"}))]),
                  answer_reply("tools", lambda o, b: o))
    events = await ask(service, "go", "tools")
    tool_msgs = [m for m in model.history[1]["messages"] if m["role"] == "tool"]
    assert "not valid JSON" in tool_msgs[0]["content"]
    assert events[-1].text == "2"


async def test_unreachable_endpoint_is_a_clear_error(local_manager: SessionManager) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    svc = ConversationService(local_manager, OpenAILLM(model="m", base_url=f"http://127.0.0.1:{port}/v1",
                                                        retries=1, backoff=0.01))
    events = await ask(svc, "hi", "fenced")
    assert events[-1].type == "error" and "cannot reach the model server" in events[-1].text
    assert "Traceback" not in events[-1].text
    await svc.close(KEY)


async def test_one_turn_at_a_time_and_stop_ends_it(model: ScriptedModel, service: ConversationService) -> None:
    model.enqueue(Slow("I am thinking about this for a long while. " * 20, delay=0.05))
    service.open(KEY, SOURCE, fmt="fenced")
    turn = await service.turn(KEY, SOURCE, "think")
    events = turn.events()
    first = await anext(events)  # the turn runs: the model has begun
    assert first.type == "text_delta"
    with pytest.raises(TurnBusy, match="still answering"):
        await service.turn(KEY, SOURCE, "and this?")
    assert service.stop_turn(KEY)
    rest = [e async for e in events]
    assert rest[-1].type == "error" and turn.done
    assert not service.stop_turn(KEY)
    model.enqueue("Now I answer.")
    assert (await ask(service, "again", "fenced"))[-1].text == "Now I answer."


async def test_observers_see_every_event_and_turn(model: ScriptedModel, service: ConversationService) -> None:
    seen: list[tuple[str, str]] = []

    class Recorder:
        def observe_event(self, event: Event, source: str) -> None:
            seen.append((source, event.type))

        def observe_turn(self, outcome: str, seconds: float, source: str) -> None:
            seen.append((source, f"turn:{outcome}"))

    service.observers.append(Recorder())
    model.enqueue(code_reply("fenced", "print(1)"), "done")
    await ask(service, "go", "fenced")
    kinds = [k for _, k in seen]
    assert {s for s, _ in seen} == {SOURCE}
    assert "execution" in kinds and kinds[-3:] == ["usage", "answer", "turn:answer"]


async def test_a_reaped_session_is_replaced_and_the_person_is_told(model: ScriptedModel,
                                                                   service: ConversationService) -> None:
    model.enqueue(code_reply("fenced", "x = 1"), "stored", code_reply("fenced", "print('x' in globals())"),
                  answer_reply("fenced", lambda o, b: o))
    await ask(service, "store", "fenced")
    old = service.get(KEY).conversation.session_id
    await service.manager.close(old)  # as the idle reaper does
    events = await ask(service, "is it there?", "fenced")
    assert events[0].type == "notice" and "previous session was closed" in events[0].text
    assert events[-1].text == "False" and service.get(KEY).conversation.session_id != old


async def test_the_service_forgets_idle_conversations_without_a_session(local_manager: SessionManager) -> None:
    svc = ConversationService(local_manager, idle_ttl_s=0.5)
    svc.open("idle", SOURCE)
    sweeper = asyncio.ensure_future(svc._sweep())
    try:
        for _ in range(40):
            if svc.get("idle") is None:
                break
            await asyncio.sleep(0.1)
        assert svc.get("idle") is None
    finally:
        sweeper.cancel()


def test_the_notebook_of_a_saved_conversation_is_valid(tmp_path: Path) -> None:
    from interpreter import Conversation

    conv = Conversation(format="fenced")
    conv.timeline.append(("question", "q"))
    conv.save(tmp_path / "c.json")
    loaded, _ = Conversation.load(tmp_path / "c.json")
    nbformat.validate(loaded.to_notebook())


async def test_callers_at_once_share_one_new_session(service: ConversationService) -> None:
    chat = service.open("together", SOURCE)
    got = await asyncio.gather(*(service.session(chat) for _ in range(3)))
    assert len({session.id for session, _ in got}) == 1
    assert len([s for s in service.manager.list() if s.id == got[0][0].id]) == 1
    await service.close("together")


async def test_a_long_output_reaches_the_model_clipped_once_with_one_marker(model: ScriptedModel,
                                                                           service: ConversationService) -> None:
    model.enqueue(code_reply("fenced", "print('a' * 3000 + 'MIDDLE' + 'z' * 3000)"),
                  answer_reply("fenced", lambda o, b: o))
    events = await ask(service, "print a lot", "fenced", observation_tokens=100)
    seen = events[-1].text
    assert re.fullmatch(r"a+\n\[\.\.\. \d+ characters truncated \.\.\.\]\nz+", seen), seen
    assert service.llm.count_tokens(seen) <= 100
