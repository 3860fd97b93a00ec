// Probe kernel (benchmarks only, not used by the engine): y[M, N] = x[M, K] @ W^T for small M
// (decode steps), float32, AVX2 + FMA, one thread.
//
// Weight layout (pack_weight): panels of NR = 16 output columns, each panel K x 16 contiguous
// (one 64-byte cache line per k), zero-padded past N. A panel is read from memory once, by the
// first row block, and re-read from L1/L2 by the other row blocks.
//
// Register tile: MR (<= 6) rows x 16 columns = 2 * MR ymm accumulators. Each output is one
// accumulator lane updated by a plain FMA chain in K order starting from 0, whatever MR, the
// row's block or M is, so a row's bits do not depend on M (batch invariant).
//
// Software prefetch: while the first row block walks a panel it prefetches the line pf_lines
// lines ahead (pf_lines * 64 bytes), which runs into the next panel near the end, so the weight
// stream is prefetched continuously. pf_lines = 0 disables it.
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int NR = 16;
constexpr int MR_MAX = 6;

// Accumulators are named variables, not arrays: with `__m256 acc[MR]` GCC kept a stack copy
// and stored all 2*MR accumulators every k (store-port bound, half speed).
#define HC_ROW(r)                                                   \
  if constexpr (MR > r) {                                           \
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);         \
    c##r##0 = _mm256_fmadd_ps(xb, w0, c##r##0);                     \
    c##r##1 = _mm256_fmadd_ps(xb, w1, c##r##1);                     \
  }
#define HC_STORE(r) \
  if constexpr (MR > r) store_row(y + r * ldy, ncols, c##r##0, c##r##1);

inline void store_row(float* y, int ncols, __m256 a0, __m256 a1) {
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
          float* __restrict y, int64_t ldy, int ncols, const float* pf) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    if (PF) _mm_prefetch(reinterpret_cast<const char*>(pf + k * NR), _MM_HINT_T0);
    __m256 w0 = _mm256_load_ps(wp + k * NR);
    __m256 w1 = _mm256_load_ps(wp + k * NR + 8);
    // Pin the weights in registers: otherwise GCC folds them into each FMA as memory operands
    // for some MR (2 loads per row instead of 2 per k, load-port bound).
    asm volatile("" : "+x"(w0), "+x"(w1));
    HC_ROW(0) HC_ROW(1) HC_ROW(2) HC_ROW(3) HC_ROW(4) HC_ROW(5)
  }
  HC_STORE(0) HC_STORE(1) HC_STORE(2) HC_STORE(3) HC_STORE(4) HC_STORE(5)
}

template <int MR>
void tile_pf(bool pf, const float* x, int64_t ldx, const float* wp, int64_t K, float* y,
             int64_t ldy, int ncols, const float* pfp) {
  if (pf)
    tile<MR, true>(x, ldx, wp, K, y, ldy, ncols, pfp);
  else
    tile<MR, false>(x, ldx, wp, K, y, ldy, ncols, pfp);
}

void dispatch(int mr, bool pf, const float* x, int64_t ldx, const float* wp, int64_t K, float* y,
              int64_t ldy, int ncols, const float* pfp) {
  switch (mr) {
    case 1: return tile_pf<1>(pf, x, ldx, wp, K, y, ldy, ncols, pfp);
    case 2: return tile_pf<2>(pf, x, ldx, wp, K, y, ldy, ncols, pfp);
    case 3: return tile_pf<3>(pf, x, ldx, wp, K, y, ldy, ncols, pfp);
    case 4: return tile_pf<4>(pf, x, ldx, wp, K, y, ldy, ncols, pfp);
    case 5: return tile_pf<5>(pf, x, ldx, wp, K, y, ldy, ncols, pfp);
    default: return tile_pf<6>(pf, x, ldx, wp, K, y, ldy, ncols, pfp);
  }
}

}  // namespace

// W [N, K] float32 -> packed [ceil(N/16), K, 16], zero-padded columns.
torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "w must be 2-D float32");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto out = torch::zeros({P, K, NR}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(dst) % 32 == 0, "packed weight not 32-byte aligned");
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
      for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * NR + j] = src[(p * NR + j) * K + k];
  return out;
}

// x [M, K] float32 contiguous, wp from pack_weight, N the true output width.
torch::Tensor gemm(torch::Tensor x, torch::Tensor wp, int64_t N, int64_t pf_lines) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be contiguous 2-D float32");
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0);
  TORCH_CHECK(wp.dim() == 3 && wp.size(1) == K && wp.size(2) == NR && P * NR >= N, "bad packed weight");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Balanced row blocks of <= 6 rows (e.g. 32 -> 6,6,5,5,5,5), so no block is left with too few
  // independent accumulators to hide the FMA latency.
  const int64_t nb = (M + MR_MAX - 1) / MR_MAX;
  for (int64_t p = 0; p < P; ++p) {
    const float* panel = w + p * K * NR;
    const int ncols = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
    int64_t m0 = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const int mr = static_cast<int>(M / nb + (b < M % nb ? 1 : 0));
      const bool pf = b == 0 && pf_lines > 0;
      dispatch(mr, pf, xp + m0 * K, K, panel, K, yp + m0 * N + p * NR, N, ncols,
               panel + pf_lines * NR);
      m0 += mr;
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "pack W[N,K] into 16-column panels");
  m.def("gemm", &gemm, "y = x @ W^T with a packed weight (AVX2/FMA, 1 thread)");
}
