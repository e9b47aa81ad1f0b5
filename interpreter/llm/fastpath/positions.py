"""Position encodings of the fast path: rotary tables, and Qwen v1's long-context extensions.

Qwen v1 (``use_dynamic_ntk``, ``use_logn_attn``, trained on ``seq_length`` tokens) serves prompts past
its training length in two ways, both reproduced here as its own modeling code defines them:

* dynamic NTK: the rotary base grows with the prompt. A prefill of ``L`` tokens takes
  ``alpha = max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1)`` (1 up to ``seq_length``, then 3, 7, ...)
  and rotates with base ``theta * alpha ** (d / (d - 2))``. The decode steps after it keep that
  prompt's alpha (the plain path caches it), and keys already in the cache are not rotated again;
* log-n attention: the query at position ``p`` (0-based) is multiplied, after rotation and in the
  model's dtype, by ``log(p + 1) / log(seq_length)`` once ``p + 1 > seq_length`` (1 before).
"""

from __future__ import annotations

import math

import torch

QWEN_LOGN_POSITIONS = 32767  # Qwen v1 tabulates the log-n factors for this many positions


def ntk_alpha(length: int, seq_length: int) -> float:
    """Qwen v1's dynamic-NTK factor for a prompt of ``length`` tokens."""
    context = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context) - 1, 1))


def rope_tables(theta: float, head_dim: int, positions: int, device: torch.device, dtype: torch.dtype,
                alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` ``[positions, head_dim]`` as the plain path computes them: inverse
    frequencies on the CPU in float32, the products and the cosines on the device."""
    base = theta * alpha ** (head_dim / (head_dim - 2)) if alpha != 1.0 else theta
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def logn_factors(positions: int, seq_length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Qwen v1's query scale for each position ``[positions]`` (computed in double, then as the
    plain path: float32, cast to the model's dtype)."""
    values = [math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, positions + 1)]
    return torch.tensor(values, dtype=torch.float32).to(device, dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[..., head_dim]`` (halves rotated, as Qwen and Llama do),
    computed in the tables' dtype and returned in ``x``'s."""
    t = x.to(cos.dtype)
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return (t * cos + rotated * sin).to(x.dtype)
