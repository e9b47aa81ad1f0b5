"""``python -m bench.int4_gemv``: the fast path's matrix-vector kernels alone (int4 on tensor cores
and in Triton, and bf16), beside PyTorch's ``_weight_int4pack_mm`` and cuBLAS in bf16, at the
Qwen-7B layer shapes, batch 1, against the copy bound measured in the same run (``--kinds`` picks
the kernels). Figures, never pass/fail.

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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_probe import run_probe

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
GROUP = 128
LAYERS = 32
KINDS = ("mma", "triton", "torch_int4", "cublas_bf16", "triton_bf16")
LABELS = {"mma": "mma int4", "triton": "triton int4", "torch_int4": "torch int4", "cublas_bf16": "cuBLAS bf16",
          "triton_bf16": "triton bf16"}


def _time_graph(calls: list[Callable[[], Any]], repeats: int = 7) -> float:
    """Median seconds of one pass over ``calls``, captured once as a CUDA graph and replayed
    ``repeats`` times (the kernels' own tuning timer, per pass rather than per call)."""
    from interpreter.llm.fastpath.kernels.gemv import graph_seconds

    return graph_seconds(calls, repeats=1, replays=repeats) * len(calls)


def _weights(n_out: int, n_in: int, copies: int, kinds: tuple[str, ...]) -> dict[str, list[Any]]:
    """``copies`` random weights of one shape in the layout of each kernel of ``kinds`` (speed does
    not depend on the values), and only those: the two bf16 kernels read the same weights."""
    import torch

    from interpreter.llm.fastpath.kernels import int4_gemv, int4_mma
    from interpreter.llm.fastpath.gptq_pack import INNER_K_TILES

    out: dict[str, list[Any]] = {kind: [] for kind in kinds}
    groups = n_in // GROUP
    for _ in range(copies):
        if "mma" in out:
            words = torch.randint(-2**31, 2**31 - 1, (n_out // 16, n_in // 64, 32, 4), dtype=torch.int32, device="cuda")
            sz = torch.randint(-2**31, 2**31 - 1, (n_out // 16, groups, 8, 2), dtype=torch.int32, device="cuda")
            out["mma"].append(int4_mma.MmaWeight(words, sz, GROUP))
        scales = (torch.rand(groups, n_out, device="cuda") * 0.01).to(torch.bfloat16)
        zeros = (torch.randn(groups, n_out, device="cuda") * 0.01).to(torch.bfloat16)
        if "triton" in out:
            words = torch.randint(-2**31, 2**31 - 1, (n_in // 8, n_out), dtype=torch.int32, device="cuda")
            out["triton"].append(int4_gemv.PackedGemvWeight(words, scales, zeros, GROUP))
        if "torch_int4" in out:
            packed = torch.randint(0, 256, (n_out, n_in // 2), dtype=torch.uint8, device="cuda")
            out["torch_int4"].append((torch.ops.aten._convert_weight_to_int4pack(packed, INNER_K_TILES),
                                      torch.stack([scales, zeros], dim=2).contiguous()))
        bf16 = [kind for kind in ("cublas_bf16", "triton_bf16") if kind in out]
        if bf16:
            weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
            for kind in bf16:
                out[kind].append(weight)
    return out


def _calls(kind: str, weights: list[Any], x: Any, config: Any = None) -> list[Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    from interpreter.llm.fastpath.kernels import int4_gemv, int4_mma

    if kind == "mma":
        return [lambda w=w: int4_mma.launch(x[0], w, config) for w in weights]
    if kind == "triton":
        return int4_gemv.product_calls(x[0], weights, config)
    if kind == "triton_bf16":
        from interpreter.llm.fastpath.kernels import bf16_gemv

        counts = [bf16_gemv.counters(w.shape[0], config, x.device) for w in weights]
        return [lambda w=w, c=c: bf16_gemv.launch(x[0], w, config, c) for w, c in zip(weights, counts)]
    if kind == "torch_int4":
        return [lambda w=w: torch.ops.aten._weight_int4pack_mm(x, w[0], GROUP, w[1]) for w in weights]
    return [lambda w=w: F.linear(x, w) for w in weights]


def _bytes(kind: str, n_out: int, n_in: int) -> int:
    if kind in ("cublas_bf16", "triton_bf16"):
        return n_out * n_in * 2
    return n_out * n_in // 2 + (n_in // GROUP) * n_out * 4  # 4-bit values, bf16 scale and zero per group


def check(kinds: tuple[str, ...], n_out: int = 4096, n_in: int = 4096) -> dict[str, float]:
    """Relative error of each int4 kernel against the dequantized weight on fresh random data."""
    import torch

    from interpreter.llm.fastpath.kernels import int4_gemv, int4_mma
    from interpreter.llm.fastpath.gptq_pack import PackedInt4, quantize

    w = quantize(torch.randn(n_out, n_in, device="cuda") * 0.02, GROUP)
    x = torch.randn(1, n_in, device="cuda").to(torch.bfloat16)
    ref = x.double() @ w.dequantize(torch.float64).t()
    rel = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
    out = {"torch_int4_rel_err": rel(PackedInt4(w, "cuda")(x))}
    if "mma" in kinds:
        out["mma_rel_err"] = rel(int4_mma.MmaInt4(w.q, w.scales_zeros, GROUP, "cuda")(x))
        # every launch shape the tuner may pick, not only the one it picked for this weight
        packed = int4_mma.pack(w.q, w.scales_zeros, GROUP)
        out["mma_worst_shape_rel_err"] = max(rel(int4_mma.launch(x[0], packed, config))
                                             for config in int4_mma.candidates())
    if "triton" in kinds:
        out["triton_rel_err"] = rel(int4_gemv.TritonInt4(w.q, w.scales_zeros, GROUP, "cuda")(x))
    return out


def _config(kind: str, weight: Any, processors: int) -> Any:
    """The launch shape the fast path would use for this weight: timed over every candidate once
    per GPU, then read from ``$JUPYBOX_HOME/gemv.json`` (so a probe after a model run does not time
    them again)."""
    from interpreter.llm.fastpath.kernels import bf16_gemv, int4_gemv, int4_mma

    if kind == "mma":
        return int4_mma.tune(weight)
    if kind == "triton":
        return int4_gemv.tune(weight)
    if kind == "triton_bf16":
        n_out, n_in = weight.shape
        times, _ = bf16_gemv.time_shape(weight, bf16_gemv.candidates(n_out, n_in, processors))
        return min(times, key=times.__getitem__)
    return None


def run(kinds: tuple[str, ...]) -> dict[str, Any]:
    import torch
    import triton

    from bench.gpu_probe import copy_bandwidth

    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {"date": datetime.date.today().isoformat(), "gpu": props.name, "torch": torch.__version__,
                              "triton": triton.__version__, "group": GROUP, "kinds": list(kinds),
                              "copy_bandwidth_tb_s": copy_bandwidth() / 1e12, "check": check(kinds), "shapes": {}}
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    model_weights: dict[str, dict[str, list[Any]]] = {}
    configs: dict[tuple[str, str], Any] = {}
    for name, (n_out, n_in) in SHAPES.items():
        copies = max(LAYERS, -(-4 * l2 // (n_out * n_in // 2)))
        weights = _weights(n_out, n_in, copies, kinds)
        model_weights[name] = {k: v[:LAYERS] for k, v in weights.items()}
        xin = x if n_in == 4096 else torch.randn(1, n_in, device="cuda").to(torch.bfloat16)
        row: dict[str, Any] = {"n_out": n_out, "n_in": n_in}
        for kind in kinds:
            config = configs[kind, name] = _config(kind, weights[kind][0], props.multi_processor_count)
            if config is not None:
                row[f"{kind}_config"] = dataclasses.asdict(config)
            t = _time_graph(_calls(kind, weights[kind], xin, config)) / copies
            row[f"{kind}_us"] = t * 1e6
            row[f"{kind}_gb_s"] = _bytes(kind, n_out, n_in) / t / 1e9
        report["shapes"][name] = row
        del weights
    # the decode step's projections for one token: every layer's four weights, in order
    xs = {name: (x if n_in == 4096 else torch.randn(1, n_in, device="cuda").to(torch.bfloat16))
          for name, (_, n_in) in SHAPES.items()}
    model: dict[str, Any] = {}
    for kind in kinds:
        calls = []
        for layer in range(LAYERS):
            for name in SHAPES:
                calls += _calls(kind, [model_weights[name][kind][layer]], xs[name], configs[kind, name])
        t = _time_graph(calls)
        size = LAYERS * sum(_bytes(kind, *shape) for shape in SHAPES.values())
        model[kind] = {"ms": t * 1e3, "gb_s": size / t / 1e9, "gb": size / 1e9}
    report["model"] = model
    return report


def render(r: dict[str, Any]) -> str:
    bw = r["copy_bandwidth_tb_s"] * 1e3
    kinds = r["kinds"]
    errors = ", ".join(f"{k.removesuffix('_rel_err')} {v:.1e}" for k, v in r["check"].items())
    lines = [f"int4 matrix-vector kernels, batch 1, group {r['group']} — {r['gpu']}, torch {r['torch']}, "
             f"triton {r['triton']}, {r['date']}",
             f"device-to-device copy: {bw:.0f} GB/s (read + write); int4 error vs dequantized weight: {errors}",
             f"{'shape':22}" + "".join(f"{LABELS[k] + ' us':>16}{'GB/s':>7}" for k in kinds)]
    for name, s in r["shapes"].items():
        lines.append(f"{name + ' ' + str(s['n_in']) + '->' + str(s['n_out']):22}"
                     + "".join(f"{s[f'{k}_us']:16.1f}{s[f'{k}_gb_s']:7.0f}" for k in kinds))
    m = r["model"]
    lines.append(f"{'32 layers, one token':22}" + "".join(f"{m[k]['ms'] * 1e3:16.0f}{m[k]['gb_s']:7.0f}" for k in kinds))
    lines.append("ratio to the copy bandwidth, 32 layers: "
                 + ", ".join(f"{LABELS[k]} {m[k]['gb_s'] / bw:.2f}" for k in kinds))
    if "torch_int4" in kinds:
        lines.append("speed against torch int4, 32 layers: "
                     + ", ".join(f"{LABELS[k]} {m['torch_int4']['ms'] / m[k]['ms']:.2f}x" for k in kinds
                                 if k != "torch_int4"))
    for name, s in r["shapes"].items():
        chosen = {k: s[f"{k}_config"] for k in kinds if f"{k}_config" in s}
        if chosen:
            lines.append(f"launch shapes, {name}: {chosen}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_gemv", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"kernels to time, comma-separated (default: all of {', '.join(KINDS)})")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        parser.error(f"unknown kernel {', '.join(unknown) or '(none given)'}: choose from {', '.join(KINDS)}")
    return run_probe("bench.int4_gemv", lambda: run(kinds), render, args.out)


if __name__ == "__main__":
    sys.exit(main())
