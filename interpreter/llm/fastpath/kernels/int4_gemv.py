"""The fast path's batch-1 int4 matrix-vector product: a Triton kernel that streams 4-bit weights
at close to the GPU's copy bandwidth.

Why its own kernel: decoding one token multiplies one activation row by every weight once, so its
speed is the rate at which weights leave memory. PyTorch's ``_weight_int4pack_mm`` reads int4
weights at well under half the bandwidth a bf16 matrix product gets from cuBLAS; at these sizes the
4-bit values must be turned into floats at ~10 per clock per multiprocessor, which a conversion
instruction cannot do, so this kernel never converts: it ORs each nibble, where it lies in its word,
into the bits of a power of two whose last mantissa bit is the nibble's lowest bit, and subtracts
that power (one logic op and one add). The activation is read as the step left it (bf16): no
separate kernel prepares it.

Weight layout (made once at load by ``pack``), for a ``[n_out, n_in]`` weight with ``group`` input
columns per scale:

* ``words``: ``int32 [n_in // 8, n_out]``; bits ``4j..4j+3`` of word ``(r, n)`` hold ``q[n, 8r + j]``
  (0..15). Output columns are contiguous, so a warp's 16-byte loads cover whole 128-byte lines.
* ``scales``, ``zeros``: ``bf16 [n_in // group, n_out]``: the weight is ``(q - 8) * scale + zero``
  (the canonical form of ``gptq_pack``), so ``y = scale * sum(x * q) + (zero - 8 * scale) * sum(x)``
  per group, and the inner loop is one fused multiply-add per weight.

Split-K: programs also split the input dimension so that a small projection still fills the GPU.
Their partial sums are added either by the caller (a float32 ``[splits, n_out]`` result, whose sum
fuses into whatever follows inside a compiled step) or in the same launch by the last program of
each column block to finish (``gemv.split_k_finish``), whichever timed faster for the shape.
The block shape, warps, groups per loop step, splits and where they are added are chosen per
weight shape by timing (``tune``) and cached in ``$JUPYBOX_HOME/gemv.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from interpreter.llm.fastpath.errors import KernelUnavailable

from interpreter.llm.fastpath.kernels import gemv

log = logging.getLogger(__name__)


try:  # Triton ships with CUDA builds of PyTorch; without it the fast path keeps PyTorch's kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]



@dataclass(frozen=True)
class GemvConfig:
    """One launch shape: ``block_n`` output columns per program, ``warps`` per program, ``step``
    groups per loop iteration, ``splits`` programs along the input dimension; with ``finish`` the
    last program of a column block adds the splits' partial sums (``gemv.split_k_finish``),
    otherwise the caller does."""

    block_n: int = 256
    warps: int = 2
    step: int = 1
    splits: int = 4
    finish: bool = False

    @property
    def rows(self) -> int:
        """Rows of the kernel's float32 result: the splits' partial sums, or their sum."""
        return 1 if self.finish or self.splits == 1 else self.splits


class Int4GemvUnavailable(KernelUnavailable):
    """No Triton here, or its kernel disagrees with the dequantized weight on this GPU."""


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _bf16_pair(v):
        """The two bf16 values of a 32-bit word as float32 (the lower first): a bf16 is the top
        half of a float32."""
        return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, part_ptr, count_ptr, out_ptr, N, K8, groups_per_split, m128, m2048,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr, SPLITS: tl.constexpr,
                     CHUNK: tl.constexpr, FINISH: tl.constexpr, PDL: tl.constexpr):
        """out[split, n] = sum over this split's groups g of
        s[g, n] * sum_k(x_k q[k, n]) + (z[g, n] - 8 s[g, n]) * sum_k(x_k).

        ``x_ptr`` is the bf16 activation read as 32-bit words (two values each). Each nibble is
        moved (three shifts or rotations a word: two nibbles each) to bits 16..19 or 12..15 and
        OR-ed (one instruction with the mask) into the float 128 or 2048 (``m128``/``m2048``: their
        bits, held in registers), whose last mantissa bit is then worth 1: the float is ``128 + q``
        or ``2048 + q`` exactly, and goes straight into a multiply-add. The ``128 * sum(x)`` and
        ``2048 * sum(x)`` this adds are taken off once a group; float32 keeps 13 or more bits of
        the products under them. With ``PDL`` (a programmatic dependent launch) the first group's
        weights are asked into the L2 while the kernel before may still run; the activation,
        which that kernel writes, is read only after ``gdc_wait``."""
        R: tl.constexpr = GROUP // 8  # packed rows of a group
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        first = split * groups_per_split
        last = tl.minimum(first + groups_per_split, K8 * 8 // GROUP)
        if PDL:
            # a 128-byte line of each row, kept inside the weight (a split past the last group, a
            # block past the last column)
            lines = tl.minimum(pid_n * BLOCK_N + tl.arange(0, (BLOCK_N + 31) // 32) * 32, N - 1)
            rows = tl.minimum(first * R + tl.arange(0, R), K8 - 1)
            gemv.prefetch_l2(w_ptr + rows[:, None] * N + lines[None, :])
            gemv.tl_cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g0 in range(first, last, STEP):
            for t in tl.static_range(STEP):
                g = g0 + t
                ok = g < last
                lo = tl.zeros([BLOCK_N], dtype=tl.float32)  # nibbles 0, 2, 4, 6 (at bits 16..19)
                hi = tl.zeros([BLOCK_N], dtype=tl.float32)  # nibbles 1, 3, 5, 7 (at bits 12..15)
                x_lo = 0.0
                x_hi = 0.0
                for i in tl.static_range(R):
                    r = g * R + i
                    w = tl.load(w_ptr + r * N + n, mask=ok & n_ok, other=0)
                    x0, x1 = _bf16_pair(tl.load(x_ptr + r * 4, mask=ok, other=0))
                    x2, x3 = _bf16_pair(tl.load(x_ptr + r * 4 + 1, mask=ok, other=0))
                    x4, x5 = _bf16_pair(tl.load(x_ptr + r * 4 + 2, mask=ok, other=0))
                    x6, x7 = _bf16_pair(tl.load(x_ptr + r * 4 + 3, mask=ok, other=0))
                    up8 = w << 8  # nibbles 1, 2 to bits 12..19
                    down8 = w >> 8  # nibbles 5, 6
                    u = w.to(tl.uint32, bitcast=True)
                    turn = ((u << 16) | (u >> 16)).to(tl.int32, bitcast=True)  # a rotation: nibbles 7, 0
                    lo = tl.fma(((turn & 0xF0000) | m128).to(tl.float32, bitcast=True), x0, lo)
                    lo = tl.fma(((up8 & 0xF0000) | m128).to(tl.float32, bitcast=True), x2, lo)
                    lo = tl.fma(((w & 0xF0000) | m128).to(tl.float32, bitcast=True), x4, lo)
                    lo = tl.fma(((down8 & 0xF0000) | m128).to(tl.float32, bitcast=True), x6, lo)
                    hi = tl.fma(((up8 & 0xF000) | m2048).to(tl.float32, bitcast=True), x1, hi)
                    hi = tl.fma(((w & 0xF000) | m2048).to(tl.float32, bitcast=True), x3, hi)
                    hi = tl.fma(((down8 & 0xF000) | m2048).to(tl.float32, bitcast=True), x5, hi)
                    hi = tl.fma(((turn & 0xF000) | m2048).to(tl.float32, bitcast=True), x7, hi)
                    x_lo += (x0 + x2) + (x4 + x6)
                    x_hi += (x1 + x3) + (x5 + x7)
                dot = (lo - 128.0 * x_lo) + (hi - 2048.0 * x_hi)
                s = tl.load(s_ptr + g * N + n, mask=ok & n_ok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * N + n, mask=ok & n_ok, other=0.0).to(tl.float32)
                acc += s * dot + (z - 8.0 * s) * (x_lo + x_hi)
        if PDL:  # every read is done: the next kernel may start (and wait for this one's stores)
            gemv.tl_cuda.gdc_launch_dependents()
        if FINISH:
            gemv.split_k_finish(acc, n, n_ok, part_ptr, count_ptr, out_ptr, N, SPLITS, CHUNK)
        else:
            tl.store(out_ptr + split * N + n, acc, mask=n_ok)


@dataclass
class PackedGemvWeight:
    """A weight in the kernel's layout (see the module docstring)."""

    words: torch.Tensor  # int32 [n_in // 8, n_out]
    scales: torch.Tensor  # bf16 [n_in // group, n_out]
    zeros: torch.Tensor  # bf16 [n_in // group, n_out]
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.words.shape[1]), int(self.words.shape[0]) * 8


def supports(n_out: int, n_in: int, group: int) -> bool:
    """Whether the kernel takes this weight: the group a power of two from 8 up, dividing ``n_in``."""
    return group >= 8 and group & (group - 1) == 0 and n_in % group == 0 and n_out > 0


def pack(q: torch.Tensor, scales_zeros: torch.Tensor, group: int) -> PackedGemvWeight:
    """The kernel's layout of a canonical 4-bit weight (``q`` uint8 ``[n_out, n_in]`` in 0..15,
    ``scales_zeros`` ``[n_in // group, n_out, 2]``), on ``q``'s device."""
    n_out, n_in = q.shape
    if not supports(n_out, n_in, group):
        raise Int4GemvUnavailable(f"a {n_out}x{n_in} weight in groups of {group} does not fit the int4 kernel")
    nibbles = q.t().reshape(n_in // 8, 8, n_out).to(torch.int64)  # [r, j, n] = q[n, 8r + j]
    shifts = (torch.arange(8, device=q.device, dtype=torch.int64) * 4).view(1, 8, 1)
    words = (nibbles << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    sz = scales_zeros.to(torch.bfloat16)
    return PackedGemvWeight(words, sz[..., 0].contiguous(), sz[..., 1].contiguous(), group)


def unpack_dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The weight transposed, ``[n_in, n_out]`` in ``dtype``, from the packed form (for prompts:
    many rows are faster as a 16-bit matrix product over the weight unpacked once for the call)."""
    k8, n_out = words.shape
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32).view(1, 8, 1)
    q = ((words.unsqueeze(1) >> shifts) & 0xF).view(k8 * 8 // group, group, n_out).float()
    full = (q - 8) * scales.float().unsqueeze(1) + zeros.float().unsqueeze(1)
    return full.view(k8 * 8, n_out).to(dtype)


M128, M2048 = 0x43000000, 0x45000000  # the bits of the floats 128 and 2048


def launch(x: torch.Tensor, w: PackedGemvWeight, config: GemvConfig,
           counts: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 products ``[config.rows, n_out]`` of one activation row ``x`` ``[n_in]`` (taken in
    bf16): the splits' partial sums, or with ``config.finish`` their sum; either way their sum over
    the first dimension is ``x @ W.T``."""
    return launch_words(x, w.words, w.scales, w.zeros, w.group, config, counts)


def counters(n_out: int, config: GemvConfig, device: torch.device | str) -> torch.Tensor:
    """The arrival counts a finishing launch needs (one per column block, zero between launches)."""
    return gemv.counters(-(-n_out // config.block_n), device)


def launch_words(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                 config: GemvConfig, counts: torch.Tensor | None = None) -> torch.Tensor:
    if triton is None:
        raise Int4GemvUnavailable("the int4 kernel needs Triton (it comes with CUDA builds of PyTorch)")
    k8, n_out = words.shape
    groups = k8 * 8 // group
    per_split = -(-groups // config.splits)
    finish = config.finish and config.splits > 1
    if finish and counts is None:
        counts = counters(n_out, config, words.device)
    parts = torch.empty((config.splits, n_out), dtype=torch.float32, device=words.device)
    out = torch.empty((1, n_out), dtype=torch.float32, device=words.device) if finish else parts
    grid = (triton.cdiv(n_out, config.block_n), config.splits)
    pairs = x.to(torch.bfloat16).contiguous().view(torch.int32)
    pdl = gemv.programmatic_launch(words.device)
    _gemv_kernel[grid](pairs, words, scales, zeros, parts, counts if finish else parts, out, n_out, k8, per_split,
                       M128, M2048, GROUP=group, BLOCK_N=config.block_n, STEP=config.step,
                       SPLITS=config.splits if finish else 1,  # only a finishing launch compiles per split count
                       CHUNK=gemv.finish_chunk(config.splits, config.block_n, config.warps) if finish else 1,
                       FINISH=finish, PDL=pdl, num_warps=config.warps, launch_pdl=pdl)
    return out


if triton is not None:

    @torch.library.custom_op("jupybox::int4_gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, counts: torch.Tensor,
                 group: int, block_n: int, warps: int, step: int, splits: int, finish: bool) -> torch.Tensor:
        """The kernel as an operator a compiled step keeps whole (and a CUDA graph replays).
        ``counts`` is zero before and after every launch, so it is not declared as mutated."""
        return launch_words(x, words, scales, zeros, group, GemvConfig(block_n, warps, step, splits, finish), counts)

    @_gemv_op.register_fake
    def _(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, counts: torch.Tensor,
          group: int, block_n: int, warps: int, step: int, splits: int, finish: bool) -> torch.Tensor:
        rows = GemvConfig(block_n, warps, step, splits, finish).rows
        return words.new_empty((rows, words.shape[1]), dtype=torch.float32)


# -- choosing a launch shape per weight shape ---------------------------------------------------------
def candidates(n_out: int, n_in: int, group: int, processors: int) -> list[GemvConfig]:
    """Launch shapes worth timing: blocks of 128 columns per warp or more (Triton then lays a warp's
    threads along the columns, so each thread holds whole groups of rows and the reduction over rows
    stays in its registers), one or two groups per loop step, and splits that put one to eight
    programs on each multiprocessor, each split count with its partial sums added by the caller
    or in the launch."""
    groups = n_in // group
    out = []
    for block_n, warps in ((128, 1), (256, 1), (256, 2), (512, 2), (512, 4), (1024, 4)):
        blocks = -(-n_out // block_n)
        splits = [s for s in (1, 2, 4, 8, 16, 32) if s <= groups and blocks * s <= 8 * processors]
        fill = [s for s in splits if blocks * s >= processors] or splits[-1:]
        for step in (1, 2):
            # a thread holds step * group / 8 rows of block_n / (32 * warps) words: more than 128
            # spills registers (seen in the compiler's report at block_n 512, 2 warps, step 2)
            if step * group // 8 * block_n // (32 * warps) <= 128:
                out += [GemvConfig(block_n, warps, step, s, finish) for s in fill[:3] if groups >= s * step
                        for finish in ((False, True) if s > 1 else (False,))]
    return out




def product_calls(x: torch.Tensor, weights: list[PackedGemvWeight], config: GemvConfig) -> list[Callable[[], Any]]:
    """One whole product per weight (the partial sums added, by the kernel or after it), to time."""
    counts = [counters(w.shape[0], config, x.device) for w in weights]

    def call(w: PackedGemvWeight, c: torch.Tensor) -> torch.Tensor:
        parts = launch(x, w, config, c)
        return parts.sum(0) if config.rows > 1 else parts

    return [lambda w=w, c=c: call(w, c) for w, c in zip(weights, counts)]


def time_configs(w: PackedGemvWeight, configs: list[GemvConfig], copies: int | None = None,
                 repeats: int = 5) -> dict[GemvConfig, float]:
    """Seconds per product for each config, weights streamed from memory: the product runs over
    enough copies of the weight to overflow the L2 cache, replayed as one CUDA graph. The time
    includes adding the partial sums where the caller adds them (a kernel of its own, timed alone;
    in a compiled step it fuses into what follows)."""
    device = w.words.device
    n_out, n_in = w.shape
    size = w.words.numel() * 4 + w.scales.numel() * 4
    if copies is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        copies = max(2, -(-3 * l2 // size))
    weights = [w] + [PackedGemvWeight(w.words.clone(), w.scales.clone(), w.zeros.clone(), w.group)
                     for _ in range(copies - 1)]
    x = torch.randn(n_in, device=device, dtype=torch.bfloat16)
    out: dict[GemvConfig, float] = {}
    for config in configs:
        try:
            out[config] = gemv.graph_seconds(product_calls(x, weights, config), repeats)
        except Exception as exc:  # a shape this GPU or Triton refuses: not a candidate
            log.info("int4 kernel config %s failed for %dx%d: %s", config, n_out, n_in, exc)
    return out


def tune(w: PackedGemvWeight) -> GemvConfig:
    """The fastest launch shape for this weight's shape on this GPU: timed once, then read from
    memory or from a small JSON cache in ``$JUPYBOX_HOME`` (default ``~/.cache/jupybox``)."""
    device = w.words.device
    n_out, n_in = w.shape

    def measure() -> tuple[GemvConfig, dict | None]:
        if device.type != "cuda":
            return GemvConfig(block_n=128, warps=1, step=1, splits=1), None
        processors = torch.cuda.get_device_properties(device).multi_processor_count
        times = time_configs(w, candidates(n_out, n_in, w.group, processors))
        if not times:
            raise Int4GemvUnavailable(f"no launch shape of the int4 kernel ran for a {n_out}x{n_in} weight")
        best = min(times, key=times.__getitem__)
        log.info("int4 kernel for %dx%d: %s, %.1f us", n_out, n_in, best, times[best] * 1e6)
        return best, asdict(best)

    return gemv.tuned(gemv.cache_key(device, f"int4 v3 {n_out}x{n_in}/{w.group}"), lambda e: GemvConfig(**e), measure)


# -- the layer ----------------------------------------------------------------------------------------
class TritonInt4(torch.nn.Module):
    """A bias-free linear layer with 4-bit weights in this kernel's layout: one row (decoding) runs
    the kernel; more rows (a prompt) multiply by the weight unpacked to bf16 for that call."""

    def __init__(self, q: torch.Tensor, scales_zeros: torch.Tensor, group: int, device: torch.device | str,
                 config: GemvConfig | None = None) -> None:
        super().__init__()
        w = pack(q.to(device), scales_zeros.to(device), group)
        self.n_out, self.n_in = w.shape
        self.group = group
        self.register_buffer("words", w.words)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        self.config = config or tune(w)
        self.register_buffer("counts", counters(self.n_out, self.config, device))  # zero between launches
        self._check(q.to(device), scales_zeros.to(device))

    @property
    def packed(self) -> PackedGemvWeight:
        return PackedGemvWeight(self.words, self.scales, self.zeros, self.group)

    def _check(self, q: torch.Tensor, scales_zeros: torch.Tensor) -> None:
        """One product against the dequantized weight, so that a kernel this GPU or Triton version
        computes wrongly is refused at load rather than answering garbage."""
        from interpreter.llm.fastpath.gptq_pack import Int4Weight, product_error

        err = product_error(Int4Weight(q, scales_zeros, self.group),
                            lambda x: launch(x, self.packed, self.config, self.counts).sum(0))
        if not err < 1e-3:  # the kernel keeps about 13 bits, the bf16 result 9
            raise Int4GemvUnavailable(f"the int4 kernel is off by {err:.1e} (relative) on a {self.n_out}x{self.n_in} weight")

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[n_out, n_in]`` in ``dtype``."""
        return _unpacker(self.words.is_cuda)(self.words, self.scales, self.zeros, self.group, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.n_in)
        if x2.shape[0] == 1:
            c = self.config
            parts = torch.ops.jupybox.int4_gemv(x2[0], self.words, self.scales, self.zeros, self.counts, self.group,
                                                c.block_n, c.warps, c.step, c.splits, c.finish)
            y = parts.sum(0, keepdim=True)
        else:
            y = x2.to(torch.bfloat16) @ _unpacker(self.words.is_cuda)(self.words, self.scales, self.zeros, self.group,
                                                                      torch.bfloat16)
        return y.to(dtype).reshape(*lead, self.n_out)


def _unpacker(cuda: bool) -> Any:
    """On a GPU, one fused kernel per weight shape rather than a few full-size temporaries."""
    from interpreter.llm.fastpath.gptq_pack import compiled_unpacker

    return compiled_unpacker(unpack_dequantize) if cuda else unpack_dequantize
