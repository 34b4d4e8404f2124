// See linear.h.
#include "linear.h"

#include <cmath>

namespace fastgpt2 {

namespace {

// The sum of f(x[i]) over n values in float64: eight independent lanes (i mod 8, which gcc vectorises without
// -ffast-math, instead of one chain of dependent adds), the lanes added in a fixed tree, then the tail in order.
template <typename F>
double lane_sum(const float* x, int64_t n, F f) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += f(x[i + j]);
  double s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += f(x[i]);
  return s;
}

}  // namespace

void layer_norm_row(const float* x, const float* weight, const float* bias, float* out, int64_t n, float eps) {
  const float mean = static_cast<float>(lane_sum(x, n, [](float v) { return static_cast<double>(v); }) / n);
  const double sq = lane_sum(x, n, [mean](float v) { return static_cast<double>(v - mean) * (v - mean); });
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
}

}  // namespace fastgpt2
