// y[M, N] = x[M, K] @ W^T (+ bias) in float32 with AVX2 + FMA, the weight packed once into
// 16-column panels (engine/kernels/cpu_gemm.py wraps these ops; measured against oneDNN in
// benchmarks/cpu_gemm_ab.py, first probed in benchmarks/csrc_probe/decode_gemm.cpp).
//
// Weight layout (cpu_gemm_pack): panels of NR = 16 output columns, each panel K x 16 contiguous
// (one 64-byte line per k), zero-padded past N, so a panel is streamed from memory once per row
// block and re-read from L1/L2 by that block's other row tiles. Panels may instead be stored in
// bfloat16 or float16 (32 bytes per k, half the memory traffic of a decode step), when the
// caller has checked that every weight is exactly representable: the kernel converts them to
// float32 exactly in the inner loop, so the FMAs, and the outputs, are those of float32 panels.
//
// Register tile: MR (<= 6) rows x 16 columns = 2 * MR ymm accumulators. Guarantee: each output
// is one accumulator lane updated by a plain FMA chain over k = 0..K-1 starting from 0.0f, then
// (if given) one float32 add of the bias. Whatever M, the row's tile, block or thread, a row's
// bits are the same: the result of a row does not depend on the batch it is in.
//
// Software prefetch: the first row tile of each panel prefetches PF_BYTES (4 KB) ahead,
// running into the next panel near the end, so the weight stream is prefetched continuously
// (benchmarks/RESULTS.md: without it the cold-weight lead over oneDNN mostly disappears).
//
// Built only where the compiler targets AVX2 + FMA (-march=native on such a host); elsewhere no
// op is registered and engine/kernels/cpu_gemm.py reports the backend unavailable.
#if defined(__AVX2__) && defined(__FMA__)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace {

constexpr int NR = 16;
constexpr int MR_MAX = 6;
// Prefetch distance in bytes of the panel stream: 64 k rows of a float32 panel, 128 of a 16-bit
// one. Decode steps are bandwidth-bound, so the same bytes ahead is the same time ahead; half
// the bytes (64 k rows) measured ~5-15% slower at 1-8 rows (benchmarks/RESULTS.md).
constexpr int64_t PF_BYTES = 4096;

// Accumulators are named variables, not an array: with `__m256 acc[MR]` GCC kept a stack copy
// and stored every accumulator each k (store-port bound, half speed).
#define CG_ROW(r)                                           \
  if constexpr (MR > r) {                                   \
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k); \
    c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0);             \
    c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1);             \
  }
#define CG_STORE(r) \
  if constexpr (MR > r) store_row(y + r * ldy, ncols, c##r##0, c##r##1, bias);

inline void store_row(float* y, int ncols, __m256 a0, __m256 a1, const float* bias) {
  if (bias != nullptr) {  // after the K chain: one rounding, as F.linear's addmm would add it
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

template <class S, int MR, bool PF>
void tile(const float* __restrict x, int64_t ldx, const typename S::T* __restrict wp, int64_t K,
          float* __restrict y, int64_t ldy, int ncols, const typename S::T* pf, const float* bias) {
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
  CG_STORE(0) CG_STORE(1) CG_STORE(2) CG_STORE(3) CG_STORE(4) CG_STORE(5)
}

template <class S, int MR>
void tile_pf(bool pf, const float* x, int64_t ldx, const typename S::T* wp, int64_t K, float* y,
             int64_t ldy, int ncols, const typename S::T* pfp, const float* bias) {
  if (pf)
    tile<S, MR, true>(x, ldx, wp, K, y, ldy, ncols, pfp, bias);
  else
    tile<S, MR, false>(x, ldx, wp, K, y, ldy, ncols, pfp, bias);
}

template <class S>
void dispatch(int mr, bool pf, const float* x, int64_t ldx, const typename S::T* wp, int64_t K, float* y,
              int64_t ldy, int ncols, const typename S::T* pfp, const float* bias) {
  switch (mr) {
    case 1: return tile_pf<S, 1>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 2: return tile_pf<S, 2>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 3: return tile_pf<S, 3>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 4: return tile_pf<S, 4>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 5: return tile_pf<S, 5>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    default: return tile_pf<S, 6>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
  }
}

// Where column j of a panel is stored within its k row: in order, except for bfloat16 panels,
// whose 32-bit pairs hold (j, 8 + j) so that BF16::load needs no shuffle.
inline int64_t slot(bool bf16, int64_t j) { return bf16 ? (j < 8 ? 2 * j : 2 * (j - 8) + 1) : j; }

template <typename T>
void pack_panels(const T* src, T* dst, int64_t N, int64_t K, bool bf16) {
  const int64_t P = (N + NR - 1) / NR;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
      for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * NR + slot(bf16, j)] = src[(p * NR + j) * K + k];
}

// W [N, K] -> packed [ceil(N/16), K, 16] of W's dtype (float32, bfloat16 or float16: the kernel
// converts 16-bit weights to float32 exactly), zero-padded columns (a new tensor).
at::Tensor cpu_gemm_pack(const at::Tensor& weight) {
  const auto dt = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() &&
                  (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "cpu_gemm_pack: weight must be a 2-D float32, bfloat16 or float16 CPU tensor");
#if !defined(__F16C__)
  TORCH_CHECK(dt != at::kHalf, "cpu_gemm_pack: float16 panels need F16C, which this build lacks");
#endif
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor out = at::zeros({P, K, NR}, w.options());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 == 0, "cpu_gemm_pack: not 32-byte aligned");
  if (dt == at::kFloat)
    pack_panels(w.data_ptr<float>(), out.data_ptr<float>(), N, K, false);
  else  // 16-bit: copy the bits
    pack_panels(static_cast<const uint16_t*>(w.data_ptr()), static_cast<uint16_t*>(out.data_ptr()), N, K,
                dt == at::kBFloat16);
  return out;
}

// Rows go in blocks of `block_rows`; within a block every panel is walked once, by balanced row
// tiles of <= 6 rows. Panels are spread over torch's intra-op threads (one thread runs inline).
template <class S>
void run(const float* xp, const typename S::T* w, float* yp, int64_t M, int64_t K, int64_t n, int64_t P,
         const float* bp, int64_t block_rows) {
  const int64_t rb = std::max<int64_t>(1, block_rows);
  for (int64_t r0 = 0; r0 < M; r0 += rb) {
    const int64_t rows = std::min(rb, M - r0);
    // Balanced tiles (e.g. 32 -> 6,6,5,5,5,5): no tile left with too few accumulators to hide
    // the FMA latency.
    const int64_t nt = (rows + MR_MAX - 1) / MR_MAX;
    at::parallel_for(0, P, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const typename S::T* panel = w + p * K * NR;
        const int ncols = static_cast<int>(std::min<int64_t>(NR, n - p * NR));
        const float* pb = bp ? bp + p * NR : nullptr;
        int64_t m0 = r0;
        for (int64_t t = 0; t < nt; ++t) {
          const int mr = static_cast<int>(rows / nt + (t < rows % nt ? 1 : 0));
          // The prefetch may point past the last panel: _mm_prefetch never faults.
          dispatch<S>(mr, t == 0, xp + m0 * K, K, panel, K, yp + m0 * n + p * NR, n, ncols,
                      panel + PF_BYTES / sizeof(typename S::T), pb);
          m0 += mr;
        }
      }
    });
  }
}

// x [M, K] float32, packed from cpu_gemm_pack, n the true output width, bias [n] or None.
at::Tensor cpu_gemm(const at::Tensor& x_in, const at::Tensor& packed, int64_t n,
                    const std::optional<at::Tensor>& bias, int64_t block_rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "cpu_gemm: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == NR && P * NR >= n &&
                  (P - 1) * NR < n && packed.is_contiguous(),
              "cpu_gemm: packed weight does not match x [M, ", K, "] and n = ", n);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n && b.scalar_type() == at::kFloat, "cpu_gemm: bias must be float32 [n]");
    bp = b.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  if (K == 0) return bp ? y.copy_(b.unsqueeze(0).expand({M, n})) : y.zero_();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (packed.scalar_type()) {
    case at::kFloat: run<F32>(xp, packed.data_ptr<float>(), yp, M, K, n, P, bp, block_rows); break;
    case at::kBFloat16:
      run<BF16>(xp, static_cast<const uint16_t*>(packed.data_ptr()), yp, M, K, n, P, bp, block_rows);
      break;
#if defined(__F16C__)
    case at::kHalf:
      run<F16>(xp, static_cast<const uint16_t*>(packed.data_ptr()), yp, M, K, n, P, bp, block_rows);
      break;
#endif
    default: TORCH_CHECK(false, "cpu_gemm: packed weight must be float32, bfloat16 or float16 (F16C)");
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("cpu_gemm_pack(Tensor weight) -> Tensor");
  m.def("cpu_gemm(Tensor x, Tensor packed, int n, Tensor? bias, int block_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("cpu_gemm_pack", &cpu_gemm_pack);
  m.impl("cpu_gemm", &cpu_gemm);
}
#endif  // __AVX2__ && __FMA__
