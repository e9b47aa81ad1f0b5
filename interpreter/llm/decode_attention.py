"""The fast path's one-token attention over the KV cache: a split-length ("flash-decoding") Triton
kernel.

Why its own kernel: decoding one token reads every cached key and value once, so attention's speed
is the rate at which the cache leaves memory. A library attention kernel given one query row runs
one program per head (32 for a 7B model, on a GPU of 132 multiprocessors), and it reads the whole
512-position bucket the decode step was captured for, visible or not. Here each head's visible
positions are cut into chunks, one program per (key/value head, chunk), so every multiprocessor
streams; a program whose chunk lies past the current position returns at once. Each program
leaves a running maximum, a sum of exponentials and an unnormalised output per query head, and a
few tensor operations (fused by the compiled step) combine the chunks.

The arithmetic is the usual one in float32 throughout: scores ``q . k / sqrt(d)``, a softmax with
the running-maximum correction, the weighted sum of values. Query heads that share a key/value head
(grouped-query attention) are handled by the same program, so a shared cache line is read once.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of PyTorch; without it the fast path keeps SDPA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]

LOG2E = 1.4426950408889634
BLOCK_POSITIONS = 64  # positions a program holds at once, times the query heads it serves


def available() -> bool:
    return triton is not None


def chunk_count(length: int, kv_heads: int, processors: int, block: int) -> int:
    """Chunks per head for ``length`` attended positions: enough programs for about four a
    multiprocessor, no chunk shorter than one block."""
    want = max(1, -(-4 * processors // kv_heads))
    return max(1, min(want, -(-length // block)))


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, chunk, splits, scale_log2,
                        stride_kh, stride_kl, stride_vh, stride_vl,
                        GROUP: tl.constexpr, GPAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """Program (kv head ``kvh``, chunk ``c``): for each query head of the group, over the visible
        positions of the chunk, the maximum score ``m`` (base 2), ``l = sum 2**(s - m)`` and
        ``acc = sum 2**(s - m) v``; written to ``[head, c]`` of the outputs."""
        kvh = tl.program_id(0)
        c = tl.program_id(1)
        visible = tl.load(pos_ptr) + 1
        start = c * chunk
        end = tl.minimum(start + chunk, visible)
        g = tl.arange(0, GPAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        g_ok = g < GROUP
        q = tl.load(q_ptr + heads[:, None] * HEAD_DIM + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        q = q * scale_log2
        m = tl.full([GPAD], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([GPAD], dtype=tl.float32)
        acc = tl.zeros([GPAD, HEAD_DIM], dtype=tl.float32)
        for p0 in range(start, end, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            ok = p < end
            k = tl.load(k_ptr + kvh * stride_kh + p[:, None] * stride_kl + d[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GPAD, BLOCK]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(w, axis=1)
            v = tl.load(v_ptr + kvh * stride_vh + p[:, None] * stride_vl + d[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        slot = heads * splits + c
        tl.store(m_ptr + slot, m, mask=g_ok)
        tl.store(l_ptr + slot, l_sum, mask=g_ok)
        tl.store(acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])

    @torch.library.custom_op("jupybox::decode_attention_partial", mutates_args=())
    def _partial_op(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                    splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-chunk softmax statistics and unnormalised outputs (see ``_partial_kernel``)."""
        heads, head_dim = q.shape
        kv_heads, length, _ = keys.shape
        group = heads // kv_heads
        gpad = triton.next_power_of_2(group)
        block = max(8, BLOCK_POSITIONS // gpad)
        per_chunk = -(-length // splits)
        chunk = -(-per_chunk // block) * block  # whole blocks
        if keys.stride(2) != 1 or values.stride(2) != 1:
            raise ValueError("the key and value rows must be contiguous")
        m = torch.empty((heads, splits), device=q.device, dtype=torch.float32)
        l_sum = torch.empty_like(m)
        acc = torch.empty((heads, splits, head_dim), device=q.device, dtype=torch.float32)
        _partial_kernel[(kv_heads, splits)](
            q, keys, values, pos, m, l_sum, acc, chunk, splits, LOG2E / math.sqrt(head_dim),
            keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            GROUP=group, GPAD=gpad, HEAD_DIM=head_dim, BLOCK=block, num_warps=4)
        return m, l_sum, acc

    @_partial_op.register_fake
    def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
          splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads, head_dim = q.shape
        m = q.new_empty((heads, splits), dtype=torch.float32)
        return m, torch.empty_like(m), q.new_empty((heads, splits, head_dim), dtype=torch.float32)


def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this attention: a power-of-two head size (Triton's ranges), whole groups."""
    return (triton is not None and heads % kv_heads == 0 and head_dim >= 16
            and head_dim & (head_dim - 1) == 0)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                     splits: int) -> torch.Tensor:
    """Attention of one query token ``q`` ``[heads, head_dim]`` over ``keys``/``values``
    ``[kv_heads, length, head_dim]`` (rows with a stride of ``head_dim``), positions ``0..pos``
    visible (``pos``: a one-element tensor, read on the device, so a captured graph serves every
    position of its bucket). Returns ``[heads, head_dim]`` in ``q``'s dtype."""
    m, l_sum, acc = torch.ops.jupybox.decode_attention_partial(q.contiguous(), keys, values, pos, splits)
    top = m.amax(dim=1, keepdim=True)
    weight = torch.exp2(m - top)  # a chunk with no visible position has m = -inf: weight 0
    out = (acc * weight.unsqueeze(-1)).sum(1) / (l_sum * weight).sum(1, keepdim=True)
    return out.to(q.dtype)
