// The whole GPT-2 step on CPU on raw buffers, float32 arithmetic on float32 or bfloat16 weight matrices: N packed
// tokens, any mix of prefill chunks and decodes (one token per decoding sequence), through embeddings, 12..48 blocks
// (LayerNorm, QKV, paged attention, projections, tanh-GELU MLP), ln_f and the tied LM head on the rows whose logits
// are wanted, on a persistent thread pool instead of ~150 torch ops per step.
//
// Batch invariance (the CPU path's contract): every output element of every linear layer, the LM head, LayerNorm and
// attention is computed by the same sequence of float32 operations whatever else is in the step, so a token's logits
// are bitwise the same alone, in a decode batch of any size, inside a prefill chunk of any size, after a prefix-cache
// hit or after recomputation (on a given machine and build). LayerNorm is per row (layer_norm_row); the
// linear layers are one FMA chain per output element whatever the number of tokens (packed_gemm.h); attention
// is per (token, head) over the token's own context [0, position] (attention.h).
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "argmax_screen.h"
#include "linear.h"
#include "packed_gemm.h"

namespace fastgpt2 {

// The model's float32 parameters as torch holds them (nn.Linear layout, row-major), read in place.
struct RawLayer {
  const float *ln_1_weight, *ln_1_bias, *c_attn_weight, *c_attn_bias, *attn_proj_weight, *attn_proj_bias;
  const float *ln_2_weight, *ln_2_bias, *c_fc_weight, *c_fc_bias, *mlp_proj_weight, *mlp_proj_bias;
};

// What the step reads: the weight matrices packed for the GEMM (packed_gemm.h) as W (float, bf16 or q8), the LM
// head included; LayerNorm parameters, biases and position embeddings float32; the token embedding's rows as float32
// (bf16 for bf16 weights; the dequantised values for int8) for the lookup.
template <typename W>
struct LayerWeights {
  const float *ln_1_weight, *ln_1_bias;
  PackedMatrix<W> c_attn;  // (3C, C)
  const float* c_attn_bias;
  PackedMatrix<W> attn_proj;  // (C, C)
  const float* attn_proj_bias;
  const float *ln_2_weight, *ln_2_bias;
  PackedMatrix<W> c_fc;  // (4C, C)
  const float* c_fc_bias;
  PackedMatrix<W> mlp_proj;  // (C, 4C)
  const float* mlp_proj_bias;
};

template <typename W>
struct ModelWeights {
  using Row = std::conditional_t<std::is_same_v<W, bf16>, bf16, float>;  // int8: the dequantised rows
  const Row* wte_rows;      // (vocab_size, C) row-major: the embedding lookup
  PackedMatrix<W> lm_head;  // wte packed: the tied LM head
  // Greedy steps' int8 screen of lm_head (argmax_screen.h; float32 and bf16 weights): null to compute every logit.
  std::shared_ptr<const ArgmaxScreen> lm_head_screen;
  const float* wpe;         // (n_positions, C)
  std::vector<LayerWeights<W>> layers;
  const float *ln_f_weight, *ln_f_bias;
  int64_t n_embd, n_head, vocab_size, n_positions;
  float layer_norm_epsilon;
};

// One step of num_tokens packed tokens. Token i (id token_ids[i] at positions[i]) belongs to the sequence whose block
// table is row seq_index[i] of block_tables (num_seqs, max_blocks); its new K/V go to slot slots[i] of kv_cache
// (n_layer, 2, num_blocks, block_size, n_head, head_dim), and it attends to its sequence's positions [0, positions[i]]
// (earlier steps' K/V already in the pool, this step's written first). A sequence's tokens come in position order.
// logits (num_logits, vocab_size) gets the logits of the rows logits_indices (num_logits,), in that order.
struct StepBatch {
  const int64_t* token_ids;  // (num_tokens,)
  const int64_t* positions;  // (num_tokens,)
  const int64_t* slots;      // (num_tokens,)
  const int32_t* seq_index;  // (num_tokens,)
  const int32_t* block_tables;
  const int64_t* logits_indices;  // (num_logits,)
  int64_t num_tokens, num_seqs, max_blocks, num_logits;
  float* kv_cache;
  int64_t num_blocks, block_size;
  float* logits;  // (num_logits, vocab_size), written; unused when greedy is set
  // Greedy decoding without the logits: when set, greedy (num_logits,) gets each logits row's argmax over the ids
  // [0, greedy_limit) (packed_argmax: the same choice as torch.argmax of those logits) and no logits are written.
  int64_t* greedy = nullptr;
  int64_t greedy_limit = 0;
};

// Inputs must already be checked (decode_launcher.cpp): ids, positions, slots, sequence indices, block ids and
// logits rows in range, slots those of the block tables, n_embd a multiple of 8.
template <typename W>
void model_step(const ModelWeights<W>& weights, const StepBatch& batch, int num_threads);

}  // namespace fastgpt2
