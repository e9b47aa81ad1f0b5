// What the int4 tensor-core kernels share (int4_mma.cu: one activation row, int4_mma_batch.cu: up to
// 32 rows): the mma instruction, nibbles to bf16 pairs, loads that bypass L1 or read through the L2.
// The compiling side defines TILES, WARPS, UNROLL, CPG and PDL (programmatic dependent launch: Hopper on)
// before this.

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
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// two nibbles (bits s..s+3 and 16+s..19+s) as the bf16 pair (128 + lo, 128 + hi): one shift and
// one three-input logic op, (a & b) | c (the compiler would spend two on its two constants)
__device__ __forceinline__ unsigned pair(unsigned w, int s) {
    unsigned out;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(w >> s), "r"(0x000F000Fu), "r"(0x43004300u));
    return out;
}

__device__ __forceinline__ float round_bf16(float v) {  // to the nearest bf16, ties to even
    const unsigned u = __float_as_uint(v);
    return __uint_as_float((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

__device__ __forceinline__ uint4 stream(const uint4* p) {  // read once: keep it out of L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// the activation, which the kernel before writes while this one may already run (a programmatic
// launch): read through the L2, never the read-only path, whose lines may predate that kernel's stores
__device__ __forceinline__ uint4 load_l2(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned word(const uint4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// a warp's weights and scales for UNROLL of its groups (each kernel's Stage holds them as w and s)
template <typename S>
__device__ __forceinline__ void load_weights(S& st, const uint4* __restrict__ words, const uint2* __restrict__ sz,
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
