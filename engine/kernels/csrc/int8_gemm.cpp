// The greedy LM head's int8 GEMM (replaces fbgemm's dynamic quantized linear there; see
// engine/kernels/int8_linear.py for the bound this must keep valid, engine/models/greedy_head.py
// for the method):
//
// int8_gemm_pack(codes): the weight's int8 codes [N, K] (per-row symmetric, in [-127, 127]) laid
//   out in blocks of 32 tokens, each one contiguous stream (the hardware prefetchers follow one
//   sequential stream but stop at every 4 KiB page of several short ones): for each group g of 4
//   input channels, 128 bytes = 4 panels of 8 tokens, 32 bytes each, token t's codes
//   k = 4g .. 4g + 3 at bytes 4t .. 4t + 3 of its panel (so one vpmaddubsw + vpmaddwd gives 8
//   tokens' 4-channel sums in the 8 int32 lanes, no horizontal reduction). K is padded to a
//   multiple of 4 and N to one of 32 with zero codes: [blocks, K4 / 4, 128] int8.
//
// int8_gemm(x, rows, panels, colsum, rescale, n): for the first `rows` rows of x (float32,
//   normalised: every entry in [-1, 1]) values [rows, n] float32 with
//     c_k   = nearbyint(x_k * 63.5)                  in [-64, 64]: the grid s·Z, s = 2/127, as
//                                                   fbgemm's with reduce_range on [-1, 1]
//     isum  = sum_k c_k q_nk                          exact: computed as sum_k (c_k + 64) q_nk - 64 colsum_n
//                                                   in int32 (|c + 64| <= 128 is an unsigned byte, a
//                                                   vpmaddubsw pair sum is <= 2 * 128 * 127 < 2^15: no
//                                                   int16 saturation; |sum| <= 128 * 127 K < 2^31)
//     value = float(isum) * rescale_n                rescale_n = float32(s ω_n), ω_n the row's float32 scale
//   so value = x̂·ŵ_n (1 + δ), |δ| <= 3u + 3u² (u = 2^-24): float(isum) is exact while
//   |isum| < 2^24 (K <= 2064) and else rounds once, rescale_n rounds once, the product once. This
//   is the "few u relative to |x̂·ŵ_n|" the bound's margin allows for fbgemm's rescale (the same
//   three roundings: int32 -> float, the scale product, the multiply). x * 63.5 rounds (<= 32 u
//   absolute), so c_k can be the farther grid neighbour only at a near-tie: |x_k - c_k s| is
//   still <= dist(x_k, s·Z) + s/64, the per-channel residual the bound assumes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 8;   // tokens per panel (int32 lanes of a ymm register)
constexpr int64_t kPanels = 4;  // panels per column block: 32 tokens
constexpr int kOffset = 64;     // c + 64 in [0, 128]: an unsigned byte
constexpr int64_t kGroupBytes = kPanels * 32;  // a block's bytes per group of 4 channels

at::Tensor int8_gemm_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_cpu(),
              "int8_gemm_pack: codes must be an int8 [N, K] CPU tensor");
  const at::Tensor c = codes.contiguous();
  const int64_t n = c.size(0), k = c.size(1), groups = (k + 3) / 4;
  const int64_t blocks = (n + kLanes * kPanels - 1) / (kLanes * kPanels);
  at::Tensor out = at::zeros({blocks, groups, kGroupBytes}, c.options());
  const int8_t* src = c.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t tok = 0; tok < n; ++tok) {
    const int64_t blk = tok / (kLanes * kPanels), p = tok / kLanes % kPanels;
    int8_t* col = dst + blk * groups * kGroupBytes + p * 32 + (tok % kLanes) * 4;
    for (int64_t kk = 0; kk < k; ++kk) col[(kk / 4) * kGroupBytes + kk % 4] = src[tok * k + kk];
  }
  return out;
}

#if defined(__AVX2__)
// acc[r][v] (8 int32 lanes: tokens of panel v) += sum over all groups of a_r · w_v, for MR rows
// of unsigned activation bytes a (row stride `a_stride`) and NV panels of a block (from w).
// pf: the next block's bytes, pulled into L2 while this one is summed (a block read as NV-panel
// halves is a strided pattern the hardware prefetcher does not follow far enough).
template <int MR, int NV>
inline void micro(const uint8_t* a, int64_t a_stride, const int8_t* w, const int8_t* pf, int64_t groups,
                  __m256i (&acc)[MR][NV]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + kGroupBytes * g), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(pf + kGroupBytes * g + 64), _MM_HINT_T1);
    __m256i ab[MR];
    for (int r = 0; r < MR; ++r) {
      int32_t four;
      std::memcpy(&four, a + r * a_stride + 4 * g, 4);
      ab[r] = _mm256_set1_epi32(four);
    }
    for (int v = 0; v < NV; ++v) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * v + kGroupBytes * g));
      for (int r = 0; r < MR; ++r) {
        // u8 x s8 pairs -> int16 (exact, see the file's comment), pairs of int16 -> int32 (exact)
        const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(ab[r], wv), ones);
        acc[r][v] = _mm256_add_epi32(acc[r][v], t);
      }
    }
  }
}

// micro<4, 2> in assembly: GCC's schedule of the generic form keeps all eight products live and
// spills an accumulator, a store-to-load chain through memory every group (~30 % slower).
template <>
inline void micro<4, 2>(const uint8_t* a, int64_t a_stride, const int8_t* w, const int8_t* pf, int64_t groups,
                        __m256i (&acc)[4][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const uint8_t *a0 = a, *a1 = a + a_stride, *a2 = a + 2 * a_stride, *a3 = a + 3 * a_stride;
  const int8_t *w0 = w, *w1 = w + 32;
  for (int64_t g = 0; g < groups; ++g) {
    // AT&T order: vpmaddubsw src(signed bytes), unsigned, dst
    asm("prefetcht1 (%[pf])\n\t"
        "prefetcht1 64(%[pf])\n\t"
        "vpbroadcastd (%[a0]), %%ymm12\n\t"
        "vpbroadcastd (%[a1]), %%ymm13\n\t"
        "vpbroadcastd (%[a2]), %%ymm14\n\t"
        "vpbroadcastd (%[a3]), %%ymm15\n\t"
        "vmovdqu (%[w0]), %%ymm11\n\t"
        "vpmaddubsw %%ymm11, %%ymm12, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c00], %[c00]\n\t"
        "vpmaddubsw %%ymm11, %%ymm13, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c10], %[c10]\n\t"
        "vpmaddubsw %%ymm11, %%ymm14, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c20], %[c20]\n\t"
        "vpmaddubsw %%ymm11, %%ymm15, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c30], %[c30]\n\t"
        "vmovdqu (%[w1]), %%ymm11\n\t"
        "vpmaddubsw %%ymm11, %%ymm12, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c01], %[c01]\n\t"
        "vpmaddubsw %%ymm11, %%ymm13, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c11], %[c11]\n\t"
        "vpmaddubsw %%ymm11, %%ymm14, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c21], %[c21]\n\t"
        "vpmaddubsw %%ymm11, %%ymm15, %%ymm10\n\t"
        "vpmaddwd %[ones], %%ymm10, %%ymm10\n\t"
        "vpaddd %%ymm10, %[c31], %[c31]\n\t"
        : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
          [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31)
        : [a0] "r"(a0 + 4 * g), [a1] "r"(a1 + 4 * g), [a2] "r"(a2 + 4 * g), [a3] "r"(a3 + 4 * g),
          [w0] "r"(w0 + kGroupBytes * g), [w1] "r"(w1 + kGroupBytes * g), [ones] "x"(ones),
          [pf] "r"(pf + kGroupBytes * g)
        : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
  }
  acc[0][0] = c00, acc[0][1] = c01, acc[1][0] = c10, acc[1][1] = c11;
  acc[2][0] = c20, acc[2][1] = c21, acc[3][0] = c30, acc[3][1] = c31;
}

// rows r0 .. r0 + MR - 1, the kPanels panels of column block `blk`, written to out (or to a
// stack tile first when the block runs past n).
template <int MR, int NV>
void tile(const uint8_t* a, int64_t groups, const int8_t* panels, const int32_t* colsum, const float* rescale,
          float* out, int64_t n, int64_t r0, int64_t blk, int64_t blocks) {
  const int64_t a_stride = groups * 4;
  float buf[MR][kLanes * kPanels];
  const int64_t col0 = blk * kLanes * kPanels;
  const bool full = col0 + kLanes * kPanels <= n;
  const __m256i off = _mm256_set1_epi32(kOffset);
  for (int64_t p0 = 0; p0 < kPanels; p0 += NV) {
    __m256i acc[MR][NV];
    const int8_t* w = panels + blk * groups * kGroupBytes;
    // the first pass over this block fetches the next one (a cached line's prefetch costs little)
    const int8_t* pf = r0 == 0 && p0 == 0 && blk + 1 < blocks ? w + groups * kGroupBytes : w;
    micro<MR, NV>(a + r0 * a_stride, a_stride, w + 32 * p0, pf, groups, acc);
    for (int v = 0; v < NV; ++v) {
      const int64_t col = col0 + (p0 + v) * kLanes;
      const __m256i cs = _mm256_mullo_epi32(off, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + col)));
      const __m256 sc = _mm256_loadu_ps(rescale + col);
      for (int r = 0; r < MR; ++r) {
        const __m256 val = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][v], cs)), sc);
        float* dst = full ? out + (r0 + r) * n + col : buf[r] + (p0 + v) * kLanes;
        _mm256_storeu_ps(dst, val);
      }
    }
  }
  if (!full)
    for (int r = 0; r < MR; ++r)
      std::memcpy(out + (r0 + r) * n + col0, buf[r], (n - col0) * sizeof(float));
}
#endif

// The activation codes of the first `rows` rows, unsigned (c + 64), K padded to 4 * groups with
// 64 (c = 0; the padded weight codes are 0 as well). Normalised rows give |c| <= 64; the clamp only
// keeps a byte a byte.
std::vector<uint8_t> quantize(const at::Tensor& x, int64_t rows, int64_t groups) {
  const int64_t k = x.size(1);
  std::vector<uint8_t> a(rows * groups * 4, static_cast<uint8_t>(kOffset));
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kk = 0; kk < k; ++kk) {
      const float c = std::nearbyint(xp[r * k + kk] * 63.5f);
      a[r * groups * 4 + kk] = static_cast<uint8_t>(std::min(128.0f, std::max(0.0f, c + kOffset)));
    }
  return a;
}

// The portable form: the same integers and the same three roundings.
void tile_scalar(const uint8_t* a, int64_t groups, const int8_t* panels, const int32_t* colsum,
                 const float* rescale, float* out, int64_t n, int64_t r, int64_t blk) {
  for (int64_t p = 0; p < kPanels; ++p)
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t col = (blk * kPanels + p) * kLanes + l;
      if (col >= n) return;
      const int8_t* w = panels + blk * groups * kGroupBytes + 32 * p + 4 * l;
      int32_t acc = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int j = 0; j < 4; ++j) acc += int32_t(a[r * groups * 4 + 4 * g + j]) * w[kGroupBytes * g + j];
      out[r * n + col] = static_cast<float>(acc - kOffset * colsum[col]) * rescale[col];
    }
}

at::Tensor int8_gemm(const at::Tensor& x, int64_t rows, const at::Tensor& panels, const at::Tensor& colsum,
                     const at::Tensor& rescale, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu() && rows >= 0 &&
                  rows <= x.size(0),
              "int8_gemm: x must be a contiguous float32 CPU [>= rows, K] tensor");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kChar && panels.is_contiguous() &&
                  panels.size(2) == kGroupBytes && panels.size(1) == (x.size(1) + 3) / 4 &&
                  panels.size(0) * kLanes * kPanels >= n,
              "int8_gemm: panels must come from int8_gemm_pack for this K and n");
  const int64_t padded = panels.size(0) * kLanes * kPanels;
  TORCH_CHECK(colsum.scalar_type() == at::kInt && colsum.is_contiguous() && colsum.numel() == padded &&
                  rescale.scalar_type() == at::kFloat && rescale.is_contiguous() && rescale.numel() == padded,
              "int8_gemm: colsum int32 and rescale float32 must have one entry per padded column");
  // |sum_k (c_k + 64) q_nk| <= 128 * 127 K must fit int32
  TORCH_CHECK(x.size(1) <= (int64_t{1} << 31) / (128 * 127), "int8_gemm: K too large for int32 sums");
  const int64_t groups = panels.size(1);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return out;
  const std::vector<uint8_t> a = quantize(x, rows, groups);
  const int8_t* pp = panels.data_ptr<int8_t>();
  const int32_t* cs = colsum.data_ptr<int32_t>();
  const float* sc = rescale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (n + kLanes * kPanels - 1) / (kLanes * kPanels);
  // column blocks outside, rows inside: a block's panels (32 tokens x K bytes) stay in L1 for all rows
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
#if defined(__AVX2__)
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) tile<4, 2>(a.data(), groups, pp, cs, sc, op, n, r, b, blocks);
      if (rows - r == 3) tile<3, 2>(a.data(), groups, pp, cs, sc, op, n, r, b, blocks);
      else if (rows - r == 2) tile<2, 4>(a.data(), groups, pp, cs, sc, op, n, r, b, blocks);
      else if (rows - r == 1) tile<1, 4>(a.data(), groups, pp, cs, sc, op, n, r, b, blocks);
#else
      for (int64_t r = 0; r < rows; ++r) tile_scalar(a.data(), groups, pp, cs, sc, op, n, r, b, blocks);
#endif
    }
  });
  return out;
}

// The portable form on any host (tests compare it with the vector one).
at::Tensor int8_gemm_reference(const at::Tensor& x, int64_t rows, const at::Tensor& panels,
                               const at::Tensor& colsum, const at::Tensor& rescale, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && panels.size(1) == (x.size(1) + 3) / 4,
              "int8_gemm_reference: as int8_gemm");
  const int64_t groups = panels.size(1);
  at::Tensor out = at::empty({rows, n}, x.options());
  const std::vector<uint8_t> a = quantize(x, rows, groups);
  const int64_t blocks = (n + kLanes * kPanels - 1) / (kLanes * kPanels);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t r = 0; r < rows; ++r)
      tile_scalar(a.data(), groups, panels.data_ptr<int8_t>(), colsum.data_ptr<int32_t>(),
                  rescale.data_ptr<float>(), out.data_ptr<float>(), n, r, b);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("int8_gemm_pack(Tensor codes) -> Tensor");
  m.def("int8_gemm(Tensor x, int rows, Tensor panels, Tensor colsum, Tensor rescale, int n) -> Tensor");
  m.def("int8_gemm_reference(Tensor x, int rows, Tensor panels, Tensor colsum, Tensor rescale, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("int8_gemm_pack", &int8_gemm_pack);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("int8_gemm_reference", &int8_gemm_reference);
}
