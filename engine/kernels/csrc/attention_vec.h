// The vector helpers of the CPU attention kernel (paged_attention.cpp and its headers): eight-float
// registers (vec8.h's v8) with their loads, stores and broadcasts, exp on eight lanes, the lane
// shuffles of the horizontal sums and maxes, and the conversions of 16-bit cache rows to float.
//
// Guarantees: every helper computes each lane (or each element) by a fixed sequence of operations
// that does not depend on the other lanes' values; the kernel's bit-identity between its decode and
// prefill paths rests on these exact sequences, so they must not be reordered or regrouped.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "vec8.h"

namespace conveyor_attention {

// Eight floats in one register (AVX/AVX2; two on NEON). Written explicitly in the hot loops
// because gcc keeps plain float arrays used as accumulators on the stack.
using conveyor_vec::v8;
using conveyor_vec::v8i;
inline v8 load8(const float* p) { return conveyor_vec::load(p); }
inline void store8(float* p, v8 v) { conveyor_vec::store(p, v); }
inline v8 splat8(float x) { return conveyor_vec::splat(x); }

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

inline v8 max8v(v8 a, v8 b) { return a > b ? a : b; }

// exp(x) for x <= 0 on eight lanes (Cephes' single-precision polynomial, ~1 ulp; round-to-nearest
// through the 1.5 * 2^23 trick); x = -inf (a masked score) gives exactly 0. Named apart from
// silu8.h's exp8 (every x), since the build compiles the sources in shared translation units.
inline v8 exp8_nonpos(v8 x) {
  const v8i masked = x < splat8(-87.0f);
  const v8 xc = masked ? splat8(-87.0f) : x;
  const v8 magic = splat8(12582912.0f);
  const v8 n = (xc * splat8(1.44269504088896341f) + magic) - magic;
  const v8 r = xc - n * splat8(0.693359375f) + n * splat8(2.12194440e-4f);
  v8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * r * r + r + splat8(1.0f);
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 two_n;
  std::memcpy(&two_n, &e, sizeof two_n);
  return masked ? splat8(0.f) : p * two_n;
}

// Lane shuffles of GCC/clang vector extensions (__builtin_shufflevector from GCC 12 and clang;
// __builtin_shuffle with a mask vector on older GCC); they lower to in-register shuffles on
// AVX2, AVX-512 and NEON alike.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, v8i{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] (what AVX's vhaddps computes).
inline v8 pair_sums(v8 a, v8 b) {
  return SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// Horizontal sums of eight registers at once: lane j of the result is the sum of the lanes x of
// a_j, always as ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) whichever j is. Seven vector
// adds and their shuffles instead of eight separate horizontal sums (which dominated the scoring
// at head_dim 64, where a dot product is only eight multiply-adds).
inline v8 sums8x8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
  const v8 lo = pair_sums(pair_sums(a0, a1), pair_sums(a2, a3));  // [a0..a3 lanes 0-3, a0..a3 lanes 4-7]
  const v8 hi = pair_sums(pair_sums(a4, a5), pair_sums(a6, a7));  // [a4..a7 lanes 0-3, a4..a7 lanes 4-7]
  return SHUFFLE8(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// [max(a0, a1), max(a2, a3), max(b0, b1), max(b2, b3), ...]: pair_sums with max.
inline v8 pair_maxes(v8 a, v8 b) {
  return max8v(SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14), SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15));
}

template <typename T>
inline void row_to_float(const T* __restrict src, float* __restrict dst, int n, float scale) {
  for (int d = 0; d < n; ++d) dst[d] = to_float(src[d]) * scale;
}

template <typename T>
inline void store_row(const float* __restrict src, T* __restrict dst, int n, float scale) {
  for (int d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * scale);
}

// Makes the compiler keep v in a register: without it, gcc folds the key (value) loads into the
// multiply-adds as memory operands, reloading them once per row and running out of load slots.
#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER(v) asm("" : "+x"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

}  // namespace conveyor_attention
