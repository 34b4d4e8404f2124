// The CPU step (see decode.h). Per layer: LayerNorm per row, then four parallel regions over weight rows and one over
// (query group, head) pairs; the residual adds and GELU are fused into the projections' epilogues, and every new K/V
// of the step is stored into the pool by the QKV projection's epilogue before any token attends. The last layer runs
// past its QKV on the logits rows only (a 512-token prompt: ~8% less time on one Intel Xeon, 2 threads).
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

// fn(i) for every row i < N: on the calling thread for a few rows, else in tasks of 32 rows on the pool.
template <typename F>
void for_rows(ThreadPool& pool, int64_t N, const F& fn) {
  constexpr int64_t kRowsPerTask = 32;
  if (N <= kRowsPerTask) {
    for (int64_t i = 0; i < N; ++i) fn(i);
    return;
  }
  pool.parallel_for((N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t t) {
    for (int64_t i = t * kRowsPerTask; i < std::min(N, (t + 1) * kRowsPerTask); ++i) fn(i);
  });
}

}  // namespace

template <typename W>
void model_step(const ModelWeights<W>& w, const StepBatch& batch, int num_threads) {
  const int64_t N = batch.num_tokens, R = batch.num_logits, C = w.n_embd, H = w.n_head, D = C / H;
  if (N == 0) return;
  // The step's activations: x, h, attn (N, C), qkv (N, 3C), fc (N, 4C), x_rows (R <= N, C). Kept per calling thread
  // and only grown, so that a step reuses mapped memory instead of faulting in 11 N C floats again (a 512-token prompt
  // of GPT-2 small: ~3000 page faults per step); the memory stays until the thread exits (CpuStep bounds N per call).
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(11 * N * C)) scratch.resize(11 * N * C);
  float* const x = scratch.data();
  float *const h = x + N * C, *const attn = h + N * C, *const qkv = attn + N * C, *const fc = qkv + 3 * N * C;
  float* const x_rows = fc + 4 * N * C;  // the last layer's logits rows (see below)
  std::vector<int64_t> context(N);  // keys each token attends to: its position + 1
  for (int64_t i = 0; i < N; ++i) context[i] = batch.positions[i] + 1;
  const int64_t pool_stride = batch.num_blocks * batch.block_size * C;  // floats per (layer, K|V) slice of the pool
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float eps = w.layer_norm_epsilon;
  std::vector<int32_t> rows_seq;
  std::vector<int64_t> rows_len;
  const float* final_rows = x;  // ln_f's input: x (rows logits_indices) or x_rows (rows 0..R-1)
  // K/V from the QKV GEMM's epilogue straight into the pool (whole 16-column panels: every GPT-2 size), else copied
  // from qkv afterwards (a 512-token prompt: the copy was 1.3% of its time on one Intel Xeon, 2 threads).
  const bool kv_direct = C % kPanelRows == 0;
  ThreadPool::with_pool(num_threads, /*linger=*/true, [&](ThreadPool& pool) {
    // 1. Token + position embeddings (a prompt's rows of the token embedding are cache misses: split over threads).
    for_rows(pool, N, [&](int64_t i) {
      // The next token's row asked for now, all its lines at once, rather than found missing line by line (a row of
      // 124M: 48 lines, 3 KB, anywhere in 154 MB).
      if (i + 1 < N) {
        const char* next = reinterpret_cast<const char*>(w.wte_rows + batch.token_ids[i + 1] * C);
        for (int64_t b = 0; b < C * static_cast<int64_t>(sizeof(*w.wte_rows)); b += 64) prefetch_line<3>(next + b);
      }
      const auto* te = w.wte_rows + batch.token_ids[i] * C;
      const float* pe = w.wpe + batch.positions[i] * C;
      for (int64_t c = 0; c < C; ++c) x[i * C + c] = to_float(te[c]) + pe[c];
    });
    for (size_t l = 0; l < w.layers.size(); ++l) {
      const LayerWeights<W>& L = w.layers[l];
      float* k_cache = batch.kv_cache + (2 * l) * pool_stride;
      float* v_cache = k_cache + pool_stride;
      // 2. x + attn(ln_1(x)): QKV, every token's K/V into the pool, attention, output projection added to x.
      layer_norms(pool, x, nullptr, N, L.ln_1_weight, L.ln_1_bias, h, C, eps);
      if (kv_direct) {  // the QKV GEMM stores K and V in the pool itself, Q in qkv
        const KVDestination kv{k_cache, v_cache, batch.slots, C};
        packed_linear(pool, L.c_attn, L.c_attn_bias, h, C, qkv, 3 * C, N, Epilogue::kStore, &kv);
      } else {
        packed_linear(pool, L.c_attn, L.c_attn_bias, h, C, qkv, 3 * C, N, Epilogue::kStore);
        for_rows(pool, N, [&](int64_t i) {
          std::memcpy(k_cache + batch.slots[i] * C, qkv + i * 3 * C + C, C * sizeof(float));
          std::memcpy(v_cache + batch.slots[i] * C, qkv + i * 3 * C + 2 * C, C * sizeof(float));
        });
      }
      // The last layer's output is read only by ln_f on the logits rows: when those are fewer than the step's
      // tokens (a prompt wants one), the rest of the layer runs on them alone, their rows gathered (x_rows) in
      // logits order. Every K/V of the step is in the pool already, and each row's operations are the same
      // whichever rows run beside it (decode.h), so the logits and the cache are bitwise what the full layer gives.
      const bool last_rows_only = l + 1 == w.layers.size() && R < N;
      const int64_t M = last_rows_only ? R : N;  // the rows the rest of the layer runs on
      float* const xm = last_rows_only ? x_rows : x;
      const float* q = qkv;
      int64_t q_stride = 3 * C;
      const int32_t* seq_index = batch.seq_index;
      const int64_t* seq_lens = context.data();
      if (last_rows_only) {
        if (R == 0) break;
        rows_seq.resize(R), rows_len.resize(R);
        for_rows(pool, R, [&](int64_t r) {
          const int64_t i = batch.logits_indices[r];
          std::memcpy(xm + r * C, x + i * C, C * sizeof(float));
          std::memcpy(h + r * C, qkv + i * 3 * C, C * sizeof(float));  // the query
          rows_seq[r] = batch.seq_index[i], rows_len[r] = context[i];
        });
        q = h, q_stride = C, seq_index = rows_seq.data(), seq_lens = rows_len.data();
      }
      paged_packed_attention(pool, q, q_stride, k_cache, v_cache, batch.block_tables, batch.max_blocks, seq_index,
                             seq_lens, M, H, D, batch.block_size, scale, attn, C);
      packed_linear(pool, L.attn_proj, L.attn_proj_bias, attn, C, xm, C, M, Epilogue::kAccumulate);
      // 3. x + mlp(ln_2(x)).
      layer_norms(pool, xm, nullptr, M, L.ln_2_weight, L.ln_2_bias, h, C, eps);
      packed_linear(pool, L.c_fc, L.c_fc_bias, h, C, fc, 4 * C, M, Epilogue::kGelu);
      packed_linear(pool, L.mlp_proj, L.mlp_proj_bias, fc, 4 * C, xm, C, M, Epilogue::kAccumulate);
      if (last_rows_only) final_rows = xm;
    }
    // 4. ln_f and the tied LM head, on the logits rows only.
    if (R == 0) return;
    layer_norms(pool, final_rows, final_rows == x ? batch.logits_indices : nullptr, R, w.ln_f_weight, w.ln_f_bias, h, C,
                eps);
    if (batch.greedy && w.lm_head_screen) {
      if constexpr (!std::is_same_v<W, q8>)
        screened_argmax(pool, *w.lm_head_screen, w.lm_head, w.wte_rows, h, C, R, batch.greedy_limit, batch.greedy);
    } else if (batch.greedy) {
      packed_argmax(pool, w.lm_head, nullptr, h, C, R, batch.greedy_limit, batch.greedy);
    } else {
      packed_linear(pool, w.lm_head, nullptr, h, C, batch.logits, w.vocab_size, R, Epilogue::kStore);
    }
  });
}

template void model_step<float>(const ModelWeights<float>&, const StepBatch&, int);
template void model_step<bf16>(const ModelWeights<bf16>&, const StepBatch&, int);
template void model_step<q8>(const ModelWeights<q8>&, const StepBatch&, int);

}  // namespace fastgpt2
