// norm.cu: group, layer and RMS norm forward (ops::group_norm, layer_norm, rms_norm) on bf16,
// with f32 statistics.
//
// norm_rows normalises `rows` rows of n contiguous elements each: y = (x - mean) / sqrt(var + eps)
// * gamma[c] + beta[c], with the biased variance, as torch does; with center = 0 (RMS norm) the
// mean is 0, so var is the mean square. The channel c of element e of
// row r is (r % groups) * per_row + e / span: layer norm is groups = 1, per_row = n, span = 1
// (c = e); group norm over (B, C, HW) is groups = G, per_row = C / G, span = HW. gamma and beta
// may be null (1 and 0).
//
// norm_rows_backward: the input gradient alone (the frozen-model path of steering). With
// xhat = (x - mean) rstd and g = dy gamma[c]: dx = rstd (g - mean(g) - xhat mean(g xhat)); without
// centering (RMS norm) the mean(g) term drops out.
//
// Launch: one block of 256 threads a row (grid = rows); block reductions through warp shuffles
// and 8 floats of static shared memory. Two passes for the statistics (mean, then the squared
// deviations: no cancellation), one to write.
// Cost: 3 reads + 1 write of 2 bytes an element, about 8 FLOPs an element: memory-bound. SD2.1's
// largest group norm (2 x 320 x 64 x 64, 32 groups) moves 21 MB: about 7 us on an H100, but only
// 64 blocks (B x groups) for 132 SMs, so about half the bandwidth: a split-row variant is the
// next step if profiles show it.
#include "common.cuh"

#define NORM_THREADS 256

// The row's mean (0 without centering) and 1 / sqrt(var + eps), for every thread of the block.
__device__ __forceinline__ void row_stats(const bf16* xr, long long n, int center, float eps,
                                          float* scratch, float& mean, float& rstd) {
    float s = 0.f;
    if (center)
        for (long long e = threadIdx.x; e < n; e += NORM_THREADS) s += bf16_to_float(xr[e]);
    mean = center ? block_sum<NORM_THREADS>(s, scratch) / (float)n : 0.f;
    float q = 0.f;
    for (long long e = threadIdx.x; e < n; e += NORM_THREADS) {
        const float dx = bf16_to_float(xr[e]) - mean;
        q += dx * dx;
    }
    rstd = 1.f / sqrtf(block_sum<NORM_THREADS>(q, scratch) / (float)n + eps);
}

// The affine parameter of element e of a row whose first channel is c0 (`absent` without one).
__device__ __forceinline__ float param_at(const bf16* p, int c0, long long e, long long span,
                                          float absent) {
    return p ? bf16_to_float(p[c0 + (int)(e / span)]) : absent;
}

STEER_KERNEL void __launch_bounds__(NORM_THREADS)
    norm_rows(bf16* __restrict__ out, const bf16* __restrict__ x,
              const bf16* __restrict__ gamma, const bf16* __restrict__ beta, long long n,
              int groups, int per_row, long long span, int center, float eps) {
    __shared__ float scratch[NORM_THREADS / 32];
    const size_t row = blockIdx.x;
    const bf16* xr = x + row * n;
    bf16* yr = out + row * n;
    float mean, rstd;
    row_stats(xr, n, center, eps, scratch, mean, rstd);
    const int c0 = (int)(row % groups) * per_row;
    for (long long e = threadIdx.x; e < n; e += NORM_THREADS) {
        const float y = (bf16_to_float(xr[e]) - mean) * rstd * param_at(gamma, c0, e, span, 1.f);
        yr[e] = float_to_bf16(y + param_at(beta, c0, e, span, 0.f));
    }
}
STEER_EMU_EXPORT(norm_rows)

STEER_KERNEL void __launch_bounds__(NORM_THREADS)
    norm_rows_backward(bf16* __restrict__ dx, const bf16* __restrict__ x,
                       const bf16* __restrict__ dy, const bf16* __restrict__ gamma, long long n,
                       int groups, int per_row, long long span, int center, float eps) {
    __shared__ float scratch[NORM_THREADS / 32];
    const size_t row = blockIdx.x;
    const bf16* xr = x + row * n;
    const bf16* dyr = dy + row * n;
    bf16* dxr = dx + row * n;
    const int c0 = (int)(row % groups) * per_row;
    float mean, rstd;
    row_stats(xr, n, center, eps, scratch, mean, rstd);
    float sg = 0.f, sgx = 0.f;
    for (long long e = threadIdx.x; e < n; e += NORM_THREADS) {
        const float g = bf16_to_float(dyr[e]) * param_at(gamma, c0, e, span, 1.f);
        sg += g;
        sgx += g * (bf16_to_float(xr[e]) - mean) * rstd;
    }
    const float mg = center ? block_sum<NORM_THREADS>(sg, scratch) / (float)n : 0.f;
    const float mgx = block_sum<NORM_THREADS>(sgx, scratch) / (float)n;
    for (long long e = threadIdx.x; e < n; e += NORM_THREADS) {
        const float g = bf16_to_float(dyr[e]) * param_at(gamma, c0, e, span, 1.f);
        const float xhat = (bf16_to_float(xr[e]) - mean) * rstd;
        dxr[e] = float_to_bf16(rstd * (g - mg - xhat * mgx));
    }
}
STEER_EMU_EXPORT(norm_rows_backward)
