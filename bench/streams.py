"""Several conversations at once on the fast path: ``python -m bench.model --streams 1,8,16,32``.

Figures, never pass/fail, on random weights of the Qwen-7B shape (int4 and bf16), all in one run:

* tokens/s of all streams together for each stream count, served by ``DecodeScheduler`` (what the
  server runs): every stream its own ``--stream-prompt``-token prompt, ``--stream-tokens`` greedy
  tokens, counted over the turns where all of them decode together; beside it the same streams'
  ``decode_batch`` steps driven by hand (argmax and read-back every step), so the scheduler's own
  cost shows. The ratio is against one stream decoded by ``generate`` (the single-stream path, a
  step queued ahead) in the same run; the bound is the weights plus every stream's KV cache at its
  mean context read once a step at the measured copy bandwidth;
* the batched 4-bit kernel alone at the model's four weight shapes, 8, 16 and 32 rows against one;
* greedy agreement: each of 8 streams decoded together against the same stream decoded alone;
* a 2048-token prompt arriving while 16 streams decode (``DecodeScheduler``: prefill chunks between
  decode steps): its time to first token against the same prompt with nobody else, and the slowest
  step of the running streams while it is prefilled;
* GPU memory per stream slot, and how many slots of an 8192-position cache fit beside the weights
  on an 80 GB card.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from bench.gpu_probe import VARIANTS, copy_bandwidth, weight_bytes

H100_BYTES = 80e9  # an H100's memory, as its maker counts it


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def kernel_figures(report: dict[str, Any]) -> None:
    """The batched int4 kernel at the Qwen-7B weight shapes: microseconds for 1, 8, 16 and 32 rows
    (each launch shape tuned), and the cost of 8 rows over one."""
    from interpreter.llm.fastpath.gptq_pack import quantize
    from interpreter.llm.fastpath.kernels import gemv, int4_mma

    out: dict[str, Any] = {}
    shapes = {"qkv": (3 * 4096, 4096, False), "o": (4096, 4096, False), "gate_up": (2 * 11008, 4096, True),
              "down": (4096, 11008, False)}
    for name, (n_out, n_in, glu) in shapes.items():
        w = quantize(torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02, 128)
        layer = int4_mma.MmaInt4(w.q, w.scales_zeros, 128, "cuda", glu=glu)
        layer.prepare_batches(32)
        row: dict[str, Any] = {}
        for rows in (1, 8, 16, 32):
            x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16)
            call = (lambda x=x, m=layer: m.glu(x)) if glu else (lambda x=x, m=layer: m(x))
            row[f"us_{rows}"] = gemv.graph_seconds([call], repeats=20) * 1e6
        row["weight_mb"] = (layer.words.numel() * 4 + layer.sz.numel() * 4) / 1e6
        row["tb_s_1"] = row["weight_mb"] / row["us_1"]
        row["configs"] = {8 * nt: str(c) for nt, c in layer.batch_configs.items()}
        out[name] = row
        del layer, w
    report["kernel"] = out


def _direct(decoder: Any, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Prefill each prompt into its own slot, then ``steps`` greedy ``decode_batch`` steps of all
    streams together, driven by hand, each step's tokens read back: (tokens/s of the steps, tokens
    per stream)."""
    slots = list(range(len(prompts)))
    tokens = [[int(decoder.prefill(torch.tensor(p, device=decoder.device), slot=s)[0].argmax())]
              for p, s in zip(prompts, slots)]
    _sync(decoder.device)
    started = time.perf_counter()
    for i in range(steps - 1):
        logits = decoder.decode_batch([t[-1] for t in tokens], [len(p) + i for p in prompts], slots)
        for t, v in zip(tokens, logits.argmax(-1).tolist()):
            t.append(v)
    return len(prompts) * (steps - 1) / (time.perf_counter() - started), tokens


def _served(scheduler: Any, prompts: list[list[int]], steps: int) -> tuple[float, float, float]:
    """Through the scheduler: tokens/s over the turns where every stream decodes, tokens/s from the
    first submission to the last token (prefills included), and the median of those turns (s)."""
    from interpreter.llm.fastpath.streams import StreamRequest

    first = len(scheduler.steps)
    started = time.perf_counter()
    handles = [scheduler.submit(StreamRequest(p, steps)) for p in prompts]
    for h in handles:
        h.result()
    whole = time.perf_counter() - started
    full = [t for t in list(scheduler.steps)[first:] if t.batch == len(prompts) and t.prefill_tokens == 0]
    return (len(prompts) * len(full) / sum(t.turn_s for t in full), len(prompts) * steps / whole,
            statistics.median(t.turn_s for t in full))


def stream_figures(decoder: Any, label: str, streams: list[int], prompt_len: int, steps: int, bandwidth: float,
                   report: dict[str, Any], save: Any) -> None:
    from interpreter.llm.fastpath.scheduler import DecodeScheduler

    r: dict[str, Any] = report.setdefault("streams", {}).setdefault(label, {})
    shape = decoder.shape
    r["slot_gb"] = decoder.slot_bytes() / 1e9
    kv_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * decoder.dtype.itemsize
    weights = weight_bytes(decoder) - shape.vocab * shape.d_model * decoder.embed.element_size()
    r["weight_gb"] = weights / 1e9
    r["slots_8192_on_80gb"] = int((0.9 * H100_BYTES - weight_bytes(decoder) - 2e9) // (kv_token * 8192))
    t0 = time.perf_counter()
    decoder.warm_up()
    r["compile_and_capture_s"] = time.perf_counter() - t0
    # one stream through the single-stream path (a step queued ahead): the baseline of the ratios
    prompt = _prompts(1, prompt_len, shape.vocab, seed=7)[0]
    for _ in range(2):
        stamps = []
        for _tok in decoder.generate(prompt, steps):
            stamps.append(time.perf_counter())
    r["one_stream_generate_tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    mean_context = prompt_len + steps / 2
    with DecodeScheduler(decoder, max_streams=decoder.slots) as scheduler:
        for n in streams:
            prompts = _prompts(n, prompt_len, shape.vocab, seed=n)
            _direct(decoder, prompts, 16)  # warm
            r[f"direct_tok_s_{n}"], _ = _direct(decoder, prompts, steps)
            tok_s, r[f"tok_s_with_prefill_{n}"], turn = _served(scheduler, prompts, steps)
            bound = n * bandwidth / (weights + n * kv_token * mean_context)
            r[f"tok_s_{n}"], r[f"turn_ms_{n}"], r[f"bound_{n}"] = tok_s, turn * 1e3, bound
            r[f"of_bound_{n}"] = tok_s / bound
            r[f"ratio_{n}"] = tok_s / r["one_stream_generate_tok_s"]
            save()
    if max(streams) >= 8:  # greedy agreement: 8 streams together against each alone
        prompts = _prompts(8, prompt_len, shape.vocab, seed=99)
        _, together = _direct(decoder, prompts, 32)
        agree = []
        for p, got in zip(prompts, together):
            _, alone = _direct(decoder, [p], 32)
            agree.append(next((i for i, (a, b) in enumerate(zip(alone[0], got)) if a != b), len(got)))
        r["greedy_agree_tokens_of_32"] = agree
    save()


def long_prompt_figures(decoder: Any, label: str, report: dict[str, Any], save: Any, running: int = 16,
                        prompt_len: int = 2048, repeats: int = 5) -> None:
    """Time to first token of a ``prompt_len`` prompt alone and while ``running`` streams decode,
    through the scheduler, and the running streams' slowest step while it is prefilled."""
    from interpreter.llm.fastpath.scheduler import DecodeScheduler

    r = report.setdefault("streams", {}).setdefault(label, {})
    with DecodeScheduler(decoder, max_streams=decoder.slots) as sched:
        long_prompt = _prompts(1, prompt_len, decoder.shape.vocab, seed=5)[0]
        unloaded = [sched.time_to_first_token(long_prompt) for _ in range(repeats + 1)][1:]
        loaded, slowest = sched.loaded_first_token(long_prompt, running=running, repeats=repeats)
    r["ttft_2048_unloaded_ms"] = [t * 1e3 for t in unloaded]
    r["ttft_2048_loaded_ms"] = [t * 1e3 for t in loaded]
    r["ttft_2048_p95_ratio"] = _p95(loaded) / statistics.median(unloaded)
    r["slowest_running_step_ms"] = slowest * 1e3
    save()


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def run(args: Any, report: dict[str, Any], save: Any) -> None:
    """The whole streams phase for each requested dtype, each decoder built alone on the GPU."""
    from interpreter.llm import fastpath

    streams = sorted({int(s) for s in args.streams.split(",")})
    report.setdefault("copy_bandwidth_tb_s", copy_bandwidth() / 1e12)
    bandwidth = report["copy_bandwidth_tb_s"] * 1e12
    report["stream_prompt"], report["stream_tokens"], report["stream_counts"] = args.stream_prompt, args.stream_tokens, streams
    kernel_figures(report)
    save()
    dtypes = [d for d in args.dtype.split(",") if d in VARIANTS]
    for d in sorted(dtypes, key=lambda d: d != "int4"):  # int4 first: the default model's
        decoder = None
        try:
            decoder = fastpath.FastDecoder(fastpath.QWEN_7B, fastpath.random_weights(fastpath.QWEN_7B, "cuda"),
                                           max_seq=max(2048 + 512, args.stream_prompt + args.stream_tokens + 8),
                                           device="cuda", slots=max(streams), **VARIANTS[d])
            stream_figures(decoder, d, streams, args.stream_prompt, args.stream_tokens, bandwidth, report, save)
            long_prompt_figures(decoder, d, report, save)
        except Exception as exc:  # keep the other dtype's figures; the error is part of the report
            report.setdefault("errors", {})[f"streams {d}"] = f"{type(exc).__name__}: {exc}"
            import traceback
            traceback.print_exc()
        decoder = None
        gc.collect()
        torch.cuda.empty_cache()


def render(r: dict[str, Any]) -> list[str]:
    counts = r.get("stream_counts", [])
    s = r.get("streams", {})
    lines = [f"several streams: {r.get('stream_prompt')}-token prompts, {r.get('stream_tokens')} greedy tokens each, "
             f"served by the decode scheduler; ratios against one stream's generate() in the same run"]
    lines.append("| figure | " + " | ".join(f"{n} stream{'s' if n > 1 else ''}" for n in counts) + " |")
    lines.append("|---|" + "---|" * len(counts))
    for d in ("int4", "bf16"):
        if d not in s:
            continue
        x = s[d]

        def cells(key: str, fmt: str) -> str:
            return " | ".join(fmt.format(x[f"{key}_{n}"]) if f"{key}_{n}" in x else "-" for n in counts)

        lines.append(f"| {d} tokens/s, all streams | {cells('tok_s', '{:.0f}')} |")
        lines.append(f"| {d} x one stream | {cells('ratio', '{:.2f}x')} |")
        lines.append(f"| {d} of the bandwidth bound | {cells('of_bound', '{:.0%}')} |")
        lines.append(f"| {d} tokens/s, prefill included | {cells('tok_s_with_prefill', '{:.0f}')} |")
        lines.append(f"| {d} tokens/s, decode_batch by hand | {cells('direct_tok_s', '{:.0f}')} |")
    for d, x in s.items():
        lines.append(f"{d}: one stream (generate) {x.get('one_stream_generate_tok_s', 0):.0f} tok/s; slot "
                     f"{x.get('slot_gb', 0):.2f} GB at this cache; {x.get('slots_8192_on_80gb', '-')} slots of 8192 "
                     f"positions fit an 80 GB card beside the weights; greedy agreement of 8 streams with each alone "
                     f"(tokens of 32): {x.get('greedy_agree_tokens_of_32', '-')}")
        if "ttft_2048_p95_ratio" in x:
            lines.append(f"{d}: 2048-token prompt while 16 streams decode: time to first token p95 "
                         f"{_p95(x['ttft_2048_loaded_ms']):.0f} ms against {statistics.median(x['ttft_2048_unloaded_ms']):.0f} ms "
                         f"alone ({x['ttft_2048_p95_ratio']:.2f}x); slowest step of the running streams "
                         f"{x['slowest_running_step_ms']:.1f} ms")
    for name, k in r.get("kernel", {}).items():
        lines.append(f"int4 kernel {name}: " + ", ".join(f"{n} rows {k[f'us_{n}']:.1f} us" for n in (1, 8, 16, 32))
                     + f" ({k['tb_s_1']:.2f} TB/s at one row)")
    return lines
