"""The fast path's decode attention: one query token against the cache, split over the cached
positions (flash decoding), in one Triton launch.

Opt-in (``JUPYBOX_DECODE_ATTENTION=triton``); see ``fastpath.decode_attention_kernel``.

Why its own kernel: at batch 1 a decode step's attention reads the whole K/V cache once for one
query, so like the projections it is bound by memory. SDPA's kernels for one query ran at about
a third of the copy bandwidth on an H200 (9.5 us plus a 1.9 us reduction a layer for 16.8 MB at
position 1023), and they cannot start before the kernel ahead of them ends. Here each program
takes one head and one slice of the positions, keeps a running max and sum in float32 (scores,
softmax and the weighted sum of values all in float32, as SDPA does), and the last program of a
head to finish merges the slices' partial results (``count`` arrivals, as ``gemv.split_k_finish``).
With programmatic dependent launch the program asks for its slice of the cache while the kernel
before it still runs: the cache up to the previous position was written by earlier steps, and
only the current position's key and value come from that kernel, after ``gdc_wait``.
"""

from __future__ import annotations

import logging
import math

import torch

from interpreter.llm import gemv

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of PyTorch; without it the fast path keeps SDPA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]

BLOCK = 32  # positions a loop step
MIN_SLICE = 64  # positions a program takes at least
MAX_SPLITS = 32


class DecodeAttentionUnavailable(RuntimeError):
    """No Triton here, or the kernel disagrees with SDPA on this GPU."""


def available() -> bool:
    return triton is not None


def splits_for(length: int, heads: int, processors: int = 132) -> int:
    """Slices of the positions per head, a power of two: the fewest that give every multiprocessor
    two programs, where each still has ``MIN_SLICE`` positions."""
    splits = 1
    while splits < MAX_SPLITS and heads * splits < 2 * processors and length >= 2 * splits * MIN_SLICE:
        splits *= 2
    return splits


if triton is not None:

    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_ptr, count_ptr, out_ptr, length, seq_stride, scale,
                       HD: tl.constexpr, GROUP: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                       LINES: tl.constexpr, PDL: tl.constexpr):
        """Program (head, split): positions ``[split * per, (split + 1) * per)`` of ``length``, those
        up to ``pos`` visible. Partials per (head, split): ``HD`` weighted sums, then max and sum
        (base-2 exponents, the query scaled by ``scale * log2(e)``)."""
        head = tl.program_id(0)
        split = tl.program_id(1)
        kv = head // GROUP
        per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        start = split * per
        end = tl.minimum(start + per, length)
        d = tl.arange(0, HD)
        base = kv * seq_stride * HD
        if PDL:  # the cache before this step's position is already there: ask for the slice's lines
            lines = tl.arange(0, LINES) * (HD // LINES)
            for s0 in range(start, end, BLOCK):
                rows = s0 + tl.arange(0, BLOCK)
                rows = tl.where(rows < end, rows, start)
                gemv.prefetch_l2(k_ptr + base + rows[:, None] * HD + lines[None, :])
                gemv.prefetch_l2(v_ptr + base + rows[:, None] * HD + lines[None, :])
            gemv.tl_cuda.gdc_wait()
        pos = tl.load(pos_ptr, cache_modifier=".cg")
        # what the kernel before wrote (the query, this position's key and value) is read through
        # the L2, never the read-only path, whose lines may predate that kernel's stores
        q = tl.load(q_ptr + head * HD + d, cache_modifier=".cg").to(tl.float32) * scale
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        acc = tl.zeros([HD], tl.float32)
        for s0 in range(start, end, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            ok = (offs < end) & (offs <= pos)
            k = tl.load(k_ptr + base + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slice with nothing visible yet
            p = tl.exp2(s - shift)
            alpha = tl.exp2(m - shift)
            v = tl.load(v_ptr + base + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        if PDL:  # every read is done
            gemv.tl_cuda.gdc_launch_dependents()
        row = part_ptr + (head * SPLITS + split) * (HD + 2)
        tl.store(row + d, acc)
        tl.store(row + HD, m)
        tl.store(row + HD + 1, total)
        tl.debug_barrier()  # the partials are written before the count says so
        arrived = tl.atomic_add(count_ptr + head, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if arrived == SPLITS - 1:
            sp = tl.arange(0, SPLITS)
            rows_ = part_ptr + (head * SPLITS + sp) * (HD + 2)
            ms = tl.load(rows_ + HD, cache_modifier=".cg")
            top = tl.max(ms, axis=0)  # position 0 is always visible: finite
            w = tl.exp2(ms - top)
            norm = tl.sum(w * tl.load(rows_ + HD + 1, cache_modifier=".cg"), axis=0)
            parts = tl.load(rows_[:, None] + d[None, :], cache_modifier=".cg")
            out = tl.sum(parts * w[:, None], axis=0) / norm
            tl.store(out_ptr + head * HD + d, out.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(count_ptr + head, 0, sem="relaxed", scope="gpu")


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: int,
           counts: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q K^T * scale) V`` for one query ``q`` ``[heads, hd]`` over positions ``0..length-1``
    of the cache ``[kv_heads, max_seq, hd]`` that are at most ``pos`` (a one-element tensor), as
    ``[heads, hd]`` in q's dtype. ``counts`` (int32 ``[heads]``) is zero before and after."""
    if triton is None:
        raise DecodeAttentionUnavailable("the decode attention kernel needs Triton")
    heads, hd = q.shape
    kv_heads, seq_stride, _ = k_cache.shape
    splits = splits_for(length, heads, _processors(q.device))
    parts = torch.empty((heads, splits, hd + 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = (1.0 / math.sqrt(hd) if scale is None else scale) * math.log2(math.e)
    pdl = gemv.programmatic_launch(q.device)
    _attend_kernel[(heads, splits)](q.contiguous(), k_cache, v_cache, pos, parts, counts, out, length, seq_stride,
                                    scale, HD=hd, GROUP=heads // kv_heads, SPLITS=splits, BLOCK=BLOCK,
                                    LINES=max(1, hd * q.element_size() // 128),  # 128-byte lines of a row
                                    PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


_PROCESSORS: dict[int, int] = {}


def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROCESSORS:
        _PROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROCESSORS[index]


if triton is not None:

    @torch.library.custom_op("jupybox::decode_attention", mutates_args=())
    def _attend_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: int,
                   counts: torch.Tensor) -> torch.Tensor:
        """The kernel as an operator a compiled step keeps whole; ``counts`` is zero before and
        after every launch, so it is not declared as mutated."""
        return attend(q, k_cache, v_cache, pos, length, counts)

    @_attend_op.register_fake
    def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: int,
          counts: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(q)


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, length: int) -> torch.Tensor:
    """SDPA on the same inputs, as the fast path computes it without this kernel."""
    heads, hd = q.shape
    kv_heads = k_cache.shape[0]
    visible = (torch.arange(length, device=q.device) <= pos).view(1, 1, 1, length)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, heads, 1, hd), k_cache[None, :, :length], v_cache[None, :, :length], attn_mask=visible,
        enable_gqa=kv_heads != heads)
    return out.view(heads, hd)


def agrees(heads: int, kv_heads: int, hd: int, device: torch.device, dtype: torch.dtype) -> bool:
    """One attention against SDPA on this GPU (at a length with several slices, the position
    inside the last one), so that a kernel computed wrongly here is refused at load."""
    gen = torch.Generator(device=device).manual_seed(0)
    length, pos = 1024, 1000
    k = torch.randn(kv_heads, length, hd, device=device, generator=gen).to(dtype)
    v = torch.randn(kv_heads, length, hd, device=device, generator=gen).to(dtype)
    q = torch.randn(heads, hd, device=device, generator=gen).to(dtype)
    counts = torch.zeros(heads, dtype=torch.int32, device=device)
    try:
        got = attend(q, k, v, torch.tensor([pos], device=device), length, counts).float()
    except Exception as exc:  # a Triton or driver that cannot build it here
        log.warning("the decode attention kernel did not run here (%s): SDPA stays", exc)
        return False
    ref = reference(q, k, v, pos, length).float()
    err = float((got - ref).norm() / ref.norm())
    if not err < 2e-2 or int(counts.abs().sum()):
        log.warning("the decode attention kernel is off by %.1e (relative) against SDPA: SDPA stays", err)
        return False
    return True
