"""The fast path's Triton int4 matrix-vector kernel, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``): the very kernel source the GPU compiles, checked against the dequantized
weight on shapes that exercise every mask (columns past the last block, splits past the last group,
odd group counts). Its speed is measured on a GPU by ``python -m bench.int4_gemv``, never here."""

from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the int4 kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")

from interpreter.llm.fastpath.kernels import int4_gemv  # noqa: E402
from tests.support.triton import run_under_triton_interpreter  # noqa: E402
from interpreter.llm.fastpath.gptq_pack import fit_group, quantize  # noqa: E402

# each case: n_out, n_in, group, block_n, warps, step, splits, finish (the kernel adds the splits)
CASES = [(96, 256, 128, 128, 1, 1, 1, False), (200, 512, 64, 128, 1, 2, 3, False), (960, 576, 32, 256, 2, 2, 4, False),
         (64, 1024, 128, 128, 1, 2, 8, False), (136, 384, 128, 256, 2, 1, 2, False),
         (200, 512, 64, 128, 1, 2, 3, True), (960, 576, 32, 256, 2, 2, 4, True),
         (136, 2048, 128, 128, 1, 1, 16, True)]  # 16 splits of 128 columns: added 8 at a time

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from interpreter.llm.fastpath.kernels import int4_gemv
    from interpreter.llm.fastpath.gptq_pack import quantize
    out = []
    gen = torch.Generator().manual_seed(0)
    for n_out, n_in, group, block_n, warps, step, splits, finish in json.loads(sys.argv[1]):
        w = quantize(torch.randn(n_out, n_in, generator=gen) * 0.02, group)
        packed = int4_gemv.pack(w.q, w.scales_zeros, group)
        x = (torch.randn(n_in, generator=gen) * 3).to(torch.bfloat16)
        ref = w.dequantize(torch.float64) @ x.double()
        config = int4_gemv.GemvConfig(block_n, warps, step, splits, finish)
        counts = int4_gemv.counters(n_out, config, "cpu")
        parts = int4_gemv.launch(x, packed, config, counts)
        again = int4_gemv.launch(x, packed, config, counts)
        got = parts.double().sum(0)
        out.append({"shape": list(parts.shape), "rel_err": float((got - ref).norm() / ref.norm()),
                    "same": bool(torch.equal(parts, again)), "counts": int(counts.abs().sum())})
    # the layer: one row through the operator a compiled step calls, several rows through the
    # weight unpacked for the call
    w = quantize(torch.randn(192, 256, generator=gen) * 0.02, 128)
    layer = int4_gemv.TritonInt4(w.q, w.scales_zeros, 128, "cpu")
    x = torch.randn(5, 256, generator=gen)
    ref = x.double() @ w.dequantize(torch.float64).t()
    one = layer(x[:1]).double()
    many = layer(x.to(torch.bfloat16)).double()
    print(json.dumps({"cases": out, "one_row": float((one - ref[:1]).norm() / ref[:1].norm()),
                      "rows": float((many - ref).norm() / ref.norm()), "one_shape": list(one.shape)}))
""")


def test_the_kernel_computes_the_dequantized_product_under_the_interpreter() -> None:
    result = run_under_triton_interpreter(SCRIPT, CASES)
    for case, got in zip(CASES, result["cases"]):
        # one row of partial sums per split, or their sum where the kernel adds them
        assert got["shape"] == [1 if case[7] else case[6], case[0]], (case, got)
        assert got["same"] and got["counts"] == 0, (case, got)  # the same bits again; counts back at zero
        # float32 accumulation of exact products riding on 128 or 2048 times the activation: about 13
        # bits kept, far finer than the bf16 result (2**-9)
        assert got["rel_err"] < 2e-4, (case, got)
    assert result["one_row"] < 1e-2 and result["one_shape"] == [1, 192]  # bf16 activations in, float32 out
    assert result["rows"] < 1e-2


def test_layout_round_trips_and_the_nibble_constants_are_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    w = quantize(torch.randn(40, 256, generator=gen), 64)
    packed = int4_gemv.pack(w.q, w.scales_zeros, 64)
    assert packed.words.shape == (32, 40) and packed.words.dtype == torch.int32 and packed.shape == (40, 256)
    dense = int4_gemv.unpack_dequantize(packed.words, packed.scales, packed.zeros, 64, torch.float32)
    assert torch.equal(dense.t(), w.dequantize(torch.float32))
    # a nibble at bits 16..19 OR-ed into the float 128 reads as 128 + q, at bits 12..15 into 2048 as 2048 + q
    q = torch.arange(16, dtype=torch.int32)
    assert torch.equal(((q << 16) | int4_gemv.M128).view(torch.float32), 128 + q.float())
    assert torch.equal(((q << 12) | int4_gemv.M2048).view(torch.float32), 2048 + q.float())


def test_shapes_the_kernel_refuses_and_group_sizes_that_fit() -> None:
    assert int4_gemv.supports(4096, 4096, 128) and int4_gemv.supports(960, 576, 64)
    assert not int4_gemv.supports(960, 576, 128) and not int4_gemv.supports(64, 96, 48)
    with pytest.raises(int4_gemv.Int4GemvUnavailable, match="does not fit"):
        int4_gemv.pack(torch.zeros(8, 96, dtype=torch.uint8), torch.zeros(2, 8, 2), 48)
    assert fit_group(4096) == 128 and fit_group(576) == 64 and fit_group(1536, 64) == 64 and fit_group(100) is None


def test_launch_shapes_cover_every_weight_of_a_7b_model() -> None:
    for n_out, n_in in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (960, 576)):
        group = fit_group(n_in)
        configs = int4_gemv.candidates(n_out, n_in, group, processors=132)
        assert configs, (n_out, n_in)
        for c in configs:
            blocks = -(-n_out // c.block_n)
            assert c.splits * c.step <= n_in // group and blocks * c.splits <= 8 * 132
            assert c.block_n >= 128 * c.warps  # every thread holds whole rows: no reduction across warps
