"""The OpenAI-compatible endpoint: jupybox as "a model" for any OpenAI client. A real server on
loopback (on the local backend: the protocol is what is tested), the scripted model behind the
interpreter; the clients are httpx and the official ``openai`` package."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from bench.scripted_model import ScriptedModel, Truncated, last_observation, prompt_text
from tests.support.replies import code_reply
from tests.support.server import API_TOKEN as KEY
from tests.support.server import AppServer
from tests.support.sse import sse_events

SQUARES = "print(sum(i * i for i in range(12)))"


@pytest.fixture
def server(api_server: AppServer) -> AppServer:
    """The run's server on the local backend: what is tested here is the protocol, not the sandbox."""
    return api_server


@pytest.fixture
def client(server: AppServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def oai(server: AppServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=60, max_retries=0)


def script_squares(model: ScriptedModel) -> None:
    model.enqueue(code_reply(SQUARES), lambda body: f"The sum is {last_observation(body)}.")


def expected_content() -> str:
    """The model's prose, the cell, its output, the answer (see ``code_reply``)."""
    return f"Let me compute that.\n\n```python\n{SQUARES}\n```\n\n```\n506\n```\n\nThe sum is 506."


def test_non_streaming_completion_over_httpx(client: httpx.Client, model: ScriptedModel) -> None:
    script_squares(model)
    sessions_before = len(client.get("/api/sessions").json()["sessions"])
    r = client.post("/v1/chat/completions", json={"model": "my-model", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum of squares below 12?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "my-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected_content()}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"])
    assert "Be brief." in prompt_text(model.history[-2])  # earlier messages went along as context
    # without `user`, the session was only for this request
    assert len(client.get("/api/sessions").json()["sessions"]) == sessions_before


def test_streaming_completion_over_httpx(client: httpx.Client, model: ScriptedModel) -> None:
    script_squares(model)
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "Sum of squares below 12?"}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == expected_content()
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    # the prose arrives as the model writes it, in pieces, before the code cell
    before_code = pieces[:next(i for i, p in enumerate(pieces) if "```python" in p)]
    assert len([p for p in before_code if p]) >= 2 and "".join(before_code).startswith("Let me compute")


def test_finish_reason_and_usage_say_how_a_turn_ended(client: httpx.Client, model: ScriptedModel) -> None:
    model.enqueue(Truncated("A long answer that was cut"))
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "explain"}]}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"].endswith("[the answer was cut at the model's token limit]")
    model.enqueue(*[code_reply(f"print({i})") for i in range(7)])  # a 7th step, past the 6 a turn may run
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "loop"}]}).json()
    assert "[stopped: Stopped after 6 executions" in body["choices"][0]["message"]["content"]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] >= 6


def test_the_openai_client_non_streaming(oai: openai.OpenAI, model: ScriptedModel) -> None:
    script_squares(model)
    completion = oai.chat.completions.create(model="jupybox", messages=[{"role": "user", "content": "squares?"}])
    assert completion.choices[0].message.content == expected_content()
    assert completion.model == "jupybox" and completion.usage is not None and completion.usage.completion_tokens > 0
    assert [m.id for m in oai.models.list()] == ["jupybox"]


def test_the_openai_client_streaming_with_usage(oai: openai.OpenAI, model: ScriptedModel) -> None:
    script_squares(model)
    stream = oai.chat.completions.create(model="jupybox", messages=[{"role": "user", "content": "squares?"}],
                                         stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == expected_content()
    assert usage is not None and usage.prompt_tokens > 0


def test_the_user_field_keeps_one_session_across_requests(oai: openai.OpenAI, client: httpx.Client,
                                                          model: ScriptedModel) -> None:
    model.enqueue(code_reply("secret = 1234"), "Stored.",
                  code_reply("print(secret + 1)"), lambda body: f"It is {last_observation(body)}.")
    history = [{"role": "user", "content": "remember 1234"}]
    first = oai.chat.completions.create(model="jupybox", messages=history, user="alice")
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "add one"}]
    second = oai.chat.completions.create(model="jupybox", messages=history, user="alice")
    assert second.choices[0].message.content.endswith("It is 1235.")
    # the kept conversation already had the first turn: the question was not wrapped in context again
    assert "Earlier in this conversation" not in prompt_text(model.history[-2])
    assert any(s["has_conversation"] for s in client.get("/api/sessions").json()["sessions"])


def test_errors_come_in_the_openai_shape(server: AppServer, oai: openai.OpenAI, client: httpx.Client) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="jupybox", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="jupybox", messages=[{"role": "assistant", "content": "no question"}])
    assert "user message" in str(info.value)
    r = client.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 422 and json.dumps(r.json()).count("Traceback") == 0
