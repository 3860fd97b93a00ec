// The register tile of the own AVX2 GEMM (cpu_gemm.cpp: y = x @ W^T; cpu_gemm_gate_up.cpp: the
// gate_up projection with SiLU-and-mul in its epilogue): MR (<= 6) rows x one 16-column panel,
// 2 * MR ymm accumulators, and how panels store their weights.
//
// Guarantee: each output is one accumulator lane updated by a plain FMA chain over k = 0..K-1
// starting from 0.0f, whatever the tile's rows, and handed to the caller's epilogue
// `out(r, a0, a1)` (row r of the tile, columns 0-7 and 8-15) once the chain ends. So every
// caller gets the same bits for the same x row and weight column, whatever it does next.
//
// Software prefetch (PF): the first row tile of each panel prefetches PF_BYTES (4 KB) ahead,
// running into the next panel near the end, so the weight stream is prefetched continuously
// (benchmarks/RESULTS.md: without it the cold-weight lead over oneDNN mostly disappears).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace conveyor_gemm {

constexpr int NR = 16;
constexpr int MR_MAX = 6;
// Prefetch distance in bytes of the panel stream: 64 k rows of a float32 panel, 128 of a 16-bit
// one. Decode steps are bandwidth-bound, so the same bytes ahead is the same time ahead; half
// the bytes (64 k rows) measured ~5-15% slower at 1-8 rows (benchmarks/RESULTS.md).
constexpr int64_t PF_BYTES = 4096;

// a (+ bias, ncols of it: the rest of the 16 lanes get 0) after the K chain: one rounding, as
// F.linear's addmm would add it.
inline void add_bias(__m256& a0, __m256& a1, const float* bias, int ncols) {
  if (bias == nullptr) return;
  if (ncols == NR) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(bias));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(bias + 8));
  } else {
    alignas(32) float b[NR] = {};
    std::copy(bias, bias + ncols, b);
    a0 = _mm256_add_ps(a0, _mm256_load_ps(b));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(b + 8));
  }
}

// Stores the first ncols (<= 16) lanes of (a0, a1) at y.
inline void store_cols(float* y, int ncols, __m256 a0, __m256 a1) {
  if (ncols == NR) {
    _mm256_storeu_ps(y, a0);
    _mm256_storeu_ps(y + 8, a1);
  } else {  // last, partial panel
    alignas(32) float buf[NR];
    _mm256_store_ps(buf, a0);
    _mm256_store_ps(buf + 8, a1);
    std::copy(buf, buf + ncols, y);
  }
}

// How a panel stores its weights, and how one k's 16 columns become two float32 registers
// (w0: columns 0-7, w1: columns 8-15). The float32 values are exact conversions, so a 16-bit panel
// feeds every FMA the same operand as the float32 panel of the same weight: bit-identical outputs.
struct F32 {  // 16 floats per k, one 64-byte line
  using T = float;
  static void load(const T* p, __m256& w0, __m256& w1) {
    w0 = _mm256_load_ps(p);
    w1 = _mm256_load_ps(p + 8);
  }
};
struct BF16 {  // 16 bfloat16 per k (32 bytes), stored as 32-bit pairs (column j, column 8 + j)
  using T = uint16_t;
  static void load(const T* p, __m256& w0, __m256& w1) {
    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
    // bfloat16 is the high half of a float32: the low half of each pair shifted up, the high
    // half with the low bits cleared (one integer op each, no cross-lane shuffle)
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
#if defined(__F16C__)
struct F16 {  // 16 IEEE halves per k (32 bytes), columns in order
  using T = uint16_t;
  static void load(const T* p, __m256& w0, __m256& w1) {
    w0 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
    w1 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};
#endif

// Accumulators are named variables, not an array: with `__m256 acc[MR]` GCC kept a stack copy
// and stored every accumulator each k (store-port bound, half speed).
#define CG_ROW(r)                                           \
  if constexpr (MR > r) {                                   \
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k); \
    c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0);             \
    c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1);             \
  }
#define CG_OUT(r) \
  if constexpr (MR > r) out(r, c##r##0, c##r##1);

// Rows x[0..MR) (row stride ldx) times one panel wp (K x 16); pf: where to prefetch when PF.
template <class S, int MR, bool PF, class Out>
inline void tile(const float* __restrict x, int64_t ldx, const typename S::T* __restrict wp, int64_t K,
                 const typename S::T* pf, Out&& out) {
  // one prefetch per 64-byte line: every k for float32 panels, every other k for 16-bit ones
  constexpr int64_t PF_EVERY = 64 / (NR * sizeof(typename S::T));
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    if (PF && k % PF_EVERY == 0) _mm_prefetch(reinterpret_cast<const char*>(pf + k * NR), _MM_HINT_T0);
    __m256 w0, w1;
    S::load(wp + k * NR, w0, w1);
    // Pin the weights in registers: otherwise GCC folds them into each FMA as memory operands
    // for some MR (2 loads per row instead of 2 per k: load-port bound).
    asm volatile("" : "+x"(w0), "+x"(w1));
    CG_ROW(0) CG_ROW(1) CG_ROW(2) CG_ROW(3) CG_ROW(4) CG_ROW(5)
  }
  CG_OUT(0) CG_OUT(1) CG_OUT(2) CG_OUT(3) CG_OUT(4) CG_OUT(5)
}
#undef CG_ROW
#undef CG_OUT

template <class S, int MR, class Out>
inline void tile_pf(bool pf, const float* x, int64_t ldx, const typename S::T* wp, int64_t K,
                    const typename S::T* pfp, Out&& out) {
  if (pf)
    tile<S, MR, true>(x, ldx, wp, K, pfp, out);
  else
    tile<S, MR, false>(x, ldx, wp, K, pfp, out);
}

// The tile of mr (1..6) rows; `out(r, a0, a1)` receives row r's 16 sums.
template <class S, class Out>
inline void dispatch(int mr, bool pf, const float* x, int64_t ldx, const typename S::T* wp, int64_t K,
                     const typename S::T* pfp, Out&& out) {
  switch (mr) {
    case 1: return tile_pf<S, 1>(pf, x, ldx, wp, K, pfp, out);
    case 2: return tile_pf<S, 2>(pf, x, ldx, wp, K, pfp, out);
    case 3: return tile_pf<S, 3>(pf, x, ldx, wp, K, pfp, out);
    case 4: return tile_pf<S, 4>(pf, x, ldx, wp, K, pfp, out);
    case 5: return tile_pf<S, 5>(pf, x, ldx, wp, K, pfp, out);
    default: return tile_pf<S, 6>(pf, x, ldx, wp, K, pfp, out);
  }
}

// Balanced row tiles of a block of `rows` (e.g. 32 -> 6,6,5,5,5,5): no tile left with too few
// accumulators to hide the FMA latency. The size of tile t of nt = tiles(rows).
inline int64_t tiles(int64_t rows) { return (rows + MR_MAX - 1) / MR_MAX; }
inline int tile_rows(int64_t rows, int64_t nt, int64_t t) {
  return static_cast<int>(rows / nt + (t < rows % nt ? 1 : 0));
}

}  // namespace conveyor_gemm
#endif  // __AVX2__ && __FMA__
