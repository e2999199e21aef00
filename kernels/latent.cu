// latent.cu: the latent update of the steering loop, with its NaN guard.
//
// latent_update: out[i] = z[i] - lr * g[i] for i < n (f32), and *nonfinite = 1 if any g[i] is NaN
// or infinite. `out` is a fresh buffer, never z itself: that is the NaN guard. One pass computes
// the update and detects a bad gradient; the host zeroes the flag before the launch, reads it
// after, and adopts `out` as the new z only when the flag is still 0, so a non-finite gradient
// leaves z untouched without a second kernel or a second pass over g.
//
// Launch: 1-D grid-stride loop, 256 threads a block, ceil(n / 256) blocks capped at 4096 (enough
// to fill an H100); no shared memory.
// Cost: 2n FLOPs (one multiply, one subtract per element); 12n bytes of traffic (read z and g,
// write out) plus one 4-byte flag. Memory-bound: a latent (64 KiB to 1 MiB) is launch-latency
// bound on any GPU.
//
// Rounding: __fmul_rn/__fsub_rn forbid nvcc from contracting the two into an FMA, so the result
// is bit-identical to the CPU reference (src/ops/latent.rs), which rounds after each operation.
#include "common.cuh"

STEER_KERNEL void latent_update(float* __restrict__ out, const float* __restrict__ z,
                                const float* __restrict__ g, float lr, unsigned long long n,
                                unsigned int* __restrict__ nonfinite) {
    for (size_t i = global_thread_index(); i < n; i += global_thread_count()) {
        const float gi = g[i];
        // Rare, so an atomic per bad element costs nothing; every writer writes the same 1.
        if (!isfinite(gi)) atomicOr(nonfinite, 1u);
        out[i] = __fsub_rn(z[i], __fmul_rn(lr, gi));
    }
}
STEER_EMU_EXPORT(latent_update)
