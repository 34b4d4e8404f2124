// The whole GPT-2 decode step on CPU (one new token per sequence) on raw buffers, float32 arithmetic on float32 or
// bfloat16 weight matrices: embeddings, 12..48 blocks (LayerNorm, QKV, paged attention, projections, tanh-GELU MLP),
// ln_f and the tied LM head, on a persistent thread pool instead of ~150 torch ops per token. Small batches are
// chains of matrix-vector products bound by memory bandwidth (row-blocked kernels, linear.h); from 12 sequences on
// the products go through a register-blocked GEMM (gemm.h).
#pragma once

#include <cstdint>
#include <vector>

#include "linear.h"

namespace fastgpt2 {

// Weight matrices in nn.Linear layout (out_features, in_features), row-major, of type W (float or bf16); LayerNorm
// parameters, biases and position embeddings float32.
template <typename W>
struct LayerWeights {
  const float *ln_1_weight, *ln_1_bias;
  const W* c_attn_weight;  // (3C, C)
  const float* c_attn_bias;
  const W* attn_proj_weight;  // (C, C)
  const float* attn_proj_bias;
  const float *ln_2_weight, *ln_2_bias;
  const W* c_fc_weight;  // (4C, C)
  const float* c_fc_bias;
  const W* mlp_proj_weight;  // (C, 4C)
  const float* mlp_proj_bias;
};

template <typename W>
struct ModelWeights {
  const W* wte;       // (vocab_size, C), also the LM head
  const float* wpe;   // (n_positions, C)
  std::vector<LayerWeights<W>> layers;
  const float *ln_f_weight, *ln_f_bias;
  int64_t n_embd, n_head, vocab_size, n_positions;
  float layer_norm_epsilon;
};

// One decode step for batch_size sequences. kv_cache: (n_layer, 2, num_blocks, block_size, n_head, head_dim); the
// new K/V of sequence b go to slot slots[b]. block_tables: (batch_size, max_blocks); seq_lens count the new token.
struct DecodeBatch {
  const int64_t* token_ids;  // (batch_size,)
  const int64_t* positions;  // (batch_size,)
  const int64_t* slots;      // (batch_size,)
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int64_t batch_size, max_blocks;
  float* kv_cache;
  int64_t num_blocks, block_size;
  float* logits;  // (batch_size, vocab_size), written
};

// Inputs must already be checked (decode_launcher.cpp): ids, positions, slots and block ids in range, n_embd a
// multiple of 8.
template <typename W>
void decode_step(const ModelWeights<W>& weights, const DecodeBatch& batch, int num_threads);

}  // namespace fastgpt2
