// common.cuh: what every kernel file shares.
#pragma once

// Every kernel is declared through STEER_KERNEL: `extern "C"` keeps its PTX name unmangled so the
// Rust side can look it up by name, and a host-emulation build can redefine this one macro.
#define STEER_KERNEL extern "C" __global__

// Grid-stride loops: the first element this thread handles, and the stride between its elements.
// size_t so that tensors past 2^31 elements index correctly.
__device__ __forceinline__ size_t global_thread_index() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t global_thread_count() {
    return (size_t)gridDim.x * blockDim.x;
}
