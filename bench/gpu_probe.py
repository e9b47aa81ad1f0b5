"""What the GPU probes (``bench.int4_gemv``, ``bench.attention``, ``bench.model``, ``bench.streams``)
share: a clear answer where there is no GPU or no Triton, then the measurement, its JSON and its
table; the measured copy bandwidth the bounds are made of; the decoder variants and their weight bytes."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS = {"bf16": {}, "int4": {"quantize_to": "int4"}}  # the fast decoder's weights: bf16, or quantized at load


def run_probe(prog: str, measure: Callable[[], dict[str, Any]], render: Callable[[dict[str, Any]], str],
              out: Path | None) -> int:
    """``measure()`` on the GPU, the report written to ``out`` if given and printed by ``render``;
    exit status 2 with a sentence where it cannot run here."""
    import torch

    if not torch.cuda.is_available():
        print(f"{prog} measures a CUDA GPU and none is visible here: run it on a GPU host.")
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"{prog} needs Triton (it comes with CUDA builds of PyTorch).")
        return 2
    report = measure()
    if out:
        out.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (median of 20)."""
    import torch

    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * (1 << 30) / statistics.median(times[5:])


def weight_bytes(decoder: Any) -> int:
    """Bytes of the decoder's weights (its caches aside)."""
    return sum(b.numel() * b.element_size() for n, b in decoder.named_buffers() if "cache" not in n)
