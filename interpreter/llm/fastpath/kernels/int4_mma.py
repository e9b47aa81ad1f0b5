"""The fast path's batch-1 int4 matrix-vector product on tensor cores: a CUDA kernel, compiled at
run time (NVRTC, which CUDA builds of PyTorch carry; ``nvrtc.py``), for weights shuffled once at
load into the registers a ``mma.sync.m16n8k16`` instruction takes.

Why tensor cores for one row: at batch 1 every weight is used once, so the product is limited by
how fast weights leave memory, and on an H200 that is about 8.4 billion 4-bit values a second,
~35 per clock per multiprocessor. A CUDA-core kernel spends a few instructions per value (move the
nibble, make it a float, multiply-add: ``int4_gemv`` is at ~0.5 of the copy bandwidth), and the
multiprocessor issues only 128 thread-instructions a clock. Here a thread turns one 32-bit word
(eight values) into the four bf16 pairs of an mma operand with three shifts and four logic ops
(each nibble OR-ed into the bits of the bf16 128, so the pair is ``128 + q`` exactly), and one
``mma`` multiplies 16 rows by 16 inputs: about one instruction per weight.

The activation ``x`` is the mma's second operand, the same in all 8 of its columns. A second mma
with an all-ones first operand sums ``x`` over the same inputs, so per group of ``group`` inputs

    y[row] += scale * sum(x * (128 + q)) + (zero - 136 * scale) * sum(x)

which is ``sum(x * ((q - 8) * scale + zero))``, the canonical form of ``gptq_pack``, in float32.

Layout, made once by ``pack`` for a ``[n_out, n_in]`` weight (``n_out`` a multiple of 16, ``group``
of 64, ``n_in`` of ``group``), rows in tiles of 16 and inputs in chunks of 64:

* ``words`` ``int32 [n_out/16, n_in/64, 32, 4]``: lane ``4g + t``'s 16 bytes of a (tile, chunk), one
  word per mma step ``j``. Inputs are permuted inside a chunk so that lane ``t`` of the activation
  operand reads ``x[64 c + 16 t : 64 c + 16 t + 16]`` with two 16-byte loads: step ``j`` row ``2t + e``
  of the operand is input ``16 t + 4 j + e``, row ``2t + 8 + e`` is input ``16 t + 4 j + 2 + e``.
  The word holds rows ``g`` and ``g + 8`` of the tile at those inputs, one nibble each, in the order
  the four operand registers take them (``nibble_position``).
* ``sz`` ``int32 [n_out/16, groups, 8, 2]``: (scale, zero) as a bf16 pair for rows ``g`` and ``g + 8``.

A block takes ``tiles`` tiles of rows; its ``warps`` warps take its groups in turn and add their
sums through shared memory at the end (no second kernel), ``unroll`` groups' loads at once in one
or two register ``stages``. The shape is timed per weight shape and cached with the other kernels'
(``gemv.json``). A ``[gate; up]`` weight packed with ``glu`` can end in ``silu(gate) * up``.

Programmatic launch (Hopper on): the kernel lets the next one be placed as soon as it runs, reads
its weights before ``griddepcontrol.wait``, and reads the activation only after it, through the L2
(``ld.global.cg``): the read-only path may hold lines from before the previous kernel's stores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import torch

from interpreter.llm.fastpath.errors import KernelUnavailable

from interpreter.llm.fastpath.kernels import gemv, nvrtc

log = logging.getLogger(__name__)

ROWS, CHUNK = 16, 64  # rows of a tile, inputs of a chunk

HERE = Path(__file__).parent
KERNEL_NAME = "jupybox_int4_mma"
BATCH_KERNEL_NAME = "jupybox_int4_mma_batch"
MAX_ROWS = 32  # activation rows the batched kernel takes: 8 a column tile, up to 4 tiles



@dataclass(frozen=True)
class MmaConfig:
    """One launch shape: ``tiles`` tiles of 16 rows a block, ``warps`` warps a block (taking its
    groups in turn), ``unroll`` groups a warp loads at once, in ``stages`` register buffers (with
    two, a warp's next loads are in flight while it multiplies)."""

    tiles: int = 1
    warps: int = 8
    unroll: int = 2
    stages: int = 2


class Int4MmaUnavailable(KernelUnavailable):
    """No CUDA GPU with bf16 tensor cores, no run-time compiler, or the kernel disagrees with the
    dequantized weight on this GPU."""


def supports(n_out: int, n_in: int, group: int) -> bool:
    """Whether the kernel takes this weight: rows in whole tiles, groups in whole chunks."""
    return n_out > 0 and n_out % ROWS == 0 and group >= CHUNK and group % CHUNK == 0 and n_in % group == 0


def available(device: torch.device) -> bool:
    """A CUDA GPU with bf16 ``mma.sync`` (compute capability 8.0 on)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def nibble_position(half: int, e: int) -> int:
    """Where in a word the nibble for row ``g + 8 * half`` and input ``4 j + e`` of lane ``t``'s
    16 lies: operand register ``r`` is ``(word >> 4 r) & 0x000F000F``, whose low half is the lower
    input, and registers 0..3 hold (row g, inputs 0-1), (row g+8, 0-1), (row g, 2-3), (row g+8, 2-3)."""
    return half + 2 * (e // 2) + 4 * (e % 2)


@dataclass
class MmaWeight:
    """A weight in the kernel's layout (see the module docstring)."""

    words: torch.Tensor  # int32 [n_out/16, n_in/64, 32, 4]
    sz: torch.Tensor  # int32 [n_out/16, groups, 8, 2]: bf16 (scale, zero) pairs
    group: int
    glu: bool = False  # a [gate; up] weight stored gate tile, up tile in turn (``glu_order``)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.words.shape[0]) * ROWS, int(self.words.shape[1]) * CHUNK


def glu_fits(n_out: int) -> bool:
    """Whether a ``[gate; up]`` weight of ``n_out`` rows splits into gate and up tiles."""
    return n_out % (2 * ROWS) == 0


def glu_order(n_out: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rows of a ``[gate; up]`` weight in the order a GLU launch stores them: gate rows
    ``16p..16p+15``, then up rows ``16p..16p+15``, for each ``p``, so that a block's tile pair holds
    both halves of 16 outputs."""
    half = torch.arange(n_out // 2, device=device).view(-1, ROWS)
    return torch.stack([half, half + n_out // 2], dim=1).reshape(-1)


def pack(q: torch.Tensor, scales_zeros: torch.Tensor, group: int, glu: bool = False) -> MmaWeight:
    """The kernel's layout of a canonical 4-bit weight (``q`` uint8 ``[n_out, n_in]`` in 0..15,
    ``scales_zeros`` ``[n_in // group, n_out, 2]``), on ``q``'s device; with ``glu`` a ``[gate; up]``
    weight's rows in ``glu_order``."""
    n_out, n_in = q.shape
    if not supports(n_out, n_in, group) or (glu and not glu_fits(n_out)):
        raise Int4MmaUnavailable(f"a {n_out}x{n_in} weight in groups of {group} does not fit the int4 mma kernel")
    if glu:
        order = glu_order(n_out, q.device)
        q, scales_zeros = q[order], scales_zeros[:, order]
    tiles, chunks, groups = n_out // ROWS, n_in // CHUNK, n_in // group
    # q[16 tile + 8 half + g, 64 chunk + 16 t + 4 j + e] -> [tile, chunk, g, t, j, half, e]
    v = q.view(tiles, 2, 8, chunks, 4, 4, 4).permute(0, 3, 2, 4, 5, 1, 6).to(torch.int64)
    shift = torch.tensor([[4 * nibble_position(h, e) for e in range(4)] for h in range(2)], device=q.device)
    words = (v << shift).sum((-2, -1))  # [tile, chunk, g, t, j]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(tiles, chunks, 32, 4)
    # scales_zeros[group, 16 tile + 8 half + g, (s, z)] -> [tile, group, g, half, (s, z)]
    sz = scales_zeros.to(torch.bfloat16).view(groups, tiles, 2, 8, 2).permute(1, 0, 3, 2, 4).contiguous()
    return MmaWeight(words.contiguous(), sz.view(torch.int32).view(tiles, groups, 8, 2), group, glu)


def unpack(w: MmaWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack``'s inverse: ``(q, scales_zeros)`` in the canonical form."""
    tiles, chunks = w.words.shape[:2]
    groups = w.sz.shape[1]
    shift = torch.tensor([[4 * nibble_position(h, e) for e in range(4)] for h in range(2)], device=w.words.device)
    words = w.words.view(tiles, chunks, 8, 4, 4, 1, 1)
    v = (words >> shift) & 0xF  # [tile, chunk, g, t, j, half, e]
    q = v.permute(0, 5, 2, 1, 3, 4, 6).reshape(tiles * ROWS, chunks * CHUNK).to(torch.uint8)
    sz = w.sz.contiguous().view(torch.bfloat16).view(tiles, groups, 8, 2, 2).permute(1, 0, 3, 2, 4)
    sz = sz.reshape(groups, tiles * ROWS, 2)
    if w.glu:
        back = torch.argsort(glu_order(tiles * ROWS, q.device))
        q, sz = q[back], sz[:, back]
    return q, sz


def emulate(x: torch.Tensor, w: MmaWeight) -> torch.Tensor:
    """What the kernel computes before its ending (rows as stored), in float64 on any device, read
    from the packed layout through the operand registers' lane mapping (so a CPU test checks
    ``pack`` against the kernel's reading)."""
    tiles, chunks = w.words.shape[:2]
    groups = w.sz.shape[1]
    cpg = chunks // groups
    xs = x.to(torch.bfloat16).double().view(1, chunks, 1, 4, 4, 2, 2)  # [., chunk, ., t, j, (b0, b1), e]
    words = w.words.view(tiles, chunks, 8, 4, 4)  # [tile, chunk, g, t, j]
    regs = [((words >> (4 * r)) & 0x000F000F) | 0x43004300 for r in range(4)]  # bf16 pairs, as the kernel makes
    low = lambda reg: (reg << 16).view(torch.float32).double()  # noqa: E731 - a pair's lower bf16
    high = lambda reg: (reg & -65536).view(torch.float32).double()  # noqa: E731
    dots = []
    for half in range(2):  # rows g (registers 0 and 2) and g + 8 (1 and 3); registers 0, 1 meet b0, 2, 3 meet b1
        a0, a1 = regs[half], regs[half + 2]
        prod = (low(a0) * xs[..., 0, 0] + high(a0) * xs[..., 0, 1] + low(a1) * xs[..., 1, 0] + high(a1) * xs[..., 1, 1])
        dots.append(prod.sum((-2, -1)).view(tiles, groups, cpg, 8).sum(2))  # [tile, group, g]
    sum_x = xs.view(groups, -1).sum(1)  # [group]
    sz = w.sz.contiguous().view(torch.bfloat16).view(tiles, groups, 8, 2, 2).double()  # [tile, group, g, half, (s, z)]
    y = torch.stack([sz[..., h, 0] * dots[h] + (sz[..., h, 1] - 136 * sz[..., h, 0]) * sum_x.view(1, groups, 1)
                     for h in range(2)], dim=2)  # [tile, group, half, g]
    return y.sum(1).reshape(tiles * ROWS)


# -- compiling and launching ---------------------------------------------------------------------------
_KERNELS: dict[tuple[int, ...], nvrtc.Kernel] = {}


def column_tiles(rows: int) -> int:
    """Column tiles of 8 rows a batched launch takes for ``rows`` activation rows: 1, 2 or 4."""
    return 1 if rows <= 8 else 2 if rows <= 16 else 4


def source(config: MmaConfig, cpg: int, pdl: bool, glu: bool = False, nt: int = 0) -> str:
    """The kernel's CUDA source for one launch shape, ``cpg`` chunks a group, with or without the
    programmatic-launch instructions (Hopper on), ending in float32 sums or (``glu``) in
    ``silu(gate) * up`` in bf16: the single-row kernel (``int4_mma.cu``), or with ``nt`` column
    tiles the batched one (``int4_mma_batch.cu``)."""
    defines = {"TILES": config.tiles, "WARPS": config.warps, "UNROLL": config.unroll, "STAGES": config.stages,
               "CPG": cpg, "PDL": int(pdl), "GLU": int(glu), "NT": nt}
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    body = (HERE / ("int4_mma_batch.cu" if nt else "int4_mma.cu")).read_text()
    return head + (HERE / "int4_mma_common.cuh").read_text() + body


def kernel(config: MmaConfig, cpg: int, device: torch.device, glu: bool = False, nt: int = 0) -> nvrtc.Kernel:
    """The compiled kernel for one launch shape, chunks per group, ending and (batched) column
    tiles on ``device`` (compiled once a process, for the device's own architecture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (*astuple(config), cpg, glu, nt, index)
    if key not in _KERNELS:
        major, minor = torch.cuda.get_device_capability(index)
        name = BATCH_KERNEL_NAME if nt else KERNEL_NAME
        try:
            cubin = nvrtc.compile_cubin(source(config, cpg, pdl=major >= 9, glu=glu, nt=nt), name, f"{major}{minor}")
            _KERNELS[key] = nvrtc.Kernel(cubin, name, torch.device("cuda", index))
        except nvrtc.NvrtcError as exc:
            raise Int4MmaUnavailable(f"the int4 mma kernel is not available here: {exc}") from exc
    return _KERNELS[key]


def launch(x: torch.Tensor, w: MmaWeight, config: MmaConfig, glu: bool = False) -> torch.Tensor:
    """One activation row ``x`` ``[n_in]`` (taken in bf16) times the weight: float32 ``[1, n_out]``
    (rows as stored), or with ``glu`` (a weight packed with ``glu``) ``silu(gate) * up`` in bf16
    ``[1, n_out / 2]``."""
    return launch_packed(x, w.words, w.sz, w.group, config, glu)


def launch_packed(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, config: MmaConfig,
                  glu: bool = False) -> torch.Tensor:
    return _launch(x.reshape(1, -1), words, sz, config, glu, batched=False)


def launch_batch(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, config: MmaConfig,
                 glu: bool = False) -> torch.Tensor:
    """Up to ``MAX_ROWS`` activation rows ``x`` ``[rows, n_in]`` (taken in bf16) times the weight
    in one launch of the batched kernel: float32 ``[rows, n_out]`` (rows as stored), or with
    ``glu`` ``silu(gate) * up`` in bf16 ``[rows, n_out / 2]``."""
    rows = int(x.shape[0])
    if not 0 < rows <= MAX_ROWS:
        raise Int4MmaUnavailable(f"the batched int4 mma kernel takes 1 to {MAX_ROWS} rows, not {rows}")
    return _launch(x, words, sz, config, glu, batched=True)


def _launch(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, config: MmaConfig, glu: bool,
            batched: bool) -> torch.Tensor:
    """One launch of the single-row kernel (``x`` ``[1, n_in]``) or of the batched one (its rows)."""
    tiles, chunks = words.shape[:2]
    groups = sz.shape[1]
    rows = int(x.shape[0])
    if glu and config.tiles % 2:
        raise Int4MmaUnavailable(f"a SiLU-fused launch takes tiles in pairs, not {config.tiles} a block")
    xb = x.to(torch.bfloat16).contiguous()
    if xb.data_ptr() % 16:  # the kernel reads the activation 16 bytes at a time
        xb = xb.clone()
    out = torch.empty((rows, tiles * ROWS // 2 if glu else tiles * ROWS),
                      dtype=torch.bfloat16 if glu else torch.float32, device=words.device)
    args = [words, sz, xb, out, tiles, groups, *([rows] if batched else [])]
    try:
        kernel(config, chunks // groups, words.device, glu, column_tiles(rows) if batched else 0)(
            (-(-tiles // config.tiles), 1, 1), (32 * config.warps, 1, 1), args,
            programmatic=gemv.programmatic_launch(words.device))
    except nvrtc.NvrtcError as exc:  # e.g. a launch shape this GPU cannot hold
        raise Int4MmaUnavailable(f"the{' batched' if batched else ''} int4 mma kernel did not launch: {exc}") from exc
    return out


@torch.library.custom_op("jupybox::int4_mma_batch", mutates_args=())
def _mma_batch_op(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, tiles: int, warps: int,
                  unroll: int, stages: int, glu: bool) -> torch.Tensor:
    """The batched kernel as an operator a compiled step keeps whole."""
    return launch_batch(x, words, sz, group, MmaConfig(tiles, warps, unroll, stages), glu)


@_mma_batch_op.register_fake
def _(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, tiles: int, warps: int,
      unroll: int, stages: int, glu: bool) -> torch.Tensor:
    rows = words.shape[0] * ROWS
    return words.new_empty((x.shape[0], rows // 2 if glu else rows), dtype=torch.bfloat16 if glu else torch.float32)


@torch.library.custom_op("jupybox::int4_mma", mutates_args=())
def _mma_op(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, tiles: int, warps: int,
            unroll: int, stages: int, glu: bool) -> torch.Tensor:
    """The kernel as an operator a compiled step keeps whole (and a CUDA graph replays)."""
    return launch_packed(x, words, sz, group, MmaConfig(tiles, warps, unroll, stages), glu)


@_mma_op.register_fake
def _(x: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, group: int, tiles: int, warps: int,
      unroll: int, stages: int, glu: bool) -> torch.Tensor:
    rows = words.shape[0] * ROWS
    return words.new_empty((1, rows // 2 if glu else rows), dtype=torch.bfloat16 if glu else torch.float32)


# -- choosing a launch shape per weight shape ---------------------------------------------------------
def candidates(glu: bool = False, nt: int = 0) -> list[MmaConfig]:
    """Launch shapes worth timing: 1, 2 or 4 tiles a block (pairs for a SiLU-fused launch), 4 to
    16 warps, one or two register stages of 1 to 4 groups' loads, at most 4 tile-groups of weights
    in registers in all. For the batched kernel (``nt`` column tiles), what keeps its activations
    and sums in registers (at most 64 activation words and 8 tile-column sums a thread) and its
    partial sums in 48 KiB of shared memory."""
    if not nt:
        return [MmaConfig(tiles, warps, unroll, stages) for tiles in ((2, 4) if glu else (1, 2, 4))
                for unroll in (1, 2, 4) for stages in (1, 2) if tiles * unroll * stages <= 4 for warps in (4, 8, 16)]
    return [MmaConfig(tiles, warps, 1, stages) for tiles in ((2, 4) if glu else (1, 2, 4))
            for stages in (1, 2) for warps in (4, 8, 16)
            if tiles * stages <= 4 and stages * nt <= 4 and tiles * nt <= 8
            and warps * tiles * nt * 16 * 8 * 4 <= 48 * 1024]


def time_configs(w: MmaWeight, configs: list[MmaConfig], repeats: int = 5, rows: int = 0) -> dict[MmaConfig, float]:
    """Seconds per product for each config (SiLU-fused for a weight packed with ``glu``; of
    ``rows`` activation rows through the batched kernel, or one through the single-row one),
    weights streamed from memory (enough copies of the weight to overflow the L2 cache), replayed
    as one CUDA graph."""
    device = w.words.device
    size = w.words.numel() * 4 + w.sz.numel() * 4
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    weights = [w] + [MmaWeight(w.words.clone(), w.sz.clone(), w.group, w.glu)
                     for _ in range(max(1, -(-3 * l2 // size) - 1))]
    x = torch.randn(max(rows, 1), w.shape[1], device=device, dtype=torch.bfloat16)
    out: dict[MmaConfig, float] = {}
    for config in configs:
        if rows:
            calls = [lambda v=v: launch_batch(x, v.words, v.sz, v.group, config, v.glu) for v in weights]
        else:
            calls = [lambda v=v: launch(x[0], v, config, v.glu) for v in weights]
        try:
            out[config] = gemv.graph_seconds(calls, repeats)
        except Exception as exc:  # a shape this GPU refuses (registers, shared memory): not a candidate
            log.info("int4 mma config %s failed for %dx%d: %s", config, *w.shape, exc)
    return out


def tune(w: MmaWeight, nt: int = 0) -> MmaConfig:
    """The fastest launch shape for this weight's shape (and ending) on this GPU, for one row or
    (``nt``) the batched kernel's ``8 nt`` rows: timed once, then read from memory or from the
    kernels' JSON cache in ``$JUPYBOX_HOME``."""
    n_out, n_in = w.shape
    what = f"int4 mma v2 {n_out}x{n_in}/{w.group}{' glu' if w.glu else ''}" + (f" batch{8 * nt}" if nt else "")

    def measure() -> tuple[MmaConfig, dict]:
        times = time_configs(w, candidates(w.glu, nt), rows=8 * nt)
        if not times:
            raise Int4MmaUnavailable(f"no launch shape of the int4 mma kernel ran for a {n_out}x{n_in} weight")
        best = min(times, key=times.__getitem__)
        log.info("int4 mma kernel for %dx%d%s%s: %s, %.1f us", n_out, n_in, " (SiLU-fused)" if w.glu else "",
                 f" x {8 * nt} rows" if nt else "", best, times[best] * 1e6)
        return best, asdict(best)

    return gemv.tuned(gemv.cache_key(w.words.device, what), lambda e: MmaConfig(**e), measure)


# -- the layer ----------------------------------------------------------------------------------------
class MmaInt4(torch.nn.Module):
    """A bias-free linear layer with 4-bit weights in this kernel's layout: one row (decoding) runs
    the kernel; more rows (a prompt) multiply by the weight unpacked to bf16 for that call.

    With ``glu`` (a ``[gate; up]`` weight) the rows are stored in ``glu_order`` and ``glu(x)`` of one
    row is ``silu(gate) * up`` from the kernel's own ending (``fuses_glu``), where that launch
    passes its check at load; otherwise the layer keeps the plain ending."""

    def __init__(self, q: torch.Tensor, scales_zeros: torch.Tensor, group: int, device: torch.device | str,
                 config: MmaConfig | None = None, glu: bool = False) -> None:
        super().__init__()
        device = torch.device(device)
        if not available(device):
            raise Int4MmaUnavailable("the int4 mma kernel needs a CUDA GPU of compute capability 8.0 or later")
        q, scales_zeros = q.to(device), scales_zeros.to(device)
        self.n_out, self.n_in = q.shape
        self.group = group
        self.fuses_glu = False
        if glu and glu_fits(self.n_out):
            w = pack(q, scales_zeros, group, glu=True)
            try:
                self.config = config or tune(w)
                self._check(q, scales_zeros, w)
                self.fuses_glu = True
            except Int4MmaUnavailable as exc:
                log.warning("%s: the int4 mma kernel keeps its plain ending for this gate/up weight", exc)
        if not self.fuses_glu:
            w = pack(q, scales_zeros, group)
            self.config = config or tune(w)
            self._check(q, scales_zeros, w)
        self.register_buffer("words", w.words)
        self.register_buffer("sz", w.sz)
        self.register_buffer("stored_to_rows", torch.argsort(glu_order(self.n_out, device)) if self.fuses_glu else None)
        self.batch_configs: dict[int, MmaConfig] = {}  # column tiles -> launch shape, once ``prepare_batches`` ran

    def prepare_batches(self, rows: int = MAX_ROWS) -> None:
        """Time and check the batched kernel for up to ``rows`` activation rows (a decode step of
        several streams), so that a compiled step finds its launch shapes ready; where a check
        fails, those rows keep the bf16 product of the unpacked weight."""
        from interpreter.llm.fastpath.gptq_pack import Int4Weight

        q, scales_zeros = unpack(MmaWeight(self.words, self.sz, self.group))
        if self.stored_to_rows is not None:  # unpack gives rows as stored: their own order for the check
            q, scales_zeros = q[self.stored_to_rows], scales_zeros[:, self.stored_to_rows]
        reference = Int4Weight(q, scales_zeros, self.group)
        for nt in sorted({column_tiles(r) for r in range(2, min(rows, MAX_ROWS) + 1)}):
            try:
                config = tune(self.packed, nt)
                err = batch_error(reference, lambda x: launch_batch(x, self.words, self.sz, self.group, config,
                                                                    self.fuses_glu), 8 * nt, self.fuses_glu)
            except Int4MmaUnavailable as exc:
                log.warning("%s: %d rows of a %dx%d weight keep the unpacked product", exc, 8 * nt, self.n_out, self.n_in)
                continue
            if err < (1e-2 if self.fuses_glu else 1e-3):
                self.batch_configs[nt] = config
            else:
                log.warning("the batched int4 mma kernel is off by %.1e (relative) on a %dx%d weight x %d rows: "
                            "those rows keep the unpacked product", err, self.n_out, self.n_in, 8 * nt)

    @property
    def packed(self) -> MmaWeight:
        return MmaWeight(self.words, self.sz, self.group, self.fuses_glu)

    def _check(self, q: torch.Tensor, scales_zeros: torch.Tensor, w: MmaWeight) -> None:
        """One product against the dequantized weight (with ``w.glu``, the SiLU-fused launch against
        ``silu(gate) * up`` of it, rounded as the unfused model rounds), so that a kernel this GPU
        computes wrongly is refused at load rather than answering garbage."""
        from interpreter.llm.fastpath.gptq_pack import Int4Weight, product_error

        err = product_error(Int4Weight(q, scales_zeros, self.group), lambda x: launch(x, w, self.config, w.glu)[0],
                            glu=w.glu)
        # float32 sums keep far more than the bf16 result's 9 bits; the SiLU-fused ending is a bf16
        # result through an exp that is not PyTorch's: now and then a step apart
        limit = 1e-2 if w.glu else 1e-3
        if not err < limit:
            raise Int4MmaUnavailable(f"the int4 mma kernel{' (SiLU-fused)' if w.glu else ''} is off by {err:.1e} "
                                     f"(relative) on a {self.n_out}x{self.n_in} weight")

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[n_out, n_in]`` in ``dtype``, rows in their own order."""
        from interpreter.llm.fastpath.gptq_pack import compiled_unpacker

        return compiled_unpacker(dequantize)(self.words, self.sz, self.group, dtype, self.fuses_glu)

    def batched(self, rows: int) -> MmaConfig | None:
        """The batched kernel's launch shape for ``rows`` activation rows, if it serves them."""
        return self.batch_configs.get(column_tiles(rows)) if 1 < rows <= MAX_ROWS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.n_in)
        config = self.batched(x2.shape[0])
        if x2.shape[0] == 1 or config is not None:
            if config is None:
                y = self._kernel(x2[0], glu=False)
            else:
                c = config
                y = torch.ops.jupybox.int4_mma_batch(x2, self.words, self.sz, self.group, c.tiles, c.warps, c.unroll,
                                                     c.stages, False)
            if self.stored_to_rows is not None:
                y = y[:, self.stored_to_rows]
        else:
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dequantized(torch.bfloat16))
        return y.to(dtype).reshape(*lead, self.n_out)

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of one row ``x`` (or of rows the batched kernel serves) through a
        weight packed with ``glu`` (``fuses_glu``), inside the kernel (more rows go through
        ``forward``, as an unfused projection's do)."""
        x2 = x.reshape(-1, self.n_in)
        config = self.batched(x2.shape[0])
        if config is None:
            return self._kernel(x.reshape(-1), glu=True).to(x.dtype).view(*x.shape[:-1], -1)
        c = config
        y = torch.ops.jupybox.int4_mma_batch(x2, self.words, self.sz, self.group, c.tiles, c.warps, c.unroll, c.stages,
                                             True)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    def _kernel(self, x: torch.Tensor, glu: bool) -> torch.Tensor:
        c = self.config
        return torch.ops.jupybox.int4_mma(x, self.words, self.sz, self.group, c.tiles, c.warps, c.unroll, c.stages, glu)


def dequantize(words: torch.Tensor, sz: torch.Tensor, group: int, dtype: torch.dtype, glu: bool = False) -> torch.Tensor:
    """The ``[n_out, n_in]`` weight in ``dtype`` from the packed form (for prompts), rows in their
    own order."""
    from interpreter.llm.fastpath.gptq_pack import Int4Weight

    q, scales_zeros = unpack(MmaWeight(words, sz, group, glu))
    return Int4Weight(q, scales_zeros, group).dequantize(dtype)



def batch_error(w: Any, run: Any, rows: int, glu: bool = False) -> float:
    """Relative error of ``run(x)`` for ``rows`` activation rows (bf16, a fixed seed; rows of
    different sizes, so a row read in place of another shows) against the dequantized weight's
    product in float32 (with ``glu``: ``silu(gate) * up``, rounded where the unfused model rounds),
    the worst row's."""
    gen = torch.Generator(device=w.q.device).manual_seed(1)
    x = (torch.randn(rows, w.shape[1], device=w.q.device, generator=gen)
         * torch.arange(1, rows + 1, device=w.q.device).view(-1, 1)).to(torch.bfloat16)
    ref = x.float() @ w.dequantize(torch.float32).T
    if glu:
        gate, up = ref.to(torch.bfloat16).float().chunk(2, dim=-1)
        ref = (torch.nn.functional.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16).float()
    got = run(x).float()
    return float(((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).max())
