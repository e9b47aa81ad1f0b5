"""The fast path's batch-1 bf16 matrix-vector product: a Triton kernel for the decode step's
projections, used for a weight shape only where it beat cuBLAS on this GPU when timed.

Why: decoding one token reads every weight once, so a projection's speed is the rate at which its
weight leaves memory. cuBLAS reads a 7B model's projections at 0.89 of the copy bandwidth on an
H200, and splits the small ones (4096 outputs) over the input dimension, adding the parts in a
second kernel; this kernel read them at 0.96 there, with no split (docs/performance.md). Each
program reads a ``block_n x block_k`` tile of the row-major weight per loop step (16-byte loads
along the input dimension) and keeps float32 products per lane, reduced once. Where the tuner does
split a product, the parts are added in the same launch (``gemv.split_k_finish``: the last program
of a column block adds every split's partial sums in a fixed order, so results are deterministic).

Launch shapes are timed per weight shape beside cuBLAS (``tune``) and cached with the int4 kernel's
in ``$JUPYBOX_HOME/gemv.json``; a shape where cuBLAS was faster keeps cuBLAS.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from interpreter.llm.fastpath.kernels import gemv

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
    def _gemv_kernel(x_ptr, w_ptr, part_ptr, count_ptr, out_ptr, N, K, k_per_split,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr,
                     PDL: tl.constexpr, GLU: tl.constexpr):
        """out[n] = sum_k w[n, k] x[k] over this program's rows and its split of the inputs. With
        ``PDL`` (a programmatic dependent launch) the first weight tile is read while the kernel
        before this one may still run (weights never change); the activation, which that kernel
        writes, only after ``gdc_wait``.

        With ``GLU`` (one split) the weight's rows are gate and up rows in turn, and the kernel
        stores ``silu(gate) * up`` in the weight's dtype: ``N / 2`` outputs, rounded where the
        unfused model rounds them (the GPU's ``exp`` is not PyTorch's, so now and then one
        lands a step apart), with no kernel of their own."""
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kk = tl.arange(0, BLOCK_K)
        start = split * k_per_split
        end = tl.minimum(start + k_per_split, K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        first = start
        if PDL:
            k = start + kk
            k_ok = k < end
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            gemv.tl_cuda.gdc_wait()
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            first = start + BLOCK_K
        for k0 in range(first, end, BLOCK_K):
            k = k0 + kk
            k_ok = k < end
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if PDL:  # every read is done: the next kernel may start (and wait for this one's stores)
            gemv.tl_cuda.gdc_launch_dependents()
        if GLU:
            dtype = out_ptr.dtype.element_ty
            gate, up = tl.split(tl.reshape(tl.sum(acc, axis=1), [BLOCK_N // 2, 2]))
            gate = gate.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            up = up.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
            m = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(out_ptr + m, (act * up).to(dtype, fp_downcast_rounding="rtne"), mask=m < N // 2)
        else:
            gemv.split_k_finish(tl.sum(acc, axis=1), n, n_ok, part_ptr, count_ptr, out_ptr, N, SPLITS, CHUNK)

    @torch.library.custom_op("jupybox::bf16_gemv", mutates_args=())
    def _gemv_op(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, block_n: int, block_k: int,
                 warps: int, splits: int, glu: bool) -> torch.Tensor:
        """The kernel as an operator a compiled step keeps whole (and a CUDA graph replays).
        ``counts`` is zero before and after every launch, so it is not declared as mutated."""
        return launch(x, weight, Bf16Config(block_n, block_k, warps, splits), counts, glu)

    @_gemv_op.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, block_n: int, block_k: int, warps: int,
          splits: int, glu: bool) -> torch.Tensor:
        if glu:
            return weight.new_empty((weight.shape[0] // 2,))
        return weight.new_empty((weight.shape[0],), dtype=torch.float32)


def supports(weight: torch.Tensor) -> bool:
    """A 16-bit weight whose input size keeps 16-byte loads aligned."""
    return (triton is not None and weight.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2
            and weight.shape[1] % 16 == 0 and weight.is_contiguous())


def counters(n_out: int, config: Bf16Config, device: torch.device | str) -> torch.Tensor:
    return gemv.counters(-(-n_out // config.block_n), device)


def glu_fits(weight: torch.Tensor, config: Bf16Config) -> bool:
    """Whether a launch can end in ``silu(gate) * up`` (``launch(glu=True)``): one split, and
    gate/up row pairs that no block boundary cuts."""
    return config.splits == 1 and config.block_n % 2 == 0 and weight.shape[0] % 2 == 0


def interleave(gate_up: torch.Tensor) -> torch.Tensor:
    """A ``[gate; up]`` weight with its rows taken in turn (gate 0, up 0, gate 1, ...), as a
    ``glu`` launch reads it."""
    n2, n_in = gate_up.shape
    return gate_up.view(2, n2 // 2, n_in).transpose(0, 1).reshape(n2, n_in).contiguous()


def launch(x: torch.Tensor, weight: torch.Tensor, config: Bf16Config, counts: torch.Tensor,
           glu: bool = False) -> torch.Tensor:
    """``weight @ x`` in float32 ``[n_out]`` for one activation row ``x`` ``[n_in]``; with ``glu``
    (an ``interleave``-d weight, ``glu_fits``) ``silu(gate) * up`` ``[n_out / 2]`` in the weight's
    dtype."""
    n_out, n_in = weight.shape
    if glu and not glu_fits(weight, config):
        raise ValueError(f"a {n_out}x{n_in} product in {config} cannot end in silu(gate) * up")
    per_split = -(-n_in // config.splits)
    per_split = -(-per_split // config.block_k) * config.block_k  # whole tiles: aligned loads
    out = (torch.empty(n_out // 2, dtype=weight.dtype, device=weight.device) if glu
           else torch.empty(n_out, dtype=torch.float32, device=weight.device))
    # with one split there are no partial sums: the kernel never touches ``parts``
    parts = out if config.splits == 1 else torch.empty((config.splits, n_out), dtype=torch.float32,
                                                       device=weight.device)
    grid = (triton.cdiv(n_out, config.block_n), config.splits)
    pdl = gemv.programmatic_launch(weight.device)
    _gemv_kernel[grid](x.to(weight.dtype).contiguous(), weight, parts, counts, out, n_out, n_in, per_split,
                       BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLITS=config.splits,
                       CHUNK=gemv.finish_chunk(config.splits, config.block_n, config.warps), PDL=pdl, GLU=glu,
                       num_warps=config.warps, launch_pdl=pdl)
    return out


def agrees(weight: torch.Tensor, config: Bf16Config, glu_weight: torch.Tensor | None = None) -> bool:
    """One product of this weight against cuBLAS's (with ``glu_weight``, its ``interleave``-d form,
    a ``glu`` launch of that against ``silu(gate) * up`` of cuBLAS's product), so that a kernel
    this GPU or Triton version computes wrongly is refused at load rather than answering garbage."""
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(weight.shape[1], device=weight.device, generator=gen).to(weight.dtype)
    ref = F.linear(x[None], weight)[0]
    if glu_weight is not None:
        got = launch(x, glu_weight, config, counters(weight.shape[0], config, weight.device), glu=True).float()
        gate, up = ref.chunk(2)
        ref = F.silu(gate) * up
    else:
        got = launch(x, weight, config, counters(weight.shape[0], config, weight.device))
    ref = ref.float()
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
            times[config] = gemv.graph_seconds([lambda w=w, c=c: launch(x, w, config, c)
                                                      for w, c in zip(weights, counts)])
        except Exception as exc:  # a shape this GPU or Triton refuses: not a candidate
            log.info("bf16 kernel config %s failed for %s: %s", config, tuple(weight.shape), exc)
    cublas = gemv.graph_seconds([lambda w=w: F.linear(row, w) for w in weights])
    return times, cublas




def tune(weight: torch.Tensor) -> Bf16Config | None:
    """The fastest launch shape for this weight's shape on this GPU, or None where cuBLAS was
    faster: timed once, then read from memory or the cache file."""
    n_out, n_in = weight.shape

    def measure() -> tuple[Bf16Config | None, dict]:
        processors = torch.cuda.get_device_properties(weight.device).multi_processor_count
        times, cublas = time_shape(weight, candidates(n_out, n_in, processors))
        best = min(times, key=times.__getitem__) if times else None
        choice = best if best is not None and times[best] < cublas else None
        log.info("bf16 %dx%d: kernel %s %.1f us, cuBLAS %.1f us: %s", n_out, n_in, best,
                 times.get(best, float("nan")) * 1e6 if best else float("nan"), cublas * 1e6,
                 "kernel" if choice else "cuBLAS")
        return choice, {"config": asdict(choice) if choice else None,
                        "kernel_us": times[best] * 1e6 if best else None, "cublas_us": cublas * 1e6}

    return gemv.tuned(gemv.cache_key(weight.device, f"bf16 v2 {n_out}x{n_in} {str(weight.dtype).removeprefix('torch.')}"),
                      lambda e: Bf16Config(**e["config"]) if e.get("config") else None, measure)
