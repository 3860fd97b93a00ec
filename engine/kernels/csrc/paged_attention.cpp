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
// one is computed.
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
constexpr int kMaxRows = 64;   // query rows (tokens x heads of a group) per work item

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
inline float sum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp), written branch-free so that a
// loop of it vectorizes; x = -inf (a masked score) gives exactly 0.
inline float exp_nonpositive(float x) {
  const bool masked = x < -87.0f;
  const float xc = masked ? -87.0f : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, sizeof two_n);
  return masked ? 0.0f : p * two_n;
}

typedef int32_t v8i __attribute__((vector_size(32)));
inline v8 max8v(v8 a, v8 b) { return a > b ? a : b; }
inline float max8(v8 v) {
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, v[l]);
  return m;
}

// exp_nonpositive on eight lanes (same polynomial; round-to-nearest through the 1.5 * 2^23 trick).
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
// rows share its pass.
inline v8 dot8keys(const float* __restrict q, const float* const* k, int D) {
  v8 a0 = splat8(0.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8 x = load8(q + d);
    a0 += x * load8(k[0] + d); a1 += x * load8(k[1] + d); a2 += x * load8(k[2] + d); a3 += x * load8(k[3] + d);
    a4 += x * load8(k[4] + d); a5 += x * load8(k[5] + d); a6 += x * load8(k[6] + d); a7 += x * load8(k[7] + d);
  }
  v8 s = sums8x8(a0, a1, a2, a3, a4, a5, a6, a7);
  for (; d < D; ++d)
    for (int j = 0; j < 8; ++j) s[j] += q[d] * k[j][d];
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

// s[r, p] = q_r . k_p for the keys row r sees (key position <= its token's), -inf for the rest.
// Keys are scored eight per pass (dot8keys), each group of key rows reused from L1 by every row.
// Decodes and prefill rows take this same path, every score is computed by the same operations
// whatever else shares its pass, and tiles start at absolute positions (multiples of
// kTileKeys), so a token's attention output is bit-identical whether it is computed as a decode,
// in a prefill or in a chunk (recompute after preemption relies on it).
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

// acc[r] += sum_p w[r, p] * v_p, 32 output columns at a time held in registers.
template <typename KT>
void accumulate_values(const float* w, int rows, int G, const KT* v_head, const int64_t* slot_off, int n, int ts,
                       int first_pos, int D, float* vt, float* acc) {
  const float* vrow[kTileKeys];  // value rows as floats: in the cache itself for a float cache
  for (int p = 0; p < n; ++p) vrow[p] = key_row(v_head + slot_off[p], vt + p * D, D);
  constexpr int kCols = 32;
  int r = 0;
  // two rows at a time: eight independent accumulator chains, each value load used twice. A key
  // the first row does not see has weight exactly 0 there.
  for (; r + 2 <= rows; r += 2) {
    const float* w0 = w + r * kTileKeys;
    const float* w1 = w0 + kTileKeys;
    const int visible = std::min(n, first_pos + (r + 1) / G + 1 - ts);
    float* a = acc + r * D;
    float* b = a + D;
    int d0 = 0;
    for (; d0 + kCols <= D; d0 += kCols) {
      v8 a0 = load8(a + d0), a1 = load8(a + d0 + 8), a2 = load8(a + d0 + 16), a3 = load8(a + d0 + 24);
      v8 b0 = load8(b + d0), b1 = load8(b + d0 + 8), b2 = load8(b + d0 + 16), b3 = load8(b + d0 + 24);
      for (int p = 0; p < visible; ++p) {
        const v8 x = splat8(w0[p]), y = splat8(w1[p]);
        const float* vr = vrow[p] + d0;
        const v8 v0 = load8(vr), v1 = load8(vr + 8), v2 = load8(vr + 16), v3 = load8(vr + 24);
        a0 += x * v0; a1 += x * v1; a2 += x * v2; a3 += x * v3;
        b0 += y * v0; b1 += y * v1; b2 += y * v2; b3 += y * v3;
      }
      store8(a + d0, a0); store8(a + d0 + 8, a1); store8(a + d0 + 16, a2); store8(a + d0 + 24, a3);
      store8(b + d0, b0); store8(b + d0 + 8, b1); store8(b + d0 + 16, b2); store8(b + d0 + 24, b3);
    }
    for (; d0 < D; ++d0)
      for (int p = 0; p < visible; ++p) {
        a[d0] += w0[p] * vrow[p][d0];
        b[d0] += w1[p] * vrow[p][d0];
      }
  }
  for (; r < rows; ++r) {
    const float* wr = w + r * kTileKeys;
    const int visible = std::min(n, first_pos + r / G + 1 - ts);
    float* ar = acc + r * D;
    int d0 = 0;
    for (; d0 + kCols <= D; d0 += kCols) {
      v8 a0 = load8(ar + d0), a1 = load8(ar + d0 + 8), a2 = load8(ar + d0 + 16), a3 = load8(ar + d0 + 24);
      for (int p = 0; p < visible; ++p) {
        const v8 x = splat8(wr[p]);
        const float* vr = vrow[p] + d0;
        a0 += x * load8(vr); a1 += x * load8(vr + 8); a2 += x * load8(vr + 16); a3 += x * load8(vr + 24);
      }
      store8(ar + d0, a0); store8(ar + d0 + 8, a1); store8(ar + d0 + 16, a2); store8(ar + d0 + 24, a3);
    }
    for (; d0 < D; ++d0)
      for (int p = 0; p < visible; ++p) ar[d0] += wr[p] * vrow[p][d0];
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

  scratch.resize(static_cast<size_t>(rows) * (2 * D + kTileKeys + 2) + 2 * kTileKeys * D);
  float* qf = scratch.data();                 // [rows, D] scaled queries
  float* acc = qf + rows * D;                 // [rows, D] running weighted sum of values
  float* s = acc + rows * D;                  // [rows, kTileKeys] scores, then probabilities
  float* m = s + rows * kTileKeys;            // [rows] running max
  float* l = m + rows;                        // [rows] running sum of exp
  float* kt = l + rows;                       // [kTileKeys, D] key tile (as floats)
  float* vt = kt + kTileKeys * D;             // [kTileKeys, D] value tile (as floats)

  for (int t = 0; t < ntok; ++t)
    for (int g = 0; g < G; ++g) {
      const QT* src = q + (q_begin + it.tok_begin + t) * pb.q_stride_tok + (it.kv_head * G + g) * pb.q_stride_head;
      row_to_float(src, qf + (t * G + g) * D, D, pb.scale);
    }
  std::fill(acc, acc + rows * D, 0.f);
  std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
  std::fill(l, l + rows, 0.f);

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
    std::fill(s, s + rows * kTileKeys, -std::numeric_limits<float>::infinity());
    const float* krow[kTileKeys];  // key rows as floats: in the cache itself for a float cache
    for (int p = 0; p < n; ++p) krow[p] = key_row(k_head + slot_off[p], kt + p * D, D);
    score_tile(qf, rows, G, krow, n, ts, first_pos, D, s);
    // online softmax: rescale what was accumulated under the old max
    for (int r = 0; r < rows; ++r) {
      float* sr = s + r * kTileKeys;
      static_assert(kTileKeys == 32, "four registers of scores per row");
      v8 x0 = load8(sr), x1 = load8(sr + 8), x2 = load8(sr + 16), x3 = load8(sr + 24);
      const float mx = std::max(m[r], max8(max8v(max8v(x0, x1), max8v(x2, x3))));
      // the first tile holds key 0, which every row sees, so mx is finite from here on
      const float corr = exp_nonpositive(m[r] - mx);
      const v8 mv = splat8(mx);
      x0 = exp8(x0 - mv); x1 = exp8(x1 - mv); x2 = exp8(x2 - mv); x3 = exp8(x3 - mv);
      store8(sr, x0); store8(sr + 8, x1); store8(sr + 16, x2); store8(sr + 24, x3);
      const float sum = sum8((x0 + x1) + (x2 + x3));
      l[r] = l[r] * corr + sum;
      m[r] = mx;
      if (corr != 1.0f) {
        float* ar = acc + r * D;
        for (int d = 0; d < D; ++d) ar[d] *= corr;
      }
    }
    for (int p = 0; p < n_next; ++p) prefetch_row(v_head + next_off[p], D);
    accumulate_values(s, rows, G, v_head, slot_off, n, ts, first_pos, D, vt, acc);
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

  const int tile_tokens = std::max(1, kMaxRows / pb.group);
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

}  // namespace

TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
