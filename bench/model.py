"""``jupybox bench model``: decode speed, time to first token and peak GPU memory of the local
model backend's fast path, beside plain ``transformers.generate`` measured in the same run, the
memory-bandwidth bound, and the figures the Qwen-7B-Chat-Int4 model card publishes. Figures, never
pass/fail.

Definitions (the model card's): decode tokens/s is new tokens over the time after the first one,
from a 1-token context, batch 1, greedy, with a host read of every token (what streaming costs);
time to first token is for a 2048-token prompt; peak memory is ``torch.cuda.max_memory_allocated``
while encoding 2048 tokens and while generating the largest ``--tokens`` count, the model alone on
the GPU. The bound is weight bytes (+ the KV cache read at the mean context) over a measured
device-to-device copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.gpu_probe import VARIANTS, copy_bandwidth, weight_bytes

# Qwen-7B-Chat-Int4 model card: A100-80G, PyTorch 2.0.1, batch 1
CARD = {"int4": {"decode_2048": 50.09, "decode_8192": 38.61, "mem_encode_2048_gb": 8.21, "mem_generate_8192_gb": 13.63},
        "bf16": {"decode_2048": 40.93, "decode_8192": 36.14, "mem_encode_2048_gb": 16.99, "mem_generate_8192_gb": 22.53}}


def add_model_flags(p: Any) -> None:
    p.add_argument("--shape", default="qwen-7b", choices=["qwen-7b"], help="random weights of this shape")
    p.add_argument("--model", help="a local checkpoint folder instead of random weights")
    p.add_argument("--dtype", default="bf16,int4", help="bf16, int4 or both, comma-separated; none: checks only")
    p.add_argument("--tokens", default="2048,8192", help="new-token counts for decode speed")
    p.add_argument("--baseline", default="static,default",
                   help="plain generate baselines to measure: static, default (comma-separated), or none")
    p.add_argument("--default-cache-tokens", type=int, default=256,
                   help="new tokens for the default-cache baseline (it is slow: ~13 tokens/s)")
    p.add_argument("--check", default="random,fp32,trained",
                   help="greedy-equality checks against plain generate (random, fp32, trained; comma-separated) "
                        "or none; see bench/model_check.py")
    p.add_argument("--train-seconds", type=float, default=60.0, help="training time of the 'trained' check's model")
    p.add_argument("--streams", help="stream counts for the several-streams phase (e.g. 1,8,16,32); when given, "
                   "only that phase runs (bench/streams.py)")
    p.add_argument("--stream-prompt", type=int, default=128, help="prompt tokens of each stream in that phase")
    p.add_argument("--stream-tokens", type=int, default=256, help="greedy steps of each stream in that phase")
    p.add_argument("--out", type=Path, help="also write the JSON here, updated after every phase")
    p.add_argument("--json", action="store_true")


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def programmatic_launch() -> bool:
    """Whether the fast path's kernels launch as programmatic dependents here (Hopper or later,
    Triton there, ``JUPYBOX_PDL`` not 0)."""
    import torch

    from interpreter.llm.fastpath.kernels import gemv

    return gemv.programmatic_launch(torch.device("cuda", 0))


def _decode_rate(decoder: Any, n: int) -> dict[str, float]:
    stamps: list[float] = []
    for _ in decoder.generate([13], n):
        stamps.append(time.perf_counter())
    return {"tokens": len(stamps), "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def _ttft(decoder: Any, prompt_len: int = 2048, repeats: int = 5) -> float:
    import torch

    prompt = torch.randint(0, decoder.shape.vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        next(iter(decoder.generate(prompt, 1)))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] if len(times) > 1 else times)


def _peak(fn: Any) -> float:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    return torch.cuda.max_memory_allocated() / 1e9


def bench_fast(decoder: Any, label: str, tokens: list[int], report: dict[str, Any], save: Any) -> None:
    """TTFT and encode-2048 memory with a 2049-position cache, then decode speed for each count
    with a cache of the largest; the peak of the largest run is the 'generating' memory. Counts
    past the model's context (its rotary tables) are skipped and said so."""
    import torch

    r: dict[str, Any] = report.setdefault("fast", {}).setdefault(label, {})
    r["weight_gb"] = weight_bytes(decoder) / 1e9
    positions = int(decoder.cos.shape[0])
    runnable = [n for n in sorted(tokens) if n + 1 <= positions]
    if len(runnable) < len(tokens):
        r["skipped"] = (f"{', '.join(str(n) for n in tokens if n not in runnable)} new tokens: the model's "
                        f"context is {positions} positions")
    if positions >= 2049:
        decoder.set_max_seq(2049)
        r["mem_encode_2048_gb"] = _peak(lambda: _ttft(decoder, 2048, repeats=1))
        r["ttft_2048_ms"] = _ttft(decoder) * 1e3
        save()
    if not runnable:
        return
    decoder.set_max_seq(max(runnable) + 1)
    t0 = time.perf_counter()
    decoder.warm_up()
    r["compile_and_capture_s"] = time.perf_counter() - t0
    _decode_rate(decoder, 64)
    for n in runnable:
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        r[f"decode_{n}"] = _decode_rate(decoder, n)["tok_s"]
        r[f"mem_generate_{n}_gb"] = torch.cuda.max_memory_allocated() / 1e9
        save()


def _hf_generate(model: Any, prompt: list[int], n: int, stop_after: int | None = None, **kw: Any) -> tuple[list[int], float]:
    """Greedy ``generate``; returns the new tokens and decode tokens/s after the first."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if not stamps:
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
            return scores

    class After(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **k: Any) -> Any:
            done = stop_after is not None and input_ids.shape[1] - len(prompt) >= stop_after
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         logits_processor=LogitsProcessorList([Stamp()]),
                         stopping_criteria=StoppingCriteriaList([After()]), pad_token_id=0, **kw)
    _sync()
    new = out[0, len(prompt):].tolist()
    return new, (len(new) - 1) / (time.perf_counter() - stamps[0])


def bench_plain_and_check(shape: Any, tokens: list[int], baselines: list[str], default_tokens: int,
                          checks: list[str], report: dict[str, Any], save: Any) -> None:
    """Plain ``generate`` on a random Qwen2 model of the shape: the 'random' greedy check against
    fast decoders built from its very weights, then the baselines."""
    import torch

    from bench import model_check
    from interpreter.llm import fastpath

    model = model_check.hf_qwen2(shape, torch.bfloat16)
    if "random" in checks:  # a bf16 check: the bf16 fast path, whichever --dtype is benchmarked
        decoders = {"bf16": fastpath.FastDecoder(shape, fastpath.TensorSource(model.state_dict()), max_seq=1024,
                                                 device="cuda", **VARIANTS["bf16"])}
        model_check.run_checks(["random"], report, save, model=model, decoders=decoders)
        del decoders
    plain_r = report.setdefault("plain", {})
    if "default" in baselines:
        plain_r[f"default_cache_decode_{default_tokens}"] = _hf_generate(model, [13], default_tokens)[1]
        save()
    if "static" in baselines:
        n = min(tokens)
        t0 = time.perf_counter()
        _hf_generate(model, [13], n, stop_after=16, cache_implementation="static")  # compiles, same cache size
        plain_r["static_cache_warmup_s"] = time.perf_counter() - t0
        plain_r[f"static_cache_decode_{n}"] = _hf_generate(model, [13], n, cache_implementation="static")[1]
        save()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run_model_bench(args: Any) -> int:
    import torch
    import transformers

    from interpreter.llm import fastpath

    def names(flag: str, value: str, allowed: Any) -> list[str]:
        chosen = [] if value == "none" else [v.strip() for v in str(value).split(",")]
        unknown = [v for v in chosen if v not in allowed]
        if unknown:
            raise ValueError(f"unknown {flag} {', '.join(unknown)}: choose from {', '.join(allowed)} (or none)")
        return chosen

    from bench.model_check import CHECKS

    try:
        if not all(t.strip().isdigit() and int(t) > 1 for t in str(args.tokens).split(",")):
            raise ValueError(f"--tokens takes new-token counts above 1, comma-separated (got {args.tokens!r})")
        if args.default_cache_tokens < 2:
            raise ValueError("--default-cache-tokens takes a count above 1")
        if not args.train_seconds > 0:
            raise ValueError("--train-seconds takes a positive number of seconds")
        tokens = sorted(int(t) for t in str(args.tokens).split(","))
        dtypes = names("--dtype", args.dtype, VARIANTS)
        baselines = names("--baseline", args.baseline, ("static", "default"))
        checks = names("--check", args.check, CHECKS)
        if args.streams is not None and not all(t.strip().isdigit() and 1 <= int(t) <= 32
                                                for t in str(args.streams).split(",")):
            raise ValueError(f"--streams takes stream counts from 1 to 32, comma-separated (got {args.streams!r})")
        if args.stream_prompt < 1 or args.stream_tokens < 9:
            raise ValueError("--stream-prompt takes a count from 1 and --stream-tokens one from 9")
    except ValueError as exc:
        print(f"jupybox bench model: {exc}")
        return 2
    if not torch.cuda.is_available():
        print("jupybox bench model measures a CUDA GPU and none is visible here: run it on a GPU host.")
        return 2
    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "gpu": props.name, "gpu_memory_gb": props.total_memory / 1e9,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "model": args.model or args.shape, "tokens": tokens, "card": CARD,
        "int4_kernel": os.environ.get("JUPYBOX_INT4_KERNEL", "auto"),
        "bf16_kernel": os.environ.get("JUPYBOX_BF16_KERNEL", "auto"),
        "decode_attention": os.environ.get("JUPYBOX_DECODE_ATTENTION", "auto"),
        "int4_glu": os.environ.get("JUPYBOX_INT4_GLU", "1") != "0",
        "programmatic_launch": programmatic_launch()}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    report["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
    save()
    if args.streams is not None:
        from bench import streams

        streams.run(args, report, save)
        save()
        print(json.dumps(report, indent=1) if args.json else "\n".join(render(report).splitlines()[:2]
                                                                         + streams.render(report)))
        return 0
    big = fastpath.DecoderShape(**{**dataclasses.asdict(fastpath.QWEN_7B), "max_context": 32768})
    if args.model and (baselines or "random" in checks):
        report["not_run"] = "the plain baselines and the 'random' check use random weights of the Qwen-7B shape, not --model"
    elif baselines or "random" in checks:
        bench_plain_and_check(big, tokens, baselines, args.default_cache_tokens, checks, report, save)
    capacity = max(max(tokens), 2048) + 1  # the longest generation, and the 2048-token prompt
    for d in dtypes:  # each built alone on the GPU, so that its peak memory is its own
        try:
            if args.model:
                decoder = fastpath.load_checkpoint(args.model, device="cuda", dtype=torch.bfloat16,
                                                   max_seq=capacity, **VARIANTS[d])
            else:
                decoder = fastpath.FastDecoder(big, fastpath.random_weights(big, "cuda"), max_seq=capacity,
                                               device="cuda", **VARIANTS[d])
            bench_fast(decoder, d, tokens, report, save)
            add_bounds(report, d, decoder, tokens)
        except Exception as exc:  # keep the other variants' figures; the error is part of the report
            report.setdefault("errors", {})[d] = f"{type(exc).__name__}: {exc}"
            import traceback
            traceback.print_exc()
        decoder = None
        gc.collect()
        torch.cuda.empty_cache()
    from bench import model_check

    model_check.run_checks([c for c in checks if c != "random"], report, save, train_seconds=args.train_seconds,
                           variants={d: VARIANTS[d] for d in (dtypes or list(VARIANTS))})
    save()
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


def bound_tokens_per_s(decoder: Any, bandwidth: float, context: int) -> float:
    """Decode tokens/s if each step only read the weights once (of the embedding, one row) and the KV
    cache of ``context`` positions, at ``bandwidth`` bytes/s."""
    shape = decoder.shape
    weights = weight_bytes(decoder) - shape.vocab * shape.d_model * decoder.embed.element_size()
    kv_per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * decoder.dtype.itemsize
    return bandwidth / (weights + kv_per_token * context)


def add_bounds(report: dict[str, Any], label: str, decoder: Any, tokens: list[int]) -> None:
    """The bound at the mean context of each generation, at the measured copy bandwidth."""
    r = report["fast"][label]
    for n in tokens:
        r[f"bound_{n}"] = bound_tokens_per_s(decoder, report["copy_bandwidth_tb_s"] * 1e12, n // 2)


def render(r: dict[str, Any]) -> str:
    lines = [f"jupybox bench model — {r['model']}, {r['gpu']}, torch {r['torch']} (CUDA {r['cuda']}), "
             f"transformers {r['transformers']}, {r['date']}",
             f"device-to-device copy: {r['copy_bandwidth_tb_s']:.2f} TB/s (read + write); int4 kernel: "
             f"{r.get('int4_kernel', 'torch')} (JUPYBOX_INT4_KERNEL); bf16 kernel: {r.get('bf16_kernel', 'cublas')} "
             f"(JUPYBOX_BF16_KERNEL); int4 SiLU fused: {'yes' if r.get('int4_glu') else 'no'} (JUPYBOX_INT4_GLU); "
             f"decode attention: {r.get('decode_attention', 'sdpa')} (JUPYBOX_DECODE_ATTENTION); "
             f"programmatic launch: {'on' if r.get('programmatic_launch') else 'off'} (JUPYBOX_PDL)"]
    from bench.model_check import render_checks

    lines += render_checks(r.get("check", {}))
    lines.append(f"{'figure':34}{'fast bf16':>11}{'fast int4':>11}{'card bf16':>11}{'card int4':>11}  (card: A100, torch 2.0.1)")
    fast = r.get("fast", {})

    def cell(label: str, key: str, fmt: str = "{:.1f}") -> str:
        v = fast.get(label, {}).get(key)
        return f"{fmt.format(v) if isinstance(v, (int, float)) else '-':>11}"

    def card(label: str, key: str) -> str:
        v = r["card"][label].get(key)
        return f"{v if v is not None else '-':>11}"

    for n in r["tokens"]:
        lines.append(f"{f'decode tok/s, {n} tokens':34}{cell('bf16', f'decode_{n}')}{cell('int4', f'decode_{n}')}"
                     f"{card('bf16', f'decode_{n}')}{card('int4', f'decode_{n}')}")
        lines.append(f"{f'  bandwidth bound, {n} tokens':34}{cell('bf16', f'bound_{n}')}{cell('int4', f'bound_{n}')}")
    lines.append(f"{'time to first token, 2048 (ms)':34}{cell('bf16', 'ttft_2048_ms')}{cell('int4', 'ttft_2048_ms')}")
    lines.append(f"{'peak GB, encode 2048':34}{cell('bf16', 'mem_encode_2048_gb', '{:.2f}')}"
                 f"{cell('int4', 'mem_encode_2048_gb', '{:.2f}')}{card('bf16', 'mem_encode_2048_gb')}{card('int4', 'mem_encode_2048_gb')}")
    n = max(r["tokens"])
    lines.append(f"{f'peak GB, generate {n}':34}{cell('bf16', f'mem_generate_{n}_gb', '{:.2f}')}"
                 f"{cell('int4', f'mem_generate_{n}_gb', '{:.2f}')}{card('bf16', f'mem_generate_{n}_gb')}"
                 f"{card('int4', f'mem_generate_{n}_gb')}")
    for k, v in r.get("plain", {}).items():
        lines.append(f"plain generate, {k.replace('_', ' ')}: {v:.1f}")
    lines += [f"{label}: skipped {x['skipped']}" for label, x in fast.items() if x.get("skipped")]
    lines += [f"{label}: failed: {message}" for label, message in r.get("errors", {}).items()]
    if r.get("not_run"):
        lines.append(f"not run: {r['not_run']}")
    return "\n".join(lines)


if __name__ == "__main__":  # the same command without the rest of jupybox installed
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    add_model_flags(parser)
    sys.exit(run_model_bench(parser.parse_args()))
