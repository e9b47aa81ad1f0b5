"""The fast path's Triton bf16 matrix-vector kernel, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``): the very kernel source the GPU compiles, checked against a float64
product on shapes that exercise every mask (rows past the last block, a last tile cut short,
several splits added by the last program to finish), twice over the same counters (they must be
back at zero, and the bits the same). Its speed is measured on a GPU by ``python -m bench.int4_gemv``."""

from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")

from interpreter.llm.fastpath.kernels import bf16_gemv  # noqa: E402
from tests.support.triton import run_under_triton_interpreter  # noqa: E402

# each case: n_out, n_in, block_n, block_k, warps, splits
CASES = [(40, 256, 16, 256, 4, 1), (37, 800, 8, 256, 4, 3), (64, 1024, 32, 256, 4, 4), (20, 528, 16, 512, 4, 2)]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from interpreter.llm.fastpath.kernels import bf16_gemv
    gen = torch.Generator().manual_seed(0)
    out = []
    for n_out, n_in, block_n, block_k, warps, splits in json.loads(sys.argv[1]):
        w = torch.randn(n_out, n_in, generator=gen).to(torch.bfloat16)
        x = torch.randn(n_in, generator=gen).to(torch.bfloat16)
        config = bf16_gemv.Bf16Config(block_n, block_k, warps, splits)
        counts = bf16_gemv.counters(n_out, config, "cpu")
        first = bf16_gemv.launch(x, w, config, counts)
        again = bf16_gemv.launch(x, w, config, counts)
        ref = w.double() @ x.double()
        out.append({"shape": list(first.shape), "rel_err": float((first.double() - ref).norm() / ref.norm()),
                    "same": bool(torch.equal(first, again)), "counts": int(counts.abs().sum())})
    # silu(gate) * up at the end of the kernel, over a weight whose gate and up rows alternate,
    # against the unfused model's arithmetic (each step rounded to the weight's dtype). In float16:
    # the interpreter truncates float32 to bf16 where a GPU rounds to nearest
    glu = []
    for n_half, n_in, block_n, block_k, warps in ((40, 256, 16, 256, 4), (37, 528, 8, 512, 4)):
        w = torch.randn(2 * n_half, n_in, generator=gen).to(torch.float16)
        x = torch.randn(n_in, generator=gen).to(torch.float16)
        config = bf16_gemv.Bf16Config(block_n, block_k, warps, 1)
        got = bf16_gemv.launch(x, bf16_gemv.interleave(w), config, bf16_gemv.counters(2 * n_half, config, "cpu"),
                               glu=True)
        gate, up = (w.double() @ x.double()).to(torch.float16).chunk(2)
        ref = torch.nn.functional.silu(gate) * up
        glu.append({"shape": list(got.shape), "dtype": str(got.dtype),
                    "rel_err": float((got.double() - ref.double()).norm() / ref.double().norm()),
                    "equal": float((got == ref).float().mean())})
    try:
        bf16_gemv.launch(x, w, bf16_gemv.Bf16Config(16, 256, 4, 2), bf16_gemv.counters(2 * n_half, config, "cpu"),
                         glu=True)
        split_glu = "accepted"
    except ValueError as exc:
        split_glu = str(exc)
    # the check at load: the kernel agrees with the reference product; a kernel that answers
    # garbage (here: zeros) is refused
    w = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    config = bf16_gemv.Bf16Config(8, 64, 2, 1)
    right = bf16_gemv.agrees(w, config) and bf16_gemv.agrees(w.half(), config, glu_weight=bf16_gemv.interleave(w.half()))
    bf16_gemv.launch = lambda x, weight, config, counts: torch.zeros(weight.shape[0])
    print(json.dumps({"cases": out, "agrees": right, "garbage_agrees": bf16_gemv.agrees(w, config), "glu": glu,
                      "split_glu": split_glu}))
""")


def test_the_kernel_computes_the_product_under_the_interpreter() -> None:
    result = run_under_triton_interpreter(SCRIPT, CASES)
    assert result["agrees"] and not result["garbage_agrees"]
    for case, got in zip(CASES, result["cases"]):
        assert got["shape"] == [case[0]] and got["same"] and got["counts"] == 0, (case, got)
        assert got["rel_err"] < 1e-6, (case, got)  # exact bf16 products added in float32
    for got, n_half in zip(result["glu"], (40, 37)):
        assert got["shape"] == [n_half] and got["dtype"] == "torch.float16", got
        # the same roundings as the unfused model; a float32 sum in another order may land one
        # float16 step apart now and then
        assert got["rel_err"] < 1e-3 and got["equal"] > 0.8, got
    assert "cannot end in silu(gate) * up" in result["split_glu"]  # the partial sums of splits are not gate/up


def test_launch_shapes_fill_the_gpu_for_every_projection_of_a_7b_model() -> None:
    for n_out, n_in in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
        configs = bf16_gemv.candidates(n_out, n_in, processors=132)
        assert configs, (n_out, n_in)
        for c in configs:
            blocks = -(-n_out // c.block_n)
            assert blocks * c.splits <= 8 * 132 and c.splits <= -(-n_in // c.block_k)
    assert bf16_gemv.supports(torch.zeros(8, 64, dtype=torch.bfloat16))
    assert not bf16_gemv.supports(torch.zeros(8, 60, dtype=torch.bfloat16))  # 16-byte loads stay aligned
    assert not bf16_gemv.supports(torch.zeros(8, 64))  # float32 keeps cuBLAS
