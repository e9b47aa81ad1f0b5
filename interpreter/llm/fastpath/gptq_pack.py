"""4-bit weights for the fast path: one canonical form, read from GPTQ checkpoints or made by a
group-wise quantizer, and packed for PyTorch's weight-only int4 matrix product.

Canonical form of a ``[n_out, n_in]`` weight, ``group`` input columns per scale:

* ``q``: ``uint8 [n_out, n_in]``, values 0..15 (one value a byte: it is only kept until packing);
* ``scales_zeros``: ``bf16 [n_in // group, n_out, 2]``, ``(scale, zero)`` per group and row;

and the weight it stands for is ``w = (q - 8) * scale + zero``. That is the layout
``torch.ops.aten._weight_int4pack_mm`` (CUDA) and ``_weight_int4pack_mm_for_cpu`` take, so packing
is the op's own ``_convert_weight_to_int4pack*`` and nothing is re-derived at run time.

GPTQ stores ``w = scale * (q - z)`` with ``q`` packed eight to an int32 along the input dimension
(``qweight [n_in/8, n_out]``), ``z`` packed along the output dimension (``qzeros [groups, n_out/8]``,
minus one in the original AutoGPTQ format) and fp16 ``scales [groups, n_out]``; rewriting it as
``(q - 8) * scale + (8 - z) * scale`` gives the canonical form exactly (up to bf16 rounding of the
scales). Act-order checkpoints (a ``g_idx`` that is not ``i // group``) are refused.

The packed kernel is built for few rows (decoding); a long prompt is faster as a 16-bit matrix
product over the weight dequantized for that one call. The packed layout is the op's own and is not
documented, so ``NibbleLayout`` learns where each value lands from the packing op itself and every
weight is checked against it when packed: a layout that does not reproduce the weight is not used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from interpreter.llm.fastpath.errors import FastPathUnsupported

log = logging.getLogger(__name__)

INNER_K_TILES = 8
DEQUANTIZE_MIN_ROWS = 32  # from this many rows on, dequantize-then-matmul beats the packed kernel


class UnsupportedQuantization(FastPathUnsupported):
    """The checkpoint's quantization is not one the fast path can repack."""


@dataclass
class Int4Weight:
    q: torch.Tensor  # uint8 [n_out, n_in], 0..15
    scales_zeros: torch.Tensor  # bf16 [n_in // group, n_out, 2]
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.q.shape[0]), int(self.q.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[n_out, n_in]`` it stands for (reference and fallback path)."""
        return _scale(self.q, self.scales_zeros, self.group, dtype)


def product_error(w: Int4Weight, run: Callable[[torch.Tensor], torch.Tensor], glu: bool = False) -> float:
    """Relative error of one matrix-vector product ``run(x)`` (``[n_out]``, a bf16 ``x`` drawn
    with a fixed seed) against the dequantized weight's product in float32; with ``glu`` (a
    ``[gate; up]`` weight), of ``[n_out / 2]`` against ``silu(gate) * up``, rounded where the
    unfused model rounds. A 4-bit kernel checks itself with it at load, so that one a GPU or a
    compiler computes wrongly is refused rather than answering garbage."""
    gen = torch.Generator(device=w.q.device).manual_seed(0)
    x = torch.randn(w.shape[1], device=w.q.device, generator=gen).to(torch.bfloat16)
    ref = w.dequantize(torch.float32) @ x.float()
    if glu:
        gate, up = ref.to(torch.bfloat16).float().chunk(2)
        ref = (torch.nn.functional.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16).float()
    got = run(x).float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _scale(q: torch.Tensor, scales_zeros: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``(q - 8) * scale + zero``, computed in float32, as a ``[n_out, n_in]`` weight in ``dtype``."""
    n_out, n_in = q.shape
    sz = scales_zeros.float().permute(1, 0, 2).unsqueeze(2)  # [n_out, groups, 1, 2]
    w = (q.view(n_out, n_in // group, group).float() - 8) * sz[..., 0] + sz[..., 1]
    return w.view(n_out, n_in).to(dtype)


def cat_rows(parts: list[Int4Weight]) -> Int4Weight:
    """Stack weights along the output dimension (fused q/k/v or gate/up projections)."""
    if len({p.group for p in parts}) != 1:
        raise UnsupportedQuantization("fused projections with different group sizes")
    return Int4Weight(torch.cat([p.q for p in parts]), torch.cat([p.scales_zeros for p in parts], dim=1), parts[0].group)


def fit_group(n_in: int, group: int = 128) -> int | None:
    """The largest power-of-two group size up to ``group`` (and from 32) that divides ``n_in``, or
    None: a model whose hidden size is not a multiple of 128 (576 in SmolLM2-135M) still quantizes."""
    size = 1 << (max(group, 1).bit_length() - 1)
    while size >= 32:
        if n_in % size == 0:
            return size
        size //= 2
    return None


def quantize(w: torch.Tensor, group: int = 128) -> Int4Weight:
    """Asymmetric min/max group-wise 4-bit quantization of a float weight ``[n_out, n_in]``
    (for benchmarks with random weights and for bf16 checkpoints loaded as int4)."""
    n_out, n_in = w.shape
    if n_in % group:
        raise UnsupportedQuantization(f"input size {n_in} is not a multiple of the group size {group}")
    g = w.float().reshape(n_out, n_in // group, group)
    lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.uint8).reshape(n_out, n_in)
    zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
    sz = torch.stack([scale.squeeze(2), zero.squeeze(2)], dim=2).transpose(0, 1).contiguous()
    return Int4Weight(q, sz.to(torch.bfloat16), group)


def _unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32, lowest nibble first, spread along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    if dim == 0:
        vals = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [rows, 8, cols]
        return vals.reshape(-1, packed.shape[1])
    vals = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF  # [rows, cols, 8]
    return vals.reshape(packed.shape[0], -1)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group: int,
              g_idx: torch.Tensor | None = None, zero_offset: int = 1) -> Int4Weight:
    """The canonical form of one GPTQ linear layer (4 bits, ``group`` columns a group).
    ``zero_offset`` is 1 for the original AutoGPTQ format (zeros stored minus one), 0 for v2."""
    n_in, n_out = qweight.shape[0] * 8, qweight.shape[1]
    if n_in % group:
        raise UnsupportedQuantization(f"input size {n_in} is not a multiple of the group size {group}")
    if g_idx is not None and not torch.equal(g_idx.cpu().long(), torch.arange(n_in) // group):
        raise UnsupportedQuantization("act-order (desc_act) GPTQ checkpoints are not supported by the fast path")
    q = _unpack_int32(qweight.to(torch.int32), dim=0).t().to(torch.uint8).contiguous()  # [n_out, n_in]
    z = _unpack_int32(qzeros.to(torch.int32), dim=1)[:, :n_out].float() + zero_offset  # [groups, n_out]
    s = scales.float()
    sz = torch.stack([s, (8 - z) * s], dim=2)  # [groups, n_out, 2]
    return Int4Weight(q, sz.to(torch.bfloat16).contiguous(), group)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group: int,
                    zero_offset: int = 1) -> torch.Tensor:
    """GPTQ's own formula ``scale * (q - z)``, ``[n_out, n_in]`` float: the reference for tests."""
    q = _unpack_int32(qweight.to(torch.int32), dim=0).float()  # [n_in, n_out]
    z = _unpack_int32(qzeros.to(torch.int32), dim=1)[:, : q.shape[1]].float() + zero_offset
    s = scales.float()
    return (s.repeat_interleave(group, 0) * (q - z.repeat_interleave(group, 0))).t().contiguous()


@dataclass(frozen=True)
class NibbleLayout:
    """Where a packing op puts the 4-bit values of ``rows`` consecutive weight rows: the packed bytes of
    such a block, split into nibbles (low nibble first), read at ``index`` give the block's values in
    row-major order. Learnt from the op, never assumed."""

    rows: int
    index: torch.Tensor  # long [rows * n_in]

    @classmethod
    def learn(cls, pack: Callable[[torch.Tensor], torch.Tensor], rows: int, n_in: int,
              device: torch.device) -> NibbleLayout | None:
        """Pack ``rows x n_in`` weights whose values spell out each value's own position, four bits
        per probe, and read where each position landed; None if the op is not a nibble permutation."""
        size = rows * n_in
        position = torch.arange(size, device=device, dtype=torch.int64)
        landed = torch.zeros(size, dtype=torch.int64, device=device)
        for shift in range(0, max(size - 1, 1).bit_length(), 4):
            probe = ((position >> shift) & 0xF).to(torch.uint8).view(rows, n_in)
            try:
                nibbles = _nibbles(pack(probe))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # the op refuses blocks of this many rows
                return None
            if nibbles.numel() != size:
                return None
            landed |= nibbles.to(torch.int64) << shift
        if not torch.equal(landed.sort().values, position):
            return None
        index = torch.empty_like(landed)
        index[landed] = position
        return cls(rows, index)

    def unpack(self, packed: torch.Tensor, n_out: int) -> torch.Tensor:
        """The ``uint8 [n_out, n_in]`` values of a packed weight."""
        return _unpack(packed, self.index, n_out)


def _unpack(packed: torch.Tensor, index: torch.Tensor, n_out: int) -> torch.Tensor:
    return _nibbles(packed).view(-1, index.numel()).index_select(1, index).view(n_out, -1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """A packed integer tensor as its 4-bit values, lowest bits of each element first (the bytes'
    order on a little-endian machine), by shifts alone so that it compiles into one kernel."""
    shifts = torch.arange(0, packed.element_size() * 8, 4, device=packed.device, dtype=packed.dtype)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).flatten()


_LAYOUTS: dict[Any, NibbleLayout | None] = {}


def _layout_for(mode: str, q: torch.Tensor, packed: torch.Tensor,
                pack: Callable[[torch.Tensor], torch.Tensor]) -> NibbleLayout | None:
    """A learnt layout that reproduces this very weight's values from its packed form, or None."""
    n_out, n_in = q.shape
    for rows in (8, 16, 32, 64):
        if n_out % rows:
            continue
        key = (mode, q.device.type, q.device.index, rows, n_in)
        if key not in _LAYOUTS:
            _LAYOUTS[key] = NibbleLayout.learn(pack, rows, n_in, q.device)
        layout = _LAYOUTS[key]
        if layout is not None and torch.equal(layout.unpack(packed, n_out), q):
            return layout
    log.warning("no learnt layout reproduces a %dx%d int4 weight packed for %s: prompts through it use the "
                "packed kernel (slower for long prompts)", n_out, n_in, mode)
    return None


def _unpack_dequantize(packed: torch.Tensor, index: torch.Tensor, n_out: int, scales_zeros: torch.Tensor, group: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """The ``[n_out, n_in]`` weight in ``dtype``, straight from the packed form."""
    return _scale(_unpack(packed, index, n_out), scales_zeros, group, dtype)


class PackedInt4(torch.nn.Module):
    """A bias-free linear layer with packed 4-bit weights, run by PyTorch's int4 weight-only
    matrix product on CUDA or CPU; where neither op exists it keeps the dequantized weight. On a
    GPU, from ``DEQUANTIZE_MIN_ROWS`` rows on (a prompt), it unpacks the weight for that call
    instead (on a CPU the packed kernel stays faster)."""

    def __init__(self, w: Int4Weight, device: torch.device | str) -> None:
        super().__init__()
        device = torch.device(device)
        self.n_out, self.n_in = w.shape
        self.group = w.group
        # the packed kernels tile the input dimension by 16 * INNER_K_TILES and the output by 8
        aligned = self.n_in % (16 * INNER_K_TILES) == 0 and self.n_out % 8 == 0
        self.mode = _int4_mode(device) if aligned else "dequantized"
        q, sz = w.q.to(device), w.scales_zeros.to(device)
        self.layout: NibbleLayout | None = None
        if self.mode in ("cuda", "cpu"):
            pack = _pack_cuda if self.mode == "cuda" else _pack_cpu
            weight = pack(q)
            self.layout = _layout_for(self.mode, q, weight, pack)
        else:
            weight = Int4Weight(q, sz, w.group).dequantize(torch.float32)
        self.register_buffer("weight", weight)
        self.register_buffer("scales_zeros", sz)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[n_out, n_in]`` in ``dtype``, unpacked for one call (needs a learnt layout)."""
        assert self.layout is not None
        fn = compiled_unpacker(_unpack_dequantize) if self.weight.is_cuda else _unpack_dequantize
        return fn(self.weight, self.layout.index, self.n_out, self.scales_zeros, self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.n_in)
        if self.mode == "cuda" and self.layout is not None and x2.shape[0] >= DEQUANTIZE_MIN_ROWS:
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dequantized(torch.bfloat16))
        elif self.mode == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.group,
                                                   self.scales_zeros)
        elif self.mode == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.weight, self.group,
                                                           self.scales_zeros)
        else:
            y = x2.float() @ self.weight.t()
        return y.to(dtype).reshape(*lead, self.n_out)


_COMPILED: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}


def compiled_unpacker(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn``, a 4-bit weight's unpacking for a prompt, compiled once a process: one fused kernel
    per weight shape on a GPU rather than a handful of full-size temporaries. Specialised to each
    shape: with symbolic sizes, a 2048-token prompt took 173 ms instead of 91. A model has a
    handful of shapes; past the compiler's limit (8 a process) the rest run eagerly."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _pack_cuda(q: torch.Tensor) -> torch.Tensor:
    hi = _nibble_order(q.device) == "hi"
    packed = (q[:, ::2] << 4 | q[:, 1::2]) if hi else (q[:, 1::2] << 4 | q[:, ::2])
    return torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), INNER_K_TILES)


def _pack_cpu(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INNER_K_TILES)


def _int4_mode(device: torch.device) -> str:
    if device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "cuda"
    if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    return "dequantized"


_NIBBLE_ORDER: dict[Any, str] = {}


def _nibble_order(device: torch.device) -> str:
    """Which nibble of a packed byte holds the even input column for this build's CUDA op: found
    once by a small product against the dequantized weight rather than assumed."""
    key = (device.type, device.index)
    if key not in _NIBBLE_ORDER:
        gen = torch.Generator().manual_seed(0)
        n, k, group = 64, 256, 128
        w = Int4Weight(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                       (torch.rand(k // group, n, 2, generator=gen) - 0.5).to(torch.bfloat16), group)
        x = torch.randn(4, k, generator=gen).to(torch.bfloat16)
        ref = x.float() @ w.dequantize().t()
        errs = {}
        for order in ("hi", "lo"):
            q = w.q.to(device)
            packed = (q[:, ::2] << 4 | q[:, 1::2]) if order == "hi" else (q[:, 1::2] << 4 | q[:, ::2])
            wp = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), INNER_K_TILES)
            y = torch.ops.aten._weight_int4pack_mm(x.to(device), wp, group, w.scales_zeros.to(device))
            errs[order] = float((y.float().cpu() - ref).norm() / ref.norm())
        best = min(errs, key=errs.__getitem__)
        if errs[best] > 2e-2:
            raise UnsupportedQuantization(f"this PyTorch's int4 matrix product disagrees with the dequantized weight: {errs}")
        _NIBBLE_ORDER[key] = best
    return _NIBBLE_ORDER[key]
