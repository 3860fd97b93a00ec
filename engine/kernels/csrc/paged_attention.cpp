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
// Files: attention_vec.h (vector helpers), attention_tile.h (tile geometry, online softmax step,
// values), attention_scores_decode.h and attention_scores_prefill.h (the two scoring paths); this
// file plans the work items and drives each one. The K/V cache write is kv_cache_write.cpp.
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

#include "attention_scores_decode.h"
#include "attention_scores_prefill.h"
#include "attention_tile.h"
#include "attention_vec.h"

namespace {

using namespace conveyor_attention;

constexpr int kMaxRows = 96;  // query rows (tokens x heads of a group) per work item
constexpr int kTiledRows = 2 * kBlockRows;  // work items with fewer rows score keys straight from the cache

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

}  // namespace

// The namespace's one TORCH_LIBRARY block; the other sources add their ops with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
