"""``python -m bench.attention``: the fast path's decode attention kernel alone (bias, rotary, the
cache's write and the attention of one token in one launch, ``interpreter/llm/fastpath/kernels/decode_attention.py``)
against SDPA alone on the same cache, at the Qwen-7B attention shape (32 heads of 128), for the
32 layers of one token, against the copy bound measured in the same run. Figures, never pass/fail.

Each layer has its own cache (32 of them do not fit in the L2), launches are replayed from one CUDA
graph, and "GB/s" is the cache a step must read (keys and values of positions ``0..pos``) over the
time per layer. ``--sweep`` also times other launch shapes (slices, positions a loop step, warps,
pipeline stages) at the first position, then the fastest few at the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import sys
from pathlib import Path
from typing import Any

from bench.gpu_probe import run_probe

HEADS, KV_HEADS, HD, LAYERS = 32, 32, 128, 32


def _cache_bytes(pos: int) -> int:
    return 2 * KV_HEADS * (pos + 1) * HD * 2


def measure(positions: list[int], sweep: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from bench.model import copy_bandwidth
    from interpreter.llm.fastpath.kernels import decode_attention as da
    from interpreter.llm import fastpath
    from interpreter.llm.fastpath.kernels import gemv
    from interpreter.llm.fastpath.positions import rope_tables

    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "gpu": props.name, "torch": torch.__version__,
                              "copy_bandwidth_tb_s": copy_bandwidth() / 1e12, "positions": {}}
    dev = torch.device("cuda")
    bw = report["copy_bandwidth_tb_s"] * 1e12
    shapes = [da.Launch()]
    if sweep:
        shapes += [da.Launch(s, b, w, st) for s, b, w, st in
                   itertools.product((0, 16, 32, 64), (16, 32, 64), (2, 4), (1, 2))
                   if (s, b, w, st) != dataclasses.astuple(da.Launch())]
    best: list[da.Launch] = []
    for n, pos in enumerate(positions):
        length = (pos // fastpath.BUCKET + 1) * fastpath.BUCKET
        ks = [torch.randn(KV_HEADS, length, HD, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        vs = [torch.randn(KV_HEADS, length, HD, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        qkv = torch.randn((HEADS + 2 * KV_HEADS) * HD, device=dev, dtype=torch.bfloat16)
        bias = torch.randn_like(qkv)
        cos, sin = rope_tables(10000.0, HD, length, dev, torch.float32)
        p = torch.tensor([pos], device=dev)
        counts = torch.zeros(HEADS, dtype=torch.int32, device=dev)
        q = torch.randn(1, HEADS, 1, HD, device=dev, dtype=torch.bfloat16)
        visible = (torch.arange(length, device=dev) <= pos).view(1, 1, 1, length)
        sdpa = gemv.graph_seconds([lambda k=k, v=v: F.scaled_dot_product_attention(q, k[None], v[None],
                                                                                   attn_mask=visible)
                                   for k, v in zip(ks, vs)])
        rows: list[dict[str, Any]] = []
        for launch in (shapes if n == 0 else [da.Launch(), *best]):
            try:
                t = gemv.graph_seconds([lambda k=k, v=v, launch=launch: da.attend(qkv, bias, cos, sin, None, k, v, p,
                                                                                  length, counts, launch=launch)
                                        for k, v in zip(ks, vs)])
            except Exception as exc:  # a launch shape this GPU cannot run (registers, shared memory)
                rows.append({**dataclasses.asdict(launch), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                continue
            rows.append({**dataclasses.asdict(launch), "us": t * 1e6, "gb_s": _cache_bytes(pos) / t / 1e9})
        timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        if n == 0:
            best = [launch for launch in (da.Launch(r["splits"], r["block"], r["warps"], r["stages"]) for r in timed)
                    if launch != da.Launch()][:4]
        report["positions"][pos] = {"length": length, "cache_mb": _cache_bytes(pos) / 1e6, "default": rows[0],
                                    "sdpa_us": sdpa * 1e6, "sdpa_gb_s": _cache_bytes(pos) / sdpa / 1e9,
                                    "copy_us": _cache_bytes(pos) / bw * 1e6, "launches": timed,
                                    "errors": [r for r in rows if "error" in r]}
        del ks, vs
        torch.cuda.empty_cache()
    return report


def render(r: dict[str, Any]) -> str:
    bw = r["copy_bandwidth_tb_s"] * 1e3
    lines = [f"decode attention, {HEADS} heads of {HD}, one token, {LAYERS} layers' caches — {r['gpu']}, "
             f"torch {r['torch']}, {r['date']}", f"device-to-device copy: {bw:.0f} GB/s (read + write)"]
    for pos, p in r["positions"].items():
        default = p["default"]
        kernel = (f"kernel {default['us']:.1f} us ({default['gb_s'] / bw:.2f} of copy, "
                  f"{p['sdpa_us'] / default['us']:.2f}x SDPA)" if "us" in default
                  else f"the kernel's default launch did not run ({default['error']})")
        lines.append(f"position {pos} (length {p['length']}, cache {p['cache_mb']:.1f} MB, at copy {p['copy_us']:.1f} us): "
                     f"SDPA {p['sdpa_us']:.1f} us ({p['sdpa_gb_s'] / bw:.2f} of copy), {kernel}")
        for x in p["launches"][:5]:
            lines.append(f"    splits {x['splits'] or 'auto':>4} block {x['block']:>3} warps {x['warps']} "
                         f"stages {x['stages']}: {x['us']:.1f} us, {x['gb_s'] / bw:.2f} of copy")
        if p["errors"]:
            lines.append(f"    {len(p['errors'])} launch shapes did not run, e.g. {p['errors'][0]['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.splitlines()[0])
    parser.add_argument("--positions", default="1023,511,2047", help="decoded positions, comma-separated")
    parser.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    items = [x.strip() for x in args.positions.split(",")]
    if not all(x.isdigit() for x in items):
        parser.error(f"--positions takes positions from 0 up, comma-separated (got {args.positions!r})")
    positions = [int(x) for x in items]
    return run_probe("bench.attention", lambda: measure(positions, args.sweep), render, args.out)


if __name__ == "__main__":
    sys.exit(main())
