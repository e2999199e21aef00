// common.cuh: what every kernel file shares: the kernel declaration macros, bf16 storage, the
// tensor-core instruction and warp reductions. The same text compiles for the GPU (nvcc) and, with
// STEER_EMULATE defined, for the host through emu.h (build.rs does both).
#pragma once

#ifdef STEER_EMULATE
#include "emu.h"
#define STEER_KERNEL extern "C"
#else
// `extern "C"` keeps the PTX names unmangled so the Rust side looks kernels up by name.
#define STEER_KERNEL extern "C" __global__
// Only the emulation build exports host launchers.
#define STEER_EMU_EXPORT(name)
// The launch's dynamic shared memory as bytes (sized by the host at launch).
#define STEER_DYNAMIC_SHARED(name) extern __shared__ __align__(16) char name[]
#endif

typedef unsigned int u32;

// Grid-stride loops: the first element this thread handles, and the stride between its elements.
// size_t so that tensors past 2^31 elements index correctly.
__device__ __forceinline__ size_t global_thread_index() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t global_thread_count() {
    return (size_t)gridDim.x * blockDim.x;
}

// bf16 is stored as its 16 raw bits (no cuda_bf16.h, so the host build needs nothing from CUDA).
typedef unsigned short bf16;

__device__ __forceinline__ float bf16_to_float(bf16 h) { return __uint_as_float((u32)h << 16); }

// Round to nearest even, as half::bf16::from_f32 does on the Rust side; NaN stays a quiet NaN.
__device__ __forceinline__ bf16 float_to_bf16(float f) {
    const u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Two bf16 as one 32-bit register, `lo` in the low half (the lower index in a fragment).
__device__ __forceinline__ u32 pack_bf16(bf16 lo, bf16 hi) { return (u32)lo | ((u32)hi << 16); }

// D = A B + C on the tensor cores for one warp: A 16x16 (row-major fragment), B 16x8 (column-major
// fragment), bf16 inputs, f32 accumulation. Fragment layout (PTX ISA, mma.m16n8k16; g = lane / 4,
// t = lane % 4): A register r holds row g + 8 (r & 1), columns 2t + {0,1} + 8 (r >> 1); B register
// r holds rows 2t + {0,1} + 8r of column g; C/D element i is row g + 8 (i >> 1), column 2t + (i & 1).
__device__ __forceinline__ void mma_bf16_16816(float d[4], const u32 a[4], const u32 b[2],
                                               const float c[4]) {
#ifdef STEER_EMULATE
    steer_emu::mma_16816(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// Fragment loaders from shared memory (see mma_bf16_16816 for the layouts).
// A fragment of a row-major bf16 tile: element (r, c) at a[r * ld + c] (r < 16, c < 16).
__device__ __forceinline__ void load_a(u32 frag[4], const bf16* a, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 4; ++r)
        frag[r] = *(const u32*)(a + (g + 8 * (r & 1)) * ld + 2 * t + 8 * (r >> 1));
}
// B fragment whose element (k, n) is s[n * ld + k] (k contiguous: one 32-bit load a register).
__device__ __forceinline__ void load_b_nk(u32 frag[2], const bf16* s, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) frag[r] = *(const u32*)(s + g * ld + 2 * t + 8 * r);
}
// B fragment whose element (k, n) is s[k * ld + n] (n contiguous: two 16-bit loads a register).
__device__ __forceinline__ void load_b_kn(u32 frag[2], const bf16* s, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r)
        frag[r] = pack_bf16(s[(2 * t + 8 * r) * ld + g], s[(2 * t + 8 * r + 1) * ld + g]);
}

// Max and sum over the 4 lanes of a quad (the lanes that share a row of an mma fragment).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
