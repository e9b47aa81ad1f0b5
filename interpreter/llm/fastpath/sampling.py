"""How a stream's next token is picked from its logits, as transformers' ``generate`` picks it
(repetition penalty, temperature, top-k, top-p; greedy is the argmax), on the logits' device so the
host never waits for it; and a picked token's way back to the host. ``FastDecoder.generate`` and
the decode scheduler both pick through here, so a stream gets the same tokens on either."""

from __future__ import annotations

import torch


class Readback:
    """Token ids on their way to the host: on a GPU, copied to pinned memory right behind the step
    that made them, so reading them waits for that step only, not for a step queued after it."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self._done: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = tokens

    def values(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.view(-1).tolist()

    def value(self) -> int:
        """The one token id (a one-element tensor)."""
        [value] = self.values()
        return value


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: seen ids' positive logits divided by it, negative ones multiplied."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
          generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax().view(1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:  # the k most likely, ties at the k-th included, as transformers keeps them
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:  # the smallest top set holding top_p: masked, not indexed (no wait for the GPU)
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator)
