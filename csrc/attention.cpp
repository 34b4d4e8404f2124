// Paged attention on CPU: per (query, head), scores over the context read through the block table, one softmax, and
// the weighted sum of V rows. Memory traffic: a lone query reads seq_len * D * 2 floats per head; a group of queries
// of one sequence (a prefill chunk) reads each K/V block once for the whole group while it is in L1.
//
// Every query's operations, wherever it is computed (attend_one_head or attend_queries): score t = dot(q, k_t) * scale
// (simd.h's dot: 8 FMA lanes then the same horizontal sum) for t = 0, 1, ..., then max over the scores in t order,
// exp_and_sum over the scores, out = 0, out += p_t * v_t (axpy, one FMA per element) for t = 0, 1, ..., out *= 1 / sum.
#include "attention.h"

#include <algorithm>
#include <cmath>

#include "simd.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

// y += w x, one fused multiply-add per element (spelled out so that no compiler choice about contraction can make
// two copies of it round differently).
inline void axpy(float w, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef FASTGPT2_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] = std::fma(w, x[i], y[i]);
}

// out += p[t] v_t for t = 0..n-1 (v_t at v + t * stride), the axpy of every t in turn; with GPT-2's head_dim of 64 the
// output stays in registers across the n keys (the same FMAs, without a load and store of out per key).
inline void accumulate(const float* p, const float* v, int64_t n, int64_t stride, float* out, int64_t head_dim) {
#ifdef FASTGPT2_AVX2
  if (head_dim == 64) {
    __m256 o[8];
    for (int i = 0; i < 8; ++i) o[i] = _mm256_loadu_ps(out + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 w = _mm256_set1_ps(p[t]);
      for (int i = 0; i < 8; ++i) o[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + t * stride + 8 * i), o[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, o[i]);
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) axpy(p[t], v + t * stride, out, head_dim);
}

// scores[t] = dot(q, k_t) * scale for t = 0..n-1 (k_t at k + t * stride); returns max(max_score, scores). Each score
// is simd.h's dot (8 FMA lanes over head_dim, then hsum); with AVX2 four keys' chains run interleaved (independent, so
// the same values), which lets the FMA latency overlap.
inline float score_block(const float* q, const float* k, int64_t n, int64_t stride, int64_t head_dim, float scale,
                         float* scores, float max_score) {
  int64_t t = 0;
#ifdef FASTGPT2_AVX2
  if (head_dim % 8 == 0) {
    for (; t + 4 <= n; t += 4) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* k0 = k + t * stride;
      for (int64_t i = 0; i < head_dim; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + stride + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * stride + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * stride + i), a3);
      }
      const float s[4] = {hsum(a0) * scale, hsum(a1) * scale, hsum(a2) * scale, hsum(a3) * scale};
      for (int j = 0; j < 4; ++j) scores[t + j] = s[j], max_score = std::max(max_score, s[j]);
    }
  }
#endif
  for (; t < n; ++t) {
    const float s = dot(q, k + t * stride, head_dim) * scale;
    scores[t] = s;
    max_score = std::max(max_score, s);
  }
  return max_score;
}

// scores[t] = exp(scores[t] - max) over n scores; returns their sum.
float exp_and_sum(float* scores, int64_t n, float max_score) {
  int64_t t = 0;
  float sum = 0.0f;
#ifdef FASTGPT2_AVX2
  const __m256 max_v = _mm256_set1_ps(max_score);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), max_v));
    _mm256_storeu_ps(scores + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; t < n; ++t) sum += (scores[t] = std::exp(scores[t] - max_score));
  return sum;
}

}  // namespace

void attend_one_head(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
                     int64_t seq_len, int64_t block_size, int64_t token_stride, int64_t head_offset,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores) {
  // Walks the table block by block (no division per token); the softmax's exps are vectorised.
  scores.resize(seq_len);
  float max_score = -INFINITY;
  for (int64_t start = 0; start < seq_len; start += block_size) {
    const float* k = k_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
    const int64_t n = std::min(block_size, seq_len - start);
    max_score = score_block(q, k, n, token_stride, head_dim, scale, scores.data() + start, max_score);
  }
  const float denom = exp_and_sum(scores.data(), seq_len, max_score);
  std::fill(out, out + head_dim, 0.0f);
  for (int64_t start = 0; start < seq_len; start += block_size) {
    const float* v = v_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
    const int64_t n = std::min(block_size, seq_len - start);
    accumulate(scores.data() + start, v, n, token_stride, out, head_dim);
  }
  const float inv = 1.0f / denom;
  for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv;
}

void attend_queries(const float* q, int64_t q_stride, const int64_t* seq_lens, int64_t num_queries,
                    const float* k_cache, const float* v_cache, const int32_t* table, int64_t block_size,
                    int64_t token_stride, int64_t head_offset, int64_t head_dim, float scale, float* out,
                    int64_t out_stride, std::vector<float>& scores) {
  // attend_one_head's three passes, each over the blocks in order and, per block, over the queries: a query's scores,
  // max, exps, sum and PV accumulation see the same values in the same order as attend_one_head's.
  int64_t max_len = 0;
  for (int64_t j = 0; j < num_queries; ++j) max_len = std::max(max_len, seq_lens[j]);
  const int64_t stride = (max_len + 15) / 16 * 16;  // floats per query's scores
  scores.resize(num_queries * (stride + 1));
  float* maxes = scores.data() + num_queries * stride;  // per query: its max score, then its softmax denominator
  std::fill(maxes, maxes + num_queries, -INFINITY);
  for (int64_t start = 0; start < max_len; start += block_size) {
    const float* k =
        k_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
    for (int64_t j = 0; j < num_queries; ++j) {
      const int64_t n = std::min(block_size, seq_lens[j] - start);
      const float* qj = q + j * q_stride;
      float* sj = scores.data() + j * stride;
      if (n > 0) maxes[j] = score_block(qj, k, n, token_stride, head_dim, scale, sj + start, maxes[j]);
    }
  }
  for (int64_t j = 0; j < num_queries; ++j) {
    maxes[j] = exp_and_sum(scores.data() + j * stride, seq_lens[j], maxes[j]);
    std::fill(out + j * out_stride, out + j * out_stride + head_dim, 0.0f);
  }
  for (int64_t start = 0; start < max_len; start += block_size) {
    const float* v =
        v_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
    for (int64_t j = 0; j < num_queries; ++j) {
      const int64_t n = std::min(block_size, seq_lens[j] - start);
      const float* sj = scores.data() + j * stride;
      if (n > 0) accumulate(sj + start, v, n, token_stride, out + j * out_stride, head_dim);
    }
  }
  for (int64_t j = 0; j < num_queries; ++j) {
    const float inv = 1.0f / maxes[j];
    float* oj = out + j * out_stride;
    for (int64_t d = 0; d < head_dim; ++d) oj[d] *= inv;
  }
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
  // This entry point runs between torch's OpenMP regions, whose threads keep spinning for a while afterwards: a pool
  // worker then waits for a core, and the caller for it (measured: 1.9 ms per call at 64 short sequences instead of
  // 0.2 ms alone). Small contexts therefore stay on the calling thread.
  int64_t total_tokens = 0;
  for (int64_t b = 0; b < batch_size; ++b) total_tokens += seq_lens[b];
  if (num_threads <= 1 || total_tokens * num_heads * head_dim < (int64_t{1} << 22)) {
    for (int64_t p = 0; p < batch_size * num_heads; ++p) pair(p);
    return;
  }
  ThreadPool::with_pool(num_threads, /*linger=*/false,
                        [&](ThreadPool& pool) { pool.parallel_for(batch_size * num_heads, pair); });
}

void paged_packed_attention(ThreadPool& pool, const float* q, int64_t q_stride, const float* k_cache,
                            const float* v_cache, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* seq_index, const int64_t* seq_lens, int64_t num_queries, int64_t num_heads,
                            int64_t head_dim, int64_t block_size, float scale, float* out, int64_t out_stride) {
  std::vector<int64_t> starts;  // group g is queries [starts[g], starts[g + 1])
  for (int64_t i = 0; i < num_queries; ++i)
    if (i == 0 || seq_index[i] != seq_index[i - 1] || i - starts.back() == kQueryTile) starts.push_back(i);
  starts.push_back(num_queries);
  const int64_t num_groups = static_cast<int64_t>(starts.size()) - 1;
  const int64_t token_stride = num_heads * head_dim;  // floats between consecutive tokens in the pool
  pool.parallel_for(num_groups * num_heads, [&](int64_t p) {
    thread_local std::vector<float> scores;
    const int64_t g = p / num_heads, h = p % num_heads, first = starts[g], n = starts[g + 1] - first;
    const int32_t* table = block_tables + static_cast<int64_t>(seq_index[first]) * max_blocks;
    const float* qg = q + first * q_stride + h * head_dim;
    float* og = out + first * out_stride + h * head_dim;
    if (n == 1)
      attend_one_head(qg, k_cache, v_cache, table, seq_lens[first], block_size, token_stride, h * head_dim, head_dim,
                      scale, og, scores);
    else
      attend_queries(qg, q_stride, seq_lens + first, n, k_cache, v_cache, table, block_size, token_stride,
                     h * head_dim, head_dim, scale, og, out_stride, scores);
  });
}

}  // namespace fastgpt2
