// The CPU step (see decode.h). Per layer: LayerNorm per row, then four parallel regions over weight rows and one over
// (query group, head) pairs; the residual adds and GELU are fused into the projections' epilogues, and every new K/V
// of the step is written straight from the QKV output into the pool before any token attends.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// From this many tokens on, parallel_linear would run the packed-panel GEMM (gemm.h) instead of the row-blocked GEMV
// kernels (linear.h). The GEMM sums each output in another order than the GEMV kernels, so a token's result would
// depend on how many tokens share its step; it is switched off here and the GEMV kernels serve every token count:
// their 4x3, 4x2 and 4x1 blocks and the tail rows' dot() all compute an output as 8 FMA lanes over K (k = 0, 8, ...)
// then the same horizontal sum (simd.h's hsum), so the per-element operations do not depend on which block a token
// lands in. A packed-weight GEMM whose per-element order is independent of the token count replaces this switch.
// (When it was on, measured on the 124M step: 8 tokens 44 ms GEMV vs 53 GEMM, 16 tokens 78 vs 70, 32 tokens 118-136
// vs 87-99.)
constexpr int64_t kGemmMinTokens = INT64_MAX;

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

// LayerNorm of rows [0, num_rows) of x (row stride C) into out; row r of out reads row rows[r] of x when rows is given.
// Per row, the same operations (layer_norm_row) whatever the number of rows or threads.
void layer_norms(ThreadPool& pool, const float* x, const int64_t* rows, int64_t num_rows, const float* weight,
                 const float* bias, float* out, int64_t C, float eps) {
  constexpr int64_t kRowsPerTask = 16;
  auto one = [&](int64_t r) { layer_norm_row(x + (rows ? rows[r] : r) * C, weight, bias, out + r * C, C, eps); };
  if (num_rows < 2 * kRowsPerTask) {
    for (int64_t r = 0; r < num_rows; ++r) one(r);
    return;
  }
  pool.parallel_for((num_rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t t) {
    for (int64_t r = t * kRowsPerTask; r < std::min(num_rows, (t + 1) * kRowsPerTask); ++r) one(r);
  });
}

}  // namespace

template <typename W>
void model_step(const ModelWeights<W>& w, const StepBatch& batch, int num_threads) {
  const int64_t N = batch.num_tokens, R = batch.num_logits, C = w.n_embd, H = w.n_head, D = C / H;
  if (N == 0) return;
  std::vector<float> x(N * C), h(N * C), qkv(N * 3 * C), attn(N * C), fc(N * 4 * C);
  std::vector<int64_t> context(N);  // keys each token attends to: its position + 1
  // 1. Token + position embeddings.
  for (int64_t i = 0; i < N; ++i) {
    context[i] = batch.positions[i] + 1;
    const W* te = w.wte + batch.token_ids[i] * C;
    const float* pe = w.wpe + batch.positions[i] * C;
    for (int64_t c = 0; c < C; ++c) x[i * C + c] = to_float(te[c]) + pe[c];
  }
  const int64_t pool_stride = batch.num_blocks * batch.block_size * C;  // floats per (layer, K|V) slice of the pool
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float eps = w.layer_norm_epsilon;
  ThreadPool::with_pool(num_threads, /*linger=*/true, [&](ThreadPool& pool) {
    for (size_t l = 0; l < w.layers.size(); ++l) {
      const LayerWeights<W>& L = w.layers[l];
      float* k_cache = batch.kv_cache + (2 * l) * pool_stride;
      float* v_cache = k_cache + pool_stride;
      // 2. x + attn(ln_1(x)): QKV, every token's K/V into the pool, attention, output projection added to x.
      layer_norms(pool, x.data(), nullptr, N, L.ln_1_weight, L.ln_1_bias, h.data(), C, eps);
      parallel_linear(pool, L.c_attn_weight, L.c_attn_bias, h.data(), C, qkv.data(), 3 * C, N, 3 * C, C,
                      Epilogue::kStore);
      for (int64_t i = 0; i < N; ++i) {
        std::memcpy(k_cache + batch.slots[i] * C, &qkv[i * 3 * C + C], C * sizeof(float));
        std::memcpy(v_cache + batch.slots[i] * C, &qkv[i * 3 * C + 2 * C], C * sizeof(float));
      }
      paged_packed_attention(pool, qkv.data(), 3 * C, k_cache, v_cache, batch.block_tables, batch.max_blocks,
                             batch.seq_index, context.data(), N, H, D, batch.block_size, scale, attn.data(), C);
      parallel_linear(pool, L.attn_proj_weight, L.attn_proj_bias, attn.data(), C, x.data(), C, N, C, C,
                      Epilogue::kAccumulate);
      // 3. x + mlp(ln_2(x)).
      layer_norms(pool, x.data(), nullptr, N, L.ln_2_weight, L.ln_2_bias, h.data(), C, eps);
      parallel_linear(pool, L.c_fc_weight, L.c_fc_bias, h.data(), C, fc.data(), 4 * C, N, 4 * C, C, Epilogue::kGelu);
      parallel_linear(pool, L.mlp_proj_weight, L.mlp_proj_bias, fc.data(), 4 * C, x.data(), C, N, C, 4 * C,
                      Epilogue::kAccumulate);
    }
    // 4. ln_f and the tied LM head, on the logits rows only.
    if (R == 0) return;
    layer_norms(pool, x.data(), batch.logits_indices, R, w.ln_f_weight, w.ln_f_bias, h.data(), C, eps);
    parallel_linear(pool, w.wte, nullptr, h.data(), C, batch.logits, w.vocab_size, R, w.vocab_size, C,
                    Epilogue::kStore);
  });
}

template void model_step<float>(const ModelWeights<float>&, const StepBatch&, int);
template void model_step<bf16>(const ModelWeights<bf16>&, const StepBatch&, int);

}  // namespace fastgpt2
