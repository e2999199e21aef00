// gemm.cu: bf16 matrix products on the tensor cores, for linear layers and convolutions.
//
// gemm_bt    C = A B^T (+ bias): A (M, K) row-major bf16; B (N, K) bf16 with element (n, k) at
//            b[n ldb_n + k ldb_k] (a torch Linear or flattened conv weight, (out, in), is
//            (K, 1); the same weight read as its transpose, for an input gradient, is (1, N)),
//            f32 accumulation, C bf16. C is row-major (M, N), or with hw > 0 laid out as NCHW:
//            row m = (image m / hw, pixel m % hw) goes to C[(m / hw) N hw + n hw + m % hw] (a
//            convolution's output, no transpose pass).
// im2col     the patches of x (B, C, H, W) as rows: col[(b, oy, ox), (c, i, j)] =
//            x[b, c, oy s - p + i, ox s - p + j] (0 outside), so conv2d = im2col + gemm_bt.
// col2im     its adjoint, as a gather (one thread an input pixel, no atomics): dx[b, c, y, x] =
//            the sum of dcol over the patches that read (y, x); conv2d's input gradient is
//            gemm_bt (dy rows times the weight) + col2im.
//
// gemm_bt launch: 128 threads (4 warps), a 64 x 64 tile of C a block, grid (ceil(N/64),
// ceil(M/64)); K streams through shared memory 32 at a time (As, Bs: 64 x 40 bf16 each, 10 KiB);
// each warp owns 16 rows of the tile and all 64 columns: 8 mma.m16n8k16 per 16 of K, operands
// loaded with ldmatrix.
// Cost: 2 M N K FLOPs; bytes 2 (M K + N K) (N/64 and M/64 re-reads from L2) + 2 M N.
// SD2.1's largest (4096 x 1280 x 320 per image) is 3.4 GFLOP: about 4 us at the H100's dense
// bf16 rate; this simple tiling (scalar-indexed shared loads, no double buffering) reaches a
// fraction of that; cuBLAS is the reference to measure it against.
// im2col launch: 1-D grid-stride, 256 threads; 2 bytes read and written per column element.
#include "common.cuh"

#define GEMM_THREADS 128
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 32
#define GEMM_LD (GEMM_BK + 8)

// A 64 x 32 tile of a (rows, k) matrix with element (r, c) at src[r ld_r + c ld_c], from
// (row0, k0) into shared memory as rows, zero-padded.
__device__ __forceinline__ void gemm_load_tile(bf16* dst, const bf16* src, int rows, int k,
                                               long long ld_r, long long ld_c, int row0, int k0) {
    // Along k within a row when k is contiguous, along rows otherwise: coalesced either way.
    if (ld_c == 1) {
        for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BK; idx += GEMM_THREADS) {
            const int r = idx / GEMM_BK, c = idx % GEMM_BK, gr = row0 + r, gc = k0 + c;
            dst[r * GEMM_LD + c] = (gr < rows && gc < k) ? src[gr * ld_r + gc] : (bf16)0;
        }
    } else {
        for (int idx = threadIdx.x; idx < GEMM_BM * GEMM_BK; idx += GEMM_THREADS) {
            const int r = idx % GEMM_BM, c = idx / GEMM_BM, gr = row0 + r, gc = k0 + c;
            dst[r * GEMM_LD + c] = (gr < rows && gc < k) ? src[gr * ld_r + gc * ld_c] : (bf16)0;
        }
    }
}

STEER_KERNEL void __launch_bounds__(GEMM_THREADS)
    gemm_bt(bf16* __restrict__ c, const bf16* __restrict__ a, const bf16* __restrict__ b,
            const bf16* __restrict__ bias, int m, int n, int k, long long ldb_n, long long ldb_k,
            int hw) {
    // 16-byte aligned: ldmatrix reads 16-byte rows.
    __shared__ __align__(16) u32 as_words[GEMM_BM * GEMM_LD / 2];
    __shared__ __align__(16) u32 bs_words[GEMM_BN * GEMM_LD / 2];
    bf16* as = (bf16*)as_words;
    bf16* bs = (bf16*)bs_words;
    const int n0 = blockIdx.x * GEMM_BN, m0 = blockIdx.y * GEMM_BM;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float acc[GEMM_BN / 8][4];
#pragma unroll
    for (int j = 0; j < GEMM_BN / 8; ++j)
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
    for (int k0 = 0; k0 < k; k0 += GEMM_BK) {
        __syncthreads();
        gemm_load_tile(as, a, m, k, k, 1, m0, k0);
        gemm_load_tile(bs, b, n, k, ldb_n, ldb_k, n0, k0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GEMM_BK / 16; ++kk) {
            u32 fa[4];
            load_a(fa, as + warp * 16 * GEMM_LD + kk * 16, GEMM_LD);
#pragma unroll
            for (int jp = 0; jp < GEMM_BN / 16; ++jp) {
                u32 fb[4];
                load_b_pair<false>(fb, bs + jp * 16 * GEMM_LD + kk * 16, GEMM_LD);
                mma_bf16_16816(acc[2 * jp], fa, fb, acc[2 * jp]);
                mma_bf16_16816(acc[2 * jp + 1], fa, fb + 2, acc[2 * jp + 1]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < GEMM_BN / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = m0 + warp * 16 + g + 8 * (i >> 1), col = n0 + j * 8 + 2 * t + (i & 1);
            if (row >= m || col >= n) continue;
            const float v = acc[j][i] + (bias ? bf16_to_float(bias[col]) : 0.f);
            const size_t at = hw > 0 ? ((size_t)(row / hw) * n + col) * hw + row % hw
                                     : (size_t)row * n + col;
            c[at] = float_to_bf16(v);
        }
}
STEER_EMU_EXPORT(gemm_bt)

STEER_KERNEL void im2col(bf16* __restrict__ col, const bf16* __restrict__ x, int channels,
                         int h, int w, int kh, int kw, int stride, int pad, int oh, int ow,
                         unsigned long long n) {
    const int kdim = channels * kh * kw;
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t r = i / kdim;
        const int q = (int)(i % kdim);
        const int b = (int)(r / ((size_t)oh * ow)), p = (int)(r % ((size_t)oh * ow));
        const int ch = q / (kh * kw), ki = (q / kw) % kh, kj = q % kw;
        const int y = (p / ow) * stride - pad + ki, xx = (p % ow) * stride - pad + kj;
        col[i] = (y >= 0 && y < h && xx >= 0 && xx < w)
                     ? x[(((size_t)b * channels + ch) * h + y) * w + xx]
                     : (bf16)0;
    }
}
STEER_EMU_EXPORT(im2col)

STEER_KERNEL void col2im(bf16* __restrict__ dx, const bf16* __restrict__ col, int channels,
                         int h, int w, int kh, int kw, int stride, int pad, int oh, int ow,
                         unsigned long long n) {
    const int kdim = channels * kh * kw;
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const int xx = (int)(i % w), y = (int)((i / w) % h);
        const int ch = (int)((i / ((size_t)w * h)) % channels);
        const size_t b = i / ((size_t)w * h * channels);
        float sum = 0.f;
        for (int ki = 0; ki < kh; ++ki) {
            const int ty = y + pad - ki;
            if (ty < 0 || ty % stride != 0 || ty / stride >= oh) continue;
            for (int kj = 0; kj < kw; ++kj) {
                const int tx = xx + pad - kj;
                if (tx < 0 || tx % stride != 0 || tx / stride >= ow) continue;
                const size_t r = (b * oh + ty / stride) * ow + tx / stride;
                sum += bf16_to_float(col[r * kdim + (ch * kh + ki) * kw + kj]);
            }
        }
        dx[i] = float_to_bf16(sum);
    }
}
STEER_EMU_EXPORT(col2im)
