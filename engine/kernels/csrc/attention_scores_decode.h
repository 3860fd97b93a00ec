// Scores of a key tile for work items with few rows (decodes): keys are scored eight per pass
// straight from the cache rows. attention_scores_prefill.h computes the same chain per score.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention_tile.h"
#include "attention_vec.h"

namespace conveyor_attention {

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

}  // namespace conveyor_attention
