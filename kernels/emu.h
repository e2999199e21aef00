// emu.h: runs the CUDA kernels in kernels/*.cu on the host, so that CI (no GPU) tests their
// logic against the CPU backend. build.rs compiles each .cu file a second time as C++20 with
// STEER_EMULATE defined; common.cuh then includes this header instead of using nvcc's built-ins.
//
// What it emulates, and how:
// - Blocks run one after another on the calling OS thread. The threads of a block are fibers
//   (ucontext) on 64 KiB stacks with a guard page, scheduled round-robin by the launch; a fiber
//   only yields at a barrier, so everything between two barriers runs without interleaving.
// - __syncthreads() and __syncwarp() are barriers over the block and the warp. A round in which no
//   fiber passes a barrier is a deadlock (a barrier some threads never reach, or a warp collective
//   under divergence): the launch stops and reports it instead of hanging.
// - Warp shuffles and the tensor-core instruction mma.m16n8k16 (bf16 in, f32 accumulate) exchange
//   registers through a per-warp slot table between two warp barriers; the mma uses the PTX ISA's
//   documented fragment layout (see mma_bf16_16816 in common.cuh), so a kernel that puts its
//   operands in the wrong registers computes the wrong product here as it would on the GPU.
// - __shared__ is `static thread_local`: one copy per OS thread, shared by the fibers of a block,
//   so tests that launch concurrently from several threads do not share it. Like real shared
//   memory it keeps stale values between blocks; kernels must not read what they did not write.
// - Atomics are plain read-modify-writes: fibers never interleave inside one.
//
// What it cannot show: speed, races between warps that real hardware would expose (fibers always
// run in one order), fast-math rounding, and instructions without a host twin here.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
// No alignas(16): host tensors are only element-aligned, and x86 reads them unaligned.
struct uint4 {
    unsigned x, y, z, w;
};

namespace steer_emu {

constexpr int WARP = 32;
constexpr size_t STACK_BYTES = 64 * 1024;
// 32-bit words a lane can put into a warp exchange (an mma's A operand is the largest: 4).
constexpr int SLOT_WORDS = 8;

struct Fiber {
    ucontext_t ctx;
    bool done;
};

struct Block {
    unsigned nthreads = 0;
    dim3 block_dim{1, 1, 1};
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    std::function<void()> body;
    // Barriers: arrivals and a generation counter, for the block and for each warp.
    unsigned block_arrived = 0, block_gen = 0;
    std::vector<unsigned> warp_arrived, warp_gen;
    std::vector<uint32_t> slots;  // (warp, lane, SLOT_WORDS)
    std::vector<uint64_t> dynamic_shared;  // the launch's dynamic shared memory, 8-byte aligned
    bool progress = false;
};

// The launch in progress on this OS thread and the fiber running now.
inline thread_local Block* cur = nullptr;
inline thread_local unsigned cur_tid = 0;
inline thread_local uint3 block_idx{0, 0, 0};
inline thread_local dim3 grid_dim{1, 1, 1};

inline uint3 thread_idx() {
    const dim3 d = cur->block_dim;
    return uint3{cur_tid % d.x, (cur_tid / d.x) % d.y, cur_tid / (d.x * d.y)};
}
inline unsigned lane() { return cur_tid % WARP; }
inline unsigned warp() { return cur_tid / WARP; }
inline unsigned warp_size(unsigned w) {
    const unsigned rest = cur->nthreads - w * WARP;
    return rest < WARP ? rest : WARP;
}

// Back to the scheduler; called only by a fiber waiting at a barrier.
inline void yield() { swapcontext(&cur->fibers[cur_tid].ctx, &cur->scheduler); }

inline void barrier(unsigned& arrived, unsigned& gen, unsigned count) {
    const unsigned my_gen = gen;
    if (++arrived == count) {
        arrived = 0;
        ++gen;
        cur->progress = true;
        return;
    }
    while (gen == my_gen) yield();
    cur->progress = true;
}
inline void sync_block() { barrier(cur->block_arrived, cur->block_gen, cur->nthreads); }
inline void sync_warp() {
    const unsigned w = warp();
    barrier(cur->warp_arrived[w], cur->warp_gen[w], warp_size(w));
}

inline uint32_t* slot(unsigned w, unsigned l) {
    return &cur->slots[(size_t(w) * WARP + l) * SLOT_WORDS];
}

// Each lane publishes `n` words, then reads lane `src(l)`'s words: the shape of every warp
// collective. The second barrier keeps a fast lane from overwriting slots still being read.
template <typename F>
inline void warp_exchange(const uint32_t* mine, int n, F&& read_all) {
    const unsigned w = warp();
    std::memcpy(slot(w, lane()), mine, sizeof(uint32_t) * n);
    sync_warp();
    read_all(w);
    sync_warp();
}

template <typename T>
inline T shuffle(T v, int src_lane) {
    static_assert(sizeof(T) == 4, "the emulated shuffles move 32-bit values");
    uint32_t bits, got;
    std::memcpy(&bits, &v, 4);
    warp_exchange(&bits, 1, [&](unsigned w) {
        got = (src_lane >= 0 && unsigned(src_lane) < warp_size(w)) ? slot(w, src_lane)[0] : bits;
    });
    T out;
    std::memcpy(&out, &got, 4);
    return out;
}

// D = A(16x16, row) * B(16x8, col) + C for one warp; registers as PTX's mma.m16n8k16 .bf16 lays
// them out (g = lane / 4, t = lane % 4; the low half of a register holds the lower index):
// A register r: row g + 8 (r & 1), columns 2t + {0, 1} + 8 (r >> 1);
// B register r: rows 2t + {0, 1} + 8 r, column g;  C/D element i: row g + 8 (i >> 1), col 2t + (i & 1).
inline float bf16_bits_to_float(uint32_t h) {
    const uint32_t b = h << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    float out[4];
    const unsigned l = lane();
    warp_exchange(mine, 6, [&](unsigned w) {
        auto a_at = [&](int row, int col) {
            const uint32_t* s = slot(w, (row % 8) * 4 + (col % 8) / 2);
            const uint32_t reg = s[(row / 8) + 2 * (col / 8)];
            return bf16_bits_to_float(col % 2 ? reg >> 16 : reg & 0xffff);
        };
        auto b_at = [&](int row, int col) {
            const uint32_t* s = slot(w, col * 4 + (row % 8) / 2);
            const uint32_t reg = s[4 + row / 8];
            return bf16_bits_to_float(row % 2 ? reg >> 16 : reg & 0xffff);
        };
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            float acc = 0.f;
            for (int k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);
            out[i] = acc + c[i];
        }
    });
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.m8n8.x4.b16 (shared memory to registers, one warp): lane i gives the address of row
// i % 8 of matrix i / 8; register j of lane l receives matrix j's row l / 4, columns
// 2 (l % 4) + {0, 1}, or with `trans` its rows 2 (l % 4) + {0, 1} of column l / 4 (PTX ISA).
inline void ldmatrix_x4(uint32_t r[4], const void* row_addr, bool trans) {
    uint64_t mine;
    std::memcpy(&mine, &row_addr, 8);
    const uint32_t words[2] = {uint32_t(mine), uint32_t(mine >> 32)};
    const unsigned l = lane();
    warp_exchange(words, 2, [&](unsigned w) {
        auto row = [&](int lane_of_row) {
            const uint32_t* s = slot(w, lane_of_row);
            const uint64_t a = uint64_t(s[0]) | (uint64_t(s[1]) << 32);
            return reinterpret_cast<const uint16_t*>(a);
        };
        for (int j = 0; j < 4; ++j) {
            uint16_t lo, hi;
            if (trans) {
                lo = row(j * 8 + 2 * (l % 4))[l / 4];
                hi = row(j * 8 + 2 * (l % 4) + 1)[l / 4];
            } else {
                lo = row(j * 8 + l / 4)[2 * (l % 4)];
                hi = row(j * 8 + l / 4)[2 * (l % 4) + 1];
            }
            r[j] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
    });
}

// cp.async.cg (16 bytes, global to shared, zero-filled when !valid) completes at once here, so
// commit_group and wait_group have nothing to wait for.
inline void cp_async16(void* dst, const void* src, bool valid) {
    if (valid)
        std::memcpy(dst, src, 16);
    else
        std::memset(dst, 0, 16);
}

inline void fiber_entry() {
    cur->body();
    cur->fibers[cur_tid].done = true;
    cur->progress = true;
    // uc_link returns to the scheduler.
}

// One fiber stack with a guard page below it, kept for the thread's later launches.
struct Stacks {
    std::vector<char*> stacks;
    ~Stacks() {
        for (char* s : stacks) munmap(s - page(), STACK_BYTES + page());
    }
    static size_t page() { return size_t(sysconf(_SC_PAGESIZE)); }
    char* get(size_t i) {
        while (stacks.size() <= i) {
            void* m = mmap(nullptr, STACK_BYTES + page(), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) return nullptr;
            mprotect(m, page(), PROT_NONE);
            stacks.push_back(static_cast<char*>(m) + page());
        }
        return stacks[i];
    }
};
inline thread_local Stacks stacks;

// Return codes of an emulated launch (the Rust side turns them into errors).
enum Status : int { OK = 0, BAD_LAUNCH = 1, DEADLOCK = 2, NO_MEMORY = 3 };

// Runs every thread of the block at block_idx to completion. Not inlined: swapcontext returns
// twice, like setjmp, and the caller's loop variables must not live across it.
__attribute__((noinline)) inline int run_block(Block& b) {
    b.block_arrived = 0;
    std::fill(b.warp_arrived.begin(), b.warp_arrived.end(), 0u);
    for (unsigned t = 0; t < b.nthreads; ++t) {
        char* stack = stacks.get(t);
        if (!stack) return NO_MEMORY;
        Fiber& f = b.fibers[t];
        f.done = false;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    for (unsigned live = b.nthreads; live > 0;) {
        b.progress = false;
        live = 0;
        for (unsigned t = 0; t < b.nthreads; ++t) {
            if (b.fibers[t].done) continue;
            cur_tid = t;
            swapcontext(&b.scheduler, &b.fibers[t].ctx);
            live += !b.fibers[t].done;
        }
        if (live > 0 && !b.progress) return DEADLOCK;
    }
    return OK;
}

inline int run(const unsigned* grid, const unsigned* block, unsigned smem,
               const std::function<void()>& kernel) {
    const unsigned nthreads = block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024 || grid[0] * grid[1] * grid[2] == 0) return BAD_LAUNCH;
    Block b;
    b.nthreads = nthreads;
    b.block_dim = dim3{block[0], block[1], block[2]};
    b.fibers.resize(nthreads);
    const unsigned nwarps = (nthreads + WARP - 1) / WARP;
    b.warp_arrived.assign(nwarps, 0);
    b.warp_gen.assign(nwarps, 0);
    b.slots.assign(size_t(nwarps) * WARP * SLOT_WORDS, 0);
    b.body = kernel;
    // All ones: a bf16 or f32 NaN, so a kernel that reads shared memory it never wrote is caught
    // by the comparison with the CPU reference rather than reading zeros.
    b.dynamic_shared.assign((smem + 7) / 8, ~uint64_t(0));
    Block* const outer = cur;
    cur = &b;
    grid_dim = dim3{grid[0], grid[1], grid[2]};
    int status = OK;
    const unsigned nblocks = grid[0] * grid[1] * grid[2];
    for (unsigned i = 0; i < nblocks && status == OK; ++i) {
        block_idx = uint3{i % grid[0], (i / grid[0]) % grid[1], i / (grid[0] * grid[1])};
        status = run_block(b);
    }
    cur = outer;
    return status;
}

// Unpacks cuLaunchKernel-style arguments (an array of pointers to each argument) into the
// kernel's parameter types and runs it.
template <typename... A, size_t... I>
inline std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<A...>{*static_cast<A*>(args[I])...};
}
template <typename... A>
inline int launch(void (*kernel)(A...), const unsigned* grid, const unsigned* block, unsigned smem,
                  void** args) {
    const std::tuple<A...> params = unpack<A...>(args, std::index_sequence_for<A...>{});
    return run(grid, block, smem, [&] { std::apply(kernel, params); });
}

}  // namespace steer_emu

// The CUDA names the kernels use.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define threadIdx (::steer_emu::thread_idx())
#define blockIdx (::steer_emu::block_idx)
#define blockDim (::steer_emu::cur->block_dim)
#define gridDim (::steer_emu::grid_dim)
#define STEER_DYNAMIC_SHARED(name) \
    char* name = reinterpret_cast<char*>(::steer_emu::cur->dynamic_shared.data())

inline void __syncthreads() { steer_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { steer_emu::sync_warp(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return steer_emu::shuffle(v, int(steer_emu::lane()) ^ mask);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
    return steer_emu::shuffle(v, src);
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old | v;
    return old;
}
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
using std::exp2f;
using std::fmaxf;
using std::isfinite;
using std::log2f;
// CUDA's integer min and max.
using std::max;
using std::min;

// The exported launcher for a kernel: `int steer_emu_<name>(grid[3], block[3], smem, args)`, the
// argument shape of cuLaunchKernel, so the Rust side packs arguments once for both targets.
#define STEER_EMU_EXPORT(name)                                                             \
    extern "C" int steer_emu_##name(const unsigned* grid, const unsigned* block,           \
                                    unsigned smem, void** args) {                          \
        return steer_emu::launch(name, grid, block, smem, args);                           \
    }
