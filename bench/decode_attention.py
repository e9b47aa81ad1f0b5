"""``python -m bench.decode_attention``: the decode step's attention alone, the fast path's
split-length Triton kernel beside SDPA as the fast path called it before (the 512-position bucket,
masked), at the Qwen-7B shape (32 heads of 128), bf16, against the copy bound measured in the same
run. Figures, never pass/fail.

Each figure is one token's attention over all 32 layers, each layer with its own cache (so the
cache is read from memory, not the L2), replayed from one CUDA graph as the decode step replays it.
Both variants are compiled as the decode step compiles them. "GB/s" is the keys and values a token
must read (positions 0..pos) over the median time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HEADS, HEAD_DIM, LAYERS, MAX_SEQ, BUCKET = 32, 128, 32, 8192, 512
POSITIONS = (511, 1023, 2047, 4095, 8191)


def _time(fn: Any, repeats: int = 9) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn()``."""
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def run() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from bench.model import copy_bandwidth
    from interpreter.llm import decode_attention as kernel

    props = torch.cuda.get_device_properties(0)
    splits = kernel.chunk_count(32768, HEADS, props.multi_processor_count, kernel.BLOCK_POSITIONS)
    caches = [(torch.randn(HEADS, MAX_SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16),
               torch.randn(HEADS, MAX_SEQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)) for _ in range(LAYERS)]
    q = torch.randn(1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(MAX_SEQ, device="cuda")

    def sdpa(q: torch.Tensor, pos: torch.Tensor, span: torch.Tensor, *kv: torch.Tensor) -> list[torch.Tensor]:
        visible = (span <= pos).view(1, 1, 1, span.shape[0])
        return [F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[:, :span.shape[0]][None],
                                               v[:, :span.shape[0]][None], attn_mask=visible)
                for k, v in zip(kv[::2], kv[1::2])]

    def triton(q: torch.Tensor, pos: torch.Tensor, span: torch.Tensor, *kv: torch.Tensor) -> list[torch.Tensor]:
        return [kernel.decode_attention(q[0], k[:, :span.shape[0]], v[:, :span.shape[0]], pos, splits)
                for k, v in zip(kv[::2], kv[1::2])]

    flat = [t for kv in caches for t in kv]
    steps = {name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in (("sdpa", sdpa), ("triton", triton))}
    rows = []
    for pos in POSITIONS:
        pos_t = torch.tensor([pos], device="cuda")
        span = positions[:min(MAX_SEQ, (pos // BUCKET + 1) * BUCKET)]
        torch._dynamo.maybe_mark_dynamic(span, 0)  # one compiled step for every length, as the fast path
        row: dict[str, Any] = {"position": pos}
        outs = {}
        for name, step in steps.items():
            t = _time(lambda: step(q, pos_t, span, *flat))  # noqa: B023
            outs[name] = step(q, pos_t, span, *flat)[0].float()
            size = LAYERS * 2 * (pos + 1) * HEADS * HEAD_DIM * 2
            row[f"{name}_us_per_layer"] = t / LAYERS * 1e6
            row[f"{name}_gb_s"] = size / t / 1e9
        row["max_abs_difference"] = float((outs["sdpa"] - outs["triton"]).abs().max())
        rows.append(row)
    return {"date": datetime.date.today().isoformat(), "gpu": props.name, "torch": torch.__version__,
            "copy_bandwidth_tb_s": copy_bandwidth() / 1e12, "splits": splits, "rows": rows}


def render(r: dict[str, Any]) -> str:
    bw = r["copy_bandwidth_tb_s"] * 1e3
    lines = [f"decode attention, one token, 32 layers x 32 heads x 128, bf16 — {r['gpu']}, torch {r['torch']}, "
             f"{r['date']}; copy {bw:.0f} GB/s; {r['splits']} chunks a head",
             f"{'position':>9}{'SDPA us/layer':>15}{'GB/s':>7}{'Triton us/layer':>17}{'GB/s':>7}{'of copy':>9}"
             f"{'speed-up':>10}{'max |diff|':>12}"]
    for row in r["rows"]:
        lines.append(f"{row['position']:9d}{row['sdpa_us_per_layer']:15.1f}{row['sdpa_gb_s']:7.0f}"
                     f"{row['triton_us_per_layer']:17.1f}{row['triton_gb_s']:7.0f}{row['triton_gb_s'] / bw:9.2f}"
                     f"{row['sdpa_us_per_layer'] / row['triton_us_per_layer']:9.2f}x{row['max_abs_difference']:12.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.decode_attention measures a CUDA GPU and none is visible here: run it on a GPU host.")
        return 2
    report = run()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
