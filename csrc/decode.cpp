// The CPU step (see decode.h). Per layer: LayerNorm per row, then four parallel regions over weight rows and one over
// (query group, head) pairs; the residual adds and GELU are fused into the projections' epilogues, and every new K/V
// of the step is written straight from the QKV output into the pool before any token attends.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention.h"
#include "linear.h"
#include "packed_gemm.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

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
    const auto* te = w.wte_rows + batch.token_ids[i] * C;
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
      packed_linear(pool, L.c_attn, L.c_attn_bias, h.data(), C, qkv.data(), 3 * C, N, Epilogue::kStore);
      for (int64_t i = 0; i < N; ++i) {
        std::memcpy(k_cache + batch.slots[i] * C, &qkv[i * 3 * C + C], C * sizeof(float));
        std::memcpy(v_cache + batch.slots[i] * C, &qkv[i * 3 * C + 2 * C], C * sizeof(float));
      }
      paged_packed_attention(pool, qkv.data(), 3 * C, k_cache, v_cache, batch.block_tables, batch.max_blocks,
                             batch.seq_index, context.data(), N, H, D, batch.block_size, scale, attn.data(), C);
      packed_linear(pool, L.attn_proj, L.attn_proj_bias, attn.data(), C, x.data(), C, N, Epilogue::kAccumulate);
      // 3. x + mlp(ln_2(x)).
      layer_norms(pool, x.data(), nullptr, N, L.ln_2_weight, L.ln_2_bias, h.data(), C, eps);
      packed_linear(pool, L.c_fc, L.c_fc_bias, h.data(), C, fc.data(), 4 * C, N, Epilogue::kGelu);
      packed_linear(pool, L.mlp_proj, L.mlp_proj_bias, fc.data(), 4 * C, x.data(), C, N, Epilogue::kAccumulate);
    }
    // 4. ln_f and the tied LM head, on the logits rows only.
    if (R == 0) return;
    layer_norms(pool, x.data(), batch.logits_indices, R, w.ln_f_weight, w.ln_f_bias, h.data(), C, eps);
    packed_linear(pool, w.lm_head, nullptr, h.data(), C, batch.logits, w.vocab_size, R, Epilogue::kStore);
  });
}

template void model_step<float>(const ModelWeights<float>&, const StepBatch&, int);
template void model_step<bf16>(const ModelWeights<bf16>&, const StepBatch&, int);
template void model_step<q8>(const ModelWeights<q8>&, const StepBatch&, int);

}  // namespace fastgpt2
