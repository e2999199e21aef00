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

// ldmatrix.x4: four 8x8 bf16 matrices from shared memory; this lane gives the address of row
// lane % 8 of matrix lane / 8 (16-byte aligned); register j gets matrix j's row lane / 4,
// columns 2 (lane % 4) + {0, 1} (with TRANS: rows 2 (lane % 4) + {0, 1} of column lane / 4). One
// instruction for what would be four 32-bit shared loads.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const bf16* row_addr) {
#ifdef STEER_EMULATE
    steer_emu::ldmatrix_x4(r, row_addr, TRANS);
#else
    const unsigned a = (unsigned)__cvta_generic_to_shared(row_addr);
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// B fragments for two adjacent n-tiles (n, n + 8) of one 16-deep k-chunk, with ldmatrix:
// from a tile whose element (k, n) is s[n * ld + k] (rows along n: K in Q K^T), or with TRANS from
// one whose element (k, n) is s[k * ld + n] (rows along k: V in P V). b[0..1] is n-tile n,
// b[2..3] n-tile n + 8.
template <bool TRANS>
__device__ __forceinline__ void load_b_pair(u32 b[4], const bf16* s, int ld) {
    const int lane = threadIdx.x & 31, mat = lane >> 3, row = lane & 7;
    // Matrix order: (n-tile 0, k 0-7), (n-tile 0, k 8-15), (n-tile 1, k 0-7), (n-tile 1, k 8-15).
    const int n_off = (mat >> 1) * 8, k_off = (mat & 1) * 8;
    ldmatrix_x4<TRANS>(b, TRANS ? s + (k_off + row) * ld + n_off : s + (n_off + row) * ld + k_off);
}

// Fragment loaders from shared memory (see mma_bf16_16816 for the layouts).
// A fragment of a row-major bf16 tile: element (r, c) at a[r * ld + c] (r < 16, c < 16; rows
// 16-byte aligned), with one ldmatrix: matrices (rows 0-7, 8-15) x (columns 0-7, 8-15) are the
// fragment's registers 0-3.
__device__ __forceinline__ void load_a(u32 frag[4], const bf16* a, int ld) {
    const int lane = threadIdx.x & 31, mat = lane >> 3, row = lane & 7;
    ldmatrix_x4<false>(frag, a + ((mat & 1) * 8 + row) * ld + (mat >> 1) * 8);
}
// Asynchronous 16-byte copy global -> shared (zero-filled when !valid), and its group fences:
// cp_async_wait<N> waits until at most N committed groups are still in flight.
__device__ __forceinline__ void cp_async16(bf16* dst, const bf16* src, bool valid) {
#ifdef STEER_EMULATE
    steer_emu::cp_async16(dst, src, valid);
#else
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef STEER_EMULATE
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef STEER_EMULATE
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
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

// A reduction over a block of THREADS threads (a multiple of 32) with `op` (SumOp, MaxOp); every
// thread gets the result. `scratch` holds THREADS / 32 floats of shared memory; calls may follow
// each other on the same scratch.
struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <int THREADS, typename Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // scratch is free (a previous call may still be reading it)
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) total = op(total, scratch[w]);
    return total;
}
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    return block_reduce<THREADS>(v, scratch, SumOp());
}
