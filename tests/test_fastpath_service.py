"""Concurrent turns on one loaded local model: the transformers backend's fast path submits every
generation to the decode scheduler, so they run together. The tiny random Qwen2 checkpoint on the
CPU in fp32; through the backend itself, and through a real server on loopback with the official
``openai`` client against ``/v1``. Ordering checks only: speed is the benchmark's business."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the transformers backend needs `pip install 'jupybox[local]'`")

from interpreter import InterpreterSettings  # noqa: E402
from interpreter.errors import ModelCancelled  # noqa: E402
from interpreter.llm.base import GenerationRequest  # noqa: E402
from interpreter.llm.transformers import TransformersLLM  # noqa: E402
from tests.support.sandboxes import serve_settings  # noqa: E402
from tests.support.server import API_TOKEN, AppServer  # noqa: E402
from tests.support.tiny_models import PROMPT, write_tiny_qwen2  # noqa: E402
from ui.services import Services  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-service"))


def request(**kw: object) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, **kw)  # type: ignore[arg-type]


async def test_concurrent_generations_get_the_text_each_gets_alone(tiny_model: Path) -> None:
    """Greedy, sampled (seeded) and stopped generations at once: each one's text, finish reason and
    usage are what it gets alone, and what the ``generate`` path gives for the same request."""
    fast = TransformersLLM(str(tiny_model), device_map="cpu", fast=True, max_streams=4)
    plain = TransformersLLM(str(tiny_model), device_map="cpu", fast=False)
    greedy = await plain.complete(request(max_tokens=40))
    stop = greedy.text[len(greedy.text) // 2:len(greedy.text) // 2 + 3]
    requests = [request(max_tokens=40), request(max_tokens=40, stop=[stop]),
                request(max_tokens=25, temperature=1.0, seed=11), request(max_tokens=7)]
    alone = [await fast.complete(r) for r in requests]
    together = await asyncio.gather(*(fast.complete(r) for r in requests))
    for a, b in zip(alone, together):
        assert (a.text, a.finish_reason, a.usage) == (b.text, b.finish_reason, b.usage)
    assert together[0].text == greedy.text != "" and together[0].finish_reason == "length"
    assert together[1].text == greedy.text[:greedy.text.find(stop)] and together[1].finish_reason == "stop"
    assert together[1].usage.completion_tokens < 40
    assert together[3].usage.completion_tokens == 7 and together[3].finish_reason == "length"
    stats = fast.streams()
    assert stats is not None and stats.slots == 4 and stats.active == stats.queued == 0
    assert stats.tokens >= 2 * sum(r.usage.completion_tokens for r in together)
    assert plain.streams() is None
    await fast.close()
    await plain.close()


async def test_a_cancelled_generation_frees_its_stream_and_the_other_finishes(tiny_model: Path) -> None:
    llm = TransformersLLM(str(tiny_model), device_map="cpu", fast=True, max_streams=2)
    expected = await llm.complete(request(max_tokens=60))
    cancel = asyncio.Event()
    got: list[str] = []

    async def cancelled_after_some_text() -> None:
        async for chunk in llm.stream(request(max_tokens=2000), cancel):
            got.append(chunk.text)
            if len(got) == 3:
                cancel.set()

    other = asyncio.create_task(llm.complete(request(max_tokens=60)))
    with pytest.raises(ModelCancelled):
        await cancelled_after_some_text()
    assert (await other).text == expected.text
    stats = llm.streams()
    assert stats is not None and stats.active == 0 and stats.queued == 0
    await llm.close()


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """``jupybox serve`` on the local sandbox backend with the tiny model on the fast path."""
    llm = TransformersLLM(str(tiny_model), device_map="cpu", fast=True, max_streams=4)
    settings = serve_settings(tmp_path_factory.mktemp("fast-serve"), "fastpath-serve", local=True,
                              api_token=API_TOKEN, interpreter=InterpreterSettings(max_tokens=4000, temperature=0.0))
    with AppServer(Services(settings, llm=llm)) as app:
        yield app
    asyncio.run(llm.close())  # a model given to the server is the giver's to close


def metrics(server: AppServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"}).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("jupybox_model_") and not line.startswith("#")}


def test_two_turns_through_v1_run_together_on_the_local_model(server: AppServer) -> None:
    """The second turn's first token arrives while the first turn still writes (both are long,
    and are closed only once the second has spoken), and ``/metrics`` shows both streams."""
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_TOKEN, timeout=120, max_retries=0)
    llm = server.services.service.llm
    server.run(llm.load())  # as a first question would
    scheduler = llm._scheduler
    owners: list[str | None] = []
    submit = scheduler.submit

    def seen(request: Any) -> Any:  # the real scheduler, watched: whose requests reach it
        owners.append(request.owner)
        return submit(request)

    scheduler.submit = seen
    log: queue.Queue[tuple[str, str]] = queue.Queue()
    close = threading.Event()

    def turn(name: str, question: str, max_tokens: int) -> None:
        stream = oai.chat.completions.create(model="local", stream=True, max_tokens=max_tokens,
                                             messages=[{"role": "user", "content": question}])
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    log.put((name, "text"))
                if close.is_set():
                    break
        log.put((name, "end"))

    def next_event(who: str, what: str) -> list[tuple[str, str]]:
        seen = []
        while True:
            event = log.get(timeout=120)
            seen.append(event)
            if event == (who, what):
                return seen

    first = threading.Thread(target=turn, args=("first", "plot the data", 4000))
    first.start()
    events = next_event("first", "text")
    second = threading.Thread(target=turn, args=("second", "describe the data", 4000))
    second.start()
    events += next_event("second", "text")
    during = metrics(server)
    assert ("first", "end") not in events  # the first turn was still writing when the second one spoke
    close.set()
    first.join(120)
    second.join(120)
    while not log.empty():
        events.append(log.get())
    last_of_first = max(i for i, e in enumerate(events) if e == ("first", "text"))
    first_of_second = events.index(("second", "text"))
    assert first_of_second < last_of_first
    assert len(owners) == 2 and len(set(owners)) == 1 and owners[0]  # both the token's user's, so shared fairly
    assert during["jupybox_model_streams_active"] == 2 and during["jupybox_model_streams_max"] == 4
    assert during["jupybox_model_streams_queued"] == 0 and during["jupybox_model_generated_tokens_total"] > 0
    deadline = time.monotonic() + 60  # the closed turns' streams leave at the scheduler's next turn
    while metrics(server)["jupybox_model_streams_active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metrics(server)["jupybox_model_streams_active"] == 0


def test_max_streams_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from interpreter.errors import ModelUnavailable
    from interpreter.llm import ModelSettings
    from ui.cli import build_parser

    parser = build_parser()
    monkeypatch.setenv("JUPYBOX_MAX_STREAMS", "8")
    assert ModelSettings.from_args(parser.parse_args(["ask", "hi"])).max_streams == 8
    settings = ModelSettings.from_args(parser.parse_args(["ask", "hi", "--max-streams", "4", "--model", "/nowhere"]))
    llm = settings.create()
    assert settings.max_streams == 4 and isinstance(llm, TransformersLLM) and llm.max_streams == 4
    monkeypatch.delenv("JUPYBOX_MAX_STREAMS")
    assert TransformersLLM("/nowhere").max_streams == 16  # the default
    with pytest.raises(SystemExit):
        parser.parse_args(["ask", "hi", "--max-streams", "33"])
    monkeypatch.setenv("JUPYBOX_MAX_STREAMS", "lots")
    with pytest.raises(ModelUnavailable, match="JUPYBOX_MAX_STREAMS"):
        ModelSettings.from_env()
