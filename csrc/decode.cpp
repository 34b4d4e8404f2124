// The CPU decode step (see decode.h). Per layer: LayerNorm on the calling thread (C floats per token), then four
// parallel regions over weight rows and one over (sequence, head) pairs; the residual adds and GELU are fused into
// the projections' epilogues, and the new K/V are written straight from the QKV output into the pool.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention.h"
#include "gemm.h"
#include "linear.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

// Output rows per task: a multiple of `align` (the kernel's row block), about 8 tasks per thread so a thread that
// starts late (a busy core) takes fewer, and at least 16 rows so a task's 50+ KB of weights outweigh the hand-off.
int64_t rows_per_task(int64_t num_rows, int num_threads, int64_t align) {
  int64_t rows = num_rows / (8 * static_cast<int64_t>(num_threads));
  rows = std::max<int64_t>(16, (rows + align - 1) / align * align);
  return rows;
}

// From this many tokens on, the packed-panel GEMM (gemm.h) beats the row-blocked GEMV kernels (linear.h): measured
// on the 124M step, 8 tokens 44 vs 53 ms (GEMV faster), 16 tokens 78 vs 70, 32 tokens 118-136 vs 87-99.
constexpr int64_t kGemmMinTokens = 12;

template <typename W>
void parallel_linear(ThreadPool& pool, const W* weight, const float* bias, const float* x, int64_t ldx, float* y,
                     int64_t ldy, int64_t num_tokens, int64_t N, int64_t K, Epilogue epilogue) {
  if (kHasGemm && num_tokens >= kGemmMinTokens) {
    thread_local std::vector<float> packed;  // the calling thread's packed X, read by every task
    pack_x(x, ldx, num_tokens, K, packed);
    const float* xp = packed.data();  // (a lambda naming `packed` would see the executing thread's own copy)
    const int64_t rows = rows_per_task(N, pool.num_threads(), kGemmPanel);
    pool.parallel_for((N + rows - 1) / rows, [&](int64_t i) {
      gemm_rows(weight, bias, xp, y, ldy, num_tokens, K, i * rows, std::min(N, (i + 1) * rows), epilogue);
    });
    return;
  }
  const int64_t rows = rows_per_task(N, pool.num_threads(), 4);
  const int64_t num_tasks = (N + rows - 1) / rows;
  pool.parallel_for(num_tasks, [&](int64_t i) {
    linear_rows(weight, bias, x, ldx, y, ldy, num_tokens, K, i * rows, std::min(N, (i + 1) * rows), epilogue);
  });
}

}  // namespace

template <typename W>
void decode_step(const ModelWeights<W>& w, const DecodeBatch& batch, int num_threads) {
  const int64_t B = batch.batch_size, C = w.n_embd, H = w.n_head, D = C / H;
  std::vector<float> x(B * C), h(B * C), qkv(B * 3 * C), attn(B * C), fc(B * 4 * C);
  // 1. Token + position embeddings.
  for (int64_t b = 0; b < B; ++b) {
    const W* te = w.wte + batch.token_ids[b] * C;
    const float* pe = w.wpe + batch.positions[b] * C;
    for (int64_t i = 0; i < C; ++i) x[b * C + i] = to_float(te[i]) + pe[i];
  }
  const int64_t pool_stride = batch.num_blocks * batch.block_size * C;  // floats per (layer, K|V) slice of the pool
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  ThreadPool::with_pool(num_threads, /*linger=*/true, [&](ThreadPool& pool) {
    for (size_t l = 0; l < w.layers.size(); ++l) {
      const LayerWeights<W>& L = w.layers[l];
      float* k_cache = batch.kv_cache + (2 * l) * pool_stride;
      float* v_cache = k_cache + pool_stride;
      // 2. x + attn(ln_1(x)): QKV, K/V into the pool, attention, output projection added to x.
      for (int64_t b = 0; b < B; ++b)
        layer_norm_row(&x[b * C], L.ln_1_weight, L.ln_1_bias, &h[b * C], C, w.layer_norm_epsilon);
      parallel_linear(pool, L.c_attn_weight, L.c_attn_bias, h.data(), C, qkv.data(), 3 * C, B, 3 * C, C,
                      Epilogue::kStore);
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(k_cache + batch.slots[b] * C, &qkv[b * 3 * C + C], C * sizeof(float));
        std::memcpy(v_cache + batch.slots[b] * C, &qkv[b * 3 * C + 2 * C], C * sizeof(float));
      }
      pool.parallel_for(B * H, [&](int64_t p) {
        thread_local std::vector<float> scores;
        const int64_t b = p / H, head = p % H;
        attend_one_head(&qkv[b * 3 * C + head * D], k_cache, v_cache, batch.block_tables + b * batch.max_blocks,
                        batch.seq_lens[b], batch.block_size, C, head * D, D, scale, &attn[b * C + head * D], scores);
      });
      parallel_linear(pool, L.attn_proj_weight, L.attn_proj_bias, attn.data(), C, x.data(), C, B, C, C,
                      Epilogue::kAccumulate);
      // 3. x + mlp(ln_2(x)).
      for (int64_t b = 0; b < B; ++b)
        layer_norm_row(&x[b * C], L.ln_2_weight, L.ln_2_bias, &h[b * C], C, w.layer_norm_epsilon);
      parallel_linear(pool, L.c_fc_weight, L.c_fc_bias, h.data(), C, fc.data(), 4 * C, B, 4 * C, C, Epilogue::kGelu);
      parallel_linear(pool, L.mlp_proj_weight, L.mlp_proj_bias, fc.data(), 4 * C, x.data(), C, B, C, 4 * C,
                      Epilogue::kAccumulate);
    }
    // 4. ln_f and the tied LM head.
    for (int64_t b = 0; b < B; ++b) layer_norm_row(&x[b * C], w.ln_f_weight, w.ln_f_bias, &h[b * C], C, w.layer_norm_epsilon);
    parallel_linear(pool, w.wte, nullptr, h.data(), C, batch.logits, w.vocab_size, B, w.vocab_size, C,
                    Epilogue::kStore);
  });
}

template void decode_step<float>(const ModelWeights<float>&, const DecodeBatch&, int);
template void decode_step<bf16>(const ModelWeights<bf16>&, const DecodeBatch&, int);

}  // namespace fastgpt2
