"""The fast path on a CPU: the same tiny random Qwen2 checkpoint as the transformers backend's tests,
decoded by ``fastpath.FastDecoder`` and by ``model.generate``; GPTQ repacking against GPTQ's own
dequantization. Speed is measured by ``jupybox bench model`` on a GPU, never here."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the transformers backend needs `pip install 'jupybox[local]'`")

from interpreter.llm import fastpath
from interpreter.llm.base import GenerationRequest
from interpreter.llm.fastpath.gptq_pack import Int4Weight, PackedInt4, from_gptq, gptq_dequantize, quantize
from interpreter.llm.transformers import TransformersLLM
from tests.support.tiny_models import PROMPT, write_tiny_qwen2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-fast"))


def hf_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_fast_greedy_output_equals_generate_on_the_same_weights(tiny_model: Path) -> None:
    prompt = [5, 17, 42, 99, 3, 150, 7]
    decoder = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32)
    fast = list(decoder.generate(prompt, 40))
    assert fast == hf_greedy(tiny_model, prompt, 40)
    assert len(set(fast)) > 5  # a lively model: equality over varied tokens, not one repeated
    # the decode step alone (no prefill of the whole sequence) gives the same logits as a prefill
    full = decoder.prefill(torch.tensor(prompt + fast[:10]), all_logits=True)
    assert torch.allclose(full[-1], decoder.prefill(torch.tensor(prompt + fast[:10]))[0], atol=1e-5)


def test_a_second_generation_reuses_the_cache_without_leaking_the_first(tiny_model: Path) -> None:
    decoder = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32)
    long_first = list(decoder.generate(list(range(10, 110)), 30))
    again = list(decoder.generate([5, 17, 42], 20))
    fresh = list(fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32).generate([5, 17, 42], 20))
    assert again == fresh and long_first


def test_decoding_with_a_step_queued_ahead_stops_where_asked_and_leaves_the_cache_sound(
        tiny_model: Path, monkeypatch) -> None:
    """Decoding queues the next step before this token is read back: stopping early still yields
    exactly the tokens before the stop, and the step queued past it changes nothing for the next
    generation. The one-at-a-time loop (``JUPYBOX_PIPELINE=0``) gives the same tokens, greedy and
    sampled (top-p) from the same seed."""
    decoder = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32)

    def sampled(n: int) -> list[int]:
        return list(decoder.generate([5, 17, 42], n, temperature=0.9, top_p=0.8,
                                     generator=torch.Generator().manual_seed(3)))

    full, drawn = list(decoder.generate([5, 17, 42], 30)), sampled(30)
    seen: list[int] = []
    for token in decoder.generate([5, 17, 42], 30, stop=lambda _: len(seen) == 5):
        seen.append(token)
    assert seen == full[:5]
    after = list(decoder.generate([9, 8, 7, 6], 12))
    assert after == list(fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32).generate([9, 8, 7, 6], 12))
    assert drawn != full and len(set(drawn)) > 5  # sampling that leaves the argmax now and then
    monkeypatch.setenv("JUPYBOX_PIPELINE", "0")
    assert list(decoder.generate([5, 17, 42], 30)) == full and list(decoder.generate([5, 17, 42], 1)) == full[:1]
    assert sampled(30) == drawn


def random_gptq(n_in: int, n_out: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    q = torch.randint(0, 16, (n_in, n_out), generator=gen, dtype=torch.int64)
    z = torch.randint(0, 16, (n_in // group, n_out), generator=gen, dtype=torch.int64) - 1  # stored minus one
    shifts = torch.arange(0, 32, 4)
    qweight = (q.view(n_in // 8, 8, n_out) << shifts.view(1, 8, 1)).sum(1)
    qzeros = ((z & 0xF).view(n_in // group, n_out // 8, 8) << shifts.view(1, 1, 8)).sum(2)
    as_int32 = lambda t: (t & 0xFFFFFFFF).to(torch.int64).where(t < 2**31, t - 2**32).to(torch.int32)  # noqa: E731
    scales = (torch.rand(n_in // group, n_out, generator=gen) * 0.02 + 0.001).half()
    return as_int32(qweight), as_int32(qzeros), scales


def test_gptq_repack_matches_dequantize_then_matmul() -> None:
    gen = torch.Generator().manual_seed(1)
    n_in, n_out, group = 512, 96, 128
    qweight, qzeros, scales = random_gptq(n_in, n_out, group, gen)
    ref_w = gptq_dequantize(qweight, qzeros, scales, group=group)
    w = from_gptq(qweight, qzeros, scales, group=group, g_idx=torch.arange(n_in) // group)
    assert float((w.dequantize() - ref_w).norm() / ref_w.norm()) < 4e-3  # bf16 scales and zeros
    x = torch.randn(5, n_in, generator=gen)
    ref = x @ ref_w.t()
    y = PackedInt4(w, "cpu")(x)  # the CPU int4 kernel where this torch has it, else the dequantized weight
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    with pytest.raises(ValueError, match="act-order"):
        from_gptq(qweight, qzeros, scales, group=group, g_idx=torch.randperm(n_in) // group)


def test_group_quantizer_round_trips_within_a_step() -> None:
    w = torch.randn(64, 256) * 0.02
    q = quantize(w, 128)
    assert isinstance(q, Int4Weight) and q.q.max() <= 15
    step = (w.reshape(64, 2, 128).amax(-1) - w.reshape(64, 2, 128).amin(-1)) / 15
    assert ((q.dequantize() - w).abs().reshape(64, 2, 128) <= step[..., None] * 0.51 + 1e-4).all()


def test_int4_decoder_computes_the_model_of_its_dequantized_weights(tiny_model: Path) -> None:
    from safetensors.torch import load_file

    int4 = fastpath.load_checkpoint(tiny_model, device="cpu", dtype=torch.float32, quantize_to="int4", group=32)
    state = load_file(next(tiny_model.glob("*.safetensors")))
    state = {k: quantize(v, 32).dequantize() if k.endswith("_proj.weight") else v for k, v in state.items()}
    shape = fastpath.DecoderShape.from_config(__import__("json").loads((tiny_model / "config.json").read_text()))
    same = fastpath.FastDecoder(shape, fastpath.TensorSource(state), max_seq=256, device="cpu", dtype=torch.float32)
    tokens = torch.tensor([5, 17, 42, 99, 3, 150, 7, 11])
    a, b = same.prefill(tokens, all_logits=True), int4.prefill(tokens, all_logits=True)
    assert float((a - b).norm() / a.norm()) < 3e-2  # the int4 kernel takes bf16 activations
    assert list(int4.generate(tokens.tolist(), 5)) == list(same.generate(tokens.tolist(), 5))


async def test_backend_fast_flag_serves_the_same_text_on_cpu(tiny_model: Path) -> None:
    plain = TransformersLLM(str(tiny_model), device_map="cpu", fast=False)
    fast = TransformersLLM(str(tiny_model), device_map="cpu", fast=True)
    request = GenerationRequest(prompt=PROMPT, max_tokens=30)
    a, b = await plain.complete(request), await fast.complete(request)
    assert fast._fast is not None and plain._fast is None
    assert b.text == a.text != "" and b.usage.completion_tokens == a.usage.completion_tokens == 30
    assert b.finish_reason == a.finish_reason == "length"
    stop = a.text[len(a.text) // 2: len(a.text) // 2 + 3]
    stopped = await fast.complete(GenerationRequest(prompt=PROMPT, max_tokens=30, stop=[stop]))
    assert stopped.text == a.text[: a.text.find(stop)] and stopped.finish_reason == "stop"
    sampled = [await fast.complete(GenerationRequest(prompt=PROMPT, max_tokens=15, temperature=1.0, seed=3))
               for _ in range(2)]
    assert sampled[0].text == sampled[1].text
    await fast.close()
    await plain.close()


def test_the_packed_weight_unpacks_to_its_values_through_the_learnt_layout() -> None:
    """What a long prompt multiplies by on a GPU: the weight unpacked from the kernel's own layout.
    The CPU op's layout differs from the CUDA one; both are learnt by the same code."""
    from interpreter.llm.fastpath.gptq_pack import _unpack_dequantize, compiled_unpacker

    w = quantize(torch.randn(192, 512, generator=torch.Generator().manual_seed(3)) * 0.02, 128)
    packed = PackedInt4(w, "cpu")
    assert packed.mode == "cpu" and packed.layout is not None  # learnt from the op and checked on this weight
    assert torch.equal(packed.dequantized(torch.float32), w.dequantize())
    args = (packed.weight, packed.layout.index, packed.n_out, packed.scales_zeros, packed.group, torch.float32)
    # the fused kernel computes the same
    assert torch.equal(compiled_unpacker(_unpack_dequantize)(*args), _unpack_dequantize(*args))
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    ref = x @ w.dequantize().t()
    assert float((packed(x) - ref).norm() / ref.norm()) < 1e-2  # 64 rows on a CPU: the packed kernel


def test_a_layout_that_does_not_reproduce_the_weight_is_not_used() -> None:
    from interpreter.llm.fastpath.gptq_pack import NibbleLayout, _layout_for, _pack_cpu

    q = torch.randint(0, 16, (96, 256), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    # the CPU op's block of rows depends on the processor's vector width (64 rows with AVX-512: then
    # 96 rows are a block of 64 and one of 32, which no one block size describes); whatever is learnt
    # must reproduce the weight, or nothing is used
    learnt = _layout_for("cpu", q, _pack_cpu(q), _pack_cpu)
    assert learnt is None or torch.equal(learnt.unpack(_pack_cpu(q), 96), q)
    reversed_op = lambda t: _pack_cpu(t.flip(1))  # noqa: E731  a different (still learnable) layout
    layout = NibbleLayout.learn(reversed_op, 64, 256, torch.device("cpu"))
    q64 = q[:64].contiguous()
    assert layout is not None and torch.equal(layout.unpack(reversed_op(q64), 64), q64)
    assert NibbleLayout.learn(lambda t: _pack_cpu(t)[:, :64], 64, 256, torch.device("cpu")) is None  # loses values
