// maps.cu: the attention maps' way to the classifier (SPEC section 3), in f32 as the maps are
// captured: bilinear resize of map planes (ops::resize_bilinear, align_corners = false), their
// renormalisation to sum 1 (steering::capture), and both backwards. The CPU references are
// src/ops/resize.rs and src/steering/capture.rs.
//
// resize_bilinear: y[p, oy, ox] = wy0 (wx0 x[y0, x0] + wx1 x[y0, x1]) + wy1 (wx0 x[y1, x0] + wx1
// x[y1, x1]) with torch's taps: src = max(scale (o + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1),
// i1 = min(i0 + 1, in - 1), weights (1 - frac, frac), scale = in / out. Launch: 1-D grid-stride
// over the outputs. Cost: 9 FLOPs and 4 gathered reads (cached: neighbours share them) an output.
//
// resize_bilinear_backward: dx[p, iy, ix] = sum over the outputs that read (iy, ix) of their
// weight times dy. A gather, not a scatter: each thread owns one input pixel, so there are no
// atomics and the result does not depend on scheduling. The outputs that read input i along an
// axis are those with i0 in {i - 1, i}: a contiguous range computed from the inverse of the tap
// formula, widened by one on each side against rounding; the exact weight function (0 outside)
// decides. Launch: 1-D grid-stride over the inputs. Cost: about (2 + out/in)^2 taps an input.
//
// renormalise: y = m / (sum(m) + eps) over each plane of n elements; renormalise_backward: dx =
// dy / s - sum(dy m) / s^2 with s = sum(m) + eps. Launch: one block of 256 threads a plane
// (grid = planes), block sums through warp shuffles. Cost: 2 (3 backward) passes over 4n bytes.
//
// The maps of one steering step are a few MB (SD2.1 at 768 px: 2 words x 195 maps of 16x16 after
// resizing, from planes of up to 96x96): launch-latency bound on any GPU; what these kernels save
// is the round trip of the maps and their gradient through the host.
#include "common.cuh"

#define MAP_THREADS 256

// The first source index and its weight of output o along an axis (torch's align_corners=False).
__device__ __forceinline__ void bilinear_tap(int o, int in, float scale, int& i0, int& i1,
                                             float& l1) {
    const float src = fmaxf(scale * ((float)o + 0.5f) - 0.5f, 0.f);
    i0 = min((int)src, in - 1);
    i1 = i0 < in - 1 ? i0 + 1 : i0;
    l1 = src - (float)i0;
}

// The weight with which output o reads input i along an axis (0 when it does not).
__device__ __forceinline__ float tap_weight(int o, int i, int in, float scale) {
    int i0, i1;
    float l1;
    bilinear_tap(o, in, scale, i0, i1, l1);
    return (i0 == i ? 1.f - l1 : 0.f) + (i1 == i ? l1 : 0.f);
}

STEER_KERNEL void resize_bilinear(float* __restrict__ out, const float* __restrict__ x,
                                  long long planes, int h, int w, int oh, int ow) {
    const float sy = (float)h / (float)oh, sx = (float)w / (float)ow;
    const size_t n = (size_t)planes * oh * ow;
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const int ox = (int)(i % ow), oy = (int)(i / ow % oh);
        const float* xp = x + i / ((size_t)oh * ow) * h * w;
        int y0, y1, x0, x1;
        float ly, lx;
        bilinear_tap(oy, h, sy, y0, y1, ly);
        bilinear_tap(ox, w, sx, x0, x1, lx);
        const float top = (1.f - lx) * xp[y0 * w + x0] + lx * xp[y0 * w + x1];
        const float bottom = (1.f - lx) * xp[y1 * w + x0] + lx * xp[y1 * w + x1];
        out[i] = (1.f - ly) * top + ly * bottom;
    }
}
STEER_EMU_EXPORT(resize_bilinear)

// The outputs [lo, hi] along an axis that may read input i (scale = in / out).
__device__ __forceinline__ void readers(int i, int out, float scale, int& lo, int& hi) {
    lo = max((int)floorf(((float)i - 0.5f) / scale - 0.5f) - 1, 0);
    hi = min((int)ceilf(((float)i + 1.5f) / scale - 0.5f) + 1, out - 1);
}

STEER_KERNEL void resize_bilinear_backward(float* __restrict__ dx, const float* __restrict__ dy,
                                           long long planes, int h, int w, int oh, int ow) {
    const float sy = (float)h / (float)oh, sx = (float)w / (float)ow;
    const size_t n = (size_t)planes * h * w;
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const int ix = (int)(i % w), iy = (int)(i / w % h);
        const float* gp = dy + i / ((size_t)h * w) * oh * ow;
        int ylo, yhi, xlo, xhi;
        readers(iy, oh, sy, ylo, yhi);
        readers(ix, ow, sx, xlo, xhi);
        float acc = 0.f;
        for (int oy = ylo; oy <= yhi; ++oy) {
            const float wy = tap_weight(oy, iy, h, sy);
            if (wy == 0.f) continue;
            for (int ox = xlo; ox <= xhi; ++ox) {
                const float wx = tap_weight(ox, ix, w, sx);
                if (wx != 0.f) acc += wy * wx * gp[oy * ow + ox];
            }
        }
        dx[i] = acc;
    }
}
STEER_EMU_EXPORT(resize_bilinear_backward)

STEER_KERNEL void __launch_bounds__(MAP_THREADS)
    renormalise(float* __restrict__ out, const float* __restrict__ x, long long n, float eps) {
    __shared__ float scratch[MAP_THREADS / 32];
    const float* xp = x + (size_t)blockIdx.x * n;
    float* yp = out + (size_t)blockIdx.x * n;
    float s = 0.f;
    for (long long e = threadIdx.x; e < n; e += MAP_THREADS) s += xp[e];
    const float inv = 1.f / (block_sum<MAP_THREADS>(s, scratch) + eps);
    for (long long e = threadIdx.x; e < n; e += MAP_THREADS) yp[e] = xp[e] * inv;
}
STEER_EMU_EXPORT(renormalise)

STEER_KERNEL void __launch_bounds__(MAP_THREADS)
    renormalise_backward(float* __restrict__ dx, const float* __restrict__ m,
                         const float* __restrict__ dy, long long n, float eps) {
    __shared__ float scratch[MAP_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * n;
    float s = 0.f, dot = 0.f;
    for (long long e = threadIdx.x; e < n; e += MAP_THREADS) {
        s += m[base + e];
        dot += m[base + e] * dy[base + e];
    }
    s = block_sum<MAP_THREADS>(s, scratch) + eps;
    dot = block_sum<MAP_THREADS>(dot, scratch);
    for (long long e = threadIdx.x; e < n; e += MAP_THREADS)
        dx[base + e] = dy[base + e] / s - dot / (s * s);
}
STEER_EMU_EXPORT(renormalise_backward)
