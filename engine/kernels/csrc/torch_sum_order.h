// sum(a * b) over a contiguous row of floats in the order of torch's CPU sum kernel
// (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum), the
// products rounded to float32 first, as `(u * v).sum(dim=-1)` materialises them: so a C++ caller
// gets bitwise the logits a torch caller computes that way. rms_norm.cpp sums its squares
// through the same `torch_order_sum`. The vector width is torch's Vectorized<float> (8 on AVX2,
// 16 on AVX-512: the caller passes it).
#pragma once

#include <algorithm>
#include <cstdint>

#include "vec8.h"

namespace conveyor_vec {

constexpr int kSumIlp = 4, kSumLevels = 4;  // torch's row_sum / multi_row_sum constants
inline int64_t sum_ceil_log2(int64_t x) {  // c10::utils::CeilLog2: 1 for x <= 2
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x - 1); v; v >>= 1) ++bits;
  return bits;
}
// The sum of n terms in torch's order, vectors of 8*V floats: the vectors are read as rows of
// kSumIlp, summed into kSumIlp accumulators with a cascade every level_step rows; the leftover
// vectors go into the first accumulator, then the others are added to it. The scalar tail is
// summed first, then the lanes one by one. `vec_term(vec, c)` is the c-th 8-float part of vector
// `vec`'s terms, `term(e)` element e's term (both already rounded to float32: see `opaque`).
template <int V, typename VecTerm, typename Term>
inline float torch_order_sum(int64_t n, VecTerm vec_term, Term term) {
  constexpr int64_t W = 8 * V;
  const int64_t nvec = n / W, size = nvec / kSumIlp;
  const int64_t level_power = std::max<int64_t>(4, sum_ceil_log2(size) / kSumLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  v8 acc[kSumLevels][kSumIlp][V];
  for (auto& level : acc)
    for (auto& chain : level)
      for (auto& part : chain) part = splat(0.0f);
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kSumIlp; ++k)
        for (int c = 0; c < V; ++c) acc[0][k][c] = acc[0][k][c] + vec_term(i * kSumIlp + k, c);
    for (int lv = 1; lv < kSumLevels; ++lv) {
      for (int k = 0; k < kSumIlp; ++k)
        for (int c = 0; c < V; ++c) {
          acc[lv][k][c] = acc[lv][k][c] + acc[lv - 1][k][c];
          acc[lv - 1][k][c] = splat(0.0f);
        }
      if ((i & (level_mask << (lv * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < kSumIlp; ++k)
      for (int c = 0; c < V; ++c) acc[0][k][c] = acc[0][k][c] + vec_term(i * kSumIlp + k, c);
  for (int lv = 1; lv < kSumLevels; ++lv)
    for (int k = 0; k < kSumIlp; ++k)
      for (int c = 0; c < V; ++c) acc[0][k][c] = acc[0][k][c] + acc[lv][k][c];
  for (int64_t v = size * kSumIlp; v < nvec; ++v)
    for (int c = 0; c < V; ++c) acc[0][0][c] = acc[0][0][c] + vec_term(v, c);
  for (int k = 1; k < kSumIlp; ++k)
    for (int c = 0; c < V; ++c) acc[0][0][c] = acc[0][0][c] + acc[0][k][c];
  float total = 0.0f;
  for (int64_t e = nvec * W; e < n; ++e) total += term(e);
  for (int c = 0; c < V; ++c)
    for (int l = 0; l < 8; ++l) total += acc[0][0][c][l];
  return total;
}
// Rows shorter than one torch vector: scalar accumulators, no cascade (torch's row_sum).
template <typename Term> inline float torch_order_sum_short(int64_t n, Term term) {
  float acc[kSumIlp] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t size = n / kSumIlp;
  for (int64_t i = 0; i < size; ++i)
    for (int k = 0; k < kSumIlp; ++k) acc[k] += term(i * kSumIlp + k);
  for (int64_t e = size * kSumIlp; e < n; ++e) acc[0] += term(e);
  for (int k = 1; k < kSumIlp; ++k) acc[0] += acc[k];
  return acc[0];
}

template <int V> inline float torch_order_dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t W = 8 * V;
  return torch_order_sum<V>(
      n, [&](int64_t vec, int c) { return opaque(load(a + vec * W + 8 * c) * load(b + vec * W + 8 * c)); },
      [&](int64_t e) { return opaque(a[e] * b[e]); });
}
inline float torch_order_dot_short(const float* a, const float* b, int64_t n) {
  return torch_order_sum_short(n, [&](int64_t e) { return opaque(a[e] * b[e]); });
}

// The row's dot product with `lanes` = torch's floats per vector (8 or 16).
inline float torch_order_dot(const float* a, const float* b, int64_t n, int64_t lanes) {
  if (n < lanes) return torch_order_dot_short(a, b, n);
  return lanes == 16 ? torch_order_dot<2>(a, b, n) : torch_order_dot<1>(a, b, n);
}

}  // namespace conveyor_vec
