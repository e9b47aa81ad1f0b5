"""The fast path's decode attention: one query token against the cache, split over the cached
positions (flash decoding), in one Triton launch that also does what precedes attention in the
step: the qkv projection's bias, the rotary embedding of the query and of this step's key, Qwen
v1's log-n query scale, and the write of this step's key and value into the cache.

The fast path's default on a GPU with Triton (``JUPYBOX_DECODE_ATTENTION=sdpa`` keeps SDPA); see
``fastpath.decode_attention_kernel``.

Why its own kernel: at batch 1 a decode step's attention reads the whole K/V cache once for one
query, so like the projections it is bound by memory, and SDPA's kernels for one query ran at about
a third of the copy bandwidth on an H200, after two small kernels of their own (rotary, cache
write). Here each program takes one head and one slice of the positions, keeps a running max and
sum in float32 (scores, softmax and the weighted sum of values all in float32, as SDPA does), and
the last program of a head to finish merges the slices' partial results (``count`` arrivals, as
``gemv.split_k_finish``). The cache before this step's position was written by earlier steps, so
each program loads its slice's first block before waiting for the kernel ahead (programmatic
dependent launch): those loads overlap the qkv projection, and only the query and this step's key
and value wait for it. This step's key and value are attended from registers, never read back
from the cache, so no program depends on another's write.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from interpreter.llm.fastpath.errors import KernelUnavailable

from interpreter.llm.fastpath.kernels import gemv
from interpreter.llm.fastpath.positions import rope_tables, rotate

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of PyTorch; without it the fast path keeps SDPA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]

BLOCK = 64  # positions a loop step (fastest of 16, 32 and 64 at 1024 and 2048 positions on an H200)
MAX_SPLITS = 64


class DecodeAttentionUnavailable(KernelUnavailable):
    """No Triton here, or the kernel disagrees with the unfused step on this GPU."""


def available() -> bool:
    return triton is not None


def splits_for(length: int, heads: int, processors: int = 132, block: int = BLOCK) -> int:
    """Slices of the positions per head, a power of two: one loop step's ``block`` of the attended
    length each (a slice's first block is loaded before the kernel ahead ends, so a program that
    has one block has all its loads in flight at once), at most ``MAX_SPLITS``, and at least
    enough that every multiprocessor gets a program when there are positions to share."""
    splits = 1
    while splits < MAX_SPLITS and (splits * block < length or heads * splits < processors) \
            and length >= 2 * splits * block:
        splits *= 2
    return splits


if triton is not None:

    @triton.jit
    def _rope_row(ptr, bias_ptr, cos, sin, d, partner, sign, BIAS: tl.constexpr):
        """One head's row of the projection (plus its bias, rounded as the unfused step rounds)
        rotated by this position's ``cos``/``sin``, in float32, as the unfused step's rotary."""
        x = tl.load(ptr + d, cache_modifier=".cg")
        xp = tl.load(ptr + partner, cache_modifier=".cg")
        if BIAS:
            x = (x.to(tl.float32) + tl.load(bias_ptr + d).to(tl.float32)).to(x.dtype)
            xp = (xp.to(tl.float32) + tl.load(bias_ptr + partner).to(tl.float32)).to(xp.dtype)
        return x.to(tl.float32) * cos + sign * xp.to(tl.float32) * sin

    @triton.jit
    def _cache_block(k_ptr, v_ptr, first, end, d, HD: tl.constexpr, BLOCK: tl.constexpr):
        """Keys and values of positions ``first..first + BLOCK - 1`` below ``end`` (zeros past it),
        with which of them are there."""
        offs = first + tl.arange(0, BLOCK)
        ok = offs < end
        k = tl.load(k_ptr + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        v = tl.load(v_ptr + offs[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        return ok, k, v

    @triton.jit
    def _attend_kernel(qkv_ptr, bias_ptr, cos_ptr, sin_ptr, logn_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, rows_ptr,
                       part_ptr, count_ptr, out_ptr, seq_stride, slot_stride, qkv_stride, scale,
                       HD: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, SPLITS: tl.constexpr,
                       BLOCK: tl.constexpr, LINES: tl.constexpr, STAGES: tl.constexpr, BIAS: tl.constexpr,
                       LOGN: tl.constexpr, PDL: tl.constexpr):
        """Program (head, split, row): slice ``split`` of the positions ``0..pos`` of the stream in
        batch row ``row``, whose cache is slot ``slot`` of the caches. The cache holds the
        positions before ``pos``; this step's key and value come from ``qkv`` (the projection's
        row: queries, keys, values), rotated here, written to the cache at ``pos`` by one program
        per key head and attended from registers. Partials per (row, head, split): ``HD`` weighted
        sums, then max and sum (base-2 exponents, the query scaled by ``scale * log2(e)``). Rows
        from ``rows`` on pad a batch to its captured size: they do nothing."""
        head = tl.program_id(0)
        split = tl.program_id(1)
        row = tl.program_id(2)
        # the rows, positions and slots were written before the step began, never by the kernel just ahead
        if row >= tl.load(rows_ptr):
            return
        kv = head // (HEADS // KV_HEADS)
        pos = tl.load(pos_ptr + row).to(tl.int32)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        k_ptr += slot * slot_stride
        v_ptr += slot * slot_stride
        qkv_ptr += row * qkv_stride
        part_ptr += row * (HEADS * SPLITS * (HD + 2))
        count_ptr += row * HEADS
        out_ptr += row * (HEADS * HD)
        per = tl.cdiv(tl.cdiv(pos + 1, SPLITS), BLOCK) * BLOCK
        start = split * per
        end = tl.minimum(start + per, pos + 1)
        cached = tl.minimum(end, pos)  # this slice's positions that are read from the cache
        d = tl.arange(0, HD)
        base = kv * seq_stride * HD
        # the slice's first block is loaded before waiting for the kernel ahead: the cache before
        # this step's position was written by earlier steps, so the loads overlap that kernel
        ok, k_first, v_first = _cache_block(k_ptr + base, v_ptr + base, start, cached, d, HD, BLOCK)
        if PDL:  # and the lines of the rest are asked into the L2
            lines = tl.arange(0, LINES) * (HD // LINES)
            for s0 in range(start + BLOCK, cached, BLOCK):
                rows = s0 + tl.arange(0, BLOCK)
                rows = tl.where(rows < cached, rows, start)
                gemv.prefetch_l2(k_ptr + base + rows[:, None] * HD + lines[None, :])
                gemv.prefetch_l2(v_ptr + base + rows[:, None] * HD + lines[None, :])
            gemv.tl_cuda.gdc_wait()
        half: tl.constexpr = HD // 2
        partner = (d + half) % HD
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
        # what the kernel before wrote (the projection) is read through the L2, never the read-only
        # path, whose lines may predate that kernel's stores
        dtype = qkv_ptr.dtype.element_ty
        q = _rope_row(qkv_ptr + head * HD, bias_ptr + head * HD, cos, sin, d, partner, sign, BIAS).to(dtype)
        if LOGN:  # Qwen v1 past its training length
            q = (q.to(tl.float32) * tl.load(logn_ptr + pos).to(tl.float32)).to(dtype)
        q = q.to(tl.float32) * scale
        s = tl.where(ok, tl.sum(k_first.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        m = tl.max(s, axis=0)
        shift = tl.where(m == float("-inf"), 0.0, m)  # nothing visible in this slice (yet)
        p = tl.exp2(s - shift)
        acc = tl.sum(p[:, None] * v_first.to(tl.float32), axis=0)
        total = tl.sum(p, axis=0)
        for s0 in tl.range(start + BLOCK, cached, BLOCK, num_stages=STAGES):
            ok, k, v = _cache_block(k_ptr + base, v_ptr + base, s0, cached, d, HD, BLOCK)
            s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - shift)
            alpha = tl.exp2(m - shift)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        if (start <= pos) & (pos < end):  # this step's key and value
            key = _rope_row(qkv_ptr + (HEADS + kv) * HD, bias_ptr + (HEADS + kv) * HD, cos, sin, d, partner, sign,
                            BIAS).to(dtype)
            value = tl.load(qkv_ptr + (HEADS + KV_HEADS + kv) * HD + d, cache_modifier=".cg")
            if BIAS:
                value = (value.to(tl.float32)
                         + tl.load(bias_ptr + (HEADS + KV_HEADS + kv) * HD + d).to(tl.float32)).to(dtype)
            if head % (HEADS // KV_HEADS) == 0:
                tl.store(k_ptr + base + pos * HD + d, key)
                tl.store(v_ptr + base + pos * HD + d, value)
            score = tl.sum(key.to(tl.float32) * q, axis=0)
            m_new = tl.maximum(m, score)
            alpha = tl.exp2(m - m_new)
            p1 = tl.exp2(score - m_new)
            acc = acc * alpha + p1 * value.to(tl.float32)
            total = total * alpha + p1
            m = m_new
        if PDL:  # every read of the kernel ahead's output is done
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


@dataclass(frozen=True)
class Launch:
    """How the kernel is launched; ``splits`` 0: ``splits_for`` the attended length."""
    splits: int = 0
    block: int = BLOCK
    warps: int = 2
    stages: int = 1


def attend(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
           logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: int,
           counts: torch.Tensor, scale: float | None = None, launch: Launch = Launch(), slots: torch.Tensor | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's attention from the qkv projection's row ``qkv`` (``[(heads + 2 * kv_heads)
    * hd]``, before its ``bias``): queries and this step's key rotated by ``cos``/``sin``
    (``[positions, hd]``) at ``pos`` (a one-element tensor, written before the step), queries
    scaled by ``logn[pos]`` if given; this step's key and value written to the caches
    (``[kv_heads, max_seq, hd]``) at ``pos``; ``softmax(q K^T * scale) V`` over positions ``0..pos``
    (``length``, the attended bucket, sets the slices) as ``[heads, hd]`` in qkv's dtype.
    ``counts`` (int32 ``[heads]``) is zero before and after.

    A batch of streams: ``qkv`` ``[batch, width]``, ``pos`` and ``slots`` ``[batch]``, caches
    ``[slots, kv_heads, max_seq, hd]`` (row ``b`` reads and writes slot ``slots[b]``), ``counts``
    ``[batch * heads]``; the result is ``[batch, heads, hd]``. ``rows`` (a one-element tensor,
    default: all) says how many rows are streams; the rest pad a captured batch and do nothing."""
    if triton is None:
        raise DecodeAttentionUnavailable("the decode attention kernel needs Triton")
    single = qkv.dim() == 1
    qkv2 = qkv.view(1, -1) if single else qkv
    kc, vc = (k_cache[None], v_cache[None]) if k_cache.dim() == 3 else (k_cache, v_cache)
    batch, width = qkv2.shape
    _, kv_heads, seq_stride, hd = kc.shape
    heads = width // hd - 2 * kv_heads
    if not all(t.is_contiguous() for t in (kc, vc, cos, sin)) or cos.shape[-1] != hd:
        raise DecodeAttentionUnavailable("the kernel reads contiguous caches and [positions, head_dim] rotary tables")
    if counts.numel() < batch * heads:
        raise DecodeAttentionUnavailable(f"{counts.numel()} arrival counts for {batch} rows of {heads} heads")
    if slots is None:
        slots = torch.zeros(batch, dtype=torch.long, device=qkv.device)
    if rows is None:
        rows = torch.full((1,), batch, dtype=torch.int32, device=qkv.device)
    splits = launch.splits or splits_for(length, heads * batch, _processors(qkv.device), launch.block)
    parts = torch.empty((batch, heads, splits, hd + 2), dtype=torch.float32, device=qkv.device)
    out = torch.empty((batch, heads, hd), dtype=qkv.dtype, device=qkv.device)
    scale = (1.0 / math.sqrt(hd) if scale is None else scale) * math.log2(math.e)
    pdl = gemv.programmatic_launch(qkv.device)
    qkv2 = qkv2.contiguous()
    _attend_kernel[(heads, splits, batch)](qkv2, qkv2 if bias is None else bias, cos, sin,
                                           cos if logn is None else logn, kc, vc, pos, slots, rows, parts, counts, out,
                                           seq_stride, kv_heads * seq_stride * hd, width, scale, HD=hd, HEADS=heads,
                                           KV_HEADS=kv_heads, SPLITS=splits, BLOCK=launch.block,
                                           LINES=max(1, hd * qkv.element_size() // 128), STAGES=launch.stages,
                                           BIAS=bias is not None, LOGN=logn is not None, PDL=pdl,
                                           num_warps=launch.warps, launch_pdl=pdl)
    return out[0] if single else out


_PROCESSORS: dict[int, int] = {}


def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROCESSORS:
        _PROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROCESSORS[index]


if triton is not None:

    @torch.library.custom_op("jupybox::decode_attention", mutates_args=("k_cache", "v_cache"))
    def _attend_op(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                   logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                   slots: torch.Tensor, rows: torch.Tensor, length: int, counts: torch.Tensor) -> torch.Tensor:
        """The kernel as an operator a compiled step keeps whole (``qkv`` ``[batch, width]``, caches
        ``[slots, kv_heads, max_seq, hd]``); ``counts`` is zero before and after every launch, so it
        is not declared as mutated."""
        return attend(qkv, bias, cos, sin, logn, k_cache, v_cache, pos, length, counts, slots=slots, rows=rows)

    @_attend_op.register_fake
    def _(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
          logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
          slots: torch.Tensor, rows: torch.Tensor, length: int, counts: torch.Tensor) -> torch.Tensor:
        hd = k_cache.shape[-1]
        return qkv.new_empty((qkv.shape[0], qkv.shape[1] // hd - 2 * k_cache.shape[-3], hd))


def reference(qkv: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
              length: int) -> torch.Tensor:
    """The unfused step on the same inputs: bias, rotary and log-n as separate operations, the
    cache written at ``pos``, then SDPA over the attended length with positions after ``pos`` masked."""
    kv_heads, _, hd = k_cache.shape
    heads = qkv.numel() // hd - 2 * kv_heads
    row = qkv.view(1, -1) if bias is None else qkv.view(1, -1) + bias
    q, k, v = row.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    c, s = cos[pos].view(1, 1, hd), sin[pos].view(1, 1, hd)
    q = rotate(q.view(1, heads, hd), c, s)
    if logn is not None:
        q = q * logn[pos]
    k_cache[:, pos] = rotate(k.view(1, kv_heads, hd), c, s)[0]
    v_cache[:, pos] = v.view(kv_heads, hd)
    visible = (torch.arange(length, device=qkv.device) <= pos).view(1, 1, 1, length)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_cache[None, :, :length], v_cache[None, :, :length], attn_mask=visible,
        enable_gqa=kv_heads != heads)
    return out.view(heads, hd)


def agrees(heads: int, kv_heads: int, hd: int, bias: bool, logn: bool, device: torch.device,
           dtype: torch.dtype, rope_dtype: torch.dtype) -> bool:
    """One step against the unfused step on this GPU (at a length with several slices, the
    position inside the last one), so that a kernel computed wrongly here is refused at load."""
    gen = torch.Generator(device=device).manual_seed(0)
    length, pos, width = 1024, 1000, (heads + 2 * kv_heads) * hd

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, generator=gen).to(dtype)

    k, v, qkv = rand(kv_heads, length, hd), rand(kv_heads, length, hd), rand(width)
    b = rand(width) if bias else None
    cos, sin = rope_tables(10000.0, hd, length, device, rope_dtype)
    scales = torch.rand(length, device=device, generator=gen).to(dtype) + 1 if logn else None
    counts = torch.zeros(heads, dtype=torch.int32, device=device)
    k_ref, v_ref = k.clone(), v.clone()
    try:
        got = attend(qkv, b, cos, sin, scales, k, v, torch.tensor([pos], device=device), length, counts).float()
    except Exception as exc:  # a Triton or driver that cannot build it here
        log.warning("the decode attention kernel did not run here (%s): SDPA stays", exc)
        return False
    ref = reference(qkv, b, cos, sin, scales, k_ref, v_ref, pos, length).float()
    err = float((got - ref).norm() / ref.norm())
    cache_err = float((k - k_ref).abs().max().item() + (v - v_ref).abs().max().item())
    if not err < 2e-2 or int(counts.abs().sum()) or not cache_err < 0.1:
        log.warning("the decode attention kernel is off by %.1e (relative; cache %.1e) against the unfused step: "
                    "SDPA stays", err, cache_err)
        return False
    return True
