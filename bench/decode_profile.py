"""``python -m bench.decode_profile``: where one decode step's time goes, kernel by kernel, in bf16
or int4 with each 4-bit kernel (``JUPYBOX_INT4_KERNEL``: mma, triton or torch), on a Qwen-7B-shaped model
cut to a few layers (compile time; every layer is the same), at a chosen position. Figures, never
pass/fail.

The compiled step is replayed as a CUDA graph, as the fast path runs it, under PyTorch's profiler;
kernels are grouped by name and their device time per layer is printed beside the step's total.
With programmatic launch (Hopper and later) kernels overlap: a kernel starts early and its time
includes its wait for the one ahead, so per-kernel times add up to more than the step. For each
kernel's own time, run with ``JUPYBOX_PDL=0`` (the step is then slower than the fast path's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def profile(kernel: str, layers: int, position: int, steps: int = 20) -> dict[str, Any]:
    """``kernel``: ``bf16`` (16-bit weights) or the 4-bit kernel's name."""
    import torch

    if kernel != "bf16":
        os.environ["JUPYBOX_INT4_KERNEL"] = kernel
    from interpreter.llm import fastpath

    max_seq = (position // fastpath.BUCKET + 1) * fastpath.BUCKET
    shape = dataclasses.replace(fastpath.QWEN_7B, n_layers=layers, max_context=max(1024, max_seq))
    decoder = fastpath.FastDecoder(shape, fastpath.random_weights(shape, "cuda"), max_seq=max_seq, device="cuda",
                                   quantize_to=None if kernel == "bf16" else "int4")
    token = torch.tensor([13], device="cuda")
    for _ in range(3):
        decoder.decode(token, position)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        decoder.decode(token, position)
    end.record()
    end.synchronize()
    step_ms = start.elapsed_time(end) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.decode(token, position)
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name][0] += e.device_time_total
            per_name[e.name][1] += 1
    kernels = sorted(((n, t / steps / layers, c / steps / layers) for n, (t, c) in per_name.items()),
                     key=lambda x: -x[1])
    busy = sum(k[1] for k in kernels) * layers / 1e3
    del decoder
    torch.cuda.empty_cache()
    return {"kernel": kernel, "position": position, "layers": layers, "step_ms": step_ms, "kernels_busy_ms": busy,
            "kernels_per_step": sum(k[2] for k in kernels) * layers,
            "per_layer_us": [{"name": n[:90], "us": t, "count": c} for n, t, c in kernels[:25]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kernels", default="bf16,mma,torch", help="bf16, or int4 with the named 4-bit kernel")
    parser.add_argument("--position", type=int, default=1023, help="the decoded token's position")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.decode_profile measures a CUDA GPU and none is visible here.")
        return 2
    results = [profile(k, args.layers, args.position) for k in args.kernels.split(",")]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{r['kernel']}, position {r['position']}: {r['layers']} layers, step {r['step_ms']:.3f} ms (graph replay), "
              f"kernels busy {r['kernels_busy_ms']:.3f} ms, {r['kernels_per_step']:.0f} kernels a step")
        for k in r["per_layer_us"][:14]:
            print(f"  {k['us']:8.1f} us/layer  x{k['count']:.2f}  {k['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
