"""Greedy decoding compared token by token: plain ``transformers.generate`` of exactly ``n`` tokens,
the fast path's teacher-forced logits, where two outputs part and how decided the plain model was.
Shared by the checks of ``jupybox bench model`` (``bench.model_check``) and the real model's check
(``bench.real_model``)."""

from __future__ import annotations

import math
from typing import Any

from interpreter.llm import fastpath


def generate_exactly(model: Any, prompt: list[int], n: int, **kw: Any) -> Any:
    """Plain greedy ``generate`` of exactly ``n`` tokens (no EOS, no compile unless asked)."""
    import torch

    ids = torch.tensor([prompt], device=model.device)
    kw.setdefault("disable_compile", True)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None, **kw)


def plain_greedy(model: Any, prompt: list[int], n: int, **kw: Any) -> list[int]:
    """``n`` greedy tokens from plain ``generate``."""
    return generate_exactly(model, prompt, n, **kw)[0, len(prompt):].tolist()


def fast_step_logits(decoder: fastpath.FastDecoder, prompt: list[int], tokens: list[int]) -> Any:
    """The fast path's logits at each step of a given continuation (teacher-forced): the prompt's
    prefill, then one decode step per token of ``tokens``; ``[len(tokens) + 1, vocab]``."""
    import torch

    device = decoder.device
    with torch.no_grad():
        steps = [decoder.prefill(torch.tensor(prompt, device=device))[0]]
        steps += [decoder.decode(torch.tensor([t], device=device), len(prompt) + i).clone()
                  for i, t in enumerate(tokens)]
    return torch.stack(steps)


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def divergence(model: Any, decoder: fastpath.FastDecoder, prompt: list[int], plain: list[int],
               fast: list[int]) -> dict[str, Any] | None:
    """Where two greedy outputs part: each path's own logits for both candidate tokens there (the
    plain path's from ``generate``'s scores, the fast path's from its decode step over the same
    history), against the 16-bit spacing at that magnitude; None if they never part."""
    at = leading_equal(plain, fast)
    if at >= min(len(plain), len(fast)):
        return None
    mine = generate_exactly(model, prompt, at + 1, output_scores=True, return_dict_in_generate=True).scores[at][0].float()
    theirs = fast_step_logits(decoder, prompt, plain[:at])[-1]
    a, b = plain[at], fast[at]
    size = max(float(mine[a].abs()), float(mine[b].abs()))
    return {"at": at, "plain_gap": float(mine[a] - mine[b]), "fast_gap": float(theirs[b] - theirs[a]),
            "fast_token_rank_in_plain": int((mine > mine[b]).sum()),
            "plain_token_rank_in_fast": int((theirs > theirs[a]).sum()),
            "bf16_spacing_at_candidates": 2.0 ** (math.floor(math.log2(size)) - 7) if size > 0 else 0.0}


def margins(model: Any, prompt: list[int], tokens: list[int]) -> dict[str, float]:
    """How decided the plain model's own greedy choices were: top-1 probability and top-2 logit gap."""
    import torch

    with torch.no_grad():
        seq = torch.tensor([prompt + tokens], device=model.device)
        logits = model(seq).logits[0, len(prompt) - 1:-1].float()
    top = logits.topk(2).values
    return {"top1_prob_median": float(logits.softmax(-1).amax(-1).median()),
            "top2_gap_median": float((top[:, 0] - top[:, 1]).median())}


def batched(decoder: fastpath.FastDecoder, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens of every prompt decoded together, as a server decodes concurrent turns: all
    submitted at once to a decode scheduler on ``decoder`` (its slots shared out, the rest queued)."""
    from interpreter.llm.fastpath.scheduler import DecodeScheduler
    from interpreter.llm.fastpath.streams import StreamRequest

    with DecodeScheduler(decoder) as scheduler:
        handles = [scheduler.submit(StreamRequest(p, n)) for p in prompts]
        return [h.result() for h in handles]


def batched_report(plain: list[list[int]], alone: list[list[int]], together: list[list[int]]) -> dict[str, Any]:
    """How the prompts decoded together compare with the plain path and with the fast path alone."""
    return {"prompts_equal_batched": sum(p == t for p, t in zip(plain, together)),
            "batched_same_as_alone": sum(a == t for a, t in zip(alone, together)),
            "batched_leading_equal": [leading_equal(p, t) for p, t in zip(plain, together)]}

def batched_lines(y: dict[str, Any]) -> list[str]:
    """A check's prompts decoded all together (through the decode scheduler), if it ran them so."""
    if "prompts_equal_batched" not in y:
        return []
    return [f"    all prompts decoded together: {y['prompts_equal_batched']} equal to the plain path, "
            f"{y['batched_same_as_alone']} to the fast path alone (equal prefixes {y['batched_leading_equal']})"]
