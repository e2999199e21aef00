// attention.cu: fused scaled-dot-product attention with map capture, forward and backward.
//
// What it computes (one (batch, head) pair bh per gridDim.y, tensors (B*H, L, D) row-major, bf16):
//   S = scale Q K^T, P = softmax_rows(S), O = P V, lse_i = log sum_j exp S_ij       (forward)
//   with `causal`, S_ij = -inf for j > i (CLIP's text encoder; forward only, no capture)
//   maps[b, w, h, i] = mean over word w's key columns j of Pm_ij                      (capture)
// where Pm is the map softmax: P itself when the map columns [c0, c1) are all keys (SD2.1), or a
// softmax of the same logits over [c0, c1) only (FLUX's text columns), kept as a second running
// log-sum-exp lse_map. Nothing of size Lq x Lk is ever written.
// The backward takes dO and the maps' gradient G (B, W, H, Lq) and returns dQ, dK, dV of
// sum(O dO) + sum(maps G). The maps' gradient enters as an extra term of dS on the map columns:
//   dS_ij = P_ij (dP_ij - D_i) + [c0 <= j < c1] Pm_ij (Gc_ij - Dm_i),   dP = dO V^T,
//   D_i = rowsum(dO_i O_i),  Gc_ij = sum over words w holding column j of G_wi / |w|,
//   Dm_i = sum_j Pm_ij Gc_ij = sum_w G_wi maps_wi,
// then dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO (the derivation is in ops/attention.rs's
// CPU reference, which this file is tested against).
//
// Design (FlashAttention-2 style, on mma.m16n8k16 bf16 tensor cores with f32 accumulation):
// - attention_forward: a block of 4 warps owns 64 query rows (16 a warp, their Q fragments held
//   in registers) and streams the keys in tiles of 64 through shared memory (K as rows, V
//   transposed, so that every mma operand is a 32-bit shared load). Each warp computes its 16x64
//   score tile with mma, keeps the running row max and sum in registers (online softmax in the
//   log2 domain, quad shuffles for the row reductions) and accumulates O += P V with P taken
//   straight from the score accumulators (an m16n8 accumulator pair is an m16k16 A fragment), so
//   P never touches shared memory. Capture costs one more running max/sum over the map columns,
//   then after the last tile a direct dot product q_i . k_j for each captured column (a handful
//   of columns: far cheaper than keeping score tiles), exp'd against the final lse_map.
// - attention_backward_prep: D_i, Dm_i and Gc (B*H, Lq, ncap) from O, dO, maps and G, one thread
//   a row.
// - attention_backward_dq: per 64 query rows, streams key tiles of 32; recomputes S and P from
//   lse, dP = dO V^T with mma, dS in registers, dQ += dS K with dS as the A fragment.
// - attention_backward_dkdv: per 64 keys, streams query tiles of 32; S^T = K Q^T and dP^T = V dO^T
//   with mma, dV += P^T dO and dK += dS^T Q with P^T and dS^T as A fragments. Two kernels (dQ by
//   query block, dK/dV by key block) instead of atomics: every output has one writer.
// Head dims up to 128 (any; padded with zeros to a multiple of 16 in shared memory; 16-byte
// loads when a multiple of 8). Shared rows are 8 bf16 longer than needed, which puts the 8 rows a
// fragment load touches in different banks.
//
// Launch: 128 threads; forward and dq grid (ceil(Lq/64), B*H), dkdv grid (ceil(Lk/64), B*H),
// prep grid (ceil(Lq/128), B*H). Dynamic shared memory sized by the head dim (src/cuda/
// attention.rs computes the same sizes); at D = 128: forward 85 KiB (Q, two K and two V tiles),
// dq 51 KiB, dkdv 52 KiB (the host opts in above 48 KiB).
//
// Cost (forward, B*H heads): 4 B H Lq Lk D FLOPs on the tensor cores (QK^T and PV), plus
// 2 B H Lq Lk exps; bytes: Q, O once, K, V once per query block: 2 B H (2 Lq D + 2 ceil(Lq/64) Lk D)
// + 4 B H Lq (lse) + 4 B W H Lq (maps). Backward: 10 B H Lq Lk D FLOPs (S twice, dP twice, dQ,
// dK, dV), bytes about 3x the forward's.
// Floors on an H100 SXM (about 800 TFLOP/s bf16 dense measured through cuBLAS here, 3.0 TB/s):
// SD2.1 self-attention at 64x64 latents with CFG (B 2, H 5, L 4096, D 64): 42.9 GFLOP -> 54 us
// compute vs 21 MB -> 7 us memory: compute-bound, floor 54 us. Its cross-attention (Lk 77):
// 0.8 GFLOP -> 1 us vs 10.5 MB (Q and O) -> 3.5 us: memory-bound, floor 3.5 us. mma.sync reaches
// at most about two thirds of the dense rate on Hopper (wgmma is the rest), so expect >= 80 us.
#include "common.cuh"

#define ATT_THREADS 128
#define ATT_BQ 64    // query rows a forward or dq block owns (16 a warp)
#define ATT_BK 64    // keys a forward tile streams
#define ATT_BKQ 32   // keys a dq tile streams
#define ATT_BKB 64   // keys a dK/dV block owns (16 a warp)
#define ATT_BQB 32   // query rows a dK/dV tile streams
#define ATT_DMAX 128 // largest head dim
#define ATT_PAD 8    // extra bf16 per shared row (bank spread; keeps rows 16-byte aligned)

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float pos_inf() { return __uint_as_float(0x7f800000u); }
__device__ __forceinline__ int round16(int x) { return (x + 15) & ~15; }

// Rows row0.. of a (nrows, width) bf16 matrix into shared memory (dst[r * ld + c]), zero beyond
// the matrix, `ld_cols` (a multiple of 8) columns: with cp.async 16-byte copies when the width
// allows (the caller commits and waits), else with plain loads.
__device__ __forceinline__ void load_rows(bf16* dst, int ld, const bf16* src, int row0, int rows,
                                          int nrows, int width, int ld_cols) {
    const int vecs = ld_cols / 8;
    const bool vec = (width & 7) == 0;
    for (int idx = threadIdx.x; idx < rows * vecs; idx += ATT_THREADS) {
        const int r = idx / vecs, c = (idx % vecs) * 8;
        const bool row_in = row0 + r < nrows;
        const bf16* s = src + (size_t)(row0 + r) * width + c;
        if (vec) {
            const bool valid = row_in && c < width;
            cp_async16(dst + r * ld + c, valid ? s : src, valid);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) dst[r * ld + c + i] = (row_in && c + i < width) ? s[i] : (bf16)0;
        }
    }
}

// load_rows, finished: the data is in shared memory for this thread (a barrier makes it
// everyone's).
__device__ __forceinline__ void load_rows_now(bf16* dst, int ld, const bf16* src, int row0,
                                              int rows, int nrows, int width, int ld_cols) {
    load_rows(dst, ld, src, row0, rows, nrows, width, ld_cols);
    cp_async_commit();
    cp_async_wait<0>();
}

// Consecutive arrays out of the dynamic shared memory; the host sizes it with the same counts
// (src/cuda/attention.rs). Every count is a multiple of 8 elements (or of 4 for 4-byte types), so
// each array stays 16-byte aligned.
__device__ __forceinline__ bf16* take_bf16(char*& p, int n) {
    bf16* a = (bf16*)p;
    p += n * sizeof(bf16);
    return a;
}
__device__ __forceinline__ float* take_f32(char*& p, int n) {
    float* a = (float*)p;
    p += n * sizeof(float);
    return a;
}
__device__ __forceinline__ int* take_i32(char*& p, int n) {
    int* a = (int*)p;
    p += n * sizeof(int);
    return a;
}

// The index of `col` among the captured columns, or -1.
__device__ __forceinline__ int capture_index(const int* cap_cols, int ncap, int col) {
    for (int c = 0; c < ncap; ++c)
        if (cap_cols[c] == col) return c;
    return -1;
}

// acc[j] += A B for the first `ncols` / 8 output tiles (ncols a multiple of 16): A is 16 x kdim
// as kdim / 16 A fragments in registers; B(k, col) is bs[col * ld + k] (K in Q K^T), or with
// TRANS bs[k * ld + col] (V in P V), loaded two n-tiles at a time with ldmatrix.
template <bool TRANS, int NTILES, int KCHUNKS>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const u32 (*a)[4], const bf16* bs,
                                         int ld, int ncols, int kdim) {
#pragma unroll
    for (int kc = 0; kc < KCHUNKS; ++kc) {
        if (kc * 16 >= kdim) break;
#pragma unroll
        for (int jp = 0; jp < NTILES / 2; ++jp) {
            if (jp * 16 >= ncols) break;
            u32 b[4];
            load_b_pair<TRANS>(b, TRANS ? bs + kc * 16 * ld + jp * 16 : bs + jp * 16 * ld + kc * 16, ld);
            mma_bf16_16816(acc[2 * jp], a[kc], b, acc[2 * jp]);
            mma_bf16_16816(acc[2 * jp + 1], a[kc], b + 2, acc[2 * jp + 1]);
        }
    }
}

// acc (16 x 8 NTILES) = A B: A the 16 rows of `as` (row stride lda, kdim columns, a multiple of
// 16), B(k, col) = bs[col * ldb + k].
template <int NTILES>
__device__ __forceinline__ void mma_tile(float (*acc)[4], const bf16* as, int lda, const bf16* bs,
                                         int ldb, int kdim) {
#pragma unroll
    for (int j = 0; j < NTILES; ++j)
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < ATT_DMAX / 16; ++kk) {
        if (kk * 16 >= kdim) break;
        u32 a[1][4];
        load_a(a[0], as + kk * 16, lda);
        mma_rows<false, NTILES, 1>(acc, a, bs + kk * 16, ldb, NTILES * 8, 16);
    }
}

STEER_KERNEL void __launch_bounds__(ATT_THREADS)
    attention_forward(const bf16* __restrict__ q, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                      int lq, int lk, int d, int dv, float scale, int causal, int heads,
                      int n_words,
                      const int* __restrict__ word_off, const int* __restrict__ word_pos,
                      const int* __restrict__ cap_cols, int map_c0, int map_c1,
                      float* __restrict__ lse_map, float* __restrict__ maps) {
    const int bh = blockIdx.y, r0 = blockIdx.x * ATT_BQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int dp = round16(d), dvp = round16(dv);
    const int ldq = dp + ATT_PAD, ldv = dvp + ATT_PAD;
    STEER_DYNAMIC_SHARED(smem);
    char* carve = smem;
    bf16* qs = take_bf16(carve, ATT_BQ * ldq);
    // Two K and two V tiles: the next tile's copy overlaps this one's arithmetic.
    bf16* ks0 = take_bf16(carve, ATT_BK * ldq);
    bf16* ks1 = take_bf16(carve, ATT_BK * ldq);
    bf16* vs0 = take_bf16(carve, ATT_BK * ldv);
    bf16* vs1 = take_bf16(carve, ATT_BK * ldv);
    const bool capture = n_words > 0;
    const float scale_log2 = scale * LOG2E;
    q += (size_t)bh * lq * d;
    k += (size_t)bh * lk * d;
    v += (size_t)bh * lk * dv;

    load_rows(qs, ldq, q, r0, ATT_BQ, lq, d, dp);
    load_rows(ks0, ldq, k, 0, ATT_BK, lk, d, dp);
    load_rows(vs0, ldv, v, 0, ATT_BK, lk, dv, dvp);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[ATT_DMAX / 16][4];
#pragma unroll
    for (int kk = 0; kk < ATT_DMAX / 16; ++kk)
        if (kk * 16 < dp) load_a(qf[kk], qs + warp * 16 * ldq + kk * 16, ldq);

    // Per fragment row r (rows g and g + 8 of the warp's 16): running max (log2 domain) and this
    // lane's share of the running sum, for the softmax and for the map softmax.
    float m[2] = {neg_inf(), neg_inf()}, l_part[2] = {0.f, 0.f};
    float mm[2] = {neg_inf(), neg_inf()}, lm_part[2] = {0.f, 0.f};
    float acc_o[ATT_DMAX / 8][4];
#pragma unroll
    for (int j = 0; j < ATT_DMAX / 8; ++j)
        for (int i = 0; i < 4; ++i) acc_o[j][i] = 0.f;

    // Causal: no key past this block's last row (key 0 is in every row's first tile, so each
    // row's running max is finite from the first tile on).
    const int kend = causal ? min(lk, r0 + ATT_BQ) : lk;
    for (int it = 0, k0 = 0; k0 < kend; ++it, k0 += ATT_BK) {
        const bool odd = it & 1;
        const bf16* kcur = odd ? ks1 : ks0;
        const bf16* vcur = odd ? vs1 : vs0;
        // Prefetch the next tile into the other buffers (last read before the previous barrier),
        // then wait for this one.
        if (k0 + ATT_BK < kend) {
            load_rows(odd ? ks0 : ks1, ldq, k, k0 + ATT_BK, ATT_BK, lk, d, dp);
            load_rows(odd ? vs0 : vs1, ldv, v, k0 + ATT_BK, ATT_BK, lk, dv, dvp);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[ATT_BK / 8][4];
#pragma unroll
        for (int j = 0; j < ATT_BK / 8; ++j)
            for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
        mma_rows<false, ATT_BK / 8, ATT_DMAX / 16>(s, qf, kcur, ldq, ATT_BK, dp);

        float rmax[2] = {neg_inf(), neg_inf()}, rmax_m[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int j = 0; j < ATT_BK / 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = k0 + j * 8 + 2 * t + (i & 1);
                const int row = r0 + warp * 16 + g + 8 * (i >> 1);
                const bool seen = col < lk && (!causal || col <= row);
                const float x = seen ? s[j][i] * scale_log2 : neg_inf();
                s[j][i] = x;
                rmax[i >> 1] = fmaxf(rmax[i >> 1], x);
                if (col >= map_c0 && col < map_c1) rmax_m[i >> 1] = fmaxf(rmax_m[i >> 1], x);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // Every tile holds a valid key, so the new max is finite and exp2(-inf) = 0 starts
            // the sum.
            const float m_new = fmaxf(m[r], quad_max(rmax[r]));
            corr[r] = exp2f(m[r] - m_new);
            m[r] = m_new;
            l_part[r] *= corr[r];
            if (capture) {
                const float mm_new = fmaxf(mm[r], quad_max(rmax_m[r]));
                if (mm_new != neg_inf()) {
                    lm_part[r] *= exp2f(mm[r] - mm_new);
                    mm[r] = mm_new;
                }
            }
        }
        u32 pf[ATT_BK / 16][4];
#pragma unroll
        for (int j = 0; j < ATT_BK / 8; ++j) {
            float p[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = k0 + j * 8 + 2 * t + (i & 1);
                p[i] = exp2f(s[j][i] - m[i >> 1]);
                l_part[i >> 1] += p[i];
                if (capture && col >= map_c0 && col < map_c1)
                    lm_part[i >> 1] += exp2f(s[j][i] - mm[i >> 1]);
            }
            // Accumulator tiles 2c and 2c + 1 are the A fragment of key chunk c.
            pf[j >> 1][2 * (j & 1)] = pack_bf16(float_to_bf16(p[0]), float_to_bf16(p[1]));
            pf[j >> 1][2 * (j & 1) + 1] = pack_bf16(float_to_bf16(p[2]), float_to_bf16(p[3]));
        }
#pragma unroll
        for (int j = 0; j < ATT_DMAX / 8; ++j)
            for (int i = 0; i < 4; ++i) acc_o[j][i] *= corr[i >> 1];
        mma_rows<true, ATT_DMAX / 8, ATT_BK / 16>(acc_o, pf, vcur, ldv, dvp, ATT_BK);
        __syncthreads();  // this tile's buffers are free for the prefetch two tiles on
    }

    const int b_idx = bh / heads, h_idx = bh % heads;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row_local = warp * 16 + g + 8 * r, row = r0 + row_local;
        const float l = quad_sum(l_part[r]);
        const float inv = 1.f / l;
        if (row < lq) {
#pragma unroll
            for (int j = 0; j < ATT_DMAX / 8; ++j) {
                const int col = j * 8 + 2 * t;
                bf16* out = o + ((size_t)bh * lq + row) * dv;
                if (col < dv) out[col] = float_to_bf16(acc_o[j][2 * r] * inv);
                if (col + 1 < dv) out[col + 1] = float_to_bf16(acc_o[j][2 * r + 1] * inv);
            }
            if (t == 0) lse[(size_t)bh * lq + row] = (m[r] + log2f(l)) * LN2;
        }
        if (!capture) continue;
        const float lsem2 = mm[r] + log2f(quad_sum(lm_part[r]));
        if (row < lq && t == 0) lse_map[(size_t)bh * lq + row] = lsem2 * LN2;
        // The captured maps: each lane of the quad takes every 4th element of the dot product.
        const bf16* qrow = qs + row_local * ldq;
        for (int w = 0; w < n_words; ++w) {
            float sum = 0.f;
            for (int p = word_off[w]; p < word_off[w + 1]; ++p) {
                const bf16* kcol = k + (size_t)cap_cols[word_pos[p]] * d;
                float dot = 0.f;
                for (int c = t; c < d; c += 4) dot += bf16_to_float(qrow[c]) * bf16_to_float(kcol[c]);
                sum += exp2f(quad_sum(dot) * scale_log2 - lsem2);
            }
            if (row < lq && t == 0)
                maps[(((size_t)b_idx * n_words + w) * heads + h_idx) * lq + row] =
                    sum / (float)(word_off[w + 1] - word_off[w]);
        }
    }
}
STEER_EMU_EXPORT(attention_forward)

// softmax_rows: p = softmax(scale s) over rows of n, in place allowed (each thread rewrites only
// what it read): the middle step of the explicit path for head dims past ATT_DMAX (the VAE's one
// 512-wide head), whose products are gemm_bt's. One block of 256 threads a row; three passes
// (max, sum, write) over 2n bytes, f32 arithmetic.
#define SOFTMAX_THREADS 256
STEER_KERNEL void __launch_bounds__(SOFTMAX_THREADS)
    softmax_rows(bf16* p, const bf16* s, long long n, float scale) {
    __shared__ float scratch[SOFTMAX_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * n;
    const float scale_log2 = scale * LOG2E;
    float mx = neg_inf();
    for (long long e = threadIdx.x; e < n; e += SOFTMAX_THREADS)
        mx = fmaxf(mx, bf16_to_float(s[base + e]) * scale_log2);
    mx = block_reduce<SOFTMAX_THREADS>(mx, scratch, MaxOp());
    float sum = 0.f;
    for (long long e = threadIdx.x; e < n; e += SOFTMAX_THREADS)
        sum += exp2f(bf16_to_float(s[base + e]) * scale_log2 - mx);
    const float inv = 1.f / block_sum<SOFTMAX_THREADS>(sum, scratch);
    for (long long e = threadIdx.x; e < n; e += SOFTMAX_THREADS)
        p[base + e] = float_to_bf16(exp2f(bf16_to_float(s[base + e]) * scale_log2 - mx) * inv);
}
STEER_EMU_EXPORT(softmax_rows)

STEER_KERNEL void __launch_bounds__(ATT_THREADS)
    attention_backward_prep(const bf16* __restrict__ o, const bf16* __restrict__ dout, int lq,
                            int dv, int heads, int n_words, const int* __restrict__ word_off,
                            const int* __restrict__ word_pos, int ncap,
                            const float* __restrict__ maps, const float* __restrict__ dmaps,
                            float* __restrict__ delta, float* __restrict__ delta_map,
                            float* __restrict__ gcap) {
    const int bh = blockIdx.y, row = blockIdx.x * ATT_THREADS + threadIdx.x;
    if (row >= lq) return;
    const size_t at = (size_t)bh * lq + row;
    float dsum = 0.f;
    for (int c = 0; c < dv; ++c) dsum += bf16_to_float(o[at * dv + c]) * bf16_to_float(dout[at * dv + c]);
    delta[at] = dsum;
    if (n_words == 0) return;
    const int b_idx = bh / heads, h_idx = bh % heads;
    float* gc = gcap + at * ncap;
    for (int c = 0; c < ncap; ++c) gc[c] = 0.f;
    float dm = 0.f;
    for (int w = 0; w < n_words; ++w) {
        const size_t mi = (((size_t)b_idx * n_words + w) * heads + h_idx) * lq + row;
        const float gw = dmaps[mi];
        dm += gw * maps[mi];
        const float share = gw / (float)(word_off[w + 1] - word_off[w]);
        for (int p = word_off[w]; p < word_off[w + 1]; ++p) gc[word_pos[p]] += share;
    }
    delta_map[at] = dm;
}
STEER_EMU_EXPORT(attention_backward_prep)

// dS for one accumulator element: P (dP - D) plus the maps' term on the map columns.
struct DsRow {
    float lse2, lsem2, delta, delta_map;
};
__device__ __forceinline__ float ds_value(float x, float dp, const DsRow& st, bool in_map,
                                          float gv, bool valid) {
    if (!valid) return 0.f;
    float ds = exp2f(x - st.lse2) * (dp - st.delta);
    if (in_map) ds += exp2f(x - st.lsem2) * (gv - st.delta_map);
    return ds;
}
__device__ __forceinline__ DsRow ds_row(const float* lse, const float* lse_map, const float* delta,
                                        const float* delta_map, size_t at, bool in, bool capture) {
    // +inf for padding rows makes P zero there.
    return DsRow{in ? lse[at] * LOG2E : pos_inf(), in && capture ? lse_map[at] * LOG2E : pos_inf(),
                 in ? delta[at] : 0.f, in && capture ? delta_map[at] : 0.f};
}

// (min 1 block an SM: without it ptxas on sm_90 caps this kernel at 128 registers and spills.)
STEER_KERNEL void __launch_bounds__(ATT_THREADS, 1)
    attention_backward_dq(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ lse_map,
                          const float* __restrict__ delta, const float* __restrict__ delta_map,
                          const float* __restrict__ gcap, const int* __restrict__ cap_cols,
                          int ncap, int map_c0, int map_c1, int lq, int lk, int d, int dv,
                          float scale, bf16* __restrict__ dq) {
    const int bh = blockIdx.y, r0 = blockIdx.x * ATT_BQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int dp = round16(d), dvp = round16(dv);
    const int ldq = dp + ATT_PAD, ldv = dvp + ATT_PAD;
    STEER_DYNAMIC_SHARED(smem);
    char* carve = smem;
    int* colcap = take_i32(carve, ATT_BKQ);
    bf16* qs = take_bf16(carve, ATT_BQ * ldq);
    bf16* dos = take_bf16(carve, ATT_BQ * ldv);
    bf16* ks = take_bf16(carve, ATT_BKQ * ldq);
    bf16* vs = take_bf16(carve, ATT_BKQ * ldv);
    const bool capture = ncap > 0;
    const float scale_log2 = scale * LOG2E;
    q += (size_t)bh * lq * d;
    k += (size_t)bh * lk * d;
    v += (size_t)bh * lk * dv;
    dout += (size_t)bh * lq * dv;

    load_rows_now(qs, ldq, q, r0, ATT_BQ, lq, d, dp);
    load_rows_now(dos, ldv, dout, r0, ATT_BQ, lq, dv, dvp);

    DsRow st[2];
    int row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row[r] = r0 + warp * 16 + g + 8 * r;
        st[r] = ds_row(lse, lse_map, delta, delta_map, (size_t)bh * lq + row[r], row[r] < lq, capture);
    }
    float acc_dq[ATT_DMAX / 8][4];
#pragma unroll
    for (int j = 0; j < ATT_DMAX / 8; ++j)
        for (int i = 0; i < 4; ++i) acc_dq[j][i] = 0.f;

    for (int k0 = 0; k0 < lk; k0 += ATT_BKQ) {
        __syncthreads();
        load_rows_now(ks, ldq, k, k0, ATT_BKQ, lk, d, dp);
        load_rows_now(vs, ldv, v, k0, ATT_BKQ, lk, dv, dvp);
        if (threadIdx.x < ATT_BKQ) colcap[threadIdx.x] = capture_index(cap_cols, ncap, k0 + threadIdx.x);
        __syncthreads();

        float s[ATT_BKQ / 8][4], dpv[ATT_BKQ / 8][4];
        mma_tile<ATT_BKQ / 8>(s, qs + warp * 16 * ldq, ldq, ks, ldq, dp);
        mma_tile<ATT_BKQ / 8>(dpv, dos + warp * 16 * ldv, ldv, vs, ldv, dvp);
        u32 dsf[ATT_BKQ / 16][4];
#pragma unroll
        for (int j = 0; j < ATT_BKQ / 8; ++j) {
            float ds[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1, jl = j * 8 + 2 * t + (i & 1), col = k0 + jl;
                const bool in_map = capture && col >= map_c0 && col < map_c1;
                const int c = in_map ? colcap[jl] : -1;
                const float gv = (c >= 0 && row[r] < lq) ? gcap[((size_t)bh * lq + row[r]) * ncap + c] : 0.f;
                ds[i] = ds_value(s[j][i] * scale_log2, dpv[j][i], st[r], in_map, gv, col < lk);
            }
            dsf[j >> 1][2 * (j & 1)] = pack_bf16(float_to_bf16(ds[0]), float_to_bf16(ds[1]));
            dsf[j >> 1][2 * (j & 1) + 1] = pack_bf16(float_to_bf16(ds[2]), float_to_bf16(ds[3]));
        }
        mma_rows<true, ATT_DMAX / 8, ATT_BKQ / 16>(acc_dq, dsf, ks, ldq, dp, ATT_BKQ);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= lq) continue;
        bf16* out = dq + ((size_t)bh * lq + row[r]) * d;
#pragma unroll
        for (int j = 0; j < ATT_DMAX / 8; ++j) {
            const int col = j * 8 + 2 * t;
            if (col < d) out[col] = float_to_bf16(acc_dq[j][2 * r] * scale);
            if (col + 1 < d) out[col + 1] = float_to_bf16(acc_dq[j][2 * r + 1] * scale);
        }
    }
}
STEER_EMU_EXPORT(attention_backward_dq)

STEER_KERNEL void __launch_bounds__(ATT_THREADS)
    attention_backward_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k,
                            const bf16* __restrict__ v, const bf16* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ lse_map,
                            const float* __restrict__ delta, const float* __restrict__ delta_map,
                            const float* __restrict__ gcap, const int* __restrict__ cap_cols,
                            int ncap, int map_c0, int map_c1, int lq, int lk, int d, int dv,
                            float scale, bf16* __restrict__ dk, bf16* __restrict__ dvout) {
    const int bh = blockIdx.y, kb0 = blockIdx.x * ATT_BKB;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int dp = round16(d), dvp = round16(dv);
    const int ldq = dp + ATT_PAD, ldv = dvp + ATT_PAD;
    STEER_DYNAMIC_SHARED(smem);
    char* carve = smem;
    DsRow* stats = (DsRow*)take_f32(carve, 4 * ATT_BQB);
    bf16* ks = take_bf16(carve, ATT_BKB * ldq);
    bf16* vs = take_bf16(carve, ATT_BKB * ldv);
    bf16* qs = take_bf16(carve, ATT_BQB * ldq);
    bf16* dos = take_bf16(carve, ATT_BQB * ldv);
    const bool capture = ncap > 0;
    const float scale_log2 = scale * LOG2E;
    q += (size_t)bh * lq * d;
    k += (size_t)bh * lk * d;
    v += (size_t)bh * lk * dv;
    dout += (size_t)bh * lq * dv;

    load_rows_now(ks, ldq, k, kb0, ATT_BKB, lk, d, dp);
    load_rows_now(vs, ldv, v, kb0, ATT_BKB, lk, dv, dvp);
    // This lane's two keys (fragment rows): their captured-column index and map membership.
    int key[2], cidx[2];
    bool in_map[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        key[r] = kb0 + warp * 16 + g + 8 * r;
        cidx[r] = capture ? capture_index(cap_cols, ncap, key[r]) : -1;
        in_map[r] = capture && key[r] >= map_c0 && key[r] < map_c1 && key[r] < lk;
    }
    float acc_dk[ATT_DMAX / 8][4], acc_dv[ATT_DMAX / 8][4];
#pragma unroll
    for (int j = 0; j < ATT_DMAX / 8; ++j)
        for (int i = 0; i < 4; ++i) acc_dk[j][i] = acc_dv[j][i] = 0.f;

    for (int q0 = 0; q0 < lq; q0 += ATT_BQB) {
        __syncthreads();
        load_rows_now(qs, ldq, q, q0, ATT_BQB, lq, d, dp);
        load_rows_now(dos, ldv, dout, q0, ATT_BQB, lq, dv, dvp);
        if (threadIdx.x < ATT_BQB) {
            const int qi = q0 + threadIdx.x;
            stats[threadIdx.x] = ds_row(lse, lse_map, delta, delta_map, (size_t)bh * lq + qi, qi < lq, capture);
        }
        __syncthreads();

        float st[ATT_BQB / 8][4], dpt[ATT_BQB / 8][4];
        mma_tile<ATT_BQB / 8>(st, ks + warp * 16 * ldq, ldq, qs, ldq, dp);
        mma_tile<ATT_BQB / 8>(dpt, vs + warp * 16 * ldv, ldv, dos, ldv, dvp);
        u32 pf[ATT_BQB / 16][4], dsf[ATT_BQB / 16][4];
#pragma unroll
        for (int j = 0; j < ATT_BQB / 8; ++j) {
            float p[4], ds[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1, ql = j * 8 + 2 * t + (i & 1), qi = q0 + ql;
                const float x = st[j][i] * scale_log2;
                const DsRow& sr = stats[ql];
                p[i] = exp2f(x - sr.lse2);
                const float gv = (in_map[r] && cidx[r] >= 0 && qi < lq)
                                     ? gcap[((size_t)bh * lq + qi) * ncap + cidx[r]] : 0.f;
                ds[i] = ds_value(x, dpt[j][i], sr, in_map[r], gv, true);
            }
            pf[j >> 1][2 * (j & 1)] = pack_bf16(float_to_bf16(p[0]), float_to_bf16(p[1]));
            pf[j >> 1][2 * (j & 1) + 1] = pack_bf16(float_to_bf16(p[2]), float_to_bf16(p[3]));
            dsf[j >> 1][2 * (j & 1)] = pack_bf16(float_to_bf16(ds[0]), float_to_bf16(ds[1]));
            dsf[j >> 1][2 * (j & 1) + 1] = pack_bf16(float_to_bf16(ds[2]), float_to_bf16(ds[3]));
        }
        mma_rows<true, ATT_DMAX / 8, ATT_BQB / 16>(acc_dv, pf, dos, ldv, dvp, ATT_BQB);
        mma_rows<true, ATT_DMAX / 8, ATT_BQB / 16>(acc_dk, dsf, qs, ldq, dp, ATT_BQB);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (key[r] >= lk) continue;
        const size_t at = (size_t)bh * lk + key[r];
#pragma unroll
        for (int j = 0; j < ATT_DMAX / 8; ++j) {
            const int col = j * 8 + 2 * t;
            if (col < d) dk[at * d + col] = float_to_bf16(acc_dk[j][2 * r] * scale);
            if (col + 1 < d) dk[at * d + col + 1] = float_to_bf16(acc_dk[j][2 * r + 1] * scale);
            if (col < dv) dvout[at * dv + col] = float_to_bf16(acc_dv[j][2 * r]);
            if (col + 1 < dv) dvout[at * dv + col + 1] = float_to_bf16(acc_dv[j][2 * r + 1]);
        }
    }
}
STEER_EMU_EXPORT(attention_backward_dkdv)
