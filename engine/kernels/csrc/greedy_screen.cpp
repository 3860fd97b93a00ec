// The greedy LM head's second op, after fbgemm's int8 GEMM on greedy_prepare.cpp's rows
// (engine/models/greedy_head.py has the method and the guarantee; engine/kernels/int8_linear.py the
// bound's derivation):
//
// greedy_screen(values, ...): a_rn = values_rn m_r + x_O · w̃_O,n (the product rounded, then the
//   sum, as the torch path; x_O · w̃_O in another float32 order than its BLAS call, which the
//   bound's margin allows), B_rn = (coef_r · pieces_n)(1 + 2^-10),
//   t_r = a_j - B_j at j = first argmax a_r, candidates {n : a_n + B_n >= t}, each recomputed as a
//   float32 dot product summed in torch's order (so its logit is bitwise the torch path's), the
//   largest wins, the lowest index among ties. Rows with a non-finite entry, more than
//   max_candidates candidates or a NaN logit are flagged for the full head.
//
// Passes: one over fbgemm's result in column tiles (all rows per tile, so a tile of w̃_O is read
// from memory once), turning it into a in place and storing each block of 32 tokens' max; then
// per row only the blocks whose max plus their largest bound reach t are read again.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "torch_sum_order.h"
#include "vec8.h"

namespace {

using namespace conveyor_vec;

constexpr int64_t kBlock = 32;  // tokens per block, as greedy_head._BLOCK (block_pieces is built with it)
constexpr int64_t kTileBlocks = 8;  // blocks per column tile of the first pass
constexpr size_t kPrefetchRows = 3;  // candidates' dense rows in flight ahead of the one being summed
constexpr float kSlack = 1.0f + 1.0f / 1024.0f;  // greedy_head._SLACK

// The first m (<= 8) float16 values at p as floats, zero padded.
inline v8 load_half(const c10::Half* p, int64_t m) {
#if defined(__F16C__)
  if (m == 8) {
    v8 v;
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &f, sizeof v);
    return v;
  }
#endif
  float buf[8] = {};
  for (int64_t i = 0; i < m; ++i) buf[i] = static_cast<float>(p[i]);
  return load(buf);
}

struct Screen {
  float* values;  // [rows, n] fbgemm's result for the normalised rows; the first pass makes it a
  const float* scale;  // [rows] m
  const float* x;  // [rows, hidden]
  const int64_t* chans;  // [n_out]
  const c10::Half* const* w_rows;  // [n_out]: the outlier channels' rows of w̃^T, each [n]
  const float* coef;  // [rows, 4]
  const float* pieces;  // [4, n]: piece-major, so 8 tokens' pieces are 4 vector loads
  const float* block_pieces;  // [4, blocks]
  const float* dense;  // [n, hidden]
  int64_t n, hidden, n_out, blocks;
};

// coef · p, then the slack: every operand is >= 0 and each step rounds once in a fixed order (the
// products are opaque: no FMA contraction that could differ between call sites), so the result is
// monotone in p, and >= the exact coef · p: 8 roundings lose < 9u relative, the slack adds 2^-10.
// The vector form (8 tokens at p[i], p[stride + i], ...) does the same IEEE operations lane by lane.
inline float bound(const float* c, const float* p, int64_t stride) {
  const float s = opaque(opaque(opaque(c[0] * p[0]) + opaque(c[1] * p[stride])) + opaque(c[2] * p[2 * stride])) +
                  opaque(c[3] * p[3 * stride]);
  return opaque(opaque(s) * kSlack);  // rounded here: a + bound() is never contracted into an FMA
}
inline v8 bound8(const float* c, const float* p, int64_t stride) {
  const v8 s = opaque(opaque(opaque(splat(c[0]) * load(p)) + opaque(splat(c[1]) * load(p + stride))) +
                      opaque(splat(c[2]) * load(p + 2 * stride))) +
               opaque(splat(c[3]) * load(p + 3 * stride));
  return opaque(opaque(s) * splat(kSlack));
}

inline uint32_t mask(v8i lanes) {  // bit l set where lane l of a vector comparison is true
#if defined(__AVX__)
  __m256 f;
  std::memcpy(&f, &lanes, sizeof f);
  return static_cast<uint32_t>(_mm256_movemask_ps(f));
#endif
  uint32_t bits = 0;
  for (int l = 0; l < 8; ++l) bits |= (lanes[l] != 0) << l;
  return bits;
}
inline float hmax(v8 v) {
  float m = v[0];
  for (int l = 1; l < 8; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
inline float hsum(v8 v) {
  float t = 0.0f;
  for (int l = 0; l < 8; ++l) t += v[l];
  return t;
}

// c + a * b rounded once where the ISA has an FMA (else twice); every a entry is formed by this
// one helper, so both passes form it alike.
inline v8 fmadd(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return opaque(a * b) + c;
#endif
}

// a for rows r0 .. r0 + NR - 1, tokens [n0, n0 + len), len <= kBlock, written over values;
// maxes[i] = the max of row r0 + i's entries, NaN when one of them is not finite. An entry is
// x_O · w̃_O (summed over the channels in order, any float32 order is inside the bound: its
// margin), plus the product v m rounded (as torch's exact.addcmul_(values, m)). NR rows times CH
// vectors of 8 tokens at once: each converted w̃ vector serves NR rows, and NR x CH independent
// FMA chains are in flight.
// acc[rr][q] = x_O · w̃_O for row rr of xo's rows and the 8 tokens from col + 8 q (the channels
// summed in order); FULL: every vector is 8 wide (no tail checks in the inner loop).
template <int NR, int CH, bool FULL>
inline void outlier_part(const Screen& s, const float* xo, int64_t col, const int64_t* width, v8 (&acc)[NR][CH]) {
  for (int rr = 0; rr < NR; ++rr)
    for (int q = 0; q < CH; ++q) acc[rr][q] = splat(0.0f);
  for (int64_t i = 0; i < s.n_out; ++i) {
    const c10::Half* wp = s.w_rows[i] + col;
    v8 h[CH];
    for (int q = 0; q < CH; ++q)
      h[q] = FULL ? load_half(wp + 8 * q, 8) : (width[q] ? load_half(wp + 8 * q, width[q]) : splat(0.0f));
    for (int rr = 0; rr < NR; ++rr) {
      const v8 b = splat(xo[rr * s.n_out + i]);
      for (int q = 0; q < CH; ++q) acc[rr][q] = fmadd(b, h[q], acc[rr][q]);
    }
  }
}

template <int NR, int CH>
void approx_rows(const Screen& s, const float* xo, int64_t r0, int64_t n0, int64_t len, float* maxes) {
  v8 mx[NR], poison[NR];
  for (int rr = 0; rr < NR; ++rr) mx[rr] = splat(-std::numeric_limits<float>::infinity()), poison[rr] = splat(0.0f);
  for (int64_t j = 0; j < len; j += 8 * CH) {
    int64_t width[CH];  // tokens in each vector (8 but in a last short block)
    for (int q = 0; q < CH; ++q) width[q] = std::max<int64_t>(0, std::min<int64_t>(8, len - j - 8 * q));
    v8 acc[NR][CH];
    if (len == kBlock) outlier_part<NR, CH, true>(s, xo + r0 * s.n_out, n0 + j, width, acc);
    else outlier_part<NR, CH, false>(s, xo + r0 * s.n_out, n0 + j, width, acc);
    for (int rr = 0; rr < NR; ++rr) {
      const v8 m = splat(s.scale[r0 + rr]);
      float* v_row = s.values + (r0 + rr) * s.n + n0 + j;
      for (int q = 0; q < CH; ++q) {
        const int64_t w = width[q];
        if (w == 0) continue;
        const v8 a = opaque(load_n(v_row + 8 * q, w) * m) + acc[rr][q];
        store_n(v_row + 8 * q, a, w);
        if (w == 8) {
          mx[rr] = a > mx[rr] ? a : mx[rr];
          poison[rr] = poison[rr] + (a - a);  // 0 for finite entries, NaN otherwise
        } else {
          for (int64_t l = 0; l < w; ++l) {
            mx[rr][0] = a[l] > mx[rr][0] ? a[l] : mx[rr][0];
            poison[rr][0] += a[l] - a[l];
          }
        }
      }
    }
  }
  for (int rr = 0; rr < NR; ++rr) maxes[rr] = hmax(mx[rr]) + hsum(poison[rr]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_screen(
    const at::Tensor& values, const at::Tensor& scale, const at::Tensor& coef, const at::Tensor& x,
    const at::Tensor& chans, const at::Tensor& dense_t, const at::Tensor& pieces, const at::Tensor& block_pieces,
    const at::Tensor& dense, const at::Tensor& finite, int64_t max_candidates, int64_t lanes) {
  const int64_t rows = scale.size(0), n = dense.size(0), hidden = dense.size(1);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  auto f32 = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cpu(); };
  TORCH_CHECK(f32(values) && values.dim() == 2 && values.size(0) >= rows && values.size(1) == n,
              "greedy_screen: values must be float32 [>= rows, vocab]");
  TORCH_CHECK(f32(scale) && f32(coef) && coef.numel() == 4 * rows && f32(x) && x.numel() == rows * hidden,
              "greedy_screen: scale [rows], coef [rows, 4], x [rows, hidden] float32");
  TORCH_CHECK(f32(pieces) && pieces.numel() == 4 * n && f32(block_pieces) && block_pieces.numel() == 4 * blocks,
              "greedy_screen: pieces [4, vocab], block_pieces [4, ceil(vocab / 32)] float32");
  TORCH_CHECK(f32(dense) && finite.scalar_type() == at::kBool && finite.numel() == rows,
              "greedy_screen: dense float32 [vocab, hidden], finite bool [rows]");
  const int64_t n_out = chans.numel();
  TORCH_CHECK(chans.scalar_type() == at::kLong && chans.is_contiguous(), "greedy_screen: chans int64");
  TORCH_CHECK(n_out == 0 || (dense_t.scalar_type() == at::kHalf && dense_t.is_contiguous() &&
                             dense_t.size(0) == hidden && dense_t.size(1) == n),
              "greedy_screen: dense_t must be float16 [hidden, vocab] when there are outlier channels");
  TORCH_CHECK(lanes == 8 || lanes == 16, "greedy_screen: lanes must be 8 or 16");
  for (int64_t i = 0; i < n_out; ++i)
    TORCH_CHECK(chans.data_ptr<int64_t>()[i] >= 0 && chans.data_ptr<int64_t>()[i] < hidden,
                "greedy_screen: channel out of range");
  std::vector<const c10::Half*> w_rows(n_out);
  for (int64_t i = 0; i < n_out; ++i) w_rows[i] = dense_t.data_ptr<c10::Half>() + chans.data_ptr<int64_t>()[i] * n;
  const Screen s{values.data_ptr<float>(), scale.data_ptr<float>(), x.data_ptr<float>(),
                 chans.data_ptr<int64_t>(), w_rows.data(),
                 coef.data_ptr<float>(), pieces.data_ptr<float>(), block_pieces.data_ptr<float>(),
                 dense.data_ptr<float>(), n, hidden, n_out, blocks};
  const bool* fin = finite.data_ptr<bool>();

  // the outlier channels' values, row by row (zeros for the non-finite rows, which fall back)
  std::vector<float> xo(rows * n_out);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n_out; ++i) xo[r * n_out + i] = fin[r] ? s.x[r * hidden + s.chans[i]] : 0.0f;

  // Pass 1: each block's max (NaN when the block holds a non-finite a).
  std::vector<float> block_max(rows * blocks);
  const int64_t tiles = (blocks + kTileBlocks - 1) / kTileBlocks;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, rows * kTileBlocks * kBlock));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    float mx[4];
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t b0 = tile * kTileBlocks, b1 = std::min(blocks, b0 + kTileBlocks);
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4)  // 4 rows at a time; every group reuses the tile's w̃ columns
        for (int64_t b = b0; b < b1; ++b) {
          approx_rows<4, 2>(s, xo.data(), r, b * kBlock, std::min(kBlock, n - b * kBlock), mx);
          for (int rr = 0; rr < 4; ++rr) block_max[(r + rr) * blocks + b] = mx[rr];
        }
      for (; r < rows; ++r)
        for (int64_t b = b0; b < b1; ++b)
          approx_rows<1, 4>(s, xo.data(), r, b * kBlock, std::min(kBlock, n - b * kBlock),
                            block_max.data() + r * blocks + b);
    }
  });

  at::Tensor tokens = at::zeros({rows}, x.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({rows}, x.options().dtype(at::kLong));
  at::Tensor fallback = at::empty({rows}, x.options().dtype(at::kBool));
  int64_t *tp = tokens.data_ptr<int64_t>(), *cp = counts.data_ptr<int64_t>();
  bool* fp = fallback.data_ptr<bool>();
  // Pass 2, per row: t, the candidate blocks' entries, the recompute.
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> cand;
    for (int64_t r = r0; r < r1; ++r) {
      fp[r] = true;
      if (!fin[r]) continue;
      const float* bm = block_max.data() + r * blocks;
      const float* c = s.coef + 4 * r;
      float top = bm[0];
      bool ok = true;
      for (int64_t b = 0; b < blocks; ++b) {
        ok &= std::isfinite(bm[b]);
        top = bm[b] > top ? bm[b] : top;
      }
      if (!ok) continue;
      int64_t j = 0;
      while (bm[j] != top) ++j;
      const float* a = s.values + r * n;
      int64_t at = j * kBlock;
      while (a[at] != top) ++at;
      // a lower bound on the row's largest float32 logit (t rounds monotonically: still below it)
      const float t = top - bound(c, s.pieces + at, n);
      if (!std::isfinite(t)) continue;
      cand.clear();
      int64_t count = 0;
      const v8 t8 = splat(t);
      auto take = [&](int64_t n0, uint32_t hits) {  // hits: bit i set for a candidate n0 + i
        for (; hits; hits &= hits - 1)
          if (++count <= max_candidates) cand.push_back(n0 + __builtin_ctz(hits));
      };
      auto block = [&](int64_t b) {  // the tokens of block b that are candidates
        const int64_t n0 = b * kBlock, end = std::min(n, n0 + kBlock);
        int64_t i = n0;
        for (; i + 8 <= end; i += 8) take(i, mask(load(a + i) + bound8(c, s.pieces + i, n) >= t8));
        for (; i < end; ++i) take(i, a[i] + bound(c, s.pieces + i, n) >= t ? 1u : 0u);
      };
      // a block's largest bound is >= each of its tokens' (the bound is monotone in the pieces)
      int64_t b = 0;
      for (; b + 8 <= blocks; b += 8)
        for (uint32_t hits = mask(load(bm + b) + bound8(c, s.block_pieces + b, blocks) >= t8); hits;
             hits &= hits - 1)
          block(b + __builtin_ctz(hits));
      for (; b < blocks; ++b)
        if (bm[b] + bound(c, s.block_pieces + b, blocks) >= t) block(b);
      cp[r] = count;
      if (count > max_candidates) continue;
      const float* x_row = s.x + r * hidden;
      float best = -std::numeric_limits<float>::infinity();
      int64_t best_n = -1;
      bool nan = false;
      // the dense rows are scattered over the head: fetch the next ones while this one is summed
      auto prefetch = [&](size_t i) {
        if (i >= cand.size()) return;
        const char* p = reinterpret_cast<const char*>(s.dense + cand[i] * hidden);
        for (int64_t off = 0; off < hidden * 4; off += 64) __builtin_prefetch(p + off);
      };
      for (size_t i = 0; i < kPrefetchRows; ++i) prefetch(i);
      for (size_t i = 0; i < cand.size(); ++i) {  // increasing n: strict > keeps the lowest index among ties
        prefetch(i + kPrefetchRows);
        const int64_t cn = cand[i];
        const float* w_row = s.dense + cn * hidden;
        const float z = torch_order_dot(w_row, x_row, hidden, lanes);
        nan |= std::isnan(z);
        if (best_n < 0 || z > best) best = z, best_n = cn;
      }
      if (nan || best_n < 0) continue;
      tp[r] = best_n;
      fp[r] = false;
    }
  });
  return {tokens, counts, fallback};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("greedy_screen(Tensor(a!) values, Tensor scale, Tensor coef, Tensor x, Tensor chans, Tensor dense_t, "
        "Tensor pieces, Tensor block_pieces, Tensor dense, Tensor finite, int max_candidates, int lanes) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("greedy_screen", &greedy_screen);
}
