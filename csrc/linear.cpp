// See linear.h.
#include "linear.h"

#include <cmath>

namespace fastgpt2 {

void layer_norm_row(const float* x, const float* weight, const float* bias, float* out, int64_t n, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = static_cast<float>(sum / n);
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i] - mean) * (x[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
}

}  // namespace fastgpt2
