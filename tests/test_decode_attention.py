"""The fast path's decode attention kernel (``interpreter/llm/fastpath/kernels/decode_attention.py``), run on the CPU
by Triton's interpreter: the very kernel source a GPU compiles, against SDPA, on cases that
exercise its masks (slices with no visible position, the position at a slice's edge, position 0,
grouped-query heads), and inside the decoder's step against the SDPA step. Its speed is measured on
a GPU by ``python -m bench.attention`` (the kernel alone) and ``python -m bench.model``, never here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernel needs Triton (`pip install 'jupybox[dev]'` brings it)")

from interpreter.llm.fastpath.kernels import decode_attention  # noqa: E402
from tests.support.triton import run_under_triton_interpreter  # noqa: E402

# heads, kv heads, head dim, cache positions, attended length, position, bias, log-n, launch (splits, block, stages)
CASES = [(4, 4, 64, 256, 256, 100, True, False, None), (6, 2, 64, 512, 512, 511, False, True, None),
         (2, 1, 128, 1024, 640, 3, True, True, None), (4, 4, 32, 128, 128, 0, False, False, None),
         (3, 3, 16, 1024, 1024, 575, True, False, None), (4, 2, 32, 512, 512, 300, False, False, (4, 16, 2))]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from interpreter.llm.fastpath.kernels import decode_attention as da
    from interpreter.llm.fastpath.positions import rope_tables
    out = []
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads, hd, max_seq, length, pos, bias, logn, launch in json.loads(sys.argv[1]):
        # float16: the interpreter truncates float32 to bf16 where a GPU rounds
        def rand(*size):
            return torch.randn(*size, generator=gen).to(torch.float16)
        k, v = rand(kv_heads, max_seq, hd), rand(kv_heads, max_seq, hd)
        k[:, pos:] = 1e4  # this step's position is the kernel's to write; later ones are never attended
        qkv = rand((heads + 2 * kv_heads) * hd)
        b = rand(qkv.numel()) if bias else None
        cos, sin = rope_tables(10000.0, hd, max_seq, torch.device("cpu"), torch.float32)
        scales = (torch.rand(max_seq, generator=gen) + 1).to(torch.float16) if logn else None
        counts = torch.zeros(heads, dtype=torch.int32)
        how = da.Launch(*launch) if launch else da.Launch()
        kc, vc = k.clone(), v.clone()
        got = da.attend(qkv, b, cos, sin, scales, kc, vc, torch.tensor([pos]), length, counts, launch=how)
        again = da.attend(qkv, b, cos, sin, scales, kc, vc, torch.tensor([pos]), length, counts, launch=how)
        kr, vr = k.double(), v.double()
        ref = da.reference(qkv.double(), None if b is None else b.double(), cos.double(), sin.double(),
                           None if scales is None else scales.double(), kr, vr, pos, length)
        others = torch.ones(max_seq, dtype=torch.bool)
        others[pos] = False
        out.append({"err": float((got.double() - ref).norm() / ref.norm()), "counts": int(counts.abs().sum()),
                    "same": bool(torch.equal(got, again)), "splits": how.splits or da.splits_for(length, heads, block=how.block),
                    "cache_err": float(max((kc[:, pos].double() - kr[:, pos]).abs().max(),
                                           (vc[:, pos].double() - vr[:, pos]).abs().max())),
                    "rest_kept": bool(torch.equal(kc[:, others], k[:, others]) and torch.equal(vc[:, others], v[:, others]))})
    print(json.dumps(out))
""")


def test_the_kernel_attends_as_the_unfused_step_does_under_the_interpreter() -> None:
    result = run_under_triton_interpreter(SCRIPT, CASES)
    assert [r["splits"] for r in result] == [c[8][0] if c[8] else decode_attention.splits_for(c[4], c[0])
                                             for c in CASES]
    assert max(r["splits"] for r in result) >= 8  # several slices, some with nothing visible
    for case, got in zip(CASES, result):
        assert got["err"] < 2e-3, (case, got)  # float16 rounding of the query and the output
        assert got["cache_err"] < 1e-2 and got["rest_kept"], (case, got)  # this step's key: float16 rounding
        assert got["counts"] == 0 and got["same"], (case, got)


STEP = textwrap.dedent("""
    import dataclasses, json, sys
    import torch
    from interpreter.llm import fastpath
    from interpreter.llm.fastpath import weights
    from interpreter.llm.fastpath.kernels import decode_attention
    shape = dataclasses.replace(fastpath.QWEN_7B, vocab=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                head_dim=16, ffn=128, max_context=1024, rope_fp32=True, logn_attn=True,
                                seq_length=64)  # log-n factors above 1 from position 65
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


def test_slices_per_head_take_a_chunk_each_up_to_a_maximum() -> None:
    assert decode_attention.splits_for(32, 32) == 1  # one loop step's worth: nothing to share
    assert decode_attention.splits_for(1024, 32) == 1024 // decode_attention.BLOCK  # a block each
    assert decode_attention.splits_for(1024, 32, block=32) == 32
    assert decode_attention.splits_for(256, 2, block=32) == 8  # fewer heads than processors: as many as the length allows
    assert decode_attention.splits_for(65536, 32) == decode_attention.MAX_SPLITS
    for length in (1, 100, 512, 4096, 32768):
        s = decode_attention.splits_for(length, 4)
        assert s & (s - 1) == 0 and (s == 1 or length >= s * decode_attention.BLOCK)  # a block each at least


@pytest.mark.parametrize("flags, message", [
    (["--positions", "1023,-1"], "--positions takes positions from 0 up"),
    ([], "measures a CUDA GPU and none is visible here"),
])
def test_the_probe_answers_bad_flags_and_a_missing_gpu_clearly(flags: list[str], message: str) -> None:
    if not flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible: the probe would measure it")
    done = subprocess.run([sys.executable, "-m", "bench.attention", *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stdout + done.stderr, done
    assert "Traceback" not in done.stdout + done.stderr


def test_the_probes_table_says_when_the_default_launch_did_not_run() -> None:
    from bench import attention

    ran = {"splits": 0, "block": 64, "warps": 2, "stages": 1, "us": 8.0, "gb_s": 2100.0}
    failed = {"splits": 0, "block": 64, "warps": 2, "stages": 1, "error": "OutOfResources: shared memory"}
    report = {"gpu": "a GPU", "torch": "2", "date": "today", "copy_bandwidth_tb_s": 4.2, "positions": {
        1023: {"length": 1024, "cache_mb": 16.8, "copy_us": 4.0, "sdpa_us": 14.0, "sdpa_gb_s": 1200.0,
               "default": ran, "launches": [ran], "errors": []},
        2047: {"length": 2048, "cache_mb": 33.6, "copy_us": 8.0, "sdpa_us": 19.0, "sdpa_gb_s": 1770.0,
               "default": failed, "launches": [], "errors": [failed]}}}
    text = attention.render(report)
    assert "kernel 8.0 us (0.50 of copy, 1.75x SDPA)" in text
    assert "the kernel's default launch did not run (OutOfResources: shared memory)" in text
    assert "1 launch shapes did not run" in text
