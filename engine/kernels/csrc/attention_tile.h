// One online-softmax step of the CPU attention kernel over a scored key tile, shared by its decode
// and prefill paths: the tile geometry, the softmax bookkeeping (running max and sum per row) and
// the accumulation of the tile's values into the rows' outputs.
//
// Guarantees: each row's max, sum and every output element are computed from that row's own
// scores by the same operations in the same order whichever rows share its pass (R, the block of
// eight rows), so a row's result does not depend on how its work item was batched.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attention_vec.h"

namespace conveyor_attention {

constexpr int kTileKeys = 32;  // key positions per online-softmax step
constexpr int kBlockRows = 6;  // rows per register-tiled pass: 6 x 2 accumulators + 2 loads + 1 broadcast

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
    const v8 corr = exp8_nonpos(old_max - mx);
    store8(m + r0, mx);
    for (int i = 0; i < 8; ++i) {
      if (i >= nr) {
        t[i] = splat8(0.f);
        continue;
      }
      float* sr = s + (r0 + i) * kTileKeys;
      const v8 mv = splat8(mx[i]);
      const v8 x0 = exp8_nonpos(load8(sr) - mv), x1 = exp8_nonpos(load8(sr + 8) - mv);
      const v8 x2 = exp8_nonpos(load8(sr + 16) - mv), x3 = exp8_nonpos(load8(sr + 24) - mv);
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

}  // namespace conveyor_attention
