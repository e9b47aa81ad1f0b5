// The int4 product of up to 32 activation rows (a decode step of several streams) on tensor cores
// (see int4_mma.py). The single-row kernel (int4_mma.cu) puts one row in all 8 columns of the mma's
// second operand; here column g of column tile n is row 8 n + g, so one mma multiplies a 16-row
// weight tile by 8 rows at once, and the weight's nibbles, unpacked once, serve NT column tiles.
// Defined by the compiling side: TILES, WARPS, UNROLL, CPG, PDL, STAGES, GLU and NT (column tiles of
// 8 rows: 1, 2 or 4); int4_mma_common.cuh precedes this.

#define STEP (WARPS * UNROLL)
#define COLS (NT * 8)

struct Stage {
    uint4 w[UNROLL][TILES][CPG], x[UNROLL][CPG][NT][2];
    uint2 s[UNROLL][TILES];
};

// lane (g8, t) reads inputs 16 t .. 16 t + 15 of each chunk of row 8 n + g8, for each column tile n
__device__ __forceinline__ void load_x(Stage& st, const uint4* x, const size_t (&row)[NT], int g0, int groups,
                                       int t) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int g = g0 + u * WARPS;
        if (g < groups) {
#pragma unroll
            for (int c = 0; c < CPG; ++c) {
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    st.x[u][c][n][0] = load_l2(x + row[n] + (g * CPG + c) * 8 + 2 * t);
                    st.x[u][c][n][1] = load_l2(x + row[n] + (g * CPG + c) * 8 + 2 * t + 1);
                }
            }
        }
    }
}

// acc[i][n]: rows g8 and g8 + 8 of tile i, columns 2 t and 2 t + 1 of column tile n (the mma's
// accumulator layout: c0 (g8, 2t), c1 (g8, 2t+1), c2 (g8+8, 2t), c3 (g8+8, 2t+1))
__device__ __forceinline__ void multiply(const Stage& st, float (&acc)[TILES][NT][4], int g0, int groups) {
    const unsigned ONE = 0x3F803F80u;  // the bf16 pair (1, 1)
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (g0 + u * WARPS < groups) {
            float sum_x[NT][4];
            float dot[TILES][NT][4];
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                sum_x[n][0] = sum_x[n][1] = sum_x[n][2] = sum_x[n][3] = 0.f;
#pragma unroll
                for (int i = 0; i < TILES; ++i) dot[i][n][0] = dot[i][n][1] = dot[i][n][2] = dot[i][n][3] = 0.f;
            }
#pragma unroll
            for (int c = 0; c < CPG; ++c) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    unsigned a[TILES][4];
#pragma unroll
                    for (int i = 0; i < TILES; ++i) {
                        const unsigned w = word(st.w[u][i][c], j);
                        a[i][0] = pair(w, 0); a[i][1] = pair(w, 4); a[i][2] = pair(w, 8); a[i][3] = pair(w, 12);
                    }
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        const unsigned b0 = word(st.x[u][c][n][j >> 1], (j & 1) * 2);
                        const unsigned b1 = word(st.x[u][c][n][j >> 1], (j & 1) * 2 + 1);
                        mma(sum_x[n], ONE, ONE, ONE, ONE, b0, b1);
#pragma unroll
                        for (int i = 0; i < TILES; ++i) mma(dot[i][n], a[i][0], a[i][1], a[i][2], a[i][3], b0, b1);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < TILES; ++i) {
                const float s0 = __uint_as_float(st.s[u][i].x << 16), z0 = __uint_as_float(st.s[u][i].x & 0xFFFF0000u);
                const float s1 = __uint_as_float(st.s[u][i].y << 16), z1 = __uint_as_float(st.s[u][i].y & 0xFFFF0000u);
                const float o0 = z0 - 136.f * s0, o1 = z1 - 136.f * s1;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    acc[i][n][0] += s0 * dot[i][n][0] + o0 * sum_x[n][0];
                    acc[i][n][1] += s0 * dot[i][n][1] + o0 * sum_x[n][1];
                    acc[i][n][2] += s1 * dot[i][n][2] + o1 * sum_x[n][0];
                    acc[i][n][3] += s1 * dot[i][n][3] + o1 * sum_x[n][1];
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
jupybox_int4_mma_batch(const uint4* __restrict__ words, const uint2* __restrict__ sz, const uint4* x,
                       float* __restrict__ out, int tiles, int groups, int batch) {
    let_next_start();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = lane & 3, g8 = lane >> 2;
    int tile[TILES];
#pragma unroll
    for (int i = 0; i < TILES; ++i) tile[i] = min(blockIdx.x * TILES + i, tiles - 1);
    size_t row[NT];  // this lane's activation row of each column tile (columns past the batch repeat its last row)
#pragma unroll
    for (int n = 0; n < NT; ++n) row[n] = (size_t)min(n * 8 + g8, batch - 1) * groups * CPG * 8;
    float acc[TILES][NT][4];
#pragma unroll
    for (int i = 0; i < TILES; ++i)
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;

    Stage a;
    int g0 = warp;
    load_weights(a, words, sz, tile, g0, groups, lane);  // before the kernel before has finished
    wait_for_inputs();
    load_x(a, x, row, g0, groups, t);
#if STAGES == 2
    Stage b;
    for (; g0 < groups; g0 += 2 * STEP) {
        load_weights(b, words, sz, tile, g0 + STEP, groups, lane);
        load_x(b, x, row, g0 + STEP, groups, t);
        multiply(a, acc, g0, groups);
        if (g0 + STEP >= groups) break;
        load_weights(a, words, sz, tile, g0 + 2 * STEP, groups, lane);
        load_x(a, x, row, g0 + 2 * STEP, groups, t);
        multiply(b, acc, g0 + STEP, groups);
    }
#else
    for (; g0 < groups; g0 += STEP) {
        multiply(a, acc, g0, groups);
        load_weights(a, words, sz, tile, g0 + STEP, groups, lane);
        load_x(a, x, row, g0 + STEP, groups, t);
    }
#endif

    __shared__ float partial[WARPS][TILES * 16][COLS];
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            partial[warp][i * 16 + g8][n * 8 + 2 * t] = acc[i][n][0];
            partial[warp][i * 16 + g8][n * 8 + 2 * t + 1] = acc[i][n][1];
            partial[warp][i * 16 + g8 + 8][n * 8 + 2 * t] = acc[i][n][2];
            partial[warp][i * 16 + g8 + 8][n * 8 + 2 * t + 1] = acc[i][n][3];
        }
    }
    __syncthreads();
#if GLU
    // tiles 2p and 2p + 1 hold gate and up rows 16p..16p+15: silu(gate) * up in bf16, rounded where
    // the unfused model rounds, as the single-row kernel does
    unsigned short* glu = reinterpret_cast<unsigned short*>(out);
    const int half_rows = tiles * 8;
    for (int r = threadIdx.x; r < TILES * 8 * COLS; r += WARPS * 32) {
        const int col = r % COLS, q = r / COLS, pair_ = q / 16, i = q % 16;
        float gate = 0.f, up = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            gate += partial[w][pair_ * 32 + i][col];
            up += partial[w][pair_ * 32 + 16 + i][col];
        }
        const int out_pair = blockIdx.x * (TILES / 2) + pair_;
        if (2 * out_pair < tiles && col < batch) {
            const float g = round_bf16(gate);
            const float act = round_bf16(g / (1.f + expf(-g)));
            glu[(size_t)col * half_rows + out_pair * 16 + i] =
                (unsigned short)(__float_as_uint(round_bf16(act * round_bf16(up))) >> 16);
        }
    }
#else
    const int rows = tiles * 16;
    for (int r = threadIdx.x; r < TILES * 16 * COLS; r += WARPS * 32) {
        const int col = r % COLS, q = r / COLS;
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) total += partial[w][q][col];
        const int row_tile = blockIdx.x * TILES + q / 16;
        if (row_tile < tiles && col < batch) out[(size_t)col * rows + row_tile * 16 + q % 16] = total;
    }
#endif
}
