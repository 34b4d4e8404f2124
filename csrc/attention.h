// Paged decode attention on CPU, on raw float32 buffers (no Python, no torch): one query token per sequence against
// its cached K/V, read in place through the block table (no gather copies). Semantics of
// fastgpt2.kernels.reference.paged_decode_attention.
#pragma once

#include <cstdint>

namespace fastgpt2 {

// q, out: (B, H, D); k_cache, v_cache: (num_blocks, block_size, H, D); block_tables: (B, max_blocks) int32;
// seq_lens: (B,) int32 in [1, max_blocks * block_size]. Work is split over (sequence, head) pairs across threads.
void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t batch_size,
                                int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                float scale, int num_threads);

}  // namespace fastgpt2
