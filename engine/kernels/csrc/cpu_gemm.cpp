// y[M, N] = x[M, K] @ W^T (+ bias) in float32 with AVX2 + FMA, the weight packed once into
// 16-column panels (engine/kernels/cpu_gemm.py wraps these ops; measured against oneDNN in
// benchmarks/cpu_gemm_ab.py, first probed in benchmarks/csrc_probe/decode_gemm.cpp).
//
// Weight layout (cpu_gemm_pack): panels of NR = 16 output columns, each panel K x 16 contiguous
// (one 64-byte line per k), zero-padded past N, so a panel is streamed from memory once per row
// block and re-read from L1/L2 by that block's other row tiles.
//
// Register tile: MR (<= 6) rows x 16 columns = 2 * MR ymm accumulators. Guarantee: each output
// is one accumulator lane updated by a plain FMA chain over k = 0..K-1 starting from 0.0f, then
// (if given) one float32 add of the bias. Whatever M, the row's tile, block or thread, a row's
// bits are the same: the result of a row does not depend on the batch it is in.
//
// Software prefetch: the first row tile of each panel prefetches PF_LINES lines (4 KB) ahead,
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
constexpr int64_t PF_LINES = 64;

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

template <int MR, bool PF>
void tile(const float* __restrict x, int64_t ldx, const float* __restrict wp, int64_t K,
          float* __restrict y, int64_t ldy, int ncols, const float* pf, const float* bias) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    if (PF) _mm_prefetch(reinterpret_cast<const char*>(pf + k * NR), _MM_HINT_T0);
    __m256 w0 = _mm256_load_ps(wp + k * NR);
    __m256 w1 = _mm256_load_ps(wp + k * NR + 8);
    // Pin the weights in registers: otherwise GCC folds them into each FMA as memory operands
    // for some MR (2 loads per row instead of 2 per k: load-port bound).
    asm volatile("" : "+x"(w0), "+x"(w1));
    CG_ROW(0) CG_ROW(1) CG_ROW(2) CG_ROW(3) CG_ROW(4) CG_ROW(5)
  }
  CG_STORE(0) CG_STORE(1) CG_STORE(2) CG_STORE(3) CG_STORE(4) CG_STORE(5)
}

template <int MR>
void tile_pf(bool pf, const float* x, int64_t ldx, const float* wp, int64_t K, float* y,
             int64_t ldy, int ncols, const float* pfp, const float* bias) {
  if (pf)
    tile<MR, true>(x, ldx, wp, K, y, ldy, ncols, pfp, bias);
  else
    tile<MR, false>(x, ldx, wp, K, y, ldy, ncols, pfp, bias);
}

void dispatch(int mr, bool pf, const float* x, int64_t ldx, const float* wp, int64_t K, float* y,
              int64_t ldy, int ncols, const float* pfp, const float* bias) {
  switch (mr) {
    case 1: return tile_pf<1>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 2: return tile_pf<2>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 3: return tile_pf<3>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 4: return tile_pf<4>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    case 5: return tile_pf<5>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
    default: return tile_pf<6>(pf, x, ldx, wp, K, y, ldy, ncols, pfp, bias);
  }
}

// W [N, K] float32 -> packed [ceil(N/16), K, 16], zero-padded columns (a new tensor).
at::Tensor cpu_gemm_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "cpu_gemm_pack: weight must be a 2-D float32 CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  at::Tensor out = at::zeros({P, K, NR}, w.options());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr<float>()) % 32 == 0, "cpu_gemm_pack: not 32-byte aligned");
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
      for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * NR + j] = src[(p * NR + j) * K + k];
  return out;
}

// x [M, K] float32, packed from cpu_gemm_pack, n the true output width, bias [n] or None.
// Rows go in blocks of `block_rows`; within a block every panel is walked once, by balanced row
// tiles of <= 6 rows. Panels are spread over torch's intra-op threads (one thread runs inline).
at::Tensor cpu_gemm(const at::Tensor& x_in, const at::Tensor& packed, int64_t n,
                    const std::optional<at::Tensor>& bias, int64_t block_rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "cpu_gemm: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == NR && P * NR >= n &&
                  (P - 1) * NR < n && packed.is_contiguous() && packed.scalar_type() == at::kFloat,
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
  const float* w = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t rb = std::max<int64_t>(1, block_rows);
  for (int64_t r0 = 0; r0 < M; r0 += rb) {
    const int64_t rows = std::min(rb, M - r0);
    // Balanced tiles (e.g. 32 -> 6,6,5,5,5,5): no tile left with too few accumulators to hide
    // the FMA latency.
    const int64_t nt = (rows + MR_MAX - 1) / MR_MAX;
    at::parallel_for(0, P, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = w + p * K * NR;
        const int ncols = static_cast<int>(std::min<int64_t>(NR, n - p * NR));
        const float* pb = bp ? bp + p * NR : nullptr;
        int64_t m0 = r0;
        for (int64_t t = 0; t < nt; ++t) {
          const int mr = static_cast<int>(rows / nt + (t < rows % nt ? 1 : 0));
          // The prefetch may point past the last panel: _mm_prefetch never faults.
          dispatch(mr, t == 0, xp + m0 * K, K, panel, K, yp + m0 * n + p * NR, n, ncols,
                   panel + PF_LINES * NR, pb);
          m0 += mr;
        }
      }
    });
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
