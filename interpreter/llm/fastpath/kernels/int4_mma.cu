// The int4 matrix-vector product of one activation row on tensor cores (see int4_mma.py).
// Defined by the compiling side: TILES, WARPS, UNROLL, CPG, PDL, STAGES, GLU; int4_mma_common.cuh precedes this.

#define STEP (WARPS * UNROLL)

// what a warp reads for UNROLL of its groups: the weights of each tile, the activation, the scales
struct Stage {
    uint4 w[UNROLL][TILES][CPG], x[UNROLL][CPG][2];
    uint2 s[UNROLL][TILES];
};

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
        const int pair = r / 16, i = r % 16;
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
        if (row_tile < tiles) out[row_tile * 16 + r % 16] = total;
    }
#endif
}
