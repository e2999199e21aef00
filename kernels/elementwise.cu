// elementwise.cu: the UNet's pointwise and data-movement ops on bf16 tensors (f32 arithmetic,
// one rounding to bf16 per output), each the CUDA twin of a CPU op in src/ops.
//
// ew_binary      out = a (+, -, *) b                         (ops::add, sub, mul)
// ew_scale       out = s x                                   (ops::scale)
// ew_activation  out = silu(x) or gelu(x) (exact, erf)       (ops::activation)
// geglu          out = h * gelu(g), (h, g) = x.chunk(2, -1)  (ops::geglu)
// add_channels   out[b, c, i] = x[b, c, i] + v[b, c]         (ops::add_channels)
// upsample2x     nearest-neighbour 2x of (P, H, W) planes    (ops::upsample_nearest2x)
// copy_strided   out[i] = x[offset(i)] over a shape of rank <= 6 with any strides on either side:
//                permute, concat and split are this one kernel with different strides
//                (ops::permute, concat, split).
//
// Launch: 1-D grid-stride loops, 256 threads a block, at most 4096 blocks; no shared memory.
// Cost: memory-bound, 2 (unary) or 3 (binary) x 2 bytes an element; a few FLOPs an element
// (gelu: erff, about 20). At SD2.1's largest activation (2 x 320 x 64 x 64 bf16, 5 MB) each is a
// few microseconds on an H100 (3 TB/s): launch latency dominates.
#include "common.cuh"

#define EW_ADD 0
#define EW_SUB 1
#define EW_MUL 2
#define ACT_SILU 0
#define ACT_GELU 1

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }

STEER_KERNEL void ew_binary(bf16* __restrict__ out, const bf16* __restrict__ a,
                            const bf16* __restrict__ b, unsigned long long n, int op) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const float x = bf16_to_float(a[i]), y = bf16_to_float(b[i]);
        out[i] = float_to_bf16(op == EW_ADD ? x + y : op == EW_SUB ? x - y : x * y);
    }
}
STEER_EMU_EXPORT(ew_binary)

STEER_KERNEL void ew_scale(bf16* __restrict__ out, const bf16* __restrict__ x, float s,
                           unsigned long long n) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        out[i] = float_to_bf16(s * bf16_to_float(x[i]));
}
STEER_EMU_EXPORT(ew_scale)

STEER_KERNEL void ew_activation(bf16* __restrict__ out, const bf16* __restrict__ x,
                                unsigned long long n, int act) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const float v = bf16_to_float(x[i]);
        out[i] = float_to_bf16(act == ACT_SILU ? silu(v) : gelu(v));
    }
}
STEER_EMU_EXPORT(ew_activation)

STEER_KERNEL void geglu(bf16* __restrict__ out, const bf16* __restrict__ x, unsigned long long n,
                        int d) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t row = i / d, col = i % d;
        const bf16* xr = x + row * 2 * d;
        out[i] = float_to_bf16(bf16_to_float(xr[col]) * gelu(bf16_to_float(xr[d + col])));
    }
}
STEER_EMU_EXPORT(geglu)

STEER_KERNEL void add_channels(bf16* __restrict__ out, const bf16* __restrict__ x,
                               const bf16* __restrict__ v, unsigned long long n,
                               unsigned long long inner) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        out[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(v[i / inner]));
}
STEER_EMU_EXPORT(add_channels)

STEER_KERNEL void upsample2x(bf16* __restrict__ out, const bf16* __restrict__ x,
                             unsigned long long n, int h, int w) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t plane = i / (4 * (size_t)h * w), rest = i % (4 * (size_t)h * w);
        const int y = (int)(rest / (2 * w)), xx = (int)(rest % (2 * w));
        out[i] = x[(plane * h + y / 2) * w + xx / 2];
    }
}
STEER_EMU_EXPORT(upsample2x)

// The shape and both sides' strides (elements), innermost last; unused leading dims are 1.
struct Strides6 {
    long long shape[6], dst[6], src[6];
};

STEER_KERNEL void copy_strided(bf16* __restrict__ out, const bf16* __restrict__ x,
                               unsigned long long n, Strides6 s) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        size_t rest = i;
        long long dst = 0, src = 0;
        for (int a = 5; a >= 0; --a) {
            const long long c = (long long)(rest % s.shape[a]);
            rest /= s.shape[a];
            dst += c * s.dst[a];
            src += c * s.src[a];
        }
        out[dst] = x[src];
    }
}
STEER_EMU_EXPORT(copy_strided)
