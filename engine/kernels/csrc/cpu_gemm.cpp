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
// Register tile (cpu_gemm_tile.h): MR (<= 6) rows x 16 columns = 2 * MR ymm accumulators.
// Guarantee: each output is one accumulator lane updated by a plain FMA chain over k = 0..K-1
// starting from 0.0f, then (if given) one float32 add of the bias. Whatever M, the row's tile,
// block or thread, a row's bits are the same: the result of a row does not depend on the batch.
//
// Built only where the compiler targets AVX2 + FMA (-march=native on such a host); elsewhere no
// op is registered and engine/kernels/cpu_gemm.py reports the backend unavailable.
#if defined(__AVX2__) && defined(__FMA__)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu_gemm_tile.h"

namespace {

using namespace conveyor_gemm;

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
    const int64_t rows = std::min(rb, M - r0), nt = tiles(rows);
    at::parallel_for(0, P, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const typename S::T* panel = w + p * K * NR;
        const int ncols = static_cast<int>(std::min<int64_t>(NR, n - p * NR));
        const float* pb = bp ? bp + p * NR : nullptr;
        int64_t m0 = r0;
        for (int64_t t = 0; t < nt; ++t) {
          const int mr = tile_rows(rows, nt, t);
          float* y = yp + m0 * n + p * NR;
          // The prefetch may point past the last panel: _mm_prefetch never faults.
          dispatch<S>(mr, t == 0, xp + m0 * K, K, panel, K, panel + PF_BYTES / sizeof(typename S::T),
                      [&](int r, __m256 a0, __m256 a1) {
                        add_bias(a0, a1, pb, ncols);
                        store_cols(y + r * n, ncols, a0, a1);
                      });
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
