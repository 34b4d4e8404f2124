// Paged decode attention on CPU: per (sequence, head), scores over the context read through the block table, one
// softmax, and the weighted sum of V rows. Memory traffic: reads seq_len * D * 2 floats per (sequence, head).
#include "attention.h"

#include <algorithm>
#include <cmath>

#include "thread_pool.h"

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

void attend_one_head(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
                     int64_t seq_len, int64_t block_size, int64_t token_stride, int64_t head_offset,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores) {
  scores.resize(seq_len);
  float max_score = -INFINITY;
  for (int64_t t = 0; t < seq_len; ++t) {
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    scores[t] = dot(q, k_cache + slot * token_stride + head_offset, head_dim) * scale;
    max_score = std::max(max_score, scores[t]);
  }
  std::fill(out, out + head_dim, 0.0f);
  float denom = 0.0f;
  for (int64_t t = 0; t < seq_len; ++t) {
    const float w = std::exp(scores[t] - max_score);
    denom += w;
    const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
    axpy(w, v_cache + slot * token_stride + head_offset, out, head_dim);
  }
  for (int64_t d = 0; d < head_dim; ++d) out[d] /= denom;
}

void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t batch_size,
                                int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                float scale, int num_threads) {
  const int64_t token_stride = num_heads * head_dim;  // floats between consecutive tokens in the pool
  auto pair = [&](int64_t p) {
    thread_local std::vector<float> scores;
    const int64_t b = p / num_heads, h = p % num_heads;
    attend_one_head(q + p * head_dim, k_cache, v_cache, block_tables + b * max_blocks, seq_lens[b], block_size,
                    token_stride, h * head_dim, head_dim, scale, out + p * head_dim, scores);
  };
  ThreadPool::with_pool(num_threads, /*linger=*/false, [&](ThreadPool& pool) { pool.parallel_for(batch_size * num_heads, pair); });
}

}  // namespace fastgpt2
