"""``jupybox bench model`` on a CPU: its flags are checked before it looks for a GPU, and the
greedy-equality check reports where two outputs part and by how much, from each path's own logits.
The figures themselves need a GPU (docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the transformers backend needs `pip install 'jupybox[local]'`")

from bench import greedy, model_check
from interpreter.llm import fastpath

TINY = fastpath.DecoderShape(vocab=300, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=256,
                             max_context=512)


@pytest.mark.parametrize("flags, message", [
    (["--check", "exact"], "unknown --check exact: choose from random, fp32, trained"),
    (["--dtype", "fp8"], "unknown --dtype fp8: choose from bf16, int4"),
    (["--tokens", "2048,lots"], "--tokens takes new-token counts above 1"),
    (["--default-cache-tokens", "0"], "--default-cache-tokens takes a count above 1"),
    (["--train-seconds", "-5"], "--train-seconds takes a positive number"),
    (["--streams", "1,64"], "--streams takes stream counts from 1 to 32"),
    (["--streams", "8", "--stream-tokens", "3"], "--stream-tokens one from 9"),
])
def test_bad_flags_get_a_clear_error_without_a_gpu(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ui.cli", "bench", "model", *flags], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and message in done.stdout and "Traceback" not in done.stdout + done.stderr


def test_divergence_names_the_step_and_both_paths_margins() -> None:
    torch.manual_seed(0)
    model = model_check.hf_qwen2(TINY, torch.float32, "cpu")
    decoder = fastpath.FastDecoder(TINY, fastpath.TensorSource(model.state_dict()), max_seq=64, device="cpu",
                                   dtype=torch.float32)
    prompt = [5, 17, 42, 99, 3, 150, 7]
    plain = greedy.plain_greedy(model, prompt, 12)
    fast = list(decoder.generate(prompt, 12))
    assert fast == plain and greedy.divergence(model, decoder, prompt, plain, fast) is None

    other = 1 if plain[5] != 1 else 2  # a fast path that parted at step 5
    parted = plain[:5] + [other] + plain[6:]
    d = greedy.divergence(model, decoder, prompt, plain, parted)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + plain[:5]])).logits[0, -1]
    assert d is not None and d["at"] == 5
    assert d["plain_gap"] == pytest.approx(float(logits[plain[5]] - logits[other]), abs=1e-4) and d["plain_gap"] > 0
    assert d["fast_gap"] == pytest.approx(-d["plain_gap"], abs=1e-4)  # same weights in float32: same logits
    assert d["fast_token_rank_in_plain"] == int((logits > logits[other]).sum()) and d["plain_token_rank_in_fast"] == 0


def test_code_prompts_open_definitions_from_the_held_out_text() -> None:
    text = b"x = 1\n" + b"".join(b"\n    def f%d(self):\n        return %d\n" % (i, i) for i in range(40))
    prompts = model_check.code_prompts(torch.tensor(list(text)), 4, length=24)
    assert len(prompts) == 4 and all(bytes(p).startswith(b"    def f") and len(p) == 24 for p in prompts)
    assert len({bytes(p) for p in prompts}) == 4
    plain = model_check.code_prompts(torch.tensor(list(b"no definitions here " * 20)), 3, length=16)
    assert len(plain) == 3 and all(len(p) == 16 for p in plain)  # evenly spaced windows instead


def test_stdlib_corpus_is_source_text() -> None:
    data = model_check.stdlib_bytes(limit=1 << 20)
    assert len(data) >= 1 << 20 and b"def " in data and b"import " in data


def test_bandwidth_bound_uses_the_measured_models_own_shape() -> None:
    from bench.model import add_bounds

    model = model_check.hf_qwen2(TINY, torch.float32, "cpu")
    decoder = fastpath.FastDecoder(TINY, fastpath.TensorSource(model.state_dict()), max_seq=64, device="cpu",
                                   dtype=torch.float32)
    weights = sum(b.numel() * b.element_size() for n, b in decoder.named_buffers() if "cache" not in n)
    report = {"copy_bandwidth_tb_s": 1.0, "fast": {"fp32": {"weight_gb": weights / 1e9}}}
    add_bounds(report, "fp32", decoder, [16, 48])
    step_bytes = weights - TINY.vocab * TINY.d_model * 4 + 2 * TINY.n_layers * TINY.n_kv_heads * TINY.head_dim * 4 * 8
    assert report["fast"]["fp32"]["bound_16"] == pytest.approx(1e12 / step_bytes)
    assert 0 < report["fast"]["fp32"]["bound_48"] < report["fast"]["fp32"]["bound_16"]


def test_the_streams_phase_serves_its_streams_through_the_scheduler_and_renders_its_table() -> None:
    """``bench.model --streams``'s measuring code on a tiny random decoder on the CPU (the figures
    themselves mean something only on a GPU): every stream count gets its served and hand-driven
    rates, the bound, the ratio, and the long prompt among running streams its times."""
    from bench import streams

    decoder = fastpath.FastDecoder(TINY, fastpath.random_weights(TINY, "cpu", torch.float32), max_seq=512,
                                   device="cpu", dtype=torch.float32, slots=4)
    report: dict = {"stream_counts": [1, 3], "stream_prompt": 20, "stream_tokens": 12}
    streams.stream_figures(decoder, "fp32", [1, 3], 20, 12, 1e12, report, lambda: None)
    streams.long_prompt_figures(decoder, "fp32", report, lambda: None, running=2, prompt_len=300, repeats=2)
    r = report["streams"]["fp32"]
    for n in (1, 3):
        assert r[f"tok_s_{n}"] > 0 and r[f"direct_tok_s_{n}"] > 0 and r[f"tok_s_with_prefill_{n}"] > 0
        assert 0 < r[f"bound_{n}"] and r[f"ratio_{n}"] == pytest.approx(r[f"tok_s_{n}"] / r["one_stream_generate_tok_s"])
    assert len(r["ttft_2048_loaded_ms"]) == 2 and r["slowest_running_step_ms"] > 0
    table = "\n".join(streams.render(report))
    assert "| fp32 tokens/s, all streams |" not in table  # only the two dtypes the issue names get rows
    report["streams"]["int4"] = r
    table = "\n".join(streams.render(report))
    assert "| figure | 1 stream | 3 streams |" in table and "| int4 tokens/s, all streams |" in table
