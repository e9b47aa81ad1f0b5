"""Qwen v1 past its training length on the fast path: dynamic-NTK rotary bases chosen by the prompt's
length and kept while decoding, and log-n scaled queries, against a reference forward written
from Qwen v1's definition in float64 (no Qwen v1 modeling code or checkpoint is available here)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from bench.qwen_v1 import random_state  # noqa: E402
from interpreter.llm import fastpath  # noqa: E402
from interpreter.llm.fastpath.positions import QWEN_LOGN_POSITIONS, ntk_alpha  # noqa: E402

CONFIG = {"model_type": "qwen", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
          "intermediate_size": 96, "seq_length": 16, "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6,
          "use_dynamic_ntk": True, "use_logn_attn": True}


def tiny_qwen_v1(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(CONFIG, seed)


def reference(state: dict[str, torch.Tensor], tokens: list[int], alpha: float) -> torch.Tensor:
    """Logits ``[T, vocab]`` of a causal forward over ``tokens`` with rotary factor ``alpha``."""
    w = {k: t.double() for k, t in state.items()}
    heads, d, s = CONFIG["num_attention_heads"], CONFIG["hidden_size"], CONFIG["seq_length"]
    hd, t = d // heads, len(tokens)
    rms = lambda x, g: g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + CONFIG["layer_norm_epsilon"])  # noqa: E731
    base = CONFIG["rotary_emb_base"] * alpha ** (hd / (hd - 2))
    angles = torch.arange(t, dtype=torch.float64)[:, None] / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    rotate = lambda x: x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin  # noqa: E731
    logn = torch.tensor([math.log(p + 1) / math.log(s) if p + 1 > s else 1.0 for p in range(t)], dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["transformer.wte.weight"][tokens]
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        qkv = rms(x, w[p + "ln_1.weight"]) @ w[p + "attn.c_attn.weight"].t() + w[p + "attn.c_attn.bias"]
        q, k, v = (z.view(t, heads, hd) for z in qkv.split(d, -1))
        q, k = rotate(q) * logn[:, None, None], rotate(k)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(t, d) @ w[p + "attn.c_proj.weight"].t()
        h = rms(x, w[p + "ln_2.weight"])
        mlp = (h @ w[p + "mlp.w1.weight"].t()) * torch.nn.functional.silu(h @ w[p + "mlp.w2.weight"].t())
        x = x + mlp @ w[p + "mlp.c_proj.weight"].t()
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].t()


def decoder(state: dict[str, torch.Tensor], config: dict | None = None) -> fastpath.FastDecoder:
    shape = fastpath.DecoderShape.from_config(config or CONFIG)
    return fastpath.FastDecoder(shape, fastpath.TensorSource(state), max_seq=96, device="cpu", dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a.double() - b).norm() / b.norm()) < 1e-5


def test_alpha_grows_with_the_prompt_past_the_training_length() -> None:
    assert [ntk_alpha(n, 16) for n in (1, 8, 16, 17, 32, 33, 64, 65)] == [1, 1, 1, 3, 3, 7, 7, 15]
    shape = fastpath.DecoderShape.from_config(CONFIG)
    assert shape.dynamic_ntk and shape.logn_attn and shape.seq_length == 16 and shape.max_context == QWEN_LOGN_POSITIONS
    plain = fastpath.DecoderShape.from_config({**CONFIG, "use_dynamic_ntk": False, "use_logn_attn": False})
    assert plain.max_context == 16 and not plain.dynamic_ntk
    with pytest.raises(fastpath.FastPathUnsupported, match="rotary_pct"):
        fastpath.DecoderShape.from_config({**CONFIG, "rotary_pct": 0.5})


def test_a_long_prompt_and_its_decode_steps_use_the_prompts_alpha_and_log_n_queries() -> None:
    state = tiny_qwen_v1()
    tokens = torch.randint(0, 64, (46,), generator=torch.Generator().manual_seed(1)).tolist()
    fast = decoder(state)
    prompt = tokens[:40]  # 40 > 16: alpha 7
    assert close(fast.prefill(torch.tensor(prompt), all_logits=True), reference(state, prompt, 7.0))
    ref = reference(state, tokens, 7.0)  # the cached keys keep the prompt's rotation: one alpha throughout
    for at in range(40, 46):
        assert close(fast.decode(torch.tensor([tokens[at]]), at), ref[at])
    assert not close(fast.prefill(torch.tensor(prompt), all_logits=True), reference(state, prompt, 1.0))


def test_a_short_prompt_decoding_past_the_training_length_gets_log_n_but_no_ntk() -> None:
    state = tiny_qwen_v1(2)
    tokens = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    fast = decoder(state)
    fast.prefill(torch.tensor([t % 64 for t in range(50)]))  # a long prompt first: alpha 7 left behind
    assert close(fast.prefill(torch.tensor(tokens[:10]), all_logits=True), reference(state, tokens[:10], 1.0))
    ref = reference(state, tokens, 1.0)
    for at in range(10, 30):
        assert close(fast.decode(torch.tensor([tokens[at]]), at), ref[at])
    greedy = list(decoder(state).generate(tokens[:10], 20))
    assert greedy == list(fast.generate(tokens[:10], 20))  # after a long prompt, the same as a fresh decoder
