// Paged attention for CPU: prefill chunks and decodes in one kernel, reading K/V blocks in place
// through the block table (no gathered copy of the context).
//
// One work item is (sequence, KV head, tile of query tokens). Its rows are every query head of
// that KV head's group for every token of the tile (GQA without repeating K/V: each K/V row is
// read once and used by all the rows). Keys are visited in tiles of kTileKeys positions with an
// online softmax (running max and sum per row), accumulating in float32 whatever the dtypes of
// q and of the cache. Items are spread over threads with OpenMP, longest first.
//
// Built on first use by engine/kernels/cpu_extension.py with -O3 -march=native. The hot loops use
// GCC vector extensions (8 floats, one AVX2 register; split into two on NEON), so the same source
// builds for any host ISA. Decodes over contexts that do not fit the cache are bound by memory
// latency of the scattered blocks: the rows of the tiles ahead are prefetched while the current
// one is computed. Prefill items (many rows) are compute-bound and go GEMM-style: the key tile is
// transposed once, then 6-row x 16-key register-tiled passes score it and 6-row x 16-column passes
// accumulate the values. Items with few rows (decodes) score straight from the cache rows. Both
// paths compute every score, softmax step and value sum by the same operations in the same order
// (one accumulation order per element, whatever the grouping), and tiles start at absolute key
// positions, so a token's output is bit-identical as a decode, in a prefill or in a chunk
// (recompute after preemption and prefix caching rely on it).
//
// write_kv_cache (at the end) stores new tokens' K/V rows at their cache slots.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kTileKeys = 32;  // key positions per online-softmax step
constexpr int kMaxRows = 96;   // query rows (tokens x heads of a group) per work item

// Eight floats in one register (AVX/AVX2; two on NEON). Written explicitly in the hot loops
// because gcc keeps plain float arrays used as accumulators on the stack.
typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

typedef int32_t v8i __attribute__((vector_size(32)));
inline v8 max8v(v8 a, v8 b) { return a > b ? a : b; }

// exp(x) for x <= 0 on eight lanes (Cephes' single-precision polynomial, ~1 ulp; round-to-nearest
// through the 1.5 * 2^23 trick); x = -inf (a masked score) gives exactly 0.
inline v8 exp8(v8 x) {
  const v8i masked = x < splat8(-87.0f);
  const v8 xc = masked ? splat8(-87.0f) : x;
  const v8 magic = splat8(12582912.0f);
  const v8 n = (xc * splat8(1.44269504088896341f) + magic) - magic;
  const v8 r = xc - n * splat8(0.693359375f) + n * splat8(2.12194440e-4f);
  v8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * r * r + r + splat8(1.0f);
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 two_n;
  std::memcpy(&two_n, &e, sizeof two_n);
  return masked ? splat8(0.f) : p * two_n;
}

// Lane shuffles of GCC/clang vector extensions (__builtin_shufflevector from GCC 12 and clang;
// __builtin_shuffle with a mask vector on older GCC); they lower to in-register shuffles on
// AVX2, AVX-512 and NEON alike.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, v8i{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (what AVX's vhaddps computes).
inline v8 pair_sums(v8 a, v8 b) {
  return SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// Horizontal sums of eight registers at once: lane j of the result is the sum of the lanes x of
// a_j, always as ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) whichever j is. Seven vector
// adds and their shuffles instead of eight separate horizontal sums (which dominated the scoring
// at head_dim 64, where a dot product is only eight multiply-adds).
inline v8 sums8x8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
  const v8 lo = pair_sums(pair_sums(a0, a1), pair_sums(a2, a3));  // [a0..a3 lanes 0-3, a0..a3 lanes 4-7]
  const v8 hi = pair_sums(pair_sums(a4, a5), pair_sums(a6, a7));  // [a4..a7 lanes 0-3, a4..a7 lanes 4-7]
  return SHUFFLE8(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Lane j: q . k[j]. Each lane is computed by the same operations from its own (q, k[j]) alone
// (products summed per lane over the 8-column chunks of D in order, then the sums8x8 tree, then
// the columns past the last full chunk one by one), so a score does not depend on which keys or
// rows share its pass. score_block computes the same chain from a transposed key tile.
inline v8 dot8keys(const float* __restrict q, const float* const* k, int D) {
  v8 a0 = splat8(0.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8 x = load8(q + d);
    a0 += x * load8(k[0] + d); a1 += x * load8(k[1] + d); a2 += x * load8(k[2] + d); a3 += x * load8(k[3] + d);
    a4 += x * load8(k[4] + d); a5 += x * load8(k[5] + d); a6 += x * load8(k[6] + d); a7 += x * load8(k[7] + d);
  }
  v8 s = sums8x8(a0, a1, a2, a3, a4, a5, a6, a7);
  for (; d < D; ++d)  // one rounding per column, as score_block's lanes
    for (int j = 0; j < 8; ++j) s[j] = std::fma(q[d], k[j][d], s[j]);
  return s;
}

template <typename T>
inline void row_to_float(const T* __restrict src, float* __restrict dst, int n, float scale) {
  for (int d = 0; d < n; ++d) dst[d] = to_float(src[d]) * scale;
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int n, float scale) {
  for (int d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * scale);
}

struct WorkItem {
  int seq;       // sequence index
  int kv_head;
  int tok_begin; // query tokens [tok_begin, tok_end) of the sequence's new tokens
  int tok_end;
  int64_t cost;  // rows x keys visited, to run long items first
};

struct Problem {
  int head_dim, num_heads, num_kv_heads, group, block_size, max_blocks;
  int64_t q_stride_tok, q_stride_head;
  int64_t kv_stride_pos;  // elements between consecutive cache slots (num_kv_heads * head_dim)
  const int32_t* block_tables;
  const int32_t* seq_lens;
  const int32_t* query_start;
  float scale;
};

// A cache row as floats: for a float cache, the row itself; otherwise converted into buf.
template <typename KT>
inline const float* key_row(const KT* src, float* buf, int D) {
  if constexpr (std::is_same_v<KT, float>) {
    return src;
  } else {
    row_to_float(src, buf, D, 1.0f);
    return buf;
  }
}

// s[r, p] = q_r . k_p for the keys row r sees (key position <= its token's); lanes past them
// masked, but whole groups of eight past them are left as they were. The path of work items with
// few rows (decodes): keys are scored eight per pass (dot8keys) straight from the cache rows, each
// group of key rows reused from L1 by every row.
inline void score_tile(const float* qf, int rows, int G, const float* const* krow, int n, int ts, int first_pos,
                       int D, float* s) {
  const v8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const v8 masked = splat8(-std::numeric_limits<float>::infinity());
  for (int p0 = 0; p0 < n; p0 += 8) {
    // past the tile's end a lane reads the last key again; its score is masked below
    const float* k[8];
    for (int j = 0; j < 8; ++j) k[j] = krow[std::min(p0 + j, n - 1)];
    for (int r = 0, t = 0; r < rows; ++t) {  // token t's rows see keys up to position first_pos + t
      const int visible = std::min(n, first_pos + t + 1 - ts) - p0;  // keys of this group they see
      for (int g = 0; g < G; ++g, ++r) {
        if (visible <= 0) continue;  // s was filled with -inf
        const v8 sc = dot8keys(qf + r * D, k, D);
        store8(s + r * kTileKeys + p0, lane < splat8(static_cast<float>(visible)) ? sc : masked);
      }
    }
  }
}

// kT[d * kTileKeys + p] = krow[p][d]: the key tile transposed, so that one register holds element
// d of eight keys and a score is a chain of multiply-adds down d in one lane (no horizontal sums).
// Eight-by-eight blocks are transposed in registers; the columns past the last one, one by one.
inline void transpose_keys(const float* const* krow, int D, float* __restrict kT) {
  static_assert(kTileKeys % 8 == 0, "whole 8x8 blocks of keys");
  int d0 = 0;
  for (; d0 + 8 <= D; d0 += 8)
    for (int p0 = 0; p0 < kTileKeys; p0 += 8) {
      const float* const* k = krow + p0;
      const v8 r0 = load8(k[0] + d0), r1 = load8(k[1] + d0), r2 = load8(k[2] + d0), r3 = load8(k[3] + d0);
      const v8 r4 = load8(k[4] + d0), r5 = load8(k[5] + d0), r6 = load8(k[6] + d0), r7 = load8(k[7] + d0);
      // pairs of rows interleaved, then quads, then the 128-bit halves exchanged
      const v8 t0 = SHUFFLE8(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13), t1 = SHUFFLE8(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
      const v8 t2 = SHUFFLE8(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13), t3 = SHUFFLE8(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
      const v8 t4 = SHUFFLE8(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13), t5 = SHUFFLE8(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
      const v8 t6 = SHUFFLE8(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13), t7 = SHUFFLE8(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
      const v8 u0 = SHUFFLE8(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13), u1 = SHUFFLE8(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
      const v8 u2 = SHUFFLE8(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13), u3 = SHUFFLE8(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
      const v8 u4 = SHUFFLE8(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13), u5 = SHUFFLE8(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
      const v8 u6 = SHUFFLE8(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13), u7 = SHUFFLE8(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
      float* o = kT + d0 * kTileKeys + p0;
      store8(o + 0 * kTileKeys, SHUFFLE8(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
      store8(o + 1 * kTileKeys, SHUFFLE8(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
      store8(o + 2 * kTileKeys, SHUFFLE8(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
      store8(o + 3 * kTileKeys, SHUFFLE8(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
      store8(o + 4 * kTileKeys, SHUFFLE8(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
      store8(o + 5 * kTileKeys, SHUFFLE8(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
      store8(o + 6 * kTileKeys, SHUFFLE8(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
      store8(o + 7 * kTileKeys, SHUFFLE8(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
    }
  for (; d0 < D; ++d0)
    for (int p = 0; p < kTileKeys; ++p) kT[d0 * kTileKeys + p] = krow[p][d0];
}

constexpr int kBlockRows = 6;  // rows per register-tiled pass: 6 x 2 accumulators + 2 loads + 1 broadcast
constexpr int kTiledRows = 2 * kBlockRows;  // work items with fewer rows score keys straight from the cache

// Makes the compiler keep v in a register: without it, gcc folds the key (value) loads into the
// multiply-adds as memory operands, reloading them once per row and running out of load slots.
#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER(v) asm("" : "+x"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

// s[r, h .. h + 16) = q_r . k_p for R rows and the 16 keys from h, unmasked: the path of work
// items with many rows (prefill). Register tiled: each key load serves R rows, each broadcast q
// element two registers of keys. Lane j of partial sum A_l is dot8keys' lane l of key j (the
// products of the columns d = l mod 8, chunk by chunk), and the partial sums are combined
// vertically in sums8x8's order ((A0 + A1) + (A2 + A3)) + ((A4 + A5) + (A6 + A7)), then the
// columns past the last full chunk one by one: bit for bit dot8keys, so a token's scores do not
// depend on the path its item takes (decode, prefill, chunk), on R, h or the other rows and keys.
template <int R>
inline void score_block(const float* __restrict q, int D, const float* __restrict kT, int h, float* __restrict s) {
  const int chunks = D / 8;
  float t[3][R][16];  // pending partial sums of the tree
  v8 a[R][2];
#pragma GCC unroll 8
  for (int l = 0; l < 8; ++l) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = splat8(0.f);
    for (int c = 0; c < chunks; ++c) {
      const float* kd = kT + (8 * c + l) * kTileKeys + h;
      v8 k0 = load8(kd), k1 = load8(kd + 8);
      IN_REGISTER(k0);
      IN_REGISTER(k1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const v8 x = splat8(q[r * D + 8 * c + l]);
        a[r][0] += x * k0;
        a[r][1] += x * k1;
      }
    }
    // slot 0: A0 + A1, then (A0 + A1) + (A2 + A3); slot 1: A2 + A3, then A4 + A5; slot 2: A6
    const int slot = l < 2 ? 0 : l < 4 ? 1 : l < 6 ? 1 : 2;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 2; ++i) {
        float* ts = t[slot][r] + 8 * i;
        if (l % 2 == 0 && l < 7) {
          store8(ts, a[r][i]);
        } else if (l == 3) {
          store8(t[0][r] + 8 * i, load8(t[0][r] + 8 * i) + (load8(ts) + a[r][i]));
        } else if (l == 7) {
          a[r][i] = load8(t[0][r] + 8 * i) + (load8(t[1][r] + 8 * i) + (load8(t[2][r] + 8 * i) + a[r][i]));
        } else {
          store8(ts, load8(ts) + a[r][i]);
        }
      }
    // the partial sums live in t, not in registers the next chains need
    asm volatile("" : : "r"(&t[0][0][0]) : "memory");
  }
  for (int d = 8 * chunks; d < D; ++d) {
    const v8 k0 = load8(kT + d * kTileKeys + h), k1 = load8(kT + d * kTileKeys + h + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const v8 x = splat8(q[r * D + d]);
      a[r][0] += x * k0;
      a[r][1] += x * k1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store8(s + r * kTileKeys + h, a[r][0]), store8(s + r * kTileKeys + h + 8, a[r][1]);
}

// acc[r] += sum_{p < np} w[r, p] * v_p for R rows, 16 (then 8, then 1) columns at a time, each
// value load serving R rows. Element (r, c) is the chain acc = acc + w[r, p] * v_p[c] (one
// rounding) over p in order whatever R; a key a row does not see has weight exactly 0 there.
template <int R>
inline void values_block(const float* __restrict w, int np, const float* const* vrow, int D, float* __restrict acc) {
  int c = 0;
  if constexpr (R <= 2) {  // decodes: enough independent chains to hide the multiply-add latency
    for (; c + 32 <= D; c += 32) {
      v8 a[R][4];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) a[r][i] = load8(acc + r * D + c + 8 * i);
      for (int p = 0; p < np; ++p) {
        v8 v0 = load8(vrow[p] + c), v1 = load8(vrow[p] + c + 8), v2 = load8(vrow[p] + c + 16), v3 = load8(vrow[p] + c + 24);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const v8 x = splat8(w[r * kTileKeys + p]);
          a[r][0] += x * v0; a[r][1] += x * v1; a[r][2] += x * v2; a[r][3] += x * v3;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) store8(acc + r * D + c + 8 * i, a[r][i]);
    }
  }
  for (; c + 16 <= D; c += 16) {
    v8 a[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r][0] = load8(acc + r * D + c), a[r][1] = load8(acc + r * D + c + 8);
    for (int p = 0; p < np; ++p) {
      v8 v0 = load8(vrow[p] + c), v1 = load8(vrow[p] + c + 8);
      IN_REGISTER(v0);
      IN_REGISTER(v1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const v8 x = splat8(w[r * kTileKeys + p]);
        a[r][0] += x * v0;
        a[r][1] += x * v1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) store8(acc + r * D + c, a[r][0]), store8(acc + r * D + c + 8, a[r][1]);
  }
  for (; c + 8 <= D; c += 8) {
    v8 a[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] = load8(acc + r * D + c);
    for (int p = 0; p < np; ++p) {
      v8 v0 = load8(vrow[p] + c);
      IN_REGISTER(v0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r] += splat8(w[r * kTileKeys + p]) * v0;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) store8(acc + r * D + c, a[r]);
  }
  // an explicit fma: a plain `+= w * v` here may be vectorized over p as products then an
  // in-order sum of them, two roundings where the vector paths above make one
  for (; c < D; ++c)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < np; ++p) acc[r * D + c] = std::fma(w[r * kTileKeys + p], vrow[p][c], acc[r * D + c]);
}

// Calls f.template operator()<R>(r0) for blocks of kBlockRows rows, then one block of the rest.
template <typename F>
inline void for_row_blocks(int rows, F&& f) {
  int r0 = 0;
  for (; r0 + kBlockRows <= rows; r0 += kBlockRows) f(std::integral_constant<int, kBlockRows>{}, r0);
  switch (rows - r0) {
    case 1: f(std::integral_constant<int, 1>{}, r0); break;
    case 2: f(std::integral_constant<int, 2>{}, r0); break;
    case 3: f(std::integral_constant<int, 3>{}, r0); break;
    case 4: f(std::integral_constant<int, 4>{}, r0); break;
    case 5: f(std::integral_constant<int, 5>{}, r0); break;
    default: break;
  }
}

// [max(a0, a1), max(a2, a3), max(b0, b1), max(b2, b3), ...]: pair_sums with max.
inline v8 pair_maxes(v8 a, v8 b) {
  return max8v(SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14), SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15));
}

// Online softmax step over one tile's scores, eight rows at a time with the bookkeeping in vectors
// (lane i: row i): new max per row, s <- exp(s - max), l <- l * corr + row sum, acc rows rescaled
// by corr = exp(old max - new max) where it changed. m and l have room for whole groups of eight
// (the lanes past the rows hold 0 and see nothing). Each row's results are computed from its own
// scores alone, by the same operations whichever rows share its group.
inline void softmax_tile(float* __restrict s, int rows, float* __restrict m, float* __restrict l,
                         float* __restrict acc, int D) {
  static_assert(kTileKeys == 32, "four registers of scores per row");
  const v8 none = splat8(-std::numeric_limits<float>::infinity());
  for (int r0 = 0; r0 < rows; r0 += 8) {
    const int nr = std::min(8, rows - r0);
    v8 t[8];
    for (int i = 0; i < 8; ++i) {
      const float* sr = s + (r0 + i) * kTileKeys;
      t[i] = i < nr ? max8v(max8v(load8(sr), load8(sr + 8)), max8v(load8(sr + 16), load8(sr + 24))) : none;
    }
    const v8 lo = pair_maxes(pair_maxes(t[0], t[1]), pair_maxes(t[2], t[3]));
    const v8 hi = pair_maxes(pair_maxes(t[4], t[5]), pair_maxes(t[6], t[7]));
    const v8 row_max = max8v(SHUFFLE8(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11), SHUFFLE8(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15));
    const v8 old_max = load8(m + r0);
    // the first tile holds key 0, which every row sees, so the max is finite from there on
    const v8 mx = max8v(old_max, row_max);
    const v8 corr = exp8(old_max - mx);
    store8(m + r0, mx);
    for (int i = 0; i < 8; ++i) {
      if (i >= nr) {
        t[i] = splat8(0.f);
        continue;
      }
      float* sr = s + (r0 + i) * kTileKeys;
      const v8 mv = splat8(mx[i]);
      const v8 x0 = exp8(load8(sr) - mv), x1 = exp8(load8(sr + 8) - mv);
      const v8 x2 = exp8(load8(sr + 16) - mv), x3 = exp8(load8(sr + 24) - mv);
      store8(sr, x0); store8(sr + 8, x1); store8(sr + 16, x2); store8(sr + 24, x3);
      t[i] = (x0 + x1) + (x2 + x3);
    }
    const v8 row_sum = sums8x8(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
    store8(l + r0, load8(l + r0) * corr + row_sum);
    for (int i = 0; i < nr; ++i)
      if (corr[i] != 1.0f) {
        float* ar = acc + (r0 + i) * D;
        for (int d = 0; d < D; ++d) ar[d] *= corr[i];
      }
  }
}

// Element offsets (from a head's first element) of the cache slots of positions [ts, ts + n),
// walking the block table (one division per tile, not one per key).
inline void tile_offsets(const Problem& pb, const int32_t* table, int ts, int n, int64_t* off) {
  int block = ts / pb.block_size, in_block = ts - block * pb.block_size;
  for (int p = 0; p < n; ++p) {
    off[p] = (static_cast<int64_t>(table[block]) * pb.block_size + in_block) * pb.kv_stride_pos;
    if (++in_block == pb.block_size) in_block = 0, ++block;
  }
}

template <typename T>
inline void prefetch_row(const T* row, int n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < static_cast<int64_t>(n) * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 1);
}

// Attends the rows of one work item. QT: dtype of q and out; KT: dtype of the cache.
template <typename QT, typename KT>
void attend_item(const Problem& pb, const WorkItem& it, const QT* q, const KT* k_cache, const KT* v_cache,
                 QT* out, std::vector<float>& scratch) {
  const int D = pb.head_dim, G = pb.group;
  const int ntok = it.tok_end - it.tok_begin;
  const int rows = ntok * G;
  const int q_begin = pb.query_start[it.seq];
  const int qlen = pb.query_start[it.seq + 1] - q_begin;
  const int ctx = pb.seq_lens[it.seq];
  const int first_pos = ctx - qlen + it.tok_begin;  // position of the item's first token
  const int kv_end = first_pos + ntok;               // keys [0, kv_end) are visible to some row
  const int32_t* table = pb.block_tables + static_cast<int64_t>(it.seq) * pb.max_blocks;

  const int rows8 = (rows + 7) / 8 * 8;
  scratch.resize(static_cast<size_t>(rows8) * (2 * D + kTileKeys + 2) + 3 * kTileKeys * D + D);
  float* qf = scratch.data();                 // [rows, D] scaled queries
  float* acc = qf + rows * D;                 // [rows, D] running weighted sum of values
  float* s = acc + rows * D;                  // [rows, kTileKeys] scores, then probabilities
  float* m = s + rows8 * kTileKeys;           // [rows8] running max
  float* l = m + rows8;                       // [rows8] running sum of exp
  float* kt = l + rows8;                      // [kTileKeys, D] key tile (as floats)
  float* vt = kt + kTileKeys * D;             // [kTileKeys, D] value tile (as floats)
  float* kT = vt + kTileKeys * D;             // [D, kTileKeys] key tile transposed
  float* zero = kT + kTileKeys * D;           // [D] zeros: the keys past a tile's end
  std::fill(zero, zero + D, 0.f);

  for (int t = 0; t < ntok; ++t)
    for (int g = 0; g < G; ++g) {
      const QT* src = q + (q_begin + it.tok_begin + t) * pb.q_stride_tok + (it.kv_head * G + g) * pb.q_stride_head;
      row_to_float(src, qf + (t * G + g) * D, D, pb.scale);
    }
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(m + rows, m + rows8, 0.f);  // lanes past the rows: finite, so no NaN from -inf - -inf
  std::fill(l, l + rows8, 0.f);

  const KT* k_head = k_cache + it.kv_head * D;
  const KT* v_head = v_cache + it.kv_head * D;
  // The rows of a tile are scattered over blocks, which defeats the hardware prefetcher: K lines
  // are requested kKeyAhead tiles ahead, before a tile's scores, and V lines one tile ahead,
  // before its values. (One burst of both, one tile ahead, measured 1.25x slower on a cold cache:
  // the core stalls once its miss buffers are full. Into L1 rather than L2, or in eight-key
  // slices between the scoring passes, measured slower; K three tiles ahead, no better.)
  constexpr int kKeyAhead = 2;
  int64_t offsets[kKeyAhead + 1][kTileKeys];  // cache offsets of the slots of tiles i .. i + kKeyAhead (a ring)
  const auto tile_n = [&](int i) { return std::max(0, std::min(kTileKeys, kv_end - i * kTileKeys)); };
  for (int i = 0; i < kKeyAhead; ++i) {
    tile_offsets(pb, table, i * kTileKeys, tile_n(i), offsets[i]);
    for (int p = 0; i > 0 && p < tile_n(i); ++p) prefetch_row(k_head + offsets[i][p], D);
  }
  for (int ts = 0, i = 0; ts < kv_end; ts += kTileKeys, ++i) {
    const int n = tile_n(i);
    const int64_t* slot_off = offsets[i % (kKeyAhead + 1)];
    const int64_t* next_off = offsets[(i + 1) % (kKeyAhead + 1)];
    const int n_next = tile_n(i + 1), n_ahead = tile_n(i + kKeyAhead);
    int64_t* ahead_off = offsets[(i + kKeyAhead) % (kKeyAhead + 1)];
    tile_offsets(pb, table, ts + kKeyAhead * kTileKeys, n_ahead, ahead_off);
    for (int p = 0; p < n_ahead; ++p) prefetch_row(k_head + ahead_off[p], D);
    const float* krow[kTileKeys];  // key rows as floats: in the cache itself for a float cache
    for (int p = 0; p < n; ++p) krow[p] = key_row(k_head + slot_off[p], kt + p * D, D);
    int visible[kMaxRows];  // keys of this tile row r sees (<= 0: none)
    for (int t = 0, r = 0; r < rows; ++t)  // token t's rows see keys up to position first_pos + t
      for (int g = 0; g < G; ++g, ++r) visible[r] = std::min(n, first_pos + t + 1 - ts);
    if (rows >= kTiledRows) {  // the transposed tile pays for itself over enough rows
      for (int p = n; p < kTileKeys; ++p) krow[p] = zero;
      transpose_keys(krow, D, kT);
      // rows in order, so a block's last row sees the most keys
      for_row_blocks(rows, [&](auto R, int r0) {
        for (int h = 0; h < kTileKeys && h < visible[r0 + decltype(R)::value - 1]; h += 16)
          score_block<decltype(R)::value>(qf + r0 * D, D, kT, h, s + r0 * kTileKeys);
      });
    } else {
      score_tile(qf, rows, G, krow, n, ts, first_pos, D, s);
    }
    for (int r = 0; r < rows; ++r)  // the keys a row does not see (some, in the tiles of its own position)
      for (int p = std::max(0, visible[r]); p < kTileKeys; ++p) s[r * kTileKeys + p] = -std::numeric_limits<float>::infinity();
    softmax_tile(s, rows, m, l, acc, D);
    for (int p = 0; p < n_next; ++p) prefetch_row(v_head + next_off[p], D);
    const float* vrow[kTileKeys];  // value rows as floats: in the cache itself for a float cache
    for (int p = 0; p < n; ++p) vrow[p] = key_row(v_head + slot_off[p], vt + p * D, D);
    for_row_blocks(rows, [&](auto R, int r0) {
      const int np = visible[r0 + decltype(R)::value - 1];
      if (np > 0) values_block<decltype(R)::value>(s + r0 * kTileKeys, np, vrow, D, acc + r0 * D);
    });
  }
  for (int t = 0; t < ntok; ++t)
    for (int g = 0; g < G; ++g) {
      const int r = t * G + g;
      QT* dst = out + ((q_begin + it.tok_begin + t) * static_cast<int64_t>(pb.num_heads) + it.kv_head * G + g) * D;
      store_row(acc + r * D, dst, D, 1.0f / l[r]);  // l >= 1: every row sees its own key
    }
}

template <typename QT, typename KT>
void run(const Problem& pb, const std::vector<WorkItem>& items, const at::Tensor& q, const at::Tensor& kv_cache,
         at::Tensor& out) {
  const QT* qp = q.data_ptr<QT>();
  const KT* kp = kv_cache.data_ptr<KT>();
  const KT* vp = kp + kv_cache.stride(0);
  QT* op = out.data_ptr<QT>();
  const int64_t n = static_cast<int64_t>(items.size());
#ifdef _OPENMP
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) attend_item<QT, KT>(pb, items[i], qp, kp, vp, op, scratch);
  }
#else
  std::vector<float> scratch;
  for (int64_t i = 0; i < n; ++i) attend_item<QT, KT>(pb, items[i], qp, kp, vp, op, scratch);
#endif
}

template <typename QT>
void dispatch_cache(const Problem& pb, const std::vector<WorkItem>& items, const at::Tensor& q,
                    const at::Tensor& kv_cache, at::Tensor& out) {
  switch (kv_cache.scalar_type()) {
    case at::kFloat: return run<QT, float>(pb, items, q, kv_cache, out);
    case at::kBFloat16: return run<QT, c10::BFloat16>(pb, items, q, kv_cache, out);
    case at::kHalf: return run<QT, c10::Half>(pb, items, q, kv_cache, out);
    default: TORCH_CHECK(false, "paged_attention: unsupported cache dtype ", kv_cache.scalar_type());
  }
}

// out [T, H, D] (contiguous) = attention of q [T, H, D] (last dim contiguous) over the paged
// cache [2, num_blocks, block_size, KVH, D]; block_tables int32 [B, max_blocks]; seq_lens int32 [B]
// (context length including the new tokens); query_start_loc int32 [B + 1]. The new tokens' K/V
// must already be in the cache.
void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && kv_cache.dim() == 5, "paged_attention: bad ranks");
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "paged_attention: CPU tensors only");
  TORCH_CHECK(q.stride(2) == 1 && out.is_contiguous() && kv_cache.is_contiguous(), "paged_attention: layout");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "paged_attention: out shape/dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt && block_tables.is_contiguous() &&
                  seq_lens.is_contiguous() && query_start_loc.is_contiguous(),
              "paged_attention: metadata must be contiguous int32");
  const int num_seqs = static_cast<int>(seq_lens.size(0));
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1 && block_tables.size(0) >= num_seqs, "paged_attention: metadata sizes");
  Problem pb;
  pb.head_dim = static_cast<int>(q.size(2));
  pb.num_heads = static_cast<int>(q.size(1));
  pb.num_kv_heads = static_cast<int>(kv_cache.size(3));
  TORCH_CHECK(kv_cache.size(0) == 2 && kv_cache.size(4) == pb.head_dim && pb.num_heads % pb.num_kv_heads == 0,
              "paged_attention: cache shape does not match q");
  pb.group = pb.num_heads / pb.num_kv_heads;
  TORCH_CHECK(pb.group <= kMaxRows, "paged_attention: more than ", kMaxRows, " query heads per KV head");
  pb.block_size = static_cast<int>(kv_cache.size(2));
  pb.max_blocks = static_cast<int>(block_tables.size(1));
  pb.q_stride_tok = q.stride(0);
  pb.q_stride_head = q.stride(1);
  pb.kv_stride_pos = static_cast<int64_t>(pb.num_kv_heads) * pb.head_dim;
  pb.block_tables = block_tables.data_ptr<int32_t>();
  pb.seq_lens = seq_lens.data_ptr<int32_t>();
  pb.query_start = query_start_loc.data_ptr<int32_t>();
  pb.scale = static_cast<float>(scale);
  TORCH_CHECK(pb.query_start[num_seqs] <= q.size(0), "paged_attention: query_start_loc past the tokens");

  // tokens per work item: rows (tokens x group) a multiple of kBlockRows where possible, so that no
  // narrower pass is left over
  int tile_tokens = std::max(1, kMaxRows / pb.group);
  while (tile_tokens > 1 && (tile_tokens * pb.group) % kBlockRows != 0) --tile_tokens;
  if ((tile_tokens * pb.group) % kBlockRows != 0) tile_tokens = std::max(1, kMaxRows / pb.group);
  std::vector<WorkItem> items;
  for (int i = 0; i < num_seqs; ++i) {
    const int qlen = pb.query_start[i + 1] - pb.query_start[i];
    const int ctx = pb.seq_lens[i];
    TORCH_CHECK(qlen >= 0 && qlen <= ctx && (ctx + pb.block_size - 1) / pb.block_size <= pb.max_blocks,
                "paged_attention: sequence ", i, " has query length ", qlen, " and context ", ctx);
    for (int t0 = 0; t0 < qlen; t0 += tile_tokens) {
      const int t1 = std::min(qlen, t0 + tile_tokens);
      const int64_t cost = static_cast<int64_t>(t1 - t0) * (ctx - qlen + t1);
      for (int h = 0; h < pb.num_kv_heads; ++h) items.push_back({i, h, t0, t1, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });

  switch (q.scalar_type()) {
    case at::kFloat: return dispatch_cache<float>(pb, items, q, kv_cache, out);
    case at::kBFloat16: return dispatch_cache<c10::BFloat16>(pb, items, q, kv_cache, out);
    case at::kHalf: return dispatch_cache<c10::Half>(pb, items, q, kv_cache, out);
    default: TORCH_CHECK(false, "paged_attention: unsupported q dtype ", q.scalar_type());
  }
}

// Copies n elements, converted to the cache's dtype as Tensor.to converts them (float to bfloat16
// or float16 rounds to nearest even; through float between the two 16-bit types).
template <typename ST, typename CT>
inline void convert_row(const ST* __restrict src, CT* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<ST, CT>) {
    std::memcpy(dst, src, n * sizeof(CT));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<CT>(to_float(src[i]));
  }
}

template <typename ST, typename CT>
void write_rows(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache, const int64_t* slots64,
                const int32_t* slots32) {
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), row = H * D;
  CT* k_cache = kv_cache.data_ptr<CT>();
  CT* v_cache = k_cache + kv_cache.stride(0);
  const ST* kp = k.data_ptr<ST>();
  const ST* vp = v.data_ptr<ST>();
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots64 != nullptr ? slots64[t] : slots32[t];
      if (slot < 0) continue;  // padding
      for (int64_t h = 0; h < H; ++h) {
        convert_row(kp + t * k.stride(0) + h * k.stride(1), k_cache + slot * row + h * D, D);
        convert_row(vp + t * v.stride(0) + h * v.stride(1), v_cache + slot * row + h * D, D);
      }
    }
  });
}

template <typename ST>
void write_rows_to(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache, const int64_t* s64, const int32_t* s32) {
  switch (kv_cache.scalar_type()) {
    case at::kFloat: return write_rows<ST, float>(k, v, kv_cache, s64, s32);
    case at::kBFloat16: return write_rows<ST, c10::BFloat16>(k, v, kv_cache, s64, s32);
    case at::kHalf: return write_rows<ST, c10::Half>(k, v, kv_cache, s64, s32);
    default: TORCH_CHECK(false, "write_kv_cache: unsupported cache dtype ", kv_cache.scalar_type());
  }
}

// Stores k[t] and v[t] ([T, KVH, D], last dim contiguous, e.g. views of a fused projection) at slot
// slot_mapping[t] (int64 or int32 [T]) of kv_cache [2, num_blocks, block_size, KVH, D], converted
// to the cache's dtype; tokens with a negative slot (padding) are skipped. Bit for bit what
// torch_attention.write_kv stores, in one pass (no index_copy_ pair, no mask).
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor kv_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type() && kv_cache.dim() == 5,
              "write_kv_cache: k and v must be [T, KVH, D] of one dtype, the cache 5-D");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && kv_cache.device().is_cpu() && slot_mapping.device().is_cpu(),
              "write_kv_cache: CPU tensors only");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.size(0) == 2 && kv_cache.size(3) == k.size(1) &&
                  kv_cache.size(4) == k.size(2),
              "write_kv_cache: cache shape does not match k/v");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "write_kv_cache: k/v last dim must be contiguous");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.is_contiguous() &&
                  (slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt),
              "write_kv_cache: slot_mapping must be contiguous int64 or int32 [T]");
  const bool wide = slot_mapping.scalar_type() == at::kLong;
  const int64_t* s64 = wide ? slot_mapping.data_ptr<int64_t>() : nullptr;
  const int32_t* s32 = wide ? nullptr : slot_mapping.data_ptr<int32_t>();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  for (int64_t t = 0; t < k.size(0); ++t) {
    const int64_t slot = wide ? s64[t] : s32[t];
    TORCH_CHECK(slot < num_slots, "write_kv_cache: slot ", slot, " of token ", t, " is past the cache's ", num_slots);
  }
  switch (k.scalar_type()) {
    case at::kFloat: return write_rows_to<float>(k, v, kv_cache, s64, s32);
    case at::kBFloat16: return write_rows_to<c10::BFloat16>(k, v, kv_cache, s64, s32);
    case at::kHalf: return write_rows_to<c10::Half>(k, v, kv_cache, s64, s32);
    default: TORCH_CHECK(false, "write_kv_cache: unsupported k/v dtype ", k.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale) -> ()");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv_cache", &write_kv_cache);
}
