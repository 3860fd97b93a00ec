// An MLP's gate_up projection with SiLU-and-multiply fused into the GEMM's epilogue:
// y[M, I] = silu(x @ Wg^T (+ bg)) * (x @ Wu^T (+ bu)), never writing the [M, 2I] intermediate
// (engine/kernels/cpu_gemm.py wraps it; measured in benchmarks/cpu_gemm_ab.py --gate-up).
//
// Weight layout: the panels of cpu_gemm.cpp (16 columns, K x 16, float32 or exact 16-bit),
// gate and up packed separately and interleaved: panel 2p holds gate columns 16p..16p+15,
// panel 2p+1 the up columns of the same indices (each zero-padded past I). A row block runs the
// gate panel, parks its sums (block_rows x 16) in an L1 buffer, runs the up panel, and combines
// the two as each up tile leaves its registers: the cold [M, 2I] output (25 MB at M = 2048,
// I = 1536) and its re-read by silu_and_mul both go.
//
// Guarantee: bit-identical to cpu_gemm on the unpacked [Wg; Wu] followed by silu_and_mul
// (fused_ops.cpp): the same tile (cpu_gemm_tile.h: one FMA chain per output in k order, then
// one add of the bias) and the same SiLU arithmetic (silu8.h). With fuse = false it writes the
// plain [M, 2I] projection (gate columns, then up), for callers that need it (LoRA deltas).
#if defined(__AVX2__) && defined(__FMA__)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu_gemm_tile.h"
#include "silu8.h"

namespace {

using namespace conveyor_gemm;
using conveyor_vec::v8;

// Row blocks of `block_rows`, each walking every (gate, up) panel pair once: the gate panel by
// all the block's balanced row tiles (its sums parked in `g`, rows x 16 floats, in L1), then
// the up panel likewise, so one panel at a time stays in L1 as in cpu_gemm.cpp. Pairs are
// spread over torch's intra-op threads (one thread runs inline).
template <class S, bool FUSE>
void run(const float* xp, const typename S::T* w, float* yp, int64_t M, int64_t K, int64_t inner,
         const float* bp, int64_t block_rows) {
  using T = typename S::T;
  const int64_t pairs = (inner + NR - 1) / NR, ldy = FUSE ? inner : 2 * inner, panel = K * NR;
  const int64_t pf = PF_BYTES / sizeof(T);  // the prefetch runs on through the interleaved stream
  const int64_t rb = std::max<int64_t>(1, std::min(block_rows, M));
  for (int64_t r0 = 0; r0 < M; r0 += rb) {
    const int64_t rows = std::min(rb, M - r0), nt = tiles(rows);
    at::parallel_for(0, pairs, 4, [&](int64_t p0, int64_t p1) {
      std::vector<float> g(FUSE ? rows * NR : 0);  // the block's gate sums of one pair, 16 lanes a row
      for (int64_t p = p0; p < p1; ++p) {
        const T* gate = w + 2 * p * panel;
        const T* up = gate + panel;
        const int ncols = static_cast<int>(std::min<int64_t>(NR, inner - p * NR));
        const float* gb = bp ? bp + p * NR : nullptr;
        const float* ub = bp ? bp + inner + p * NR : nullptr;
        float* y = yp + r0 * ldy + p * NR;
        for (int64_t t = 0, m = 0; t < nt; m += tile_rows(rows, nt, t), ++t) {
          dispatch<S>(tile_rows(rows, nt, t), t == 0, xp + (r0 + m) * K, K, gate, K, gate + pf,
                      [&](int r, __m256 a0, __m256 a1) {
                        add_bias(a0, a1, gb, ncols);
                        if constexpr (FUSE) {
                          _mm256_storeu_ps(&g[(m + r) * NR], a0);
                          _mm256_storeu_ps(&g[(m + r) * NR + 8], a1);
                        } else {
                          store_cols(y + (m + r) * ldy, ncols, a0, a1);
                        }
                      });
        }
        for (int64_t t = 0, m = 0; t < nt; m += tile_rows(rows, nt, t), ++t) {
          dispatch<S>(tile_rows(rows, nt, t), t == 0, xp + (r0 + m) * K, K, up, K, up + pf,
                      [&](int r, __m256 a0, __m256 a1) {
                        add_bias(a0, a1, ub, ncols);
                        if constexpr (FUSE) {
                          // lanes past ncols hold silu(0) * 0, not stored (silu_and_mul's zero padding)
                          const float* gr = &g[(m + r) * NR];
                          a0 = (__m256)conveyor_vec::silu_mul8<float>((v8)_mm256_loadu_ps(gr), (v8)a0);
                          a1 = (__m256)conveyor_vec::silu_mul8<float>((v8)_mm256_loadu_ps(gr + 8), (v8)a1);
                          store_cols(y + (m + r) * ldy, ncols, a0, a1);
                        } else {
                          store_cols(y + (m + r) * ldy + inner, ncols, a0, a1);
                        }
                      });
        }
      }
    });
  }
}

template <class S>
void run_fuse(bool fuse, const float* xp, const typename S::T* w, float* yp, int64_t M, int64_t K, int64_t inner,
              const float* bp, int64_t block_rows) {
  if (fuse)
    run<S, true>(xp, w, yp, M, K, inner, bp, block_rows);
  else
    run<S, false>(xp, w, yp, M, K, inner, bp, block_rows);
}

// x [M, K] float32; packed [2 * ceil(I/16), K, 16] interleaved gate/up panels (cpu_gemm.py's
// pack_gate_up); bias [2I] (gate, then up) or None. fuse: [M, I] silu(gate) * up, else [M, 2I].
at::Tensor cpu_gemm_gate_up(const at::Tensor& x_in, const at::Tensor& packed, int64_t inner,
                            const std::optional<at::Tensor>& bias, bool fuse, int64_t block_rows) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "cpu_gemm_gate_up: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(inner >= 0 && packed.dim() == 3 && packed.size(0) == 2 * ((inner + NR - 1) / NR) &&
                  packed.size(1) == K && packed.size(2) == NR && packed.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0,
              "cpu_gemm_gate_up: packed weight does not match x [M, ", K, "] and inner = ", inner);
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == 2 * inner && b.scalar_type() == at::kFloat,
                "cpu_gemm_gate_up: bias must be float32 [2 * inner]");
    bp = b.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, fuse ? inner : 2 * inner}, x.options());
  if (M == 0 || inner == 0) return y;
  // K == 0 needs no case of its own: empty FMA chains leave 0 (+ bias) for the epilogue
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (packed.scalar_type()) {
    case at::kFloat: run_fuse<F32>(fuse, xp, packed.data_ptr<float>(), yp, M, K, inner, bp, block_rows); break;
    case at::kBFloat16:
      run_fuse<BF16>(fuse, xp, static_cast<const uint16_t*>(packed.data_ptr()), yp, M, K, inner, bp, block_rows);
      break;
#if defined(__F16C__)
    case at::kHalf:
      run_fuse<F16>(fuse, xp, static_cast<const uint16_t*>(packed.data_ptr()), yp, M, K, inner, bp, block_rows);
      break;
#endif
    default: TORCH_CHECK(false, "cpu_gemm_gate_up: packed weight must be float32, bfloat16 or float16 (F16C)");
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("cpu_gemm_gate_up(Tensor x, Tensor packed, int inner, Tensor? bias, bool fuse, int block_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("cpu_gemm_gate_up", &cpu_gemm_gate_up); }
#endif  // __AVX2__ && __FMA__
