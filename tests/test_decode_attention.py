"""The fast path's split-length decode attention kernel, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``): the very kernel source the GPU compiles, checked against softmax
attention computed in float64, for one head per key/value head and for grouped-query attention,
with chunks wholly past the current position, a last chunk cut short and a cache longer than the
attended span. Its speed is measured on a GPU by ``python -m bench.decode_attention``, never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")

from interpreter.llm import decode_attention  # noqa: E402

# each case: heads, kv_heads, head_dim, cache positions, attended length, position, splits, dtype
CASES = [(4, 4, 32, 96, 64, 40, 3, "float32"), (6, 2, 16, 160, 128, 127, 4, "float32"),
         (8, 2, 32, 80, 80, 0, 2, "bfloat16"), (3, 1, 64, 200, 192, 150, 5, "bfloat16"),
         (2, 2, 16, 40, 40, 7, 8, "float32")]

SCRIPT = textwrap.dedent("""
    import json, math, sys
    import torch
    from interpreter.llm import decode_attention
    out = []
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, head_dim, cache, length, pos, splits, dtype in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        q = (torch.randn(heads, head_dim, generator=gen) * 2).to(dt)
        k_cache = torch.randn(kv_heads, cache, head_dim, generator=gen).to(dt)
        v_cache = torch.randn(kv_heads, cache, head_dim, generator=gen).to(dt)
        got = decode_attention.decode_attention(q, k_cache[:, :length], v_cache[:, :length],
                                                torch.tensor([pos]), splits)
        group = heads // kv_heads
        k = k_cache[:, :pos + 1].double().repeat_interleave(group, 0)
        v = v_cache[:, :pos + 1].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hld->hl", q.double(), k) / math.sqrt(head_dim)
        ref = torch.einsum("hl,hld->hd", scores.softmax(-1), v)
        out.append({"dtype": str(got.dtype), "shape": list(got.shape),
                    "err": float((got.double() - ref).abs().max()), "scale": float(ref.abs().max())})
    print(json.dumps(out))
""")


def test_the_kernel_computes_softmax_attention_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for case, got in zip(CASES, result):
        heads, _, head_dim, *_, dtype = case
        assert got["shape"] == [heads, head_dim] and got["dtype"] == f"torch.{dtype}", (case, got)
        # float32 arithmetic throughout; a bf16 result is rounded once at the end (8 bits)
        limit = 1e-5 if dtype == "float32" else got["scale"] * 2 ** -7
        assert got["err"] < limit, (case, got)


def test_chunks_fill_the_gpu_and_never_split_a_block() -> None:
    assert decode_attention.chunk_count(512, 32, 132, 64) == 8  # 512 positions: 8 blocks, one each
    assert decode_attention.chunk_count(8192, 32, 132, 64) == 17  # about four programs a multiprocessor
    assert decode_attention.chunk_count(40, 3, 132, 64) == 1
    assert decode_attention.supports(32, 32, 128) and decode_attention.supports(9, 3, 64)
    assert not decode_attention.supports(32, 32, 80) and not decode_attention.supports(10, 4, 64)
