"""The fast path's batch-1 bf16 matrix-vector product: a Triton kernel for the decode step's
projections, used for a weight shape only where it beat cuBLAS on this GPU when timed.

Why: decoding one token reads every weight once, so a projection's speed is the rate at which its
weight leaves memory. cuBLAS reads a 7B model's projections at 0.89 of the copy bandwidth on an
H200, and splits the small ones (4096 outputs) over the input dimension, adding the parts in a
second kernel; this kernel read them at 0.96 there, with no split (docs/performance.md). Each
program reads a ``block_n x block_k`` tile of the row-major weight per loop step (16-byte loads
along the input dimension) and keeps float32 products per lane, reduced once. Where the tuner does
split a product, the parts are added in the same launch (``split_k_finish``: the last program of a
column block adds every split's partial sums, in split order, so results are deterministic).

Launch shapes are timed per weight shape beside cuBLAS (``tune``) and cached with the int4 kernel's
in ``$JUPYBOX_HOME/int4_gemv.json``; a shape where cuBLAS was faster keeps cuBLAS.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interpreter.llm import int4_gemv

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Bf16Config:
    """``block_n`` outputs and ``block_k`` inputs per program and loop step, ``warps`` per
    program, ``splits`` programs along the input dimension."""

    block_n: int = 16
    block_k: int = 256
    warps: int = 4
    splits: int = 1


if triton is not None:

    @triton.jit
    def split_k_finish(acc, n, n_ok, part_ptr, count_ptr, out_ptr, N):
        """The end of a split-K program (grid ``(column blocks, splits)``): with one split, store
        ``acc``; otherwise store it as this split's partial sums, and let the last program of the
        column block to arrive (an atomic count) add every split's partials in split order (so the
        result does not depend on which came last) and store the sum, then reset the count for the
        next launch. One launch, no reduction kernel after it, and the partials never leave the L2."""
        splits = tl.num_programs(1)
        if splits == 1:
            tl.store(out_ptr + n, acc, mask=n_ok)
        else:
            block = tl.program_id(0)
            tl.store(part_ptr + tl.program_id(1) * N + n, acc, mask=n_ok)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if arrived == splits - 1:
                total = tl.zeros_like(acc)
                for k in range(splits):  # in split order: the same bits whichever program came last
                    total += tl.load(part_ptr + k * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + n, total, mask=n_ok)
                tl.atomic_xchg(count_ptr + block, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, part_ptr, count_ptr, out_ptr, N, K, k_per_split,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[n] = sum_k w[n, k] x[k] over this program's rows and its split of the inputs."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kk = tl.arange(0, BLOCK_K)
        start = split * k_per_split
        end = tl.minimum(start + k_per_split, K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            k = k0 + kk
            k_ok = k < end
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        split_k_finish(tl.sum(acc, axis=1), n, n_ok, part_ptr, count_ptr, out_ptr, N)

    @torch.library.custom_op("jupybox::bf16_gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, block_n: int, block_k: int,
                 warps: int, splits: int) -> torch.Tensor:
        """The kernel as an operator a compiled step keeps whole (and a CUDA graph replays).
        ``counts`` is zero before and after every launch, so it is not declared as mutated."""
        return launch(x, weight, Bf16Config(block_n, block_k, warps, splits), counts)

    @_gemv_op.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, block_n: int, block_k: int, warps: int,
          splits: int) -> torch.Tensor:
        return weight.new_empty((weight.shape[0],), dtype=torch.float32)


def supports(weight: torch.Tensor) -> bool:
    """A 16-bit weight whose input size keeps 16-byte loads aligned."""
    return (triton is not None and weight.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2
            and weight.shape[1] % 16 == 0 and weight.is_contiguous())


def counters(n_out: int, config: Bf16Config, device: torch.device | str) -> torch.Tensor:
    return torch.zeros(-(-n_out // config.block_n), dtype=torch.int32, device=device)


def launch(x: torch.Tensor, weight: torch.Tensor, config: Bf16Config, counts: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` in float32 ``[n_out]`` for one activation row ``x`` ``[n_in]``."""
    n_out, n_in = weight.shape
    per_split = -(-n_in // config.splits)
    per_split = -(-per_split // config.block_k) * config.block_k  # whole tiles: aligned loads
    out = torch.empty(n_out, dtype=torch.float32, device=weight.device)
    # with one split there are no partial sums: the kernel never touches ``parts``
    parts = out if config.splits == 1 else torch.empty((config.splits, n_out), dtype=torch.float32,
                                                       device=weight.device)
    grid = (triton.cdiv(n_out, config.block_n), config.splits)
    _gemv_kernel[grid](x.to(weight.dtype).contiguous(), weight, parts, counts, out, n_out, n_in, per_split,
                       BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.warps)
    return out


def agrees(weight: torch.Tensor, config: Bf16Config) -> bool:
    """One product of this weight against cuBLAS's, so that a kernel this GPU or Triton version
    computes wrongly is refused at load rather than answering garbage."""
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(weight.shape[1], device=weight.device, generator=gen).to(weight.dtype)
    got = launch(x, weight, config, counters(weight.shape[0], config, weight.device))
    ref = F.linear(x[None], weight)[0].float()
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err < 1e-2:  # both add exact products in float32; cuBLAS's result is rounded to 16 bits
        log.warning("the bf16 kernel is off by %.1e (relative) on a %dx%d weight: cuBLAS runs it", err, *weight.shape)
        return False
    return True


def candidates(n_out: int, n_in: int, processors: int) -> list[Bf16Config]:
    """Tiles of 8 to 32 rows by 256 or 512 inputs, and the splits that put one to eight programs
    on each multiprocessor."""
    out = []
    for block_n, block_k, warps in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 512, 8), (32, 256, 4),
                                    (32, 512, 8)):
        blocks = -(-n_out // block_n)
        tiles = -(-n_in // block_k)
        splits = [s for s in (1, 2, 4, 8, 16) if s <= tiles and blocks * s <= 8 * processors]
        fill = [s for s in splits if blocks * s >= processors] or splits[-1:]
        out += [Bf16Config(block_n, block_k, warps, s) for s in fill[:3]]
    return out


def time_shape(weight: torch.Tensor, configs: list[Bf16Config]) -> tuple[dict[Bf16Config, float], float]:
    """Seconds per product for each config and for cuBLAS, the weight streamed from memory (enough
    copies of it to overflow the L2 cache)."""
    device = weight.device
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    copies = max(2, -(-3 * l2 // (weight.numel() * weight.element_size())))
    weights = [weight] + [torch.randn_like(weight) for _ in range(copies - 1)]
    x = torch.randn(weight.shape[1], device=device, dtype=weight.dtype)
    row = x.view(1, -1)
    times: dict[Bf16Config, float] = {}
    for config in configs:
        try:
            counts = [counters(weight.shape[0], config, device) for _ in weights]
            times[config] = int4_gemv.graph_seconds([lambda w=w, c=c: launch(x, w, config, c)
                                                      for w, c in zip(weights, counts)])
        except Exception as exc:  # a shape this GPU or Triton refuses: not a candidate
            log.info("bf16 kernel config %s failed for %s: %s", config, tuple(weight.shape), exc)
    cublas = int4_gemv.graph_seconds([lambda w=w: F.linear(row, w) for w in weights])
    return times, cublas


_TUNED: dict[str, Bf16Config | None] = {}


def tune(weight: torch.Tensor) -> Bf16Config | None:
    """The fastest launch shape for this weight's shape on this GPU, or None where cuBLAS was
    faster: timed once, then read from memory or the cache file."""
    n_out, n_in = weight.shape
    key = int4_gemv.cache_key(weight.device, f"bf16 v1 {n_out}x{n_in} {str(weight.dtype).removeprefix('torch.')}")
    if key in _TUNED:
        return _TUNED[key]
    saved = int4_gemv.read_cache()
    if key in saved:
        entry = saved[key]
        try:
            _TUNED[key] = Bf16Config(**entry["config"]) if entry.get("config") else None
            return _TUNED[key]
        except (TypeError, AttributeError):
            pass
    processors = torch.cuda.get_device_properties(weight.device).multi_processor_count
    times, cublas = time_shape(weight, candidates(n_out, n_in, processors))
    best = min(times, key=times.__getitem__) if times else None
    choice = best if best is not None and times[best] < cublas else None
    log.info("bf16 %dx%d: kernel %s %.1f us, cuBLAS %.1f us: %s", n_out, n_in, best,
             times.get(best, float("nan")) * 1e6 if best else float("nan"), cublas * 1e6,
             "kernel" if choice else "cuBLAS")
    _TUNED[key] = choice
    int4_gemv.write_cache(key, {"config": asdict(choice) if choice else None,
                                "kernel_us": times[best] * 1e6 if best else None, "cublas_us": cublas * 1e6})
    return choice
