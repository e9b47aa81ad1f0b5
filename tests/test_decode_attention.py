"""The fast path's decode attention kernel (``interpreter/llm/decode_attention.py``), run on the CPU
by Triton's interpreter: the very kernel source a GPU compiles, against SDPA, on cases that
exercise its masks (slices with no visible position, the position at a slice's edge, position 0,
grouped-query heads), and inside the decoder's step against the SDPA step. Its speed is measured on
a GPU by ``python -m bench.model`` (and ``bench.decode_profile``), never here."""

from __future__ import annotations

import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")

from interpreter.llm import decode_attention  # noqa: E402
from tests.conftest import run_under_triton_interpreter  # noqa: E402

# heads, kv heads, head dim, cache positions, attended length, position
CASES = [(4, 4, 64, 256, 256, 100), (6, 2, 64, 512, 512, 511), (2, 1, 128, 1024, 640, 3), (4, 4, 32, 128, 128, 0),
         (3, 3, 16, 1024, 1024, 575)]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from interpreter.llm import decode_attention as da
    out = []
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, hd, max_seq, length, pos in json.loads(sys.argv[1]):
        # float16: the interpreter truncates float32 to bf16 where a GPU rounds
        k = torch.randn(kv_heads, max_seq, hd, generator=gen).to(torch.float16)
        v = torch.randn(kv_heads, max_seq, hd, generator=gen).to(torch.float16)
        k[:, pos + 1:] = 1e4  # positions after the query's are never attended
        q = torch.randn(heads, hd, generator=gen).to(torch.float16)
        counts = torch.zeros(heads, dtype=torch.int32)
        got = da.attend(q, k, v, torch.tensor([pos]), length, counts)
        again = da.attend(q, k, v, torch.tensor([pos]), length, counts)
        ref = da.reference(q.double(), k.double(), v.double(), pos, length)
        out.append({"err": float((got.double() - ref).norm() / ref.norm()), "counts": int(counts.abs().sum()),
                    "same": bool(torch.equal(got, again)), "splits": da.splits_for(length, heads)})
    print(json.dumps(out))
""")


def test_the_kernel_attends_as_sdpa_does_under_the_interpreter() -> None:
    result = run_under_triton_interpreter(SCRIPT, CASES)
    assert [r["splits"] for r in result] == [decode_attention.splits_for(c[4], c[0]) for c in CASES]
    assert max(r["splits"] for r in result) >= 8  # several slices, some with nothing visible
    for case, got in zip(CASES, result):
        assert got["err"] < 2e-3, (case, got)  # float16 output rounding
        assert got["counts"] == 0 and got["same"], (case, got)


STEP = textwrap.dedent("""
    import dataclasses, json, sys
    import torch
    from interpreter.llm import decode_attention, fastpath, weights
    shape = dataclasses.replace(fastpath.QWEN_7B, vocab=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=16, ffn=128, max_context=1024)
    dec = fastpath.FastDecoder(shape, weights.random_weights(shape, "cpu", torch.float32), max_seq=1024,
                               device="cpu", dtype=torch.float32, compile=False)
    assert dec.attn_counts is None  # on a CPU the step keeps SDPA
    dec.prefill(torch.arange(40) % 64)
    errs = []
    for pos in (40, 41, 600):
        token = torch.tensor([pos % 64])
        dec.attn_counts = None
        ref = dec.decode(token, pos)
        dec.attn_counts = torch.zeros(shape.n_heads, dtype=torch.int32)
        got = dec.decode(token, pos)
        errs.append(float((got - ref).norm() / ref.norm()))
    print(json.dumps({"errs": errs, "counts": int(dec.attn_counts.abs().sum())}))
""")


def test_the_decoders_step_with_the_kernel_matches_its_sdpa_step() -> None:
    result = run_under_triton_interpreter(STEP, None)
    assert max(result["errs"]) < 1e-4 and result["counts"] == 0, result


def test_slices_per_head_fill_the_gpu_without_going_below_a_minimum_slice() -> None:
    assert decode_attention.splits_for(64, 32) == 1
    assert decode_attention.splits_for(1024, 32) == 16  # 512 programs (256 would be under 2 x 132)
    assert decode_attention.splits_for(1024, 32, processors=64) == 4
    assert decode_attention.splits_for(8192, 9) == 32
    for length in (1, 100, 512, 4096, 32768):
        s = decode_attention.splits_for(length, 4)
        assert s & (s - 1) == 0 and (s == 1 or length >= s * decode_attention.MIN_SLICE)
