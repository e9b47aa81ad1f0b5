"""The OpenAI-compatible backend against a real HTTP server on loopback (scripted replies)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from bench.scripted_model import HttpError, ScriptedModel, Slow, ToolCalls
from interpreter import ConversationService, ModelCancelled, ModelError
from interpreter.llm.base import GenerationRequest, Message
from interpreter.llm.openai import OpenAILLM
from sandbox import SessionManager


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    m = ScriptedModel().start()
    yield m
    m.stop()


def llm_for(model: ScriptedModel, **kw) -> OpenAILLM:
    return OpenAILLM(model="scripted", base_url=model.url, api_key="k-123", backoff=0.01, **kw)


async def test_chat_streams_in_pieces_with_usage(model: ScriptedModel) -> None:
    model.enqueue("The quick brown fox jumps over the lazy dog.")
    llm = llm_for(model)
    chunks = [c async for c in llm.stream(GenerationRequest(messages=[Message("user", "hi")], temperature=0.3, seed=7))]
    assert len([c for c in chunks if c.text]) > 3
    assert "".join(c.text for c in chunks) == "The quick brown fox jumps over the lazy dog."
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens > 0
    body = model.history[0]
    assert body["stream"] is True and body["temperature"] == 0.3 and body["seed"] == 7 and body["model"] == "scripted"
    assert model.paths[0] == "/v1/chat/completions"
    await llm.close()


async def test_raw_prompt_uses_completions_and_stop_words_hold_client_side(model: ScriptedModel) -> None:
    # five stop words: the server gets the first four, the fifth is enforced here
    model.enqueue("alpha beta gamma STOPHERE delta")
    llm = llm_for(model)
    req = GenerationRequest(prompt="Say:", stop=["w1", "w2", "w3", "w4", "STOPHERE"])
    out = await llm.complete(req)
    assert model.paths[0] == "/v1/completions" and model.history[0]["prompt"] == "Say:"
    assert len(model.history[0]["stop"]) == 4
    assert out.text == "alpha beta gamma " and out.finish_reason == "stop"
    await llm.close()


def test_streamed_text_never_shows_a_stop_word_or_the_start_of_one() -> None:
    """The one rule every backend streams by (``StopCutter``): a tail that could begin a stop word
    waits for the next piece; the text ends where a stop word begins, even one split over pieces."""
    from interpreter.llm.base import StopCutter

    text = StopCutter(["Observation:", "\n\n\n"])
    shown = [text.add(p) for p in ("The answer", " is 4.\nObs", "erv", "ation: 12", " more")]
    assert shown == ["The answer", " is 4.\n", "", "", ""] and text.stopped and text.rest() == ""
    assert text.shown == "The answer is 4.\n"
    unstopped = StopCutter(["Observation:"])
    assert [unstopped.add(p) for p in ("a\nObs", "olete")] == ["a\n", "Obsolete"]
    assert unstopped.add("\nObserv") == "\n" and unstopped.rest() == "Observ" and not unstopped.stopped


async def test_retries_429_and_5xx_then_succeeds(model: ScriptedModel) -> None:
    model.enqueue(HttpError(429), HttpError(503), "ok now")
    llm = llm_for(model)
    out = await llm.complete(GenerationRequest(messages=[Message("user", "x")]))
    assert out.text == "ok now" and len(model.history) == 3
    await llm.close()


async def test_client_errors_are_not_retried_and_say_what_the_server_said(model: ScriptedModel) -> None:
    model.enqueue(HttpError(400, '{"error": {"message": "model nope does not exist"}}'))
    llm = llm_for(model)
    with pytest.raises(ModelError, match="400.*model nope does not exist"):
        await llm.complete(GenerationRequest(messages=[Message("user", "x")]))
    assert len(model.history) == 1
    await llm.close()


async def test_cancel_stops_the_stream(model: ScriptedModel) -> None:
    model.enqueue(Slow("word " * 200, delay=0.05))
    llm = llm_for(model)
    cancel = asyncio.Event()
    got = []
    t0 = time.monotonic()
    with pytest.raises(ModelCancelled):
        async for chunk in llm.stream(GenerationRequest(messages=[Message("user", "x")]), cancel):
            got.append(chunk.text)
            cancel.set()
    assert time.monotonic() - t0 < 3 and len(got) < 5
    await llm.close()


async def test_tool_call_fragments_are_assembled(model: ScriptedModel) -> None:
    model.enqueue(ToolCalls([("python", json.dumps({"code": "print(1)"})), ("python", json.dumps({"code": "2"}))]))
    llm = llm_for(model)
    out = await llm.complete(GenerationRequest(messages=[Message("user", "x")], tools=[{"type": "function"}]))
    assert [json.loads(c.arguments)["code"] for c in out.tool_calls] == ["print(1)", "2"]
    assert model.history[0]["tools"] == [{"type": "function"}]
    await llm.close()


async def test_plots_go_to_a_vision_model_as_image_parts(model: ScriptedModel, docker_manager: SessionManager) -> None:
    service = ConversationService(docker_manager, llm_for(model, supports_images=True))
    service.open("vision", "test", fmt="fenced")
    model.enqueue("```python\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\n```", "A rising line.")
    events = [e async for e in (await service.turn("vision", "test", "plot")).events()]
    assert events[-1].text == "A rising line."
    parts = model.history[1]["messages"][-1]["content"]
    assert parts[0]["type"] == "text" and "fig-" in parts[0]["text"]
    assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    await service.close("vision")
    await service.llm.close()
