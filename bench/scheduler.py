"""The decode scheduler on a GPU: ``python -m bench.scheduler [--streams 1,8,16] [--dtype int4]``.

Figures, never pass/fail, on random weights of the Qwen-7B shape, all in one run:

* tokens/s of ``n`` streams served through ``DecodeScheduler`` (each its own prompt, greedy), over
  the turns where all ``n`` decode together, against ``decode_batch`` steps of the same ``n`` driven
  directly (argmax and read-back included): what the scheduler's own turn costs;
* a 2048-token prompt arriving while 16 streams decode: its time to first token (median and p95)
  against the same prompt alone, and the running streams' slowest turn while it is prefilled.

The batched kernels' own figures are ``python -m bench.model --streams``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_probe import VARIANTS


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def direct_tok_s(decoder: Any, prompts: list[list[int]], steps: int) -> float:
    """Greedy ``decode_batch`` steps of every stream, driven by hand, tokens read back each step."""
    slots = list(range(len(prompts)))
    tokens = [int(decoder.prefill(torch.tensor(p, device=decoder.device), slot=s)[0].argmax())
              for p, s in zip(prompts, slots)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(steps):
        logits = decoder.decode_batch(tokens, [len(p) + i for p in prompts], slots)
        tokens = logits.argmax(-1).tolist()
    return len(prompts) * steps / (time.perf_counter() - started)


def served_tok_s(scheduler: Any, prompts: list[list[int]], steps: int) -> tuple[float, float]:
    """Tokens/s through the scheduler over the turns where every stream decodes, and the median
    turn there (seconds)."""
    from interpreter.llm.fastpath.scheduler import StreamRequest

    first = len(scheduler.steps)
    handles = [scheduler.submit(StreamRequest(p, steps)) for p in prompts]
    for h in handles:
        h.result()
    full = [s for s in list(scheduler.steps)[first:] if s.batch == len(prompts) and s.prefill_tokens == 0]
    return len(prompts) * len(full) / sum(s.turn_s for s in full), statistics.median(s.turn_s for s in full)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from interpreter.llm import fastpath
    from interpreter.llm.fastpath.scheduler import DecodeScheduler

    counts = sorted({int(n) for n in args.streams.split(",")})
    slots = max(max(counts), args.running + 1)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "prompt": args.prompt,
                              "tokens": args.tokens, "streams": {}}
    started = time.perf_counter()
    decoder = fastpath.FastDecoder(fastpath.QWEN_7B, fastpath.random_weights(fastpath.QWEN_7B, "cuda"),
                                   max_seq=args.max_seq, device="cuda", slots=slots, **VARIANTS[args.dtype])
    decoder.warm_up()
    report["load_and_capture_s"] = time.perf_counter() - started
    report["slot_gb"] = decoder.slot_bytes() / 1e9
    with DecodeScheduler(decoder, max_streams=slots) as scheduler:
        for n in counts:
            prompts = _prompts(n, args.prompt, decoder.shape.vocab, seed=n)
            direct_tok_s(decoder, prompts, 16)  # warm
            direct = direct_tok_s(decoder, prompts, args.tokens)
            served, turn = served_tok_s(scheduler, prompts, args.tokens)
            report["streams"][n] = {"direct_tok_s": direct, "served_tok_s": served, "served_of_direct": served / direct,
                                    "median_turn_ms": turn * 1e3}
            print(f"{n} streams: served {served:.0f} tok/s, decode_batch driven directly {direct:.0f} tok/s "
                  f"({served / direct:.0%}); median turn {turn * 1e3:.2f} ms", flush=True)
        long_prompt = _prompts(1, 2048, decoder.shape.vocab, seed=5)[0]
        alone = [scheduler.time_to_first_token(long_prompt) for _ in range(args.repeats + 1)][1:]
        loaded, slowest = scheduler.loaded_first_token(long_prompt, running=args.running, repeats=args.repeats)
    report["long_prompt"] = {"running": args.running, "ttft_alone_ms": [t * 1e3 for t in alone],
                             "ttft_loaded_ms": [t * 1e3 for t in loaded],
                             "p95_over_alone_median": p95(loaded) / statistics.median(alone),
                             "slowest_running_turn_ms": slowest * 1e3}
    print(f"2048-token prompt: time to first token alone {statistics.median(alone) * 1e3:.0f} ms (median), while "
          f"{args.running} streams decode {statistics.median(loaded) * 1e3:.0f} ms median, {p95(loaded) * 1e3:.0f} ms "
          f"p95 ({report['long_prompt']['p95_over_alone_median']:.2f}x); slowest turn of the running streams during "
          f"its prefill {slowest * 1e3:.1f} ms", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="1,8,16", help="stream counts, comma-separated (at most 32)")
    p.add_argument("--dtype", choices=sorted(VARIANTS), default="int4")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of each stream")
    p.add_argument("--tokens", type=int, default=256, help="new tokens of each stream")
    p.add_argument("--running", type=int, default=16, help="streams decoding while the long prompt arrives")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seq", type=int, default=4096, help="cache positions per stream")
    p.add_argument("--json", type=Path, help="write the report here too")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.scheduler measures on a CUDA GPU and none is visible here.", file=sys.stderr)
        return 2
    report = measure(args)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
