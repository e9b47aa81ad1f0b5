"""``python -m bench.int4_gemv``: the fast path's matrix-vector kernels alone (int4, and bf16), beside
PyTorch's ``_weight_int4pack_mm`` and cuBLAS in bf16, at the Qwen-7B layer shapes, batch 1, against
the copy bound measured in the same run. Figures, never pass/fail.

Every product reads weights that are not in the L2 cache (each kernel runs over enough distinct
copies of its weight), launches are replayed from CUDA graphs (as the decode step replays them), and
"GB/s" is the bytes a product must read (weights, scales and zeros; the activation is negligible)
over its median time. The "model" row runs the 4 projections of all 32 layers with distinct weights
in one graph: the decode step's matrix-vector work for one token.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
GROUP = 128
LAYERS = 32
KINDS = ("triton", "torch_int4", "cublas_bf16", "triton_bf16")


def _time_graph(calls: list[Callable[[], Any]], repeats: int = 7) -> float:
    """Median seconds of one pass over ``calls``, captured once as a CUDA graph and replayed."""
    import torch

    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
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


def _weights(n_out: int, n_in: int, copies: int) -> dict[str, list[Any]]:
    """``copies`` random weights of one shape in each kernel's own layout (speed does not depend on
    the values): ours, PyTorch's packed int4, and bf16."""
    import torch

    from interpreter.llm import int4_gemv
    from interpreter.llm.gptq_pack import INNER_K_TILES

    out: dict[str, list[Any]] = {"triton": [], "torch_int4": [], "cublas_bf16": []}
    groups = n_in // GROUP
    for _ in range(copies):
        words = torch.randint(-2**31, 2**31 - 1, (n_in // 8, n_out), dtype=torch.int32, device="cuda")
        scales = (torch.rand(groups, n_out, device="cuda") * 0.01).to(torch.bfloat16)
        zeros = (torch.randn(groups, n_out, device="cuda") * 0.01).to(torch.bfloat16)
        out["triton"].append(int4_gemv.PackedGemvWeight(words, scales, zeros, GROUP))
        packed = torch.randint(0, 256, (n_out, n_in // 2), dtype=torch.uint8, device="cuda")
        out["torch_int4"].append((torch.ops.aten._convert_weight_to_int4pack(packed, INNER_K_TILES),
                                  torch.stack([scales, zeros], dim=2).contiguous()))
        out["cublas_bf16"].append(torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16))
    return out


def _calls(kind: str, weights: list[Any], x: Any, config: Any = None) -> list[Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    from interpreter.llm import int4_gemv

    if kind == "triton":
        return int4_gemv.product_calls(x[0], weights, config)
    if kind == "triton_bf16":
        from interpreter.llm import bf16_gemv

        counts = [bf16_gemv.counters(w.shape[0], config, x.device) for w in weights]
        return [lambda w=w, c=c: bf16_gemv.launch(x[0], w, config, c) for w, c in zip(weights, counts)]
    if kind == "torch_int4":
        return [lambda w=w: torch.ops.aten._weight_int4pack_mm(x, w[0], GROUP, w[1]) for w in weights]
    return [lambda w=w: F.linear(x, w) for w in weights]


def _bytes(kind: str, n_out: int, n_in: int) -> int:
    if kind in ("cublas_bf16", "triton_bf16"):
        return n_out * n_in * 2
    return n_out * n_in // 2 + (n_in // GROUP) * n_out * 4  # 4-bit values, bf16 scale and zero per group


def check(n_out: int = 4096, n_in: int = 4096) -> dict[str, float]:
    """Relative error of each int4 kernel against the dequantized weight on fresh random data."""
    import torch

    from interpreter.llm import int4_gemv
    from interpreter.llm.gptq_pack import PackedInt4, quantize

    w = quantize(torch.randn(n_out, n_in, device="cuda") * 0.02, GROUP)
    x = torch.randn(1, n_in, device="cuda").to(torch.bfloat16)
    ref = x.double() @ w.dequantize(torch.float64).t()
    ours = int4_gemv.TritonInt4(w.q, w.scales_zeros, GROUP, "cuda")(x).double()
    theirs = PackedInt4(w, "cuda")(x).double()
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    return {"triton_rel_err": rel(ours), "torch_int4_rel_err": rel(theirs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import triton

    from bench.model import copy_bandwidth
    from interpreter.llm import int4_gemv

    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "gpu": props.name, "torch": torch.__version__,
                              "triton": triton.__version__, "group": GROUP, "copy_bandwidth_tb_s": copy_bandwidth() / 1e12,
                              "check": check(), "shapes": {}}
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    model_weights: dict[str, dict[str, list[Any]]] = {}
    for name, (n_out, n_in) in SHAPES.items():
        copies = max(LAYERS, -(-4 * l2 // (n_out * n_in // 2)))
        weights = _weights(n_out, n_in, copies)
        model_weights[name] = {k: v[:LAYERS] for k, v in weights.items()}
        xin = x if n_in == 4096 else torch.randn(1, n_in, device="cuda").to(torch.bfloat16)
        # the launch shape the fast path would use: timed over every candidate once per GPU, then
        # read from $JUPYBOX_HOME/gemv.json (so a probe after a model run does not time them again)
        best = int4_gemv.tune(weights["triton"][0])
        row: dict[str, Any] = {"n_out": n_out, "n_in": n_in, "triton_config": dataclasses.asdict(best)}
        from interpreter.llm import bf16_gemv

        bf_times, _ = bf16_gemv.time_shape(weights["cublas_bf16"][0],
                                           bf16_gemv.candidates(n_out, n_in, props.multi_processor_count))
        best_bf = min(bf_times, key=bf_times.__getitem__)
        row["triton_bf16_config"] = dataclasses.asdict(best_bf)
        weights["triton_bf16"] = weights["cublas_bf16"]
        model_weights[name]["triton_bf16"] = weights["cublas_bf16"][:LAYERS]
        for kind in KINDS:
            t = _time_graph(_calls(kind, weights[kind], xin, best_bf if kind == "triton_bf16" else best)) / copies
            row[f"{kind}_us"] = t * 1e6
            row[f"{kind}_gb_s"] = _bytes(kind, n_out, n_in) / t / 1e9
        report["shapes"][name] = row
        del weights
    # the decode step's projections for one token: every layer's four weights, in order
    xs = {name: (x if n_in == 4096 else torch.randn(1, n_in, device="cuda").to(torch.bfloat16))
          for name, (_, n_in) in SHAPES.items()}
    model: dict[str, Any] = {}
    from interpreter.llm import bf16_gemv

    for kind in KINDS:
        calls = []
        for layer in range(LAYERS):
            for name in SHAPES:
                config = (int4_gemv.GemvConfig(**report["shapes"][name]["triton_config"]) if kind == "triton" else
                          bf16_gemv.Bf16Config(**report["shapes"][name]["triton_bf16_config"]) if kind == "triton_bf16"
                          else None)
                calls += _calls(kind, [model_weights[name][kind][layer]], xs[name], config)
        t = _time_graph(calls)
        size = LAYERS * sum(_bytes(kind, *shape) for shape in SHAPES.values())
        model[kind] = {"ms": t * 1e3, "gb_s": size / t / 1e9, "gb": size / 1e9}
    report["model"] = model
    return report


def render(r: dict[str, Any]) -> str:
    bw = r["copy_bandwidth_tb_s"] * 1e3
    lines = [f"int4 matrix-vector kernels, batch 1, group {r['group']} — {r['gpu']}, torch {r['torch']}, "
             f"triton {r['triton']}, {r['date']}",
             f"device-to-device copy: {bw:.0f} GB/s (read + write); int4 error vs dequantized weight: "
             f"triton {r['check']['triton_rel_err']:.1e}, torch {r['check']['torch_int4_rel_err']:.1e}",
             f"{'shape':22}{'triton us':>10}{'GB/s':>7}{'torch int4 us':>14}{'GB/s':>7}{'cuBLAS bf16 us':>15}{'GB/s':>7}"
             f"{'triton bf16 us':>15}{'GB/s':>7}  triton int4 / bf16 config"]
    for name, s in r["shapes"].items():
        lines.append(f"{name + ' ' + str(s['n_in']) + '->' + str(s['n_out']):22}{s['triton_us']:10.1f}{s['triton_gb_s']:7.0f}"
                     f"{s['torch_int4_us']:14.1f}{s['torch_int4_gb_s']:7.0f}{s['cublas_bf16_us']:15.1f}"
                     f"{s['cublas_bf16_gb_s']:7.0f}{s['triton_bf16_us']:15.1f}{s['triton_bf16_gb_s']:7.0f}"
                     f"  {s['triton_config']} / {s['triton_bf16_config']}")
    m = r["model"]
    lines.append(f"{'32 layers, one token':22}{m['triton']['ms'] * 1e3:10.0f}{m['triton']['gb_s']:7.0f}"
                 f"{m['torch_int4']['ms'] * 1e3:14.0f}{m['torch_int4']['gb_s']:7.0f}"
                 f"{m['cublas_bf16']['ms'] * 1e3:15.0f}{m['cublas_bf16']['gb_s']:7.0f}"
                 f"{m['triton_bf16']['ms'] * 1e3:15.0f}{m['triton_bf16']['gb_s']:7.0f}")
    lines.append(f"ratio to the copy bandwidth, 32 layers: triton {m['triton']['gb_s'] / bw:.2f}, torch int4 "
                 f"{m['torch_int4']['gb_s'] / bw:.2f}, cuBLAS bf16 {m['cublas_bf16']['gb_s'] / bw:.2f}, triton bf16 "
                 f"{m['triton_bf16']['gb_s'] / bw:.2f}; "
                 f"triton / torch int4 speed {m['torch_int4']['ms'] / m['triton']['ms']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_gemv", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.int4_gemv measures a CUDA GPU and none is visible here: run it on a GPU host.")
        return 2
    from interpreter.llm import int4_gemv

    if not int4_gemv.available():
        print("bench.int4_gemv needs Triton (it comes with CUDA builds of PyTorch).")
        return 2
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
