// Paged decode attention on CPU: per (sequence, head), scores over the context read through the block table, one
// softmax, and the weighted sum of V rows. Memory traffic: reads seq_len * D * 2 floats per (sequence, head).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

namespace fastgpt2 {
namespace {

// Eight independent lanes so that gcc vectorises without -ffast-math.
inline float dot(const float* a, const float* b, int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t batch_size,
                                int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                float scale, int num_threads) {
  const int64_t token_stride = num_heads * head_dim;  // floats between consecutive tokens in the pool
  const int64_t num_pairs = batch_size * num_heads;
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(head_dim);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / num_heads, h = pair % num_heads;
      const int64_t len = seq_lens[b];
      const int32_t* table = block_tables + b * max_blocks;
      const float* qv = q + pair * head_dim;
      scores.resize(len);
      float max_score = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
        scores[t] = dot(qv, k_cache + slot * token_stride + h * head_dim, head_dim) * scale;
        max_score = std::max(max_score, scores[t]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float denom = 0.0f;
      for (int64_t t = 0; t < len; ++t) {
        const float w = std::exp(scores[t] - max_score);
        denom += w;
        const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
        axpy(w, v_cache + slot * token_stride + h * head_dim, acc.data(), head_dim);
      }
      float* o = out + pair * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] = acc[d] / denom;
    }
  };
  // Threads only pay for themselves on enough work (spawning costs tens of microseconds).
  int64_t total_tokens = 0;
  for (int64_t b = 0; b < batch_size; ++b) total_tokens += seq_lens[b];
  int threads = static_cast<int>(std::min<int64_t>(num_threads, num_pairs));
  if (threads <= 1 || total_tokens * num_heads * head_dim < (1 << 17)) {
    work(0, num_pairs);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (num_pairs + threads - 1) / threads;
  for (int i = 1; i < threads; ++i) {
    const int64_t begin = i * chunk, end = std::min(num_pairs, begin + chunk);
    if (begin < end) pool.emplace_back(work, begin, end);
  }
  work(0, std::min(num_pairs, chunk));
  for (std::thread& t : pool) t.join();
}

}  // namespace fastgpt2
