// See argmax_screen.h: greedy decoding's int8 screen of the LM head, then float32 for the rows it keeps.
#include "argmax_screen.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"  // bf16, to_float
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

constexpr double kUnit = 0x1p-24;  // float32's unit roundoff
double gamma_n(int64_t n) { return static_cast<double>(n) * kUnit / (1.0 - static_cast<double>(n) * kUnit); }

// Rows kept per token beyond which the screen gives way to packed_argmax: E then rules out too little to pay (with
// random GPT-2-sized weights about 30 of 50257 rows are kept).
constexpr int64_t kMaxKept = 1024;
// Chains evaluated side by side (independent, so each keeps its own order).
constexpr int kChains = 8;

// y[j] = the float32 GEMM's value of row ids[j] (packed_gemm.h's chain: c = fma(x_k, w_k, c) over k in order, from
// zero) for kChains rows of W (row-major, K inputs).
template <typename Row>
void exact_values(const float* x, const Row* rows, int64_t K, const int64_t* ids, float* y) {
  const Row* p[kChains];
  for (int j = 0; j < kChains; ++j) p[j] = rows + ids[j] * K;
  float c[kChains] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float xk = x[k];
#pragma GCC unroll 8
    for (int j = 0; j < kChains; ++j) c[j] = std::fma(xk, to_float(p[j][k]), c[j]);
  }
  for (int j = 0; j < kChains; ++j) y[j] = c[j];
}

// The largest of z[0, n), n >= 1 (finite values): 16 running maxima side by side, in the form gcc vectorises.
float max_of(const float* z, int64_t n) {
  constexpr int kWays = 16;
  float m[kWays];
  for (int j = 0; j < kWays; ++j) m[j] = z[0];
  int64_t r = 0;
  for (; r + kWays <= n; r += kWays)
    for (int j = 0; j < kWays; ++j) m[j] = m[j] > z[r + j] ? m[j] : z[r + j];
  float best = m[0];
  for (int j = 1; j < kWays; ++j) best = best > m[j] ? best : m[j];
  for (; r < n; ++r) best = best > z[r] ? best : z[r];
  return best;
}

// E for token x (argmax_screen.h), or -1 when the screen cannot serve it (a non-finite activation, or products that
// could overflow float32).
double token_bound(const ArgmaxScreen& s, const float* x, int64_t K) {
  double x2 = 0.0, dx2 = 0.0, xq2 = 0.0;
  int8_t q[kQ8Block];
  for (int64_t b = 0; b < K; b += kQ8Block) {
    const float d = quantize_q8_block(x + b, q);  // the int8 GEMM's quantisation of x, bitwise
    if (!std::isfinite(d)) return -1.0;
    for (int64_t i = 0; i < kQ8Block; ++i) {
      const double v = x[b + i], v_hat = static_cast<double>(q[i]) * d;
      x2 += v * v, dx2 += (v - v_hat) * (v - v_hat), xq2 += v_hat * v_hat;
    }
  }
  const double xn = std::sqrt(x2), dxn = std::sqrt(dx2), xqn = std::sqrt(xq2);
  if (!(s.w_norm * xn < 1e30)) return -1.0;
  const double e = s.delta_norm * xn + s.q_norm * dxn + gamma_n(K / kQ8Block + 2) * s.q_norm * xqn +
                   gamma_n(K) * s.w_norm * xn;
  return 1.001 * e;
}

// Token t's pick, or -1 when it needs packed_argmax: the rows r < limit with z_r >= max z - 2E, evaluated in float32
// in id order, the first of the largest kept (ties: the first, as torch.argmax).
template <typename Row>
int64_t screened_pick(const ArgmaxScreen& s, const Row* rows, const float* x, int64_t K, const float* z,
                      int64_t limit, std::vector<int64_t>& kept) {
  const double e = token_bound(s, x, K);
  if (e < 0.0) return -1;
  const float z_max = max_of(z, limit);
  // The threshold rounded down to a float32, so that the float comparison keeps every row the exact one keeps.
  const double threshold = static_cast<double>(z_max) - 2.0 * e;
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  kept.clear();
  constexpr int64_t kSpan = 128;  // rows whose largest value is checked first: most spans hold no row to keep
  for (int64_t r0 = 0; r0 < limit; r0 += kSpan) {
    const int64_t r1 = std::min(limit, r0 + kSpan);
    if (max_of(z + r0, r1 - r0) < t) continue;
    for (int64_t r = r0; r < r1; ++r) {
      if (z[r] >= t) {
        if (static_cast<int64_t>(kept.size()) == kMaxKept) return -1;
        kept.push_back(r);
      }
    }
  }
  const size_t n = kept.size();
  while (kept.size() % kChains != 0) kept.push_back(kept[n - 1]);  // padding: repeats, never picked over the first
  float best = 0.0f;
  int64_t best_id = -1;
  for (size_t i = 0; i < n; i += kChains) {
    float y[kChains];
    exact_values(x, rows, K, kept.data() + i, y);
    for (size_t j = 0; j < kChains && i + j < n; ++j) {
      if (!std::isfinite(y[j])) return -1;
      if (best_id < 0 || y[j] > best) best = y[j], best_id = kept[i + j];
    }
  }
  return best_id;
}

template <typename T>
T* grown(std::vector<T>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace

template <typename Row>
std::shared_ptr<const ArgmaxScreen> build_argmax_screen(const Row* rows, int64_t num_rows, int64_t cols) {
  if (num_rows < 1 || cols < kQ8Block || cols % kQ8Block != 0) return nullptr;
  std::vector<float> widened;  // pack_matrix<q8> reads float32
  const float* w = nullptr;
  if constexpr (std::is_same_v<Row, float>) {
    w = rows;
  } else {
    widened.resize(static_cast<size_t>(num_rows * cols));
    for (int64_t i = 0; i < num_rows * cols; ++i) widened[i] = to_float(rows[i]);
    w = widened.data();
  }
  for (int64_t i = 0; i < num_rows * cols; ++i)
    if (!std::isfinite(w[i])) return nullptr;
  auto s = std::make_shared<ArgmaxScreen>();
  s->q = pack_matrix<q8>(w, num_rows, cols);
  int8_t q[kQ8Block];
  for (int64_t r = 0; r < num_rows; ++r) {
    double w2 = 0.0, d2 = 0.0, q2 = 0.0;
    for (int64_t b = 0; b < cols; b += kQ8Block) {
      const float* v = w + r * cols + b;
      const float d = quantize_q8_block(v, q);  // pack_matrix<q8>'s values, bitwise
      for (int64_t i = 0; i < kQ8Block; ++i) {
        const double v_hat = static_cast<double>(q[i]) * d;
        w2 += static_cast<double>(v[i]) * v[i], d2 += (v[i] - v_hat) * (v[i] - v_hat), q2 += v_hat * v_hat;
      }
    }
    s->w_norm = std::max(s->w_norm, std::sqrt(w2));
    s->delta_norm = std::max(s->delta_norm, std::sqrt(d2));
    s->q_norm = std::max(s->q_norm, std::sqrt(q2));
  }
  return s;
}

template <typename W, typename Row>
void screened_argmax(ThreadPool& pool, const ArgmaxScreen& screen, const PackedMatrix<W>& w, const Row* rows,
                     const float* x, int64_t ldx, int64_t num_tokens, int64_t limit, int64_t* index) {
  if (num_tokens <= 0) return;
  const int64_t R = w.rows, K = w.cols;
  thread_local std::vector<float> z_buffer;
  float* z = grown(z_buffer, num_tokens * R);
  packed_linear<q8>(pool, screen.q, nullptr, x, ldx, z, R, num_tokens, Epilogue::kStore);
  pool.parallel_for(num_tokens, [&](int64_t t) {
    thread_local std::vector<int64_t> kept;
    index[t] = screened_pick(screen, rows, x + t * ldx, K, z + t * R, limit, kept);
  });
  // The tokens the screen could not serve, through packed_argmax.
  std::vector<int64_t> redo;
  for (int64_t t = 0; t < num_tokens; ++t)
    if (index[t] < 0) redo.push_back(t);
  if (redo.empty()) return;
  const int64_t n = static_cast<int64_t>(redo.size());
  std::vector<float> xs(static_cast<size_t>(n * K));
  for (int64_t i = 0; i < n; ++i) std::copy(x + redo[i] * ldx, x + redo[i] * ldx + K, xs.data() + i * K);
  std::vector<int64_t> picks(static_cast<size_t>(n));
  packed_argmax(pool, w, nullptr, xs.data(), K, n, limit, picks.data());
  for (int64_t i = 0; i < n; ++i) index[redo[i]] = picks[i];
}

template std::shared_ptr<const ArgmaxScreen> build_argmax_screen<float>(const float*, int64_t, int64_t);
template std::shared_ptr<const ArgmaxScreen> build_argmax_screen<bf16>(const bf16*, int64_t, int64_t);
template void screened_argmax<float, float>(ThreadPool&, const ArgmaxScreen&, const PackedMatrix<float>&, const float*,
                                            const float*, int64_t, int64_t, int64_t, int64_t*);
template void screened_argmax<bf16, bf16>(ThreadPool&, const ArgmaxScreen&, const PackedMatrix<bf16>&, const bf16*,
                                          const float*, int64_t, int64_t, int64_t, int64_t*);

}  // namespace fastgpt2
