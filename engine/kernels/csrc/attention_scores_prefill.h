// Scores of a key tile for work items with many rows (prefill chunks), GEMM-style: the key tile is
// transposed once, then R-row x 16-key register-tiled passes score it. Each score is bit for bit
// the one attention_scores_decode.h's dot8keys computes.
#pragma once

#include "attention_tile.h"
#include "attention_vec.h"

namespace conveyor_attention {

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

}  // namespace conveyor_attention
