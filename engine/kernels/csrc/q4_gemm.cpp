// y[M, N] = x[M, K] @ W^T in float32 straight from GGUF Q4_1 blocks (engine/kernels/q4_linear.py
// wraps these ops; benchmarks/q4_linear_ab.py measures them against the float32 GEMM).
//
// GGUF Q4_1: W is N rows of K/32 blocks of 20 bytes: fp16 d, fp16 m, 16 bytes qs; weight j of a
// block (j < 16) is (qs[j] & 0xF) * d + m, weight j + 16 is (qs[j] >> 4) * d + m.
//
// Layout (q4_1_pack): panels of 16 output columns, as the float32 GEMM's (cpu_gemm.cpp), each one
// contiguous stream of K/32 panel blocks of 320 bytes (5 bits a weight, as GGUF's):
//   bytes   0..31   d of columns 0..15 (fp16)        bytes 32..63   m of columns 0..15 (fp16)
//   bytes  64..319  for k = 0..31 of the block, 8 bytes: byte j = q(column j) | q(column j + 8) << 4
// so one k's 16 nibbles widen with a vpmovzxbd, an and (columns 0-7) and a shift (columns 8-15).
// Columns past N have d = m = 0 (weight 0; their outputs are never stored).
//
// Arithmetic: w = fma(q, d, m) in float32. q * d is exact (11-bit d times a 4-bit q), so this is
// the one rounding of gguf.dequantize's float32 (d * q) + m: w is the dequantized weight, bit for
// bit. Each output is then one FMA chain over k = 0..K-1 from 0.0f, as cpu_gemm_tile.h's: the
// result is bit-identical to cpu_gemm on the dequantized weight (any M, any tile, any thread), so
// a row's bits do not depend on its batch, nor on which of the two kernels a caller picks.
//
// Cost per k of a 16-column panel: 7 vector ops to decode 16 weights (once per tile of <= 4 rows,
// or once per panel into a buffer for more rows) plus 2 FMAs per row; the stream is 10 bytes per
// k against 64 for float32 panels. At 1-4 rows the float32 GEMM waits on memory and this kernel
// on its FMA ports (~2.9 cycles per panel-k at 1 row, warm): benchmarks/RESULTS.md.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CONVEYOR_Q4_AVX2 1
#include <immintrin.h>

#include "cpu_gemm_tile.h"
#endif

namespace conveyor_q4 {  // named, not anonymous: the unity build shares units between sources

constexpr int64_t kCols = 16;          // output columns per panel
constexpr int64_t kBlock = 32;         // weights per GGUF block along K
constexpr int64_t kGgufBytes = 20;     // a GGUF Q4_1 block
constexpr int64_t kQsOffset = 64;      // where a panel block's nibbles start (after d[16], m[16])
constexpr int64_t kPanelBlockBytes = kQsOffset + kBlock * kCols / 2;  // 320
constexpr int64_t kBlockRows = 64;     // rows per block: x's block stays in cache across panels
// Prefetch distance of the weight stream, as the float32 GEMM's (cpu_gemm_tile.h); 2 and 8 KB
// measured within noise of it here (13 panel blocks ahead of each panel read).
constexpr int64_t kPrefetchBytes = 4096;
// Row blocks up to this many rows decode weights in registers per tile (8 accumulators: 1 row x
// 4 panels, 2 x 2, 4 x 1); larger ones decode each panel once into a buffer (see q4_run). At 3-4
// rows the fused tiles measured 1.3-1.6x faster than the buffer.
constexpr int64_t kFusedRows = 4;

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// GGUF bytes [N, K/32 * 20] -> [ceil(N/16), K/32, 320] uint8 in the layout above (a new tensor).
at::Tensor q4_1_pack(const at::Tensor& raw) {
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.is_cpu() && raw.size(1) % kGgufBytes == 0,
              "q4_1_pack: raw must be a uint8 CPU tensor [N, K/32 * 20]");
  const at::Tensor r = raw.contiguous();
  const int64_t n = r.size(0), blocks = r.size(1) / kGgufBytes, panels = (n + kCols - 1) / kCols;
  at::Tensor out = at::zeros({panels, blocks, kPanelBlockBytes}, r.options());
  const uint8_t* src = r.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t p = row / kCols, c = row % kCols;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* g = src + (row * blocks + b) * kGgufBytes;
      uint8_t* o = dst + (p * blocks + b) * kPanelBlockBytes;
      std::memcpy(o + 2 * c, g, 2);       // d
      std::memcpy(o + 32 + 2 * c, g + 2, 2);  // m
      for (int j = 0; j < kBlock; ++j) {
        const int q = j < 16 ? g[4 + j] & 0xF : g[4 + j - 16] >> 4;
        o[kQsOffset + 8 * j + c % 8] |= static_cast<uint8_t>(c < 8 ? q : q << 4);
      }
    }
  }
  return out;
}

#if defined(CONVEYOR_Q4_AVX2)
// The 16 float32 weights of row j (0..31) of a panel block: fma(q, d, m), q * d exact, one
// rounding: gguf.dequantize's float32 weights. w0: columns 0-7 (low nibbles), w1: 8-15 (high).
struct Block {
  __m256 d0, d1, m0, m1;
  explicit Block(const uint8_t* blk)
      : d0(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)))),
        d1(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))),
        m0(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32)))),
        m1(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 48)))) {}
  inline void weights(const uint8_t* blk, int j, __m256& w0, __m256& w1) const {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + kQsOffset + 8 * j)));
    w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF))), d0, m0);
    w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d1, m1);
  }
};

inline void prefetch_block(const uint8_t* p) {
  for (int64_t line = 0; line < kPanelBlockBytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + line), _MM_HINT_T0);
}

// Accumulators are named variables (an array was kept on the stack by GCC in cpu_gemm_tile.h):
// a<row><panel><half>; a tile uses MR * NP * 2 <= 8 of them.
#define Q4_ACC(r, p) __m256 a##r##p##0 = z, a##r##p##1 = z;
#define Q4_FMA(r, p)                                 \
  if constexpr (MR > r) {                            \
    a##r##p##0 = _mm256_fmadd_ps(xb##r, w0, a##r##p##0); \
    a##r##p##1 = _mm256_fmadd_ps(xb##r, w1, a##r##p##1); \
  }
// One panel's 16 weights of this k, then every row's FMAs with them (2 weights live at a time).
#define Q4_PANEL(p)                                                                     \
  if constexpr (NP > p) {                                                               \
    __m256 w0, w1;                                                                      \
    s##p.weights(blk##p, j, w0, w1);                                                    \
    asm volatile("" : "+x"(w0), "+x"(w1)); /* no memory-operand FMAs (cpu_gemm_tile.h) */ \
    Q4_FMA(0, p) Q4_FMA(1, p) Q4_FMA(2, p) Q4_FMA(3, p)                                 \
  }
#define Q4_OUT(r, p) \
  if constexpr (MR > r && NP > p) out(r, p, a##r##p##0, a##r##p##1);
#define Q4_ROWS(M, r) M(r, 0) M(r, 1) M(r, 2) M(r, 3)

// Rows x[0..MR) (stride ldx) times NP adjacent panels, decoding each weight in registers once for
// the tile. An FMA chain has a 4-cycle latency, and each output is one chain: one row and one
// panel (2 chains) would wait on it, so a single row takes 4 panels at once, two rows 2.
// PF: prefetch the stream kPrefetchBytes ahead of each panel.
template <int MR, int NP, bool PF, class Out>
inline void q4_tile(const float* __restrict x, int64_t ldx, const uint8_t* __restrict panel, int64_t panel_bytes,
                    int64_t blocks, Out&& out) {
  static_assert(MR * NP <= 4 && NP <= 4 && MR <= 4, "at most 8 accumulators");
  const __m256 z = _mm256_setzero_ps();
  Q4_ROWS(Q4_ACC, 0) Q4_ROWS(Q4_ACC, 1) Q4_ROWS(Q4_ACC, 2) Q4_ROWS(Q4_ACC, 3)
  for (int64_t b = 0; b < blocks; ++b) {
    // panels past NP alias panel 0: never decoded (their code is discarded at compile time)
    const uint8_t* blk0 = panel + b * kPanelBlockBytes;
    const uint8_t* blk1 = blk0 + (NP > 1 ? panel_bytes : 0);
    const uint8_t* blk2 = blk0 + (NP > 2 ? 2 * panel_bytes : 0);
    const uint8_t* blk3 = blk0 + (NP > 3 ? 3 * panel_bytes : 0);
    if (PF) {
      prefetch_block(blk0 + kPrefetchBytes);
      if (NP > 1) prefetch_block(blk1 + kPrefetchBytes);
      if (NP > 2) prefetch_block(blk2 + kPrefetchBytes);
      if (NP > 3) prefetch_block(blk3 + kPrefetchBytes);
    }
    const Block s0(blk0), s1(blk1), s2(blk2), s3(blk3);
    const float* xk = x + b * kBlock;
    for (int j = 0; j < kBlock; ++j) {
      const __m256 xb0 = _mm256_broadcast_ss(xk + j);
      const __m256 xb1 = MR > 1 ? _mm256_broadcast_ss(xk + ldx + j) : z;
      const __m256 xb2 = MR > 2 ? _mm256_broadcast_ss(xk + 2 * ldx + j) : z;
      const __m256 xb3 = MR > 3 ? _mm256_broadcast_ss(xk + 3 * ldx + j) : z;
      Q4_PANEL(0) Q4_PANEL(1) Q4_PANEL(2) Q4_PANEL(3)
    }
  }
  Q4_ROWS(Q4_OUT, 0) Q4_ROWS(Q4_OUT, 1) Q4_ROWS(Q4_OUT, 2) Q4_ROWS(Q4_OUT, 3)
}
#undef Q4_ACC
#undef Q4_FMA
#undef Q4_PANEL
#undef Q4_OUT
#undef Q4_ROWS

template <int MR, int NP, class Out>
inline void q4_tile_pf(bool pf, const float* x, int64_t ldx, const uint8_t* panel, int64_t panel_bytes,
                       int64_t blocks, Out&& out) {
  if (pf)
    q4_tile<MR, NP, true>(x, ldx, panel, panel_bytes, blocks, out);
  else
    q4_tile<MR, NP, false>(x, ldx, panel, panel_bytes, blocks, out);
}

// A panel's float32 weights [K, 16] into buf (32-byte aligned): the float32 GEMM's panel layout,
// for its register tile (cpu_gemm_tile.h) when a row block has more rows than a fused tile takes.
inline void q4_decode_panel(const uint8_t* panel, int64_t blocks, float* buf) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = panel + b * kPanelBlockBytes;
    prefetch_block(blk + kPrefetchBytes);
    const Block s(blk);
    for (int j = 0; j < kBlock; ++j) {
      __m256 w0, w1;
      s.weights(blk, j, w0, w1);
      _mm256_store_ps(buf + (b * kBlock + j) * kCols, w0);
      _mm256_store_ps(buf + (b * kBlock + j) * kCols + 8, w1);
    }
  }
}

// Panels over torch's intra-op threads. Row blocks of <= kFusedRows rows: fused tiles (decode in
// registers). Larger ones: each panel decoded once into a per-thread float32 buffer, then the
// float32 GEMM's balanced tiles of <= 6 rows read it from L1/L2 (same FMA chains, same bits).
void q4_run(const float* xp, const uint8_t* w, float* yp, int64_t M, int64_t K, int64_t n, int64_t P) {
  const int64_t blocks = K / kBlock, panel_bytes = blocks * kPanelBlockBytes;
  for (int64_t r0 = 0; r0 < M; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, M - r0);
    const float* x = xp + r0 * K;
    at::parallel_for(0, P, 4, [&](int64_t p0, int64_t p1) {
      if (rows <= kFusedRows) {
        for (int64_t p = p0; p < p1;) {
          // 1 row: 4 panels at a time (then 2, 1); 2 rows: 2 panels; 3-4 rows: 1 panel
          const int64_t left = p1 - p;
          const int np = rows == 1 ? (left >= 4 ? 4 : left >= 2 ? 2 : 1) : rows == 2 && left >= 2 ? 2 : 1;
          auto out = [&](int r, int q, __m256 a0, __m256 a1) {
            const int64_t col = (p + q) * kCols;
            conveyor_gemm::store_cols(yp + (r0 + r) * n + col, static_cast<int>(std::min(kCols, n - col)), a0, a1);
          };
          const uint8_t* panel = w + p * panel_bytes;
          if (rows == 1 && np == 4) q4_tile_pf<1, 4>(true, x, K, panel, panel_bytes, blocks, out);
          else if (rows == 1 && np == 2) q4_tile_pf<1, 2>(true, x, K, panel, panel_bytes, blocks, out);
          else if (rows == 1) q4_tile_pf<1, 1>(true, x, K, panel, panel_bytes, blocks, out);
          else if (rows == 2 && np == 2) q4_tile_pf<2, 2>(true, x, K, panel, panel_bytes, blocks, out);
          else if (rows == 2) q4_tile_pf<2, 1>(true, x, K, panel, panel_bytes, blocks, out);
          else if (rows == 3) q4_tile_pf<3, 1>(true, x, K, panel, panel_bytes, blocks, out);
          else q4_tile_pf<4, 1>(true, x, K, panel, panel_bytes, blocks, out);
          p += np;
        }
        return;
      }
      float* buf = static_cast<float*>(std::aligned_alloc(64, K * kCols * sizeof(float)));
      TORCH_CHECK(buf != nullptr, "q4_1_linear: out of memory for a panel buffer");
      const int64_t nt = conveyor_gemm::tiles(rows);
      for (int64_t p = p0; p < p1; ++p) {
        q4_decode_panel(w + p * panel_bytes, blocks, buf);
        const int ncols = static_cast<int>(std::min(kCols, n - p * kCols));
        int64_t m0 = 0;
        for (int64_t t = 0; t < nt; ++t) {
          const int mr = conveyor_gemm::tile_rows(rows, nt, t);
          float* y = yp + (r0 + m0) * n + p * kCols;
          conveyor_gemm::dispatch<conveyor_gemm::F32>(
              mr, false, x + m0 * K, K, buf, K, buf,
              [&](int r, __m256 a0, __m256 a1) { conveyor_gemm::store_cols(y + r * n, ncols, a0, a1); });
          m0 += mr;
        }
      }
      std::free(buf);
    });
  }
}
#endif

// The portable form: the same weights (std::fma) and the same FMA chain, so the same bits.
void q4_run_scalar(const float* xp, const uint8_t* w, float* yp, int64_t M, int64_t K, int64_t n) {
  const int64_t blocks = K / kBlock;
  for (int64_t col = 0; col < n; ++col) {
    const uint8_t* panel = w + (col / kCols) * blocks * kPanelBlockBytes;
    const int64_t c = col % kCols;
    for (int64_t r = 0; r < M; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = panel + b * kPanelBlockBytes;
        const float d = half_at(blk + 2 * c), m = half_at(blk + 32 + 2 * c);
        for (int64_t j = 0; j < kBlock; ++j) {
          const uint8_t byte = blk[kQsOffset + 8 * j + c % 8];
          const float q = static_cast<float>(c < 8 ? byte & 0xF : byte >> 4);
          acc = std::fma(xp[r * K + b * kBlock + j], std::fma(q, d, m), acc);
        }
      }
      yp[r * n + col] = acc;
    }
  }
}

at::Tensor checked_out(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu() && x.size(1) == k,
              op, ": x must be a 2-D float32 CPU tensor [M, ", k, "]");
  TORCH_CHECK(k % kBlock == 0 && n >= 0 && packed.dim() == 3 && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous() && packed.size(0) == (n + kCols - 1) / kCols &&
                  packed.size(1) == k / kBlock && packed.size(2) == kPanelBlockBytes,
              op, ": packed must come from q4_1_pack for n = ", n, ", k = ", k);
  return at::empty({x.size(0), n}, x.options());
}

// x [M, k] float32, packed from q4_1_pack of an [n, k] weight: x @ W^T [M, n].
at::Tensor q4_1_linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = checked_out(x, packed, n, k, "q4_1_linear");
  if (y.numel() == 0) return y;
  if (k == 0) return y.zero_();
#if defined(CONVEYOR_Q4_AVX2)
  q4_run(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), y.data_ptr<float>(), x.size(0), k, n, packed.size(0));
#else
  q4_run_scalar(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), y.data_ptr<float>(), x.size(0), k, n);
#endif
  return y;
}

// The portable form on any host (tests compare it with the vector one).
at::Tensor q4_1_linear_reference(const at::Tensor& x_in, const at::Tensor& packed, int64_t n, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = checked_out(x, packed, n, k, "q4_1_linear_reference");
  if (y.numel() == 0) return y;
  if (k == 0) return y.zero_();
  q4_run_scalar(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), y.data_ptr<float>(), x.size(0), k, n);
  return y;
}

}  // namespace conveyor_q4

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("q4_1_pack(Tensor raw) -> Tensor");
  m.def("q4_1_linear(Tensor x, Tensor packed, int n, int k) -> Tensor");
  m.def("q4_1_linear_reference(Tensor x, Tensor packed, int n, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("q4_1_pack", &conveyor_q4::q4_1_pack);
  m.impl("q4_1_linear", &conveyor_q4::q4_1_linear);
  m.impl("q4_1_linear_reference", &conveyor_q4::q4_1_linear_reference);
}
