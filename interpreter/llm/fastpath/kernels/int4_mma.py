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

import torch

from interpreter.llm.fastpath.kernels import gemv, nvrtc

log = logging.getLogger(__name__)

ROWS, CHUNK = 16, 64  # rows of a tile, inputs of a chunk

SOURCE = r"""
#define TILES %(tiles)d
#define WARPS %(warps)d
#define UNROLL %(unroll)d
#define CPG %(cpg)d
#define PDL %(pdl)d
#define STAGES %(stages)d
#define GLU %(glu)d

// a programmatic dependent launch: wait for the kernel before (it writes x) / let the next start
__device__ __forceinline__ void wait_for_inputs() {
#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_start() {
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void mma(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%%0,%%1,%%2,%%3}, {%%4,%%5,%%6,%%7}, "
        "{%%8,%%9}, {%%0,%%1,%%2,%%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// two nibbles (bits s..s+3 and 16+s..19+s) as the bf16 pair (128 + lo, 128 + hi): one shift and
// one three-input logic op, (a & b) | c (the compiler would spend two on its two constants)
__device__ __forceinline__ unsigned pair(unsigned w, int s) {
    unsigned out;
    asm("lop3.b32 %%0, %%1, %%2, %%3, 0xEA;" : "=r"(out) : "r"(w >> s), "r"(0x000F000Fu), "r"(0x43004300u));
    return out;
}

__device__ __forceinline__ float round_bf16(float v) {  // to the nearest bf16, ties to even
    const unsigned u = __float_as_uint(v);
    return __uint_as_float((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

__device__ __forceinline__ uint4 stream(const uint4* p) {  // read once: keep it out of L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%%0,%%1,%%2,%%3}, [%%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// the activation, which the kernel before writes while this one may already run (a programmatic
// launch): read through the L2, never the read-only path, whose lines may predate that kernel's stores
__device__ __forceinline__ uint4 load_l2(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%%0,%%1,%%2,%%3}, [%%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned word(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

#define STEP (WARPS * UNROLL)

// what a warp reads for UNROLL of its groups: the weights of each tile, the activation, the scales
struct Stage {
    uint4 w[UNROLL][TILES][CPG], x[UNROLL][CPG][2];
    uint2 s[UNROLL][TILES];
};

__device__ __forceinline__ void load_weights(Stage& st, const uint4* __restrict__ words, const uint2* __restrict__ sz,
                                             const int (&tile)[TILES], int g0, int groups, int lane) {
    const int chunks = groups * CPG;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int g = g0 + u * WARPS;
        if (g < groups) {
#pragma unroll
            for (int i = 0; i < TILES; ++i) {
#pragma unroll
                for (int c = 0; c < CPG; ++c)
                    st.w[u][i][c] = stream(words + ((size_t)tile[i] * chunks + g * CPG + c) * 32 + lane);
                st.s[u][i] = sz[((size_t)tile[i] * groups + g) * 8 + (lane >> 2)];
            }
        }
    }
}

__device__ __forceinline__ void load_x(Stage& st, const uint4* x, int g0, int groups, int t) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int g = g0 + u * WARPS;
        if (g < groups) {
#pragma unroll
            for (int c = 0; c < CPG; ++c) {
                st.x[u][c][0] = load_l2(x + (g * CPG + c) * 8 + 2 * t);
                st.x[u][c][1] = load_l2(x + (g * CPG + c) * 8 + 2 * t + 1);
            }
        }
    }
}

__device__ __forceinline__ void multiply(const Stage& st, float (&acc)[TILES][2], int g0, int groups) {
    const unsigned ONE = 0x3F803F80u;  // the bf16 pair (1, 1)
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (g0 + u * WARPS < groups) {
            float sum_x[4] = {0.f, 0.f, 0.f, 0.f};
            float dot[TILES][4];
#pragma unroll
            for (int i = 0; i < TILES; ++i) dot[i][0] = dot[i][1] = dot[i][2] = dot[i][3] = 0.f;
#pragma unroll
            for (int c = 0; c < CPG; ++c) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const unsigned b0 = word(st.x[u][c][j >> 1], (j & 1) * 2);
                    const unsigned b1 = word(st.x[u][c][j >> 1], (j & 1) * 2 + 1);
                    mma(sum_x, ONE, ONE, ONE, ONE, b0, b1);
#pragma unroll
                    for (int i = 0; i < TILES; ++i) {
                        const unsigned w = word(st.w[u][i][c], j);
                        mma(dot[i], pair(w, 0), pair(w, 4), pair(w, 8), pair(w, 12), b0, b1);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < TILES; ++i) {
                const float s0 = __uint_as_float(st.s[u][i].x << 16), z0 = __uint_as_float(st.s[u][i].x & 0xFFFF0000u);
                const float s1 = __uint_as_float(st.s[u][i].y << 16), z1 = __uint_as_float(st.s[u][i].y & 0xFFFF0000u);
                acc[i][0] += s0 * dot[i][0] + (z0 - 136.f * s0) * sum_x[0];
                acc[i][1] += s1 * dot[i][2] + (z1 - 136.f * s1) * sum_x[0];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
jupybox_int4_mma(const uint4* __restrict__ words, const uint2* __restrict__ sz, const uint4* x,
                 float* __restrict__ out, int tiles, int groups) {
    // every block of this kernel is running: the next kernel may be placed now and read its own
    // weights; it waits for this one to finish before it reads what this one writes
    let_next_start();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = lane & 3, g8 = lane >> 2;
    int tile[TILES];
#pragma unroll
    for (int i = 0; i < TILES; ++i) tile[i] = min(blockIdx.x * TILES + i, tiles - 1);
    float acc[TILES][2];
#pragma unroll
    for (int i = 0; i < TILES; ++i) acc[i][0] = acc[i][1] = 0.f;

    Stage a;
    int g0 = warp;
    load_weights(a, words, sz, tile, g0, groups, lane);  // before the kernel before has finished
    wait_for_inputs();
    load_x(a, x, g0, groups, t);
#if STAGES == 2
    Stage b;  // two stages: the next groups' loads are in flight while these are multiplied
    for (; g0 < groups; g0 += 2 * STEP) {
        load_weights(b, words, sz, tile, g0 + STEP, groups, lane);
        load_x(b, x, g0 + STEP, groups, t);
        multiply(a, acc, g0, groups);
        if (g0 + STEP >= groups) break;
        load_weights(a, words, sz, tile, g0 + 2 * STEP, groups, lane);
        load_x(a, x, g0 + 2 * STEP, groups, t);
        multiply(b, acc, g0 + STEP, groups);
    }
#else
    for (; g0 < groups; g0 += STEP) {
        multiply(a, acc, g0, groups);
        load_weights(a, words, sz, tile, g0 + STEP, groups, lane);
        load_x(a, x, g0 + STEP, groups, t);
    }
#endif

    __shared__ float partial[WARPS][TILES * 16];
    if (t == 0) {
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
            partial[warp][i * 16 + g8] = acc[i][0];
            partial[warp][i * 16 + g8 + 8] = acc[i][1];
        }
    }
    __syncthreads();
#if GLU
    // tiles 2p and 2p + 1 hold gate and up rows 16p..16p+15: store silu(gate) * up in bf16, rounded
    // where the unfused model rounds (gate, silu(gate), up and the product)
    unsigned short* glu = reinterpret_cast<unsigned short*>(out);
    for (int r = threadIdx.x; r < TILES * 8; r += WARPS * 32) {
        const int pair = r / 16, i = r %% 16;
        float gate = 0.f, up = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            gate += partial[w][pair * 32 + i];
            up += partial[w][pair * 32 + 16 + i];
        }
        const int out_pair = blockIdx.x * (TILES / 2) + pair;
        if (2 * out_pair < tiles) {
            const float g = round_bf16(gate);
            const float act = round_bf16(g / (1.f + expf(-g)));
            glu[out_pair * 16 + i] = (unsigned short)(__float_as_uint(round_bf16(act * round_bf16(up))) >> 16);
        }
    }
#else
    for (int r = threadIdx.x; r < TILES * 16; r += WARPS * 32) {
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) total += partial[w][r];
        const int row_tile = blockIdx.x * TILES + r / 16;
        if (row_tile < tiles) out[row_tile * 16 + r %% 16] = total;
    }
#endif
}
"""

KERNEL_NAME = "jupybox_int4_mma"


@dataclass(frozen=True)
class MmaConfig:
    """One launch shape: ``tiles`` tiles of 16 rows a block, ``warps`` warps a block (taking its
    groups in turn), ``unroll`` groups a warp loads at once, in ``stages`` register buffers (with
    two, a warp's next loads are in flight while it multiplies)."""

    tiles: int = 1
    warps: int = 8
    unroll: int = 2
    stages: int = 2


class Int4MmaUnavailable(RuntimeError):
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


def source(config: MmaConfig, cpg: int, pdl: bool, glu: bool = False) -> str:
    """The kernel's CUDA source for one launch shape, ``cpg`` chunks a group, with or without the
    programmatic-launch instructions (Hopper on), ending in float32 sums or (``glu``) in
    ``silu(gate) * up`` in bf16."""
    return SOURCE % {"tiles": config.tiles, "warps": config.warps, "unroll": config.unroll, "stages": config.stages,
                     "cpg": cpg, "pdl": int(pdl), "glu": int(glu)}


def kernel(config: MmaConfig, cpg: int, device: torch.device, glu: bool = False) -> nvrtc.Kernel:
    """The compiled kernel for one launch shape, chunks per group and ending on ``device``
    (compiled once a process, for the device's own architecture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (*astuple(config), cpg, glu, index)
    if key not in _KERNELS:
        major, minor = torch.cuda.get_device_capability(index)
        try:
            cubin = nvrtc.compile_cubin(source(config, cpg, pdl=major >= 9, glu=glu), KERNEL_NAME, f"{major}{minor}")
            _KERNELS[key] = nvrtc.Kernel(cubin, KERNEL_NAME, torch.device("cuda", index))
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
    tiles, chunks = words.shape[:2]
    groups = sz.shape[1]
    if glu and config.tiles % 2:
        raise Int4MmaUnavailable(f"a SiLU-fused launch takes tiles in pairs, not {config.tiles} a block")
    xb = x.to(torch.bfloat16).contiguous()
    if xb.data_ptr() % 16:  # the kernel reads the activation 16 bytes at a time
        xb = xb.clone()
    out = torch.empty((1, tiles * ROWS // 2 if glu else tiles * ROWS), dtype=torch.bfloat16 if glu else torch.float32,
                      device=words.device)
    try:
        kernel(config, chunks // groups, words.device, glu)(
            (-(-tiles // config.tiles), 1, 1), (32 * config.warps, 1, 1), [words, sz, xb, out, tiles, groups],
            programmatic=gemv.programmatic_launch(words.device))
    except nvrtc.NvrtcError as exc:  # e.g. a launch shape this GPU cannot hold
        raise Int4MmaUnavailable(f"the int4 mma kernel did not launch: {exc}") from exc
    return out


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
def candidates(glu: bool = False) -> list[MmaConfig]:
    """Launch shapes worth timing: 1, 2 or 4 tiles a block (pairs for a SiLU-fused launch), 4 to
    16 warps, one or two register stages of 1 to 4 groups' loads, at most 4 tile-groups of weights
    in registers in all."""
    return [MmaConfig(tiles, warps, unroll, stages) for tiles in ((2, 4) if glu else (1, 2, 4)) for unroll in (1, 2, 4)
            for stages in (1, 2) if tiles * unroll * stages <= 4
            for warps in (4, 8, 16)]


_TUNED: dict[str, MmaConfig] = {}


def time_configs(w: MmaWeight, configs: list[MmaConfig], repeats: int = 5) -> dict[MmaConfig, float]:
    """Seconds per product for each config (SiLU-fused for a weight packed with ``glu``), weights
    streamed from memory (enough copies of the weight to overflow the L2 cache), replayed as one
    CUDA graph."""
    device = w.words.device
    size = w.words.numel() * 4 + w.sz.numel() * 4
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    weights = [w] + [MmaWeight(w.words.clone(), w.sz.clone(), w.group, w.glu)
                     for _ in range(max(1, -(-3 * l2 // size) - 1))]
    x = torch.randn(w.shape[1], device=device, dtype=torch.bfloat16)
    out: dict[MmaConfig, float] = {}
    for config in configs:
        try:
            out[config] = gemv.graph_seconds([lambda v=v: launch(x, v, config, v.glu) for v in weights], repeats)
        except Exception as exc:  # a shape this GPU refuses (registers, shared memory): not a candidate
            log.info("int4 mma config %s failed for %dx%d: %s", config, *w.shape, exc)
    return out


def tune(w: MmaWeight) -> MmaConfig:
    """The fastest launch shape for this weight's shape (and ending) on this GPU: timed once, then
    read from memory or from the kernels' JSON cache in ``$JUPYBOX_HOME``."""
    device = w.words.device
    n_out, n_in = w.shape
    key = gemv.cache_key(device, f"int4 mma v2 {n_out}x{n_in}/{w.group}{' glu' if w.glu else ''}")
    if key in _TUNED:
        return _TUNED[key]
    saved = gemv.read_cache().get(key)
    if isinstance(saved, dict):
        try:
            _TUNED[key] = MmaConfig(**saved)
            return _TUNED[key]
        except TypeError:
            pass
    times = time_configs(w, candidates(w.glu))
    if not times:
        raise Int4MmaUnavailable(f"no launch shape of the int4 mma kernel ran for a {n_out}x{n_in} weight")
    best = min(times, key=times.__getitem__)
    log.info("int4 mma kernel for %dx%d%s: %s, %.1f us", n_out, n_in, " (SiLU-fused)" if w.glu else "", best,
             times[best] * 1e6)
    _TUNED[key] = best
    gemv.write_cache(key, asdict(best))
    return best


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.n_in)
        if x2.shape[0] == 1:
            y = self._kernel(x2[0], glu=False)
            if self.stored_to_rows is not None:
                y = y[:, self.stored_to_rows]
        else:
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dequantized(torch.bfloat16))
        return y.to(dtype).reshape(*lead, self.n_out)

    def glu(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of one row ``x`` through a weight packed with ``glu`` (``fuses_glu``),
        inside the kernel (more rows go through ``forward``, as an unfused projection's do)."""
        return self._kernel(x.reshape(-1), glu=True).to(x.dtype).view(*x.shape[:-1], -1)

    def _kernel(self, x: torch.Tensor, glu: bool) -> torch.Tensor:
        c = self.config
        return torch.ops.jupybox.int4_mma(x, self.words, self.sz, self.group, c.tiles, c.warps, c.unroll, c.stages, glu)


def dequantize(words: torch.Tensor, sz: torch.Tensor, group: int, dtype: torch.dtype, glu: bool = False) -> torch.Tensor:
    """The ``[n_out, n_in]`` weight in ``dtype`` from the packed form (for prompts), rows in their
    own order."""
    from interpreter.llm.fastpath.gptq_pack import Int4Weight

    q, scales_zeros = unpack(MmaWeight(words, sz, group, glu))
    return Int4Weight(q, scales_zeros, group).dequantize(dtype)

