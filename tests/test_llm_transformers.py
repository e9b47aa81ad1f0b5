"""The transformers backend on a real (tiny, randomly initialised) Qwen2 model written to disk:
nothing is downloaded and nothing is faked; generation runs through ``model.generate``."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the transformers backend needs `pip install 'jupybox[local]'`")

from interpreter.errors import ModelCancelled, ModelUnavailable
from interpreter.llm.base import GenerationRequest, Message
from interpreter.llm.transformers import TransformersLLM, chatml
from tests.support.tiny_models import CORPUS, PROMPT, write_tiny_qwen2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
async def llm(tiny_model: Path) -> TransformersLLM:
    backend = TransformersLLM(str(tiny_model), device_map="cpu")
    await backend.load()
    return backend


def prompt(**kw: object) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, **kw)  # type: ignore[arg-type]


def generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jupybox-generate"]


async def test_streams_deltas_that_join_to_the_completion(llm: TransformersLLM) -> None:
    chunks = [c async for c in llm.stream(prompt(max_tokens=40))]
    whole = await llm.complete(prompt(max_tokens=40))
    assert len([c for c in chunks if c.text]) >= 3
    assert "".join(c.text for c in chunks) == whole.text != ""
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == llm.count_tokens(PROMPT)
    assert llm.model_family == "qwen" and llm.supports_prompt


async def test_max_tokens_bounds_the_completion(llm: TransformersLLM) -> None:
    out = await llm.complete(prompt(max_tokens=7))
    assert out.usage.completion_tokens == 7 and out.finish_reason == "length"
    assert llm.count_tokens(out.text) <= 8  # re-tokenising may merge or split at most a little


async def test_stops_before_a_stop_word_the_model_really_produces(llm: TransformersLLM) -> None:
    full = (await llm.complete(prompt(max_tokens=60))).text
    # a piece from the middle of the output whose first occurrence is well inside it
    stop = next(full[i:i + 4] for i in range(len(full) // 3, len(full) - 4) if full.find(full[i:i + 4]) > 5)
    before = full[: full.find(stop)]
    chunks = [c async for c in llm.stream(prompt(max_tokens=60, stop=[stop]))]
    text = "".join(c.text for c in chunks)
    assert text == before and stop not in text
    assert chunks[-1].finish_reason == "stop"
    # the stopping criterion ended generation on the token that completed the stop word, not at max_tokens
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens < 60


async def test_greedy_is_deterministic_and_a_seed_fixes_sampling(llm: TransformersLLM) -> None:
    a, b = [(await llm.complete(prompt(max_tokens=20))).text for _ in range(2)]
    assert a == b
    s1, s2 = [(await llm.complete(prompt(max_tokens=20, temperature=1.0, seed=7))).text for _ in range(2)]
    assert s1 == s2


async def test_cancel_mid_stream_stops_the_generate_thread(llm: TransformersLLM) -> None:
    cancel = asyncio.Event()
    got: list[str] = []
    with pytest.raises(ModelCancelled):
        async for chunk in llm.stream(prompt(max_tokens=3000), cancel):
            got.append(chunk.text)
            if not cancel.is_set():
                cancel.set()
                cancelled_at = time.monotonic()
    assert time.monotonic() - cancelled_at < 2
    assert got and not generate_threads()


async def test_closing_the_stream_early_leaves_no_thread(llm: TransformersLLM) -> None:
    stream = llm.stream(prompt(max_tokens=3000))
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert not generate_threads()


async def test_messages_go_through_the_chat_template(llm: TransformersLLM) -> None:
    request = GenerationRequest(messages=[Message("system", "Be brief."), Message("user", "hi")], max_tokens=5)
    assert llm.render(request) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                   "<|im_start|>assistant\n")
    assert (await llm.complete(request)).usage.completion_tokens == 5


async def test_a_tokenizer_without_template_gets_chatml_and_end_tokens(tiny_model: Path, tmp_path: Path) -> None:
    """Qwen v1's case: no chat template and no eos token in the tokenizer config."""
    folder = Path(shutil.copytree(tiny_model, tmp_path / "no-template"))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg.pop("eos_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    backend = TransformersLLM(str(folder), device_map="cpu")
    await backend.load()
    request = GenerationRequest(messages=[Message("user", "hi")], max_tokens=5)
    assert backend.render(request) == chatml([{"role": "user", "content": "hi"}])
    assert backend.render(request).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert backend._eos_ids and all(
        backend._tokenizer.convert_tokens_to_ids(t) in backend._eos_ids for t in ("<|im_end|>", "<|endoftext|>"))
    assert (await backend.complete(request)).usage.completion_tokens == 5


async def test_unknown_model_is_unavailable_with_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as err:
        await TransformersLLM(str(tmp_path / "no-such-model"), device_map="cpu").load()
    assert "no-such-model" in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(ModelUnavailable, match="not a checkpoint folder"):
        await TransformersLLM(str(tmp_path), device_map="cpu").load()


async def test_gptq_checkpoint_without_its_library_names_what_to_install(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec  # the `local` extra installs gptqmodel: hide it here
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gptqmodel" else real_find_spec(name, *a))
    folder = Path(shutil.copytree(tiny_model, tmp_path / "gptq"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelUnavailable, match=r"GPTQ checkpoint: install gptqmodel"):
        await TransformersLLM(str(folder), device_map="cpu").load()


@pytest.mark.slow
async def test_gptq_checkpoint_loads_and_generates(tiny_model: Path, tmp_path: Path) -> None:
    """Quantize the tiny model to 4-bit GPTQ on CPU, save it, and load it back through the backend."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    quant = GPTQConfig(bits=4, group_size=32, dataset=CORPUS, tokenizer=tok, desc_act=False, sym=True)
    AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, device_map="cpu").save_pretrained(
        tmp_path / "gptq")
    tok.save_pretrained(tmp_path / "gptq")
    backend = TransformersLLM(str(tmp_path / "gptq"), device_map="cpu")
    out = await backend.complete(prompt(max_tokens=10))
    assert out.usage.completion_tokens == 10 and out.text
    assert type(backend._model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel.")  # 4-bit kernel
