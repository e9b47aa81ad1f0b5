"""The fast path's several streams on a CPU: cache slots, prompts prefilled in chunks, and one
decode step for many streams (``FastDecoder.decode_batch``), against each stream decoded alone,
on the tiny random Qwen2 checkpoint in fp32; and the batched decode attention kernel's own source
under Triton's interpreter. Speed is measured by ``python -m bench.model --streams`` on a GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the fast path's checkpoints load with `pip install 'jupybox[local]'`")

from interpreter.llm import fastpath  # noqa: E402
from tests.support.tiny_models import write_tiny_qwen2  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-batch"))


def alone(folder: Path, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every step's logits of one stream in a decoder of its own."""
    dec = fastpath.load_checkpoint(folder, device="cpu", dtype=torch.float32)
    logits = [dec.prefill(torch.tensor(prompt))[0]]
    tokens = []
    for i in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits.append(dec.decode(torch.tensor(tokens[-1:]), len(prompt) + i))
    return tokens, logits[:-1]


def test_streams_decoded_in_one_step_get_what_each_gets_alone_bitwise(tiny_model: Path) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 90) for _ in range(n)] for n in (7, 30, 1, 530)]  # one past a 512 bucket
    steps = 12
    dec = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32, slots=5)
    slots = [4, 0, 2, 1]  # any free slot, not the row's index
    last = [dec.prefill(torch.tensor(p), slot=s)[0] for p, s in zip(prompts, slots)]
    got: list[list[int]] = [[] for _ in prompts]
    got_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for i in range(steps):
        for b, logits in enumerate(last):
            got_logits[b].append(logits)
            got[b].append(int(logits.argmax()))
        out = dec.decode_batch([g[-1] for g in got], [len(p) + i for p in prompts], slots)
        last = list(out)
    for b, prompt in enumerate(prompts):
        tokens, logits = alone(tiny_model, prompt, steps)
        assert got[b] == tokens
        assert all(torch.equal(x, y) for x, y in zip(got_logits[b], logits))
    assert len({tuple(g) for g in got}) == len(prompts)  # four different answers, not one repeated


def test_a_prompt_in_chunks_fills_the_slot_as_one_prefill_does(tiny_model: Path) -> None:
    prompt = [(i * 37) % 89 + 1 for i in range(300)]
    whole = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32)
    chunked = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32)
    ref = whole.prefill(torch.tensor(prompt))[0]
    for start in range(0, len(prompt), 64):
        got = chunked.prefill(torch.tensor(prompt[start:start + 64]), slot=0, start=start,
                              prompt_length=len(prompt))[0]
    # a different row count in each product: equal up to float32 summation order
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    for layer_a, layer_b in zip(whole.layers, chunked.layers):
        assert torch.allclose(layer_a.k_cache[0, :, :300], layer_b.k_cache[0, :, :300], atol=1e-5)
    assert list(whole.generate(prompt, 10)) == list(chunked.generate(prompt, 10))


def test_a_slot_reused_after_a_longer_stream_holds_no_trace_of_it(tiny_model: Path) -> None:
    dec = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32, slots=2)
    long_prompt, short_prompt = [i % 89 + 1 for i in range(120)], [9, 8, 7]
    dec.prefill(torch.tensor(long_prompt), slot=1)
    for i in range(5):
        dec.decode_batch([3], [len(long_prompt) + i], [1])
    logits = dec.prefill(torch.tensor(short_prompt), slot=1)[0]
    tokens = []
    for i in range(8):
        tokens.append(int(logits.argmax()))
        logits = dec.decode_batch(tokens[-1:], [len(short_prompt) + i], [1])[0]
    assert tokens == alone(tiny_model, short_prompt, 8)[0]


@pytest.mark.parametrize("rows, positions, slots, message", [
    ([1, 2], [0], [0], "1 to 2 rows in distinct slots"),
    ([1, 2], [0, 1], [1, 1], "distinct slots"),
    ([1], [10_000], [0], "outside the cache"),
    ([1], [0], [7], "outside the cache"),
])
def test_a_bad_batch_is_refused_before_any_work(tiny_model: Path, rows, positions, slots, message: str) -> None:
    dec = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32, slots=2)
    with pytest.raises(ValueError, match=message):
        dec.decode_batch(rows, positions, slots)


BATCHED_ATTENTION = """
import json, sys
import torch
from interpreter.llm.fastpath.kernels import decode_attention as da
from interpreter.llm.fastpath.positions import rope_tables
gen = torch.Generator().manual_seed(1)
heads, kv_heads, hd, max_seq, n_slots = 4, 2, 32, 256, 5
def rand(*size):
    return torch.randn(*size, generator=gen).to(torch.float16)
k, v = rand(n_slots, kv_heads, max_seq, hd), rand(n_slots, kv_heads, max_seq, hd)
cos, sin = rope_tables(10000.0, hd, max_seq, torch.device("cpu"), torch.float32)
positions, slots = [100, 0, 255], [3, 0, 4]
batch = 4  # a captured batch of four: the fourth row pads it and must do nothing
qkv = rand(batch, (heads + 2 * kv_heads) * hd)
bias = rand(qkv.shape[1])
counts = torch.zeros(batch * heads, dtype=torch.int32)
kc, vc = k.clone(), v.clone()
got = da.attend(qkv, bias, cos, sin, None, kc, vc, torch.tensor(positions + [7]), 256, counts,
                slots=torch.tensor(slots + [1]), rows=torch.tensor([3], dtype=torch.int32))
errs, cache_errs = [], []
for b, (pos, slot) in enumerate(zip(positions, slots)):
    kr, vr = k[slot].double(), v[slot].double()
    ref = da.reference(qkv[b].double(), bias.double(), cos.double(), sin.double(), None, kr, vr, pos, 256)
    errs.append(float((got[b].double() - ref).norm() / ref.norm()))
    cache_errs.append(float((kc[slot, :, pos].double() - kr[:, pos]).abs().max()))
untouched = [s for s in range(n_slots) if s not in slots]
print(json.dumps({"errs": errs, "cache_errs": cache_errs, "counts": int(counts.abs().sum()),
                  "others_kept": bool(torch.equal(kc[untouched], k[untouched]) and torch.equal(vc[untouched], v[untouched]))}))
"""


def test_the_batched_attention_kernel_attends_each_row_in_its_own_slot_under_the_interpreter() -> None:
    pytest.importorskip("triton", reason="the kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")
    from tests.support.triton import run_under_triton_interpreter

    result = run_under_triton_interpreter(BATCHED_ATTENTION, None)
    assert max(result["errs"]) < 2e-3, result  # float16 rounding of the query and the output
    assert max(result["cache_errs"]) < 1e-2 and result["counts"] == 0, result
    assert result["others_kept"], result  # the padded row (slot 1) and the free slot (2) are untouched


def test_the_steps_batched_arithmetic_agrees_with_each_row_alone(tiny_model: Path) -> None:
    """The step a GPU runs as one graph for several streams (the rows' products together, each row's
    attention over its own slot with the later positions masked, padded rows repeating row 0) against
    each row through the step alone: equal up to float32 summation order."""
    dec = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32, slots=3)
    prompts = [[5, 6, 7], list(range(1, 60)), [9]]
    for slot, p in enumerate(prompts):
        dec.prefill(torch.tensor(p), slot=slot)
    tokens, positions, slots = [11, 12, 13], [len(p) for p in prompts], [0, 1, 2]
    alone = dec.decode_batch(tokens, positions, slots)  # on a CPU: each row alone
    for slot, p in enumerate(prompts):  # the same K/V again: the step above wrote this position
        dec.prefill(torch.tensor(p), slot=slot)
    padded = torch.tensor(tokens + tokens[:1])
    pos = torch.tensor(positions + positions[:1])
    with torch.no_grad():
        together = dec._decode(padded, pos, dec.positions[:512], torch.tensor(slots + slots[:1]))
    assert together.shape[0] == 4
    assert torch.allclose(together[:3], alone, atol=1e-4, rtol=1e-4)
    assert torch.allclose(together[3], alone[0], atol=1e-4, rtol=1e-4)  # the pad: row 0 again, dropped by the caller


BATCHED_STEP = """
import dataclasses, json
import torch
from interpreter.llm import fastpath
from interpreter.llm.fastpath import weights
from interpreter.llm.fastpath.kernels import decode_attention  # noqa: F401 - registers the kernel's operator
shape = dataclasses.replace(fastpath.QWEN_7B, vocab=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn=128, max_context=1024, rope_fp32=True, logn_attn=True, seq_length=64)
dec = fastpath.FastDecoder(shape, weights.random_weights(shape, "cpu", torch.float32), max_seq=1024, device="cpu",
                           dtype=torch.float32, compile=False, slots=3)
for slot, n in enumerate((40, 3, 600)):
    dec.prefill(torch.arange(n) % 64, slot=slot)
tokens, pos, slots = torch.tensor([1, 2, 3, 1]), torch.tensor([40, 3, 600, 40]), torch.tensor([0, 1, 2, 0])
span = dec.positions[:1024]
with torch.no_grad():
    ref = dec._decode(tokens, pos, span, slots)  # SDPA
    dec.attn_counts = torch.zeros(4 * shape.n_heads, dtype=torch.int32)
    rows = torch.tensor([3], dtype=torch.int32)
    got = dec._decode(tokens, pos, span, slots, rows)  # the kernel, the fourth row a pad
errs = [float((got[b] - ref[b]).norm() / ref[b].norm()) for b in range(3)]
print(json.dumps({"errs": errs, "counts": int(dec.attn_counts.abs().sum())}))
"""


def test_the_decoders_batched_step_with_the_kernel_matches_its_sdpa_step() -> None:
    pytest.importorskip("triton", reason="the kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")
    from tests.support.triton import run_under_triton_interpreter

    result = run_under_triton_interpreter(BATCHED_STEP, None)
    assert max(result["errs"]) < 1e-4 and result["counts"] == 0, result
