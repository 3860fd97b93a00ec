// Residual add + RMSNorm for CPU rows, bit-identical to `ops.rms_norm_torch` on the host it was
// tested on (AVX2): s = x + residual (rounded to T), then in float32
// normed = s * rsqrt(sum(s*s) / n + eps), rounded to T, times the weight (rounded to T).
//
// Bit-identity needs the reference's summation order of the squares, which is torch's CPU sum
// kernel over a contiguous last dim (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum
// -> row_sum -> multi_row_sum), reproduced by `sum_squares`; its vector width is torch's
// Vectorized<float> (8 on AVX2, 16 on AVX-512: the caller passes it). The rsqrt is torch's own
// kernel (at::rsqrt_ over the rows' mean squares), as its vectorized rsqrt differs from 1/sqrt in
// the last bit. Why bother: a tiny random model amplifies a one-ulp change of a norm scale to
// 1e-4 in the logits, the tolerance of the tests against transformers.
//
// Two passes over each row (add + squares; scale), rows spread over torch's intra-op threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "torch_sum_order.h"
#include "vec8.h"

namespace {

using namespace conveyor_vec;

// sum(s*s) over one row in torch's order (torch_sum_order.h), the squares rounded to float32.
template <int K, typename T> float sum_squares(const T* s, int64_t n) {
  constexpr int64_t W = 8 * K;
  return torch_order_sum<K>(
      n,
      [&](int64_t vec, int c) {
        const v8 a = load(s + vec * W + 8 * c);
        return opaque(a * a);
      },
      [&](int64_t e) {
        const float a = static_cast<float>(s[e]);
        return opaque(a * a);
      });
}

// Rows shorter than one vector: torch sums them with scalar accumulators (row_sum over floats).
template <typename T> float sum_squares_short(const T* s, int64_t n) {
  return torch_order_sum_short(n, [&](int64_t e) {
    const float a = static_cast<float>(s[e]);
    return opaque(a * a);
  });
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* res, const at::Tensor& w, at::Tensor& out,
                   at::Tensor* sum, float eps, int64_t lanes) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T* xp = x.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  T* sp = sum ? sum->data_ptr<T>() : nullptr;
  const T* src = sp ? sp : xp;  // the rows that are normalised
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::Tensor scale = at::empty({rows}, x.options().dtype(at::kFloat));
  float* scale_p = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (rp) {
        const T *x_row = xp + r * n, *r_row = rp + r * n;
        T* s_row = sp + r * n;
        for_chunks(n, [&](int64_t i, auto m) {
          store_n(s_row + i, rounded<T>(load_n(x_row + i, m) + load_n(r_row + i, m)), m);
        });
      }
      const T* row = src + r * n;
      const float ss = n < lanes ? sum_squares_short(row, n)
                                 : (lanes == 16 ? sum_squares<2>(row, n) : sum_squares<1>(row, n));
      scale_p[r] = ss / static_cast<float>(n) + eps;
    }
  });
  scale.rsqrt_();
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const v8 inv = splat(scale_p[r]);
      const T* s_row = src + r * n;
      T* o_row = op + r * n;
      for_chunks(n, [&](int64_t i, auto m) {
        store_n(o_row + i, rounded<T>(load_n(s_row + i, m) * inv) * load_n(wp + i, m), m);
      });
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w, int64_t lanes) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) > 0, "rms_norm: x layout");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [hidden] in x's dtype");
  TORCH_CHECK(lanes == 8 || lanes == 16, "rms_norm: lanes must be 8 or 16");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, int64_t lanes) {
  check_norm_args(x, w, lanes);
  at::Tensor out = at::empty_like(x);
  by_dtype("rms_norm", x.scalar_type(), [&](auto tag) {
    rms_norm_rows<decltype(tag)>(x, nullptr, w, out, nullptr, static_cast<float>(eps), lanes);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w,
                                                double eps, int64_t lanes) {
  check_norm_args(x, w, lanes);
  TORCH_CHECK(res.sizes() == x.sizes() && res.is_contiguous() && res.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  at::Tensor out = at::empty_like(x), sum = at::empty_like(x);
  by_dtype("add_rms_norm", x.scalar_type(), [&](auto tag) {
    rms_norm_rows<decltype(tag)>(x, &res, w, out, &sum, static_cast<float>(eps), lanes);
  });
  return {out, sum};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, int lanes) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, int lanes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
