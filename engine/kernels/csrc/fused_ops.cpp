// Fused elementwise kernels for the CPU dense path (engine/kernels/ops.py dispatches here):
// residual add + RMSNorm, NeoX rotary in place, and SiLU-and-multiply, for float32 and bfloat16.
//
// Each replaces a chain of separate torch ops (one pass over memory and one allocation each) by
// one or two passes, and keeps the rounding points of that chain: every intermediate that torch
// materialises as a tensor of the model dtype is rounded to that dtype here too (`rounded<T>`),
// statistics are accumulated in float32. Products and sums are kept separate (no FMA
// contraction, see `rounded`), so the residual add and the rotary are bit-identical to
// the torch path; RMSNorm differs only in the summation order of the squares, SiLU only in the
// exp (`exp8`, a Cephes-style polynomial; tests/test_cpu_fused_ops.py bounds its error).
//
// Hot loops use GCC vector extensions (8 floats, one AVX2 register; split on other ISAs), with
// the ragged tail of a row processed through a zero-padded 8-element buffer so that it takes the
// same arithmetic as the body. Rows are spread over torch's intra-op threads (at::parallel_for)
// in chunks large enough that one thread, the common case, runs inline.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
using bf16 = c10::BFloat16;

constexpr int64_t kGrainElements = 1 << 16;  // per thread chunk: below this, threading costs more

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 as_float(v8u u) {
  v8 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline v8u as_bits(v8 f) {
  v8u u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// bfloat16 bits of v, rounded to nearest even like c10::BFloat16 (NaN -> the canonical quiet NaN).
inline v8u bf16_bits(v8 v) {
  const v8u u = as_bits(v);
  const v8u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const v8u nan = (v8u)(v != v);
  return (r & ~nan) | (0x7FC0u & nan);
}

inline v8 load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 load(const bf16* p) {
  v8h h;
  std::memcpy(&h, p, sizeof h);
  return as_float(__builtin_convertvector(h, v8u) << 16);
}
inline void store(bf16* p, v8 v) {
  const v8h h = __builtin_convertvector(bf16_bits(v), v8h);
  std::memcpy(p, &h, sizeof h);
}

// The value v takes once stored as a T (what a torch op producing a T tensor rounds to). For
// float32 that is v itself, made opaque to the compiler: torch rounds every product on its own,
// and letting gcc contract x1*c - x2*s into an FMA would change the low bits of the rotary.
inline v8 opaque(v8 v) {
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}
template <typename T> inline v8 rounded(v8 v);
template <> inline v8 rounded<float>(v8 v) { return opaque(v); }
template <> inline v8 rounded<bf16>(v8 v) { return as_float(bf16_bits(v) << 16); }

// The first m (<= 8) elements at p, zero padded; and the store of the first m lanes.
template <typename T> inline v8 load_n(const T* p, int64_t m) {
  if (m == 8) return load(p);
  T buf[8] = {};
  std::copy(p, p + m, buf);
  return load(buf);
}
template <typename T> inline void store_n(T* p, v8 v, int64_t m) {
  if (m == 8) return store(p, v);
  T buf[8];
  store(buf, v);
  std::copy(buf, buf + m, p);
}

// exp(x) in float32 for every x: Cephes' expf polynomial on r = x - n ln2, |r| <= ln2/2, with
// ln2 split in two so n*ln2 is exact, and 2^n applied as two factors so that n = 128 (x near
// ln(FLT_MAX)) and gradual underflow need no special case. x > ln(FLT_MAX) gives inf, NaN NaN.
// Horner's steps may contract into FMAs; the last step may not (`opaque`): contracted it gave a
// max error of 1.02 ulp, kept separate 0.99 ulp over 50M points (tests/test_cpu_fused_ops.py).
inline v8 exp8(v8 x) {
  const v8 hi = splat(88.72283935546875f), lo = splat(-103.97208404541015625f);
  const v8 xc = x < lo ? lo : (x > hi ? hi : x);
  const v8 t = xc * 1.44269504088896341f;
  const v8i n = __builtin_convertvector(t + (t < 0.0f ? splat(-0.5f) : splat(0.5f)), v8i);
  const v8 nf = __builtin_convertvector(n, v8);
  const v8 r = (xc - opaque(nf * 0.693359375f)) + opaque(nf * 2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (opaque(p * r * r) + r) + 1.0f;
  const v8i n1 = n >> 1, n2 = n - n1;
  const v8 y = (p * as_float((v8u)((n1 + 127) << 23))) * as_float((v8u)((n2 + 127) << 23));
  const v8 inf = splat(std::numeric_limits<float>::infinity());
  return x != x ? x : (x > hi ? inf : y);
}

// ---- RMSNorm (optionally after a residual add) ----------------------------------------------

// One row of n: s = x (+ res, rounded to T and written to sum); out = T(T(s * rsqrt(mean(s^2) +
// eps)) * w), the squares summed in float32.
template <typename T>
void rms_norm_row(const T* x, const T* res, const T* w, T* out, T* sum, int64_t n, float eps) {
  v8 acc0 = splat(0.0f), acc1 = splat(0.0f);
  const T* s = res ? sum : x;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8 a = load(x + i), b = load(x + i + 8);
    if (res) {
      a = rounded<T>(a + load(res + i));
      b = rounded<T>(b + load(res + i + 8));
      store(sum + i, a);
      store(sum + i + 8, b);
    }
    acc0 = acc0 + a * a;
    acc1 = acc1 + b * b;
  }
  for (; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    v8 a = load_n(x + i, m);
    if (res) {
      a = rounded<T>(a + load_n(res + i, m));
      store_n(sum + i, a, m);
    }
    acc0 = acc0 + a * a;
  }
  const float inv = 1.0f / std::sqrt(hsum(acc0 + acc1) / static_cast<float>(n) + eps);
  const v8 vinv = splat(inv);
  for (i = 0; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    store_n(out + i, rounded<T>(load_n(s + i, m) * vinv) * load_n(w + i, m), m);
  }
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor* res, const at::Tensor& w, at::Tensor& out,
                   at::Tensor* sum, float eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T* xp = x.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  T* sp = sum ? sum->data_ptr<T>() : nullptr;
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      rms_norm_row<T>(xp + r * n, rp ? rp + r * n : nullptr, wp, op + r * n, sp ? sp + r * n : nullptr, n, eps);
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.size(-1) > 0, "rms_norm: x layout");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [hidden] in x's dtype");
}

template <typename F> void by_dtype(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(bf16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm_args(x, w);
  at::Tensor out = at::empty_like(x);
  by_dtype("rms_norm", x.scalar_type(), [&](auto tag) {
    rms_norm_rows<decltype(tag)>(x, nullptr, w, out, nullptr, static_cast<float>(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w,
                                                double eps) {
  check_norm_args(x, w);
  TORCH_CHECK(res.sizes() == x.sizes() && res.is_contiguous() && res.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  at::Tensor out = at::empty_like(x), sum = at::empty_like(x);
  by_dtype("add_rms_norm", x.scalar_type(), [&](auto tag) {
    rms_norm_rows<decltype(tag)>(x, &res, w, out, &sum, static_cast<float>(eps));
  });
  return {out, sum};
}

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
      for (int64_t i = 0; i < half; i += 8) {
        const int64_t m = std::min<int64_t>(8, half - i);
        const v8 vc = rounded<T>(load_n(c + i, m)), vs = rounded<T>(load_n(s + i, m));
        const v8 x1 = load_n(p + i, m), x2 = load_n(p + half + i, m);
        store_n(p + i, rounded<T>(x1 * vc) - rounded<T>(x2 * vs), m);
        store_n(p + half + i, rounded<T>(x2 * vc) + rounded<T>(x1 * vs), m);
      }
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
  const v8 one = splat(1.0f);
  for (int64_t i = 0; i < inner; i += 8) {
    const int64_t m = std::min<int64_t>(8, inner - i);
    const v8 g = load_n(x + i, m);
    store_n(out + i, rounded<T>(g / (one + exp8(-g))) * load_n(x + inner + i, m), m);
  }
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
  for (int64_t i = 0; i < x.numel(); i += 8) {
    const int64_t m = std::min<int64_t>(8, x.numel() - i);
    store_n(op + i, exp8(load_n(xp + i, m)), m);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("vec_exp(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("vec_exp", &vec_exp);
}
