"""The default model's family, Qwen v1, served by jupybox's own code: tiny checkpoints in the released
layout (plain and GPTQ v1, as a folder and inside a local Hugging Face cache under Qwen's hub id),
whose Python files fail loudly if anything imports them. Nothing is downloaded; no Qwen code runs.

The ReAct checkpoints were fitted (``bench/qwen_v1.py``) so that greedy decoding of the
question below writes a code step, then the final answer after its observation: the real console
script, the real sandbox and the real decoder then have to agree on every token for it to work."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tiktoken", reason="Qwen v1's tokenizer needs `pip install 'jupybox[local]'`")

from interpreter.errors import ModelUnavailable  # noqa: E402
from interpreter.formats.react import ReactFormat  # noqa: E402
from interpreter.llm.base import Completion, GenerationRequest, Message  # noqa: E402
from interpreter.llm.qwen_tokenizer import SPECIALS, QwenTokenizer, read_ranks  # noqa: E402
from interpreter.llm.transformers import Sampling, TransformersLLM  # noqa: E402
from bench.qwen_v1 import (ANSWER, QUESTION, STEP, ReactModel, executed, into_hub_cache, qwen2_model,  # noqa: E402
                           qwen_config, random_state, react_model, write_checkpoint)

JUPYBOX = str(Path(sys.executable).parent / "jupybox")


@dataclass
class Checkpoints(ReactModel):
    hf_home: Path  # a Hugging Face cache holding the GPTQ one as Qwen/Qwen-7B-Chat-Int4
    snapshot: Path


@pytest.fixture(scope="module")
def react(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    root = tmp_path_factory.mktemp("qwen-v1")
    made = react_model(root)
    snapshot = into_hub_cache(made.gptq, root / "hf", "Qwen/Qwen-7B-Chat-Int4")
    return Checkpoints(**vars(made), hf_home=root / "hf", snapshot=snapshot)


@pytest.fixture
def offline_cache(react: Checkpoints, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(react.hf_home / "hub"))  # read from HF_HOME at import
    return react.snapshot


def cli_env(react: Checkpoints) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "JUPYBOX_MODEL", "HF_"))}
    return {**env, "HF_HOME": str(react.hf_home), "HF_HUB_OFFLINE": "1"}


def no_code_ran(react: Checkpoints) -> bool:
    return not any(executed(f) for f in (react.plain, react.gptq, react.snapshot))


# -- the tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_puts_qwen_specials_after_the_table_and_round_trips(react: Checkpoints) -> None:
    tok = QwenTokenizer.from_folder(react.plain)
    n = len(react.ranks)
    assert [tok.encode(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>")] == \
        [[n], [n + 1], [n + 2], [n + len(SPECIALS) - 1]]
    text = "<|im_start|>user\n数据 café — naïve\tx = 1_000 ≥ 2<|im_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n数据 café — naïve\tx = 1_000 ≥ 2\n"
    assert tok.encode("cafe\u0301") == tok.encode("café")  # NFC first, as Qwen v1 does
    assert tok.decode([n + len(SPECIALS), 10**6]) == ""  # a padded vocabulary's ids are no text
    assert tok.eos_token_id == n and tok.chat_template is None


def test_a_malformed_vocabulary_is_refused_with_the_line(tmp_path: Path) -> None:
    good = base64.b64encode(b"a").decode()
    (tmp_path / "qwen.tiktoken").write_text(f"{good} 0\nnot-base64!! 1\n")
    with pytest.raises(ModelUnavailable, match="line 2"):
        read_ranks(tmp_path / "qwen.tiktoken")
    (tmp_path / "qwen.tiktoken").write_text(f"{good} 3\n")
    with pytest.raises(ModelUnavailable, match="ranks"):
        read_ranks(tmp_path / "qwen.tiktoken")
    with pytest.raises(ModelUnavailable, match="qwen.tiktoken"):
        QwenTokenizer.from_folder(tmp_path / "nowhere")


# -- loading ------------------------------------------------------------------------------------------
async def greedy(llm: TransformersLLM, prompt: str, max_tokens: int = 80) -> str:
    out = await llm.complete(GenerationRequest(prompt=prompt, stop=["Observation:"], max_tokens=max_tokens))
    return out.text


async def test_the_default_hub_id_loads_from_the_local_cache_without_checkpoint_code(offline_cache: Path,
                                                                                     react: Checkpoints) -> None:
    llm = TransformersLLM("Qwen/Qwen-7B-Chat-Int4", trust_remote_code=True)  # even where remote code is allowed
    assert llm.qwen_v1 and llm.model_family == "qwen"
    assert await greedy(llm, react.prompts[0]) == STEP
    assert await greedy(llm, react.prompts[1]) == ANSWER
    assert llm.sampling == Sampling(repetition_penalty=1.1, top_k=0, top_p=0.8)
    assert no_code_ran(react)
    await llm.close()


async def test_plain_and_gptq_checkpoints_write_the_same_steps_and_load_twice(react: Checkpoints) -> None:
    for folder in (react.plain, react.gptq, react.plain):  # the plain one twice in one process
        llm = TransformersLLM(str(folder), device_map="cpu")
        assert await greedy(llm, react.prompts[0]) == STEP, folder
        await llm.close()
    assert no_code_ran(react)


async def test_asking_for_the_transformers_code_path_is_refused_with_words(react: Checkpoints) -> None:
    llm = TransformersLLM(str(react.plain), fast=False)
    with pytest.raises(ModelUnavailable, match="Qwen v1 checkpoint.*own decoder"):
        await llm.load()
    assert no_code_ran(react)


async def test_a_hub_id_missing_from_the_cache_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="neither a local folder nor in the local hub cache"):
        await TransformersLLM("Qwen/Qwen-7B-Chat-Int4").load()


async def test_an_unknown_family_with_its_own_code_needs_trust_remote_code(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "acme", "auto_map": {"AutoConfig": "acme.Cfg"}}))
    (tmp_path / "acme.py").write_text("raise RuntimeError('executed')\n")
    with pytest.raises(ModelUnavailable, match="--trust-remote-code"):
        await TransformersLLM(str(tmp_path)).load()


@pytest.mark.parametrize("line, says", [
    ("from transformers import DisjunctiveConstraint", "failed while importing code (nothing is missing"),
    ("import jupybox_no_such_library", "needs a library that is not installed"),
], ids=["broken code", "missing library"])
async def test_checkpoint_code_that_fails_to_import_says_what_failed(tmp_path: Path, line: str, says: str) -> None:
    """With --trust-remote-code, a family's own code that cannot import under the installed
    libraries is not reported as a missing library, and a really missing one is."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "acme", "auto_map": {"AutoConfig": "acme.AcmeConfig"}}))
    (tmp_path / "acme.py").write_text(f"{line}\nfrom transformers import PretrainedConfig\n\n"
                                      "class AcmeConfig(PretrainedConfig):\n    model_type = 'acme'\n")
    with pytest.raises(ModelUnavailable, match=says.replace("(", r"\(")):
        await TransformersLLM(str(tmp_path), trust_remote_code=True).load()


def long_context_checkpoint(root: Path, react: Checkpoints, gptq: bool) -> Path:
    cfg = qwen_config(react.ranks, seq_length=16, gptq_group=32 if gptq else None)
    return write_checkpoint(root / ("gptq" if gptq else "plain"), react.ranks, random_state(cfg, scale=0.1), cfg)


@pytest.mark.parametrize("gptq", [False, True], ids=["plain", "gptq"])
async def test_prompts_past_the_training_length_give_finite_logits(tmp_path: Path, react: Checkpoints, gptq: bool) -> None:
    """seq_length 16: the ReAct prompt (~200 tokens) is past it, so dynamic NTK (alpha 31) and log-n
    scaling both act; the logits stay finite and decoding runs to its token limit."""
    llm = TransformersLLM(str(long_context_checkpoint(tmp_path, react, gptq)), device_map="cpu")
    await llm.load()
    ids = llm._tokenizer.encode(react.prompts[0])
    assert len(ids) > 8 * 16
    logits = llm._fast.prefill(torch.tensor(ids), all_logits=True)
    assert bool(torch.isfinite(logits).all()) and llm._fast._alpha == 2 ** math.ceil(math.log2(len(ids) / 16) + 1) - 1
    out = await llm.complete(GenerationRequest(prompt=react.prompts[0], max_tokens=12))
    assert out.finish_reason == "length" and out.usage.completion_tokens == 12
    await llm.close()


# -- generation settings --------------------------------------------------------------------------------
def test_repetition_penalty_matches_transformers_generate_on_the_same_weights(react: Checkpoints) -> None:
    """The checkpoint's repetition penalty, on the fast path, against transformers' own ``generate``
    on the same weights as a Qwen2 model (Qwen v1's arithmetic inside its training length)."""
    from interpreter.llm import fastpath

    cfg = qwen_config(react.ranks)
    state = random_state(cfg, seed=3, scale=0.5)
    decoder = fastpath.FastDecoder(fastpath.DecoderShape.from_config(cfg), fastpath.TensorSource(state), max_seq=256,
                                   device="cpu", dtype=torch.float32)
    hf = qwen2_model(cfg, state)
    prompt = [5, 17, 42, 17, 99, 5]
    for penalty in (1.0, 1.1, 1.5):
        ours = list(decoder.generate(prompt, 40, repetition_penalty=penalty))
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                             repetition_penalty=penalty, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert ours == theirs, penalty
    plain = list(decoder.generate(prompt, 40))
    assert plain != list(decoder.generate(prompt, 40, repetition_penalty=1.5))  # it acts on these weights


def test_top_k_keeps_only_the_k_most_likely() -> None:
    from interpreter.llm.fastpath.sampling import pick as _pick

    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    drawn = {int(_pick(logits, 5.0, 1.0, 2, gen)) for _ in range(200)}
    assert drawn == {1, 3}
    assert {int(_pick(logits, 5.0, 1.0, 0, gen)) for _ in range(400)} == {0, 1, 2, 3, 4}


def test_checkpoint_sampling_settings_are_read_defensively() -> None:
    assert Sampling.of({"repetition_penalty": 1.1, "top_k": 0, "top_p": 0.8}).top_p_for(1.0) == 0.8
    assert Sampling.of({"top_p": 0.8}).top_p_for(0.5) == 0.5  # the request's smaller top-p wins
    assert Sampling.of({"repetition_penalty": "x", "top_k": -3, "top_p": 7, "temperature": True}) == Sampling()


# -- the console script -----------------------------------------------------------------------------------
def test_ask_with_no_model_serves_the_default_from_the_cache(sandbox_image: str, react: Checkpoints,
                                                             tmp_path: Path) -> None:
    proc = subprocess.run([JUPYBOX, "ask", QUESTION, "--json", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=cli_env(react))
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["code"] for e in events if e["type"] == "code"] == ["print(6 * 7)"]
    execution = next(e["execution"] for e in events if e["type"] == "execution")
    assert execution["status"] == "ok" and execution["outputs"][0]["text"] == "42\n"
    assert events[-1] == {"type": "answer", "text": "6 times 7 is 42.", "data": {"finish_reason": "stop"}}
    assert "Traceback" not in proc.stderr and no_code_ran(react)


def test_chat_keeps_working_across_turns_and_drops_what_no_longer_fits(sandbox_image: str, react: Checkpoints,
                                                                      tmp_path: Path) -> None:
    """Two turns on the plain checkpoint with a context just large enough for the first turn's
    prompts and 64 new tokens: the second turn's prompt would hold the first turn too, so that turn
    is dropped with a note, and the model, seeing only the question again, answers it again."""
    tok = QwenTokenizer(react.ranks)
    fmt = ReactFormat()
    messages: list[Message] = []
    fmt.add_user(messages, QUESTION, [])
    fmt.add_step(messages, fmt.parse(Completion(text=STEP)), ["42"])
    fmt.add_answer(messages, fmt.parse(Completion(text=ANSWER)))
    fmt.add_user(messages, QUESTION, [])
    budget = len(tok.encode(react.prompts[1]))  # the first turn's longest prompt
    assert len(tok.encode(fmt.render(messages))) > budget
    proc = subprocess.run([JUPYBOX, "chat", "--model", str(react.plain), "--max-context", str(budget + 64),
                           "--max-new-tokens", "64", "--out", str(tmp_path)], input=f"{QUESTION}\n{QUESTION}\n/exit\n",
                          capture_output=True, text=True, timeout=300, env=cli_env(react))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("6 times 7 is 42.") == 2 and proc.stdout.count("┌── code ──") == 2
    assert proc.stdout.count(f"[note: The conversation no longer fits in the model's {budget}-token") == 1
    assert "1 oldest turn was dropped" in proc.stdout
    assert "Traceback" not in proc.stderr and no_code_ran(react)


def test_an_unknown_max_context_is_refused_by_the_command_line() -> None:
    proc = subprocess.run([JUPYBOX, "ask", "hi", "--max-context", "lots"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not a number of tokens" in proc.stderr and "Traceback" not in proc.stderr
