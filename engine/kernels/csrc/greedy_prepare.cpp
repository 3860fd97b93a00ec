// The greedy LM head's first op, before fbgemm's int8 GEMM (engine/models/greedy_head.py has the
// method and the guarantee; engine/kernels/int8_linear.py the bound's derivation; the second op is
// greedy_screen.cpp):
//
// greedy_prepare(x, outliers, factor): the outlier channels O, the normalised int8 input (rows of
//   x with O zeroed, divided by their max |.|, plus the sentinel row [1, -1, 0, ...]), each row's
//   scale m and its four bound coefficients coef_r = (m + max|x_r|, m ||r||_2, m ||x̂||_2, ||x_O||_1),
//   the norms in float64 and rounded up to float32 as int8_linear.approx does, and which rows are
//   finite (a non-finite row is all zeros here and takes the full head).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr double kStep = 2.0 / 127.0;  // int8_linear.ACT_STEP

float round_up(double v) {  // float32 never below the float64 value
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> greedy_prepare(const at::Tensor& x,
                                                                                       int64_t outliers,
                                                                                       double factor) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu() &&
                  x.size(1) >= 2,
              "greedy_prepare: x must be a contiguous float32 [rows, hidden >= 2] CPU tensor");
  const int64_t rows = x.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();
  at::Tensor finite = at::empty({rows}, x.options().dtype(at::kBool));
  bool* fin = finite.data_ptr<bool>();
  std::vector<float> col_max(k, 0.0f);  // over the finite rows, as the torch path's zeroed rows
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * k;
    bool ok = true;
    for (int64_t c = 0; c < k; ++c) ok &= std::isfinite(row[c]);
    fin[r] = ok;
    if (ok)
      for (int64_t c = 0; c < k; ++c) col_max[c] = std::max(col_max[c], std::fabs(row[c]));
  }
  // O: the channels over `factor` x the (lower) median channel, at most `outliers`, the largest
  std::vector<float> sorted(col_max);
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1) / 2, sorted.end());
  const float limit = static_cast<float>(factor) * sorted[(k - 1) / 2];
  std::vector<int64_t> order;
  for (int64_t c = 0; c < k; ++c)
    if (col_max[c] > limit) order.push_back(c);
  const int64_t n_out = std::min<int64_t>(std::max<int64_t>(outliers, 0), order.size());
  std::partial_sort(order.begin(), order.begin() + n_out, order.end(), [&](int64_t a, int64_t b) {
    return col_max[a] > col_max[b] || (col_max[a] == col_max[b] && a < b);
  });
  at::Tensor chans = at::empty({n_out}, x.options().dtype(at::kLong));
  std::copy(order.begin(), order.begin() + n_out, chans.data_ptr<int64_t>());
  std::vector<char> is_out(k, 0);
  for (int64_t i = 0; i < n_out; ++i) is_out[order[i]] = 1;

  at::Tensor inp = at::zeros({rows + 1, k}, x.options());
  at::Tensor scale = at::empty({rows}, x.options());
  at::Tensor coef = at::empty({rows, 4}, x.options());
  float *ip = inp.data_ptr<float>(), *mp = scale.data_ptr<float>(), *cp = coef.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * k;
    float* out = ip + r * k;
    float m_in = 0.0f, m_all = 0.0f;
    double l1_out = 0.0;
    if (fin[r]) {  // a non-finite row is all zeros here (it takes the full head)
      for (int64_t c = 0; c < k; ++c) {
        const float v = std::fabs(row[c]);
        m_all = std::max(m_all, v);
        if (is_out[c]) l1_out += v;
        else m_in = std::max(m_in, v);
      }
    }
    const float m = m_in > 0.0f ? m_in : 1.0f;
    double r2 = 0.0, x2 = 0.0;
    if (fin[r]) {
      for (int64_t c = 0; c < k; ++c) {
        if (is_out[c]) continue;
        const float xn = row[c] / m;  // correctly rounded, as torch's x / m: |xn| <= 1
        out[c] = xn;
        const double d = static_cast<double>(xn);
        const double dist = std::fabs(d - kStep * std::nearbyint(d / kStep)) + kStep / 64;
        r2 += dist * dist;
        x2 += d * d;
      }
    }
    const double r_norm = std::sqrt(r2);
    mp[r] = m;
    // the products and the sum round to nearest; the bound's 2^-10 slack covers them (as in torch)
    cp[4 * r + 0] = m + m_all;
    cp[4 * r + 1] = m * round_up(r_norm);
    cp[4 * r + 2] = m * round_up(std::sqrt(x2) + r_norm);
    cp[4 * r + 3] = round_up(l1_out);
  }
  ip[rows * k + 0] = 1.0f;  // the sentinel row: the input's range is exactly [-1, 1]
  ip[rows * k + 1] = -1.0f;
  return {inp, scale, coef, chans, finite};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("greedy_prepare(Tensor x, int outliers, float factor) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) { m.impl("greedy_prepare", &greedy_prepare); }
