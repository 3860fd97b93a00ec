// SiLU-and-multiply of eight floats, shared by the fused elementwise op (fused_ops.cpp:
// silu_and_mul) and the gate_up GEMM's fused epilogue (cpu_gemm_gate_up.cpp), so that the two
// paths compute the same bits from the same gate and up values.
#pragma once

#include <limits>

#include "vec8.h"

namespace conveyor_vec {

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

// T(g / (1 + exp(-g))) * up, the product still in float32 (the caller's store rounds it to T):
// the rounding points of torch's F.silu(gate) * up in dtype T.
template <typename T> inline v8 silu_mul8(v8 g, v8 up) {
  return rounded<T>(g / (splat(1.0f) + exp8(-g))) * up;
}

}  // namespace conveyor_vec
