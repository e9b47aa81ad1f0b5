"""The fast path on a real checkpoint: SmolLM2-135M-Instruct (Llama architecture, grouped-query
attention, tied embeddings) in float32 on the CPU gives plain ``generate``'s greedy tokens one for
one. The same check in bf16 and int4 on a GPU is ``jupybox bench model --check smollm2``."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the transformers backend needs `pip install 'jupybox[local]'`")

from interpreter.llm import fastpath  # noqa: E402

pytestmark = pytest.mark.slow


def test_fast_path_greedy_equals_generate_on_real_weights(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    n = 24
    plain = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, prompt.shape[1]:].tolist()
    decoder = fastpath.load_checkpoint(smollm2, device="cpu", dtype=torch.float32)
    assert decoder.shape.tie_embeddings and decoder.shape.n_kv_heads < decoder.shape.n_heads
    assert decoder.shape.rope_theta == model.config.rope_parameters["rope_theta"] != 10000.0
    fast = list(decoder.generate(prompt[0].tolist(), n))
    assert fast == plain
    assert "def " in tokenizer.decode(plain)  # a real model's answer, not noise


def test_the_greedy_check_decodes_its_prompts_together_as_each_alone(smollm2: Path) -> None:
    """``--check smollm2``'s batched leg on the CPU (float32): every chat prompt decoded together
    through the decode scheduler gives the fast path's tokens alone, and the plain path's where the
    fast path alone does."""
    from bench import real_model

    report = real_model.greedy_check(n=8, device="cpu", variants=("fp32",))
    fp32 = report["fp32"]
    assert fp32["batched_same_as_alone"] == report["prompts"] >= 2
    assert fp32["prompts_equal_batched"] == fp32["prompts_equal"] == report["prompts"]
    assert "all prompts decoded together" in "\n".join(real_model.render_check(report))
