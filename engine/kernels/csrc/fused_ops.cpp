// Fused elementwise kernels for the CPU dense path (engine/kernels/ops.py dispatches here): NeoX
// rotary in place and SiLU-and-multiply, for float32 and bfloat16 (RMSNorm: rms_norm.cpp).
//
// Each replaces a chain of separate torch ops (one pass over memory and one allocation each) by
// one pass, with the rounding points of that chain (vec8.h: `rounded<T>`, no FMA contraction).
// The rotary is bit-identical to the torch path; SiLU differs only in the exp (silu8.h's `exp8`,
// a Cephes-style polynomial, < 1 ulp; tests/test_cpu_fused_ops.py checks it).
//
// The ragged tail of a row goes through a zero-padded 8-element buffer, so it takes the same
// arithmetic as the body. Rows are spread over torch's intra-op threads (at::parallel_for) in
// chunks large enough that one thread, the common case, runs inline.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "silu8.h"

namespace {

using namespace conveyor_vec;

// ---- rotary ---------------------------------------------------------------------------------

// Rotates the first 2*half dims of every head of token rows [t0, t1) of t ([T, H, D], any
// token/head strides, unit dim stride): r1 = x1*c - x2*s, r2 = x2*c + x1*s with c, s rounded to T
// and each product rounded to T, as the torch path computes them.
template <typename T>
void rotate(T* base, int64_t t0, int64_t t1, int64_t heads, int64_t st, int64_t sh, const float* cos,
            const float* sin, int64_t half) {
  for (int64_t t = t0; t < t1; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* p = base + t * st + h * sh;
      for_chunks(half, [&](int64_t i, auto m) {
        const v8 vc = rounded<T>(load_n(c + i, m)), vs = rounded<T>(load_n(s + i, m));
        const v8 x1 = load_n(p + i, m), x2 = load_n(p + half + i, m);
        store_n(p + i, rounded<T>(x1 * vc) - rounded<T>(x2 * vs), m);
        store_n(p + half + i, rounded<T>(x2 * vc) + rounded<T>(x1 * vs), m);
      });
    }
  }
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2), "rotary: q/k shapes");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.device().is_cpu() && k.device().is_cpu(), "rotary: q/k layout");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rotary: q and k dtypes differ");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) &&
                  2 * cos.size(1) <= q.size(2),
              "rotary: cos/sin must be float32 [T, rotary_dim // 2]");
  const int64_t tokens = q.size(0), half = cos.size(1);
  const int64_t per_token = (q.size(1) + k.size(1)) * 2 * half;
  by_dtype("rotary", q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* qp = q.data_ptr<T>();
    T* kp = k.data_ptr<T>();
    at::parallel_for(0, tokens, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, per_token)),
                     [&](int64_t t0, int64_t t1) {
                       rotate<T>(qp, t0, t1, q.size(1), q.stride(0), q.stride(1), cos.data_ptr<float>(),
                                 sin.data_ptr<float>(), half);
                       rotate<T>(kp, t0, t1, k.size(1), k.stride(0), k.stride(1), cos.data_ptr<float>(),
                                 sin.data_ptr<float>(), half);
                     });
  });
}

// ---- SiLU and multiply ----------------------------------------------------------------------

// out = T(T(g / (1 + exp(-g))) * u) per element, g the first half of a row and u the second.
template <typename T> void silu_mul_row(const T* x, T* out, int64_t inner) {
  for_chunks(inner, [&](int64_t i, auto m) {
    store_n(out + i, silu_mul8<T>(load_n(x + i, m), load_n(x + inner + i, m)), m);
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "silu_and_mul: x must be contiguous [..., 2 * I]");
  const int64_t inner = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inner;
  at::Tensor out = at::empty(shape, x.options());
  if (inner == 0) return out;
  const int64_t rows = x.numel() / x.size(-1);
  by_dtype("silu_and_mul", x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / inner), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) silu_mul_row<T>(xp + r * 2 * inner, op + r * inner, inner);
    });
  });
  return out;
}

// exp8 over a float32 tensor, for the accuracy test only.
at::Tensor vec_exp(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), "vec_exp: float32 CPU");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_chunks(x.numel(), [&](int64_t i, auto m) { store_n(op + i, exp8(load_n(xp + i, m)), m); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("vec_exp(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("rotary_", &rotary_);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("vec_exp", &vec_exp);
}
