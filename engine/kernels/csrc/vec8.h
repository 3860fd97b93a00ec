// Eight-float vectors (one AVX2 register; GCC splits them on other ISAs) and the loads, stores and
// roundings the fused elementwise kernels (fused_ops.cpp, rms_norm.cpp) share.
//
// Rounding points: every intermediate that the torch reference materialises as a tensor of the
// model dtype T is rounded to T here too (`rounded<T>`); for float32 that is an `opaque` value,
// so that gcc cannot contract a product into a following add (an FMA rounds once, torch twice).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace conveyor_vec {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
using bf16 = c10::BFloat16;

constexpr int64_t kGrainElements = 1 << 16;  // elements per thread chunk: below it threads cost more

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

// v, hidden from the optimiser: no FMA contraction across it, no reassociation.
inline v8 opaque(v8 v) {
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}
inline float opaque(float v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
  return v;
}

// The value v takes once stored as a T (what a torch op producing a T tensor rounds to).
template <typename T> inline v8 rounded(v8 v);
template <> inline v8 rounded<float>(v8 v) { return opaque(v); }
template <> inline v8 rounded<bf16>(v8 v) { return as_float(bf16_bits(v) << 16); }

// The first m (<= 8) elements at p, zero padded; and the store of the first m lanes. A ragged
// tail goes through the same vector arithmetic as the body.
template <typename T, typename M> inline v8 load_n(const T* p, M m) {
  if (m == 8) return load(p);
  T buf[8] = {};
  std::copy(p, p + static_cast<int64_t>(m), buf);
  return load(buf);
}
template <typename T, typename M> inline void store_n(T* p, v8 v, M m) {
  if (m == 8) return store(p, v);
  T buf[8];
  store(buf, v);
  std::copy(buf, buf + static_cast<int64_t>(m), p);
}

// f(i, m) for i = 0, 8, 16, ... < n, m the elements from i on (at most 8): the body's m is a
// compile-time 8 (so load_n / store_n are plain vector moves there), only the tail's is not.
template <typename F> inline void for_chunks(int64_t n, F&& f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) f(i, std::integral_constant<int64_t, 8>{});
  if (i < n) f(i, n - i);
}

// Calls f(float{}) or f(bf16{}) for the tensor dtype t; other dtypes are an error.
template <typename F> void by_dtype(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(bf16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

}  // namespace conveyor_vec
