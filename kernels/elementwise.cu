// elementwise.cu: the UNet's pointwise and data-movement ops on bf16 tensors (f32 arithmetic,
// one rounding to bf16 per output), each the CUDA twin of a CPU op in src/ops.
//
// ew_binary      out = a (+, -, *) b                         (ops::add, sub, mul)
// ew_scale       out = s x                                   (ops::scale)
//                (both also on f32: ew_binary32, ew_scale32)
// cast_*         bf16 <-> f32                                (Tensor::to_dtype on a GPU)
// ew_activation  out = silu(x), gelu(x) (exact, erf), quick_gelu(x) or leaky relu (relu: slope 0)
//                                                            (ops::activation)
// geglu          out = h * gelu(g), (h, g) = x.chunk(2, -1)  (ops::geglu)
// add_broadcast  out[o, m, i] = x[o, m, i] + v[o, i]         (ops::add_broadcast,
//                                                            add_channels)
// embedding      out[r, j] = w[ids[r], j]                    (ops::embedding)
// modulate       out = x (1 + scale) + shift, per (B, D)     (ops::modulate, FLUX's adaLN)
// rope           rotary embedding of interleaved pairs       (ops::rope, FLUX)
// upsample2x     nearest-neighbour 2x of (P, H, W) planes    (ops::upsample_nearest2x)
// copy_strided   out[i] = x[offset(i)] over a shape of rank <= 6 with any strides on either side:
//                permute, concat and split are this one kernel with different strides
//                (ops::permute, concat, split); copy_strided32 moves 4-byte elements (the f32
//                maps and their gradients).
// Backwards (input gradients; the frozen-model path of steering):
// ew_activation_backward  dx = dy f'(x) for the same          (ops::activation_backward)
// geglu_backward          dx = (dy gelu(g), dy h gelu'(g))    (ops::geglu_backward)
// upsample2x_backward     dx = the sum of each 2x2 block of dy (ops::upsample_nearest2x_backward)
// modulate_backward       dx, dshift, dscale (sums over L)    (ops::modulate_backward)
// rope with sign -1       the inverse rotation                (ops::rope_backward)
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
#define ACT_LEAKY_RELU 2  // max(x, 0) + slope min(x, 0); ReLU is slope 0
#define ACT_QUICK_GELU 3  // x sigmoid(1.702 x) (CLIP's quick_gelu)

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float silu_grad(float x) {
    const float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
}
// d/dx of x Phi(x) = Phi(x) + x phi(x).
__device__ __forceinline__ float gelu_grad(float x) {
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) +
           x * 0.3989422804014327f * expf(-0.5f * x * x);
}

// The activation `act` (ACT_*) and its derivative; `slope` is the leaky ReLU's.
__device__ __forceinline__ float activate(float x, int act, float slope) {
    switch (act) {
        case ACT_SILU: return silu(x);
        case ACT_GELU: return gelu(x);
        case ACT_QUICK_GELU: return x / (1.f + expf(-1.702f * x));
        default: return x > 0.f ? x : slope * x;
    }
}
__device__ __forceinline__ float activate_grad(float x, int act, float slope) {
    switch (act) {
        case ACT_SILU: return silu_grad(x);
        case ACT_GELU: return gelu_grad(x);
        case ACT_QUICK_GELU: {
            const float s = 1.f / (1.f + expf(-1.702f * x));
            return s + 1.702f * x * s * (1.f - s);
        }
        default: return x > 0.f ? 1.f : slope;
    }
}

// f32 arithmetic on bf16 or f32 storage (the f32 variants serve latents: the scheduler's steps
// and classifier-free guidance stay on the GPU).
__device__ __forceinline__ float load_f(bf16 v) { return bf16_to_float(v); }
__device__ __forceinline__ float load_f(float v) { return v; }
__device__ __forceinline__ void store_f(bf16& dst, float v) { dst = float_to_bf16(v); }
__device__ __forceinline__ void store_f(float& dst, float v) { dst = v; }

template <typename T>
__device__ __forceinline__ void binary_elements(T* __restrict__ out, const T* __restrict__ a,
                                                const T* __restrict__ b, unsigned long long n,
                                                int op) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const float x = load_f(a[i]), y = load_f(b[i]);
        store_f(out[i], op == EW_ADD ? x + y : op == EW_SUB ? x - y : x * y);
    }
}
STEER_KERNEL void ew_binary(bf16* __restrict__ out, const bf16* __restrict__ a,
                            const bf16* __restrict__ b, unsigned long long n, int op) {
    binary_elements(out, a, b, n, op);
}
STEER_EMU_EXPORT(ew_binary)
STEER_KERNEL void ew_binary32(float* __restrict__ out, const float* __restrict__ a,
                              const float* __restrict__ b, unsigned long long n, int op) {
    binary_elements(out, a, b, n, op);
}
STEER_EMU_EXPORT(ew_binary32)

template <typename T>
__device__ __forceinline__ void scale_elements(T* __restrict__ out, const T* __restrict__ x,
                                               float s, unsigned long long n) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        store_f(out[i], s * load_f(x[i]));
}
STEER_KERNEL void ew_scale(bf16* __restrict__ out, const bf16* __restrict__ x, float s,
                           unsigned long long n) {
    scale_elements(out, x, s, n);
}
STEER_EMU_EXPORT(ew_scale)
STEER_KERNEL void ew_scale32(float* __restrict__ out, const float* __restrict__ x, float s,
                             unsigned long long n) {
    scale_elements(out, x, s, n);
}
STEER_EMU_EXPORT(ew_scale32)

// Dtype conversions on the device (round to nearest even, as half::bf16 on the host).
STEER_KERNEL void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ x,
                                   unsigned long long n) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        out[i] = float_to_bf16(x[i]);
}
STEER_EMU_EXPORT(cast_f32_to_bf16)
STEER_KERNEL void cast_bf16_to_f32(float* __restrict__ out, const bf16* __restrict__ x,
                                   unsigned long long n) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        out[i] = bf16_to_float(x[i]);
}
STEER_EMU_EXPORT(cast_bf16_to_f32)

STEER_KERNEL void ew_activation(bf16* __restrict__ out, const bf16* __restrict__ x,
                                unsigned long long n, int act, float slope) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        out[i] = float_to_bf16(activate(bf16_to_float(x[i]), act, slope));
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

// x viewed as (outer, mid, inner), v as (outer, inner).
STEER_KERNEL void add_broadcast(bf16* __restrict__ out, const bf16* __restrict__ x,
                                const bf16* __restrict__ v, unsigned long long n,
                                unsigned long long mid, unsigned long long inner) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t vi = i / (mid * inner) * inner + i % inner;
        out[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(v[vi]));
    }
}
STEER_EMU_EXPORT(add_broadcast)

// adaLN modulation (FLUX): x (B, L, D), shift and scale (B, D); out = x (1 + scale) + shift.
STEER_KERNEL void modulate(bf16* __restrict__ out, const bf16* __restrict__ x,
                           const bf16* __restrict__ shift, const bf16* __restrict__ scale,
                           unsigned long long n, long long l, int d) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t p = i / ((size_t)l * d) * d + i % d;
        out[i] = float_to_bf16(bf16_to_float(x[i]) * (1.f + bf16_to_float(scale[p])) +
                               bf16_to_float(shift[p]));
    }
}
STEER_EMU_EXPORT(modulate)

// Its backward: one thread a (b, channel) column walks the L rows, so the sums over L for dshift
// and dscale need no atomics (and reads stay coalesced across the column's neighbours).
STEER_KERNEL void modulate_backward(bf16* __restrict__ dx, bf16* __restrict__ dshift,
                                    bf16* __restrict__ dscale, const bf16* __restrict__ x,
                                    const bf16* __restrict__ scale, const bf16* __restrict__ dy,
                                    unsigned long long columns, long long l, int d) {
    for (size_t c = global_thread_index(); c < columns; c += global_thread_count()) {
        const size_t b = c / d, ch = c % d;
        const float k = 1.f + bf16_to_float(scale[c]);
        float dsh = 0.f, dsc = 0.f;
        for (long long r = 0; r < l; ++r) {
            const size_t at = (b * l + r) * d + ch;
            const float g = bf16_to_float(dy[at]);
            dx[at] = float_to_bf16(g * k);
            dsh += g;
            dsc += g * bf16_to_float(x[at]);
        }
        dshift[c] = float_to_bf16(dsh);
        dscale[c] = float_to_bf16(dsc);
    }
}
STEER_EMU_EXPORT(modulate_backward)

// Rotary embedding on interleaved pairs (FLUX): x (B, H, L, D), cos and sin (L, D/2); each pair
// (x[2i], x[2i+1]) at position p rotates by (cos[p, i], sign sin[p, i]); sign -1 is the backward.
STEER_KERNEL void rope(bf16* __restrict__ out, const bf16* __restrict__ x,
                       const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t,
                       unsigned long long pairs, long long l, int half, float sign) {
    for (size_t i = global_thread_index(); i < pairs; i += global_thread_count()) {
        const size_t p = (i / half) % l * half + i % half;
        const float c = bf16_to_float(cos_t[p]), s = sign * bf16_to_float(sin_t[p]);
        const float a = bf16_to_float(x[2 * i]), b = bf16_to_float(x[2 * i + 1]);
        out[2 * i] = float_to_bf16(a * c - b * s);
        out[2 * i + 1] = float_to_bf16(b * c + a * s);
    }
}
STEER_EMU_EXPORT(rope)

// Rows of a (V, d) table: out[r, j] = w[ids[r], j] (ids checked on the host).
STEER_KERNEL void embedding(bf16* __restrict__ out, const bf16* __restrict__ w,
                            const int* __restrict__ ids, unsigned long long n, int d) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        out[i] = w[(size_t)ids[i / d] * d + i % d];
}
STEER_EMU_EXPORT(embedding)

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

template <typename T>
__device__ __forceinline__ void copy_elements(T* __restrict__ out, const T* __restrict__ x,
                                              unsigned long long n, const Strides6& s) {
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
STEER_KERNEL void copy_strided(bf16* __restrict__ out, const bf16* __restrict__ x,
                               unsigned long long n, Strides6 s) {
    copy_elements(out, x, n, s);
}
STEER_EMU_EXPORT(copy_strided)
// The same for 4-byte elements (the f32 maps and their gradients).
STEER_KERNEL void copy_strided32(float* __restrict__ out, const float* __restrict__ x,
                                 unsigned long long n, Strides6 s) {
    copy_elements(out, x, n, s);
}
STEER_EMU_EXPORT(copy_strided32)

STEER_KERNEL void ew_activation_backward(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                         const bf16* __restrict__ dy, unsigned long long n,
                                         int act, float slope) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count())
        dx[i] = float_to_bf16(bf16_to_float(dy[i]) * activate_grad(bf16_to_float(x[i]), act, slope));
}
STEER_EMU_EXPORT(ew_activation_backward)

// n: elements of dy (rows x d); dx is (rows, 2d).
STEER_KERNEL void geglu_backward(bf16* __restrict__ dx, const bf16* __restrict__ x,
                                 const bf16* __restrict__ dy, unsigned long long n, int d) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t row = i / d, col = i % d;
        const bf16* xr = x + row * 2 * d;
        const float h = bf16_to_float(xr[col]), g = bf16_to_float(xr[d + col]);
        const float gy = bf16_to_float(dy[i]);
        dx[row * 2 * d + col] = float_to_bf16(gy * gelu(g));
        dx[row * 2 * d + d + col] = float_to_bf16(gy * h * gelu_grad(g));
    }
}
STEER_EMU_EXPORT(geglu_backward)

// n: elements of dx, (P, h, w) planes; dy is (P, 2h, 2w).
STEER_KERNEL void upsample2x_backward(bf16* __restrict__ dx, const bf16* __restrict__ dy,
                                      unsigned long long n, int h, int w) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const size_t plane = i / ((size_t)h * w), rest = i % ((size_t)h * w);
        const int y = (int)(rest / w), xx = (int)(rest % w);
        const bf16* d = dy + (plane * 2 * h + 2 * y) * 2 * w + 2 * xx;
        dx[i] = float_to_bf16(bf16_to_float(d[0]) + bf16_to_float(d[1]) + bf16_to_float(d[2 * w]) +
                              bf16_to_float(d[2 * w + 1]));
    }
}
STEER_EMU_EXPORT(upsample2x_backward)
