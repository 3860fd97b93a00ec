// y[M, N] = x[M, K] @ W^T (+ bias) in float32, W read straight from GGUF Q4_1 blocks (5 bits a
// weight instead of 32): engine/kernels/q4_1_linear.py wraps these ops, and
// benchmarks/q4_1_linear_ab.py measures them against the float32 GEMM (csrc/cpu_gemm.cpp).
//
// Guarantee: bit-identical to cpu_gemm(x, cpu_gemm_pack(W), bias) with W = gguf.dequantize(raw),
// for any M and thread count. Each weight is the value gguf's numpy code computes,
// fl32(fl32(d * q) + m), d and m the block's fp16 scale and min widened to float32 (exact). The
// kernel computes it as one FMA, fl32(d * q + m), which is the same value: d has at most 11
// significant bits and q 4, so d * q is exact in float32 and its rounding is a no-op. Each
// output is then one FMA chain over k = 0..K-1 from 0.0f and one add of the bias, exactly
// cpu_gemm's order. Outputs are vectorised across 8 output columns, never across k.
//
// Layout (q4_1_gemm_pack): panels of 32 output rows (4 groups of 8; N padded with zero blocks), each
// panel K/32 blocks of 640 bytes streamed in order (one sequential stream for the prefetchers):
//   bytes   0..127: per group v: 8 fp16 d (one per row), then 8 fp16 m
//   bytes 128..639: per chunk c of 8 k (4 chunks) and group v, 32 bytes: row i's 8 codes
//                   (k = 8c .. 8c + 7) as the nibbles of the 32-bit lane i, k = 8c + j at bit 4j.
// So one 256-bit load gives 8 rows' codes for 8 consecutive k.
//
// Nibble j is isolated with one AND (mask 0xF << 4j, or a shift right by 28 for j = 7), its int32
// converted to float q * 16^j exactly, and multiplied by d * 16^-j (exact: a power of two, and
// far from float32's subnormals for any fp16 d): the real product is still the exact q * d. That
// is one integer op per weight fewer than shift-and-mask: and, convert, FMA per 8 weights.
//
// Paths by rows M: 1 row, tile_row (codes and d in registers, codes shifted a nibble per k);
// 2-10 rows, `tile` (balanced tiles of <= 5 rows, the d * 16^-j table); 11+ rows, `wide` (each
// panel decoded once per 64 rows into a float32 panel for cpu_gemm_tile.h's register tile).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu_gemm_tile.h"

namespace conveyor_q4_1 {

constexpr int64_t kBlockK = 32;         // weights per GGUF block
constexpr int64_t kRawBytes = 20;       // fp16 d, fp16 m, 16 bytes of nibbles
constexpr int kGroups = 4;              // 8-row groups per panel
constexpr int64_t kPanelRows = 8 * kGroups;
constexpr int64_t kCodesAt = kGroups * 32;  // the scales' bytes precede the codes
constexpr int64_t kBlockBytes = kCodesAt + 4 * kGroups * 32;  // 640: ten cache lines
// Software prefetch distance of the weight stream: without prefetch M = 4 measured ~20% slower
// (20.1 against 16.5 ms per 30 layers of SmolLM2-135M), 8 KB no faster than 4 KB.
constexpr int64_t kPrefetchBytes = 4096;

inline uint16_t read_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// raw uint8 [N, K/32 * 20] (GGUFReader's Q4_1 tensor) -> uint8 [ceil(N/32), K/32, 640].
at::Tensor q4_1_gemm_pack(const at::Tensor& raw_in) {
  TORCH_CHECK(raw_in.dim() == 2 && raw_in.scalar_type() == at::kByte && raw_in.is_cpu() &&
                  raw_in.size(1) % kRawBytes == 0,
              "q4_1_gemm_pack: raw must be a uint8 CPU tensor [N, K/32 * 20]");
  const at::Tensor raw = raw_in.contiguous();
  const int64_t n = raw.size(0), blocks = raw.size(1) / kRawBytes, panels = (n + kPanelRows - 1) / kPanelRows;
  // zeros: padded rows get d = m = 0 and code 0, so their (never stored) outputs are finite
  at::Tensor out = at::zeros({panels, blocks, kBlockBytes}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t p = row / kPanelRows, v = row % kPanelRows / 8, i = row % 8;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* s = src + row * blocks * kRawBytes + b * kRawBytes;
      uint8_t* blk = dst + (p * blocks + b) * kBlockBytes;
      std::memcpy(blk + v * 32 + i * 2, s, 2);           // d
      std::memcpy(blk + v * 32 + 16 + i * 2, s + 2, 2);  // m
      for (int c = 0; c < 4; ++c) {
        uint32_t lane = 0;
        for (int j = 0; j < 8; ++j) {
          const int k = 8 * c + j;  // GGUF: weight k < 16 is byte k's low nibble, k >= 16 byte k-16's high
          const uint32_t q = k < 16 ? s[4 + k] & 0xF : s[4 + k - 16] >> 4;
          lane |= q << (4 * j);
        }
        std::memcpy(blk + kCodesAt + (c * kGroups + v) * 32 + i * 4, &lane, 4);
      }
    }
  }
  return out;
}

// Nibble j of each lane, as an int32 q * 16^j (j = 7: q itself, see the file's comment).
template <int J>
inline __m256i nibble(__m256i codes) {
  if constexpr (J == 7) return _mm256_srli_epi32(codes, 28);
  else return _mm256_and_si256(codes, _mm256_set1_epi32(0xF << (4 * J)));
}

// Accumulators, codes and weights are named variables, not arrays: with arrays GCC kept stack
// copies and stored every accumulator each k (as cpu_gemm_tile.h notes for the float32 tile).
// Q1_W: group v's 8 weights at nibble J; fma(q', d', m) = fl(q * d + m) = fl(fl(q * d) + m), since
// q * d is exact (see the file's comment). They are pinned in registers so GCC neither folds them
// into every row's FMA nor spills them.
#define Q1_W(v)                                                                                 \
  if constexpr (NV > v) {                                                                       \
    w##v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(nibble<J>(q##v)), _mm256_load_ps(ds[v][J]), m##v); \
    asm volatile("" : "+x"(w##v));                                                              \
  }
#define Q1_FMA(r, v) \
  if constexpr (NV > v) c##r##v = _mm256_fmadd_ps(xb, w##v, c##r##v);
#define Q1_ROW(r)                                                 \
  if constexpr (MR > r) {                                         \
    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k + J);   \
    Q1_FMA(r, 0) Q1_FMA(r, 1)                                     \
  }
#define Q1_OUT(r, v) \
  if constexpr (MR > r && NV > v) out(r, v0 + v, c##r##v);
#define Q1_CODES(v) \
  q##v = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + kCodesAt + (c * kGroups + v0 + v) * 32));
#define Q1_SCALES(v)                                                                           \
  {                                                                                            \
    const uint8_t* dm = blk + (v0 + v) * 32;                                                   \
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm)));  \
    m##v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 16)));       \
    _mm256_store_ps(ds[v][0], d);                                                              \
    _mm256_store_ps(ds[v][7], d);                                                              \
    for (int j = 1; j < 7; ++j)                                                                \
      _mm256_store_ps(ds[v][j], _mm256_mul_ps(d, _mm256_set1_ps(1.0f / float(1 << (4 * j))))); \
  }

// One k (= k + J) for all rows and groups of the tile: 8 weights per group, then MR FMAs each.
#define Q1_STEP(JJ)                                          \
  {                                                          \
    constexpr int J = JJ;                                    \
    __m256 w0, w1;                                           \
    Q1_W(0) Q1_W(1)                                          \
    Q1_ROW(0) Q1_ROW(1) Q1_ROW(2) Q1_ROW(3) Q1_ROW(4)           \
  }

// MR (<= 5) rows of x times groups v0, v0 + 1 (NV = 2) of one panel, all
// K; out(r, v, sums) gets each row's 8 sums per group. pf: also prefetch the panel stream
// kPrefetchBytes ahead (the panel's first tile does).
template <int MR, class Out>
void tile(const float* __restrict x, int64_t ldx, const uint8_t* __restrict panel, int64_t blocks, int v0,
          bool pf, Out&& out) {
  constexpr int NV = 2;  // 2 * MR <= 10 accumulators of the 16 ymm registers
  static_assert(MR <= 5);
  const __m256 z = _mm256_setzero_ps();
  __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z;
  alignas(32) float ds[NV][8][8];  // d * 16^-j per group and nibble (read as memory operands)
  __m256 m0 = z, m1 = z;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = panel + b * kBlockBytes;
    if (pf)  // the whole block, all groups
      for (int64_t l = 0; l < kBlockBytes; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + l), _MM_HINT_T0);
    Q1_SCALES(0) Q1_SCALES(1)
    for (int c = 0; c < 4; ++c) {
      __m256i q0, q1;
      Q1_CODES(0) Q1_CODES(1)
      const int64_t k = b * kBlockK + 8 * c;
      Q1_STEP(0) Q1_STEP(1) Q1_STEP(2) Q1_STEP(3) Q1_STEP(4) Q1_STEP(5) Q1_STEP(6) Q1_STEP(7)
    }
  }
  Q1_OUT(0, 0) Q1_OUT(0, 1) Q1_OUT(1, 0) Q1_OUT(1, 1) Q1_OUT(2, 0) Q1_OUT(2, 1) Q1_OUT(3, 0) Q1_OUT(3, 1)
  Q1_OUT(4, 0) Q1_OUT(4, 1)
}
#undef Q1_W
#undef Q1_FMA
#undef Q1_ROW
#undef Q1_OUT
#undef Q1_CODES
#undef Q1_SCALES
#undef Q1_STEP

// One row, all 4 groups: codes and d stay in registers, the codes shifted down a nibble per k,
// so a weight costs and, shift, convert, FMA with no load but m's (`tile`'s scaled-d table
// costs a load per weight, which more rows share).
#define Q1R_SCALES(v)                                                                            \
  d##v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + v * 32)));     \
  _mm256_store_ps(ms[v], _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + v * 32 + 16))));
#define Q1R_CODES(v) \
  q##v = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + kCodesAt + (c * kGroups + v) * 32));
#define Q1R_W(v)                                                                                        \
  {                                                                                                     \
    const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q##v, low)), d##v, _mm256_load_ps(ms[v])); \
    c##v = _mm256_fmadd_ps(xb, w, c##v);                                                                \
    q##v = _mm256_srli_epi32(q##v, 4);                                                                  \
  }
template <class Out>
void tile_row(const float* __restrict x, const uint8_t* __restrict panel, int64_t blocks, bool pf, Out&& out) {
  const __m256 z = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(0xF);
  __m256 c0 = z, c1 = z, c2 = z, c3 = z, d0, d1, d2, d3;
  alignas(32) float ms[4][8];
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = panel + b * kBlockBytes;
    if (pf)
      for (int64_t l = 0; l < kBlockBytes; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + l), _MM_HINT_T0);
    Q1R_SCALES(0) Q1R_SCALES(1) Q1R_SCALES(2) Q1R_SCALES(3)
    for (int c = 0; c < 4; ++c) {
      __m256i q0, q1, q2, q3;
      Q1R_CODES(0) Q1R_CODES(1) Q1R_CODES(2) Q1R_CODES(3)
      const float* xk = x + b * kBlockK + 8 * c;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256 xb = _mm256_broadcast_ss(xk + j);
        Q1R_W(0) Q1R_W(1) Q1R_W(2) Q1R_W(3)
      }
    }
  }
  out(0, 0, c0); out(0, 1, c1); out(0, 2, c2); out(0, 3, c3);
}
#undef Q1R_SCALES
#undef Q1R_CODES
#undef Q1R_W

// A row tile (<= 5 rows) of one panel. One row: tile_row (4 independent FMA chains; ~8% faster
// than `tile` at M = 1: 9.2 against 10.0 ms per 30 layers of SmolLM2-135M). 2-5 rows: `tile`, 2
// groups at a time (at M = 2 ~25% faster than one 2 x 4 tile, which spilled).
template <class Out>
void panel_rows(int mr, const float* x, int64_t ldx, const uint8_t* panel, int64_t blocks, Out&& out) {
  if (mr == 1) return tile_row(x, panel, blocks, true, out);
  for (int v0 = 0; v0 < kGroups; v0 += 2) {
    const bool pf = v0 == 0;  // the panel's first reader prefetches the stream
    switch (mr) {
      case 2: tile<2>(x, ldx, panel, blocks, v0, pf, out); break;
      case 3: tile<3>(x, ldx, panel, blocks, v0, pf, out); break;
      case 4: tile<4>(x, ldx, panel, blocks, v0, pf, out); break;
      default: tile<5>(x, ldx, panel, blocks, v0, pf, out); break;
    }
  }
}

// Many rows (M >= kWideRows): each panel is decoded once per block of kRowBlock rows, a half at
// a time, into a float32 panel of cpu_gemm's layout (K x 16) read by the float32 GEMM's own
// register tile (cpu_gemm_tile.h): the same weights, the same FMA chain, so the same bits, with
// the decode spread over up to 64 rows instead of redone per row tile (which lost to the float32
// GEMM from 16 rows: 58.0 against 49.8 ms per 30 layers). Below 11 rows the register tiles
// measured faster than this path (M = 6: 26.1 against 27.6 ms, M = 8: 31.6 against 34.1).
constexpr int64_t kWideRows = 11;
constexpr int64_t kRowBlock = 64;

// Half s (rows 16s .. 16s + 15) of a panel as one K x 16 float32 panel dst (32-byte aligned),
// small enough to stay in L1/L2 for the row tiles that read it.
void decode_half(const uint8_t* panel, int64_t blocks, int s, float* dst) {
  const __m256i low = _mm256_set1_epi32(0xF);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = panel + b * kBlockBytes;
    if (s == 0)  // the whole block, both halves
      for (int64_t l = 0; l < kBlockBytes; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + l), _MM_HINT_T0);
    // both groups of the half per k, so each 64-byte line of dst is written whole, once
    const uint8_t* dm = blk + 2 * s * 32;
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm)));
    const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 16)));
    const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 32)));
    const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 48)));
    for (int c = 0; c < 4; ++c) {
      const uint8_t* codes = blk + kCodesAt + (c * kGroups + 2 * s) * 32;
      __m256i q0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes));
      __m256i q1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + 32));
      float* o = dst + (b * kBlockK + 8 * c) * 16;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // fma(q, d, m): gguf's value, see the file's comment
        _mm256_store_ps(o + j * 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q0, low)), d0, m0));
        _mm256_store_ps(o + j * 16 + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q1, low)), d1, m1));
        q0 = _mm256_srli_epi32(q0, 4);
        q1 = _mm256_srli_epi32(q1, 4);
      }
    }
  }
}

void wide(const float* xp, const uint8_t* wp, float* yp, int64_t M, int64_t K, int64_t n, int64_t panels,
          const float* bp) {
  using namespace conveyor_gemm;
  const int64_t blocks = K / kBlockK;
  for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, M - r0), nt = tiles(rows);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      // one K x 16 float32 panel, 32-byte aligned (__m256's alignment), left uninitialised
      const std::unique_ptr<__m256[]> buf(new __m256[K * 2]);
      float* fb = reinterpret_cast<float*>(buf.get());
      for (int64_t p = p0; p < p1; ++p) {
        for (int s = 0; s < 2; ++s) {
          const int64_t col0 = p * kPanelRows + s * NR;
          const int ncols = static_cast<int>(std::min<int64_t>(NR, n - col0));
          if (ncols <= 0) break;
          decode_half(wp + p * blocks * kBlockBytes, blocks, s, fb);
          int64_t m0 = r0;
          for (int64_t t = 0; t < nt; ++t) {
            const int mr = tile_rows(rows, nt, t);
            dispatch<F32>(mr, false, xp + m0 * K, K, fb, K, fb, [&](int r, __m256 a0, __m256 a1) {
              add_bias(a0, a1, bp ? bp + col0 : nullptr, ncols);  // as cpu_gemm: one add after the chain
              store_cols(yp + (m0 + r) * n + col0, ncols, a0, a1);
            });
            m0 += mr;
          }
        }
      }
    });
  }
}

// x [M, K] float32, packed from q4_1_gemm_pack, n the true output width, bias [n] or None.
at::Tensor q4_1_gemm(const at::Tensor& x_in, const at::Tensor& packed, int64_t n,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.is_cpu(),
              "q4_1_gemm: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == kBlockBytes && packed.size(1) * kBlockK == K &&
                  packed.size(0) * kPanelRows >= n && (packed.size(0) - 1) * kPanelRows < n,
              "q4_1_gemm: packed weight does not match x [M, ", K, "] and n = ", n);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0, "q4_1_gemm: packed not 32-byte aligned");
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n && b.scalar_type() == at::kFloat, "q4_1_gemm: bias must be float32 [n]");
    bp = b.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t blocks = packed.size(1), panels = packed.size(0), panel_bytes = blocks * kBlockBytes;
  if (M >= kWideRows) {
    wide(xp, wp, yp, M, K, n, panels, bp);
    return y;
  }
  const int64_t nt = (M + 4) / 5;  // balanced row tiles of <= 5 (e.g. 8 -> 4 + 4)
  at::parallel_for(0, panels, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t t = 0, m0 = 0; t < nt; ++t) {
        const int mr = static_cast<int>(M / nt + (t < M % nt ? 1 : 0));
        float* y = yp + m0 * n;
        panel_rows(mr, xp + m0 * K, K, wp + p * panel_bytes, blocks, [&](int r, int v, __m256 a) {
          const int64_t col = p * kPanelRows + v * 8, cols = std::min<int64_t>(8, n - col);
          if (cols <= 0) return;
          alignas(32) float buf[8] = {};
          if (bp) {  // one add after the chain, as cpu_gemm
            std::copy(bp + col, bp + col + cols, buf);
            a = _mm256_add_ps(a, _mm256_load_ps(buf));
          }
          _mm256_store_ps(buf, a);
          std::copy(buf, buf + cols, y + r * n + col);
        });
        m0 += mr;
      }
  });
  return y;
}

}  // namespace conveyor_q4_1

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("q4_1_gemm_pack(Tensor raw) -> Tensor");
  m.def("q4_1_gemm(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("q4_1_gemm_pack", &conveyor_q4_1::q4_1_gemm_pack);
  m.impl("q4_1_gemm", &conveyor_q4_1::q4_1_gemm);
}
#endif  // __AVX2__ && __FMA__ && __F16C__
