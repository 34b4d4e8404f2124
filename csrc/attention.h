// Paged decode attention on CPU, on raw float32 buffers (no Python, no torch): one query token per sequence against
// its cached K/V, read in place through the block table (no gather copies). Semantics of
// fastgpt2.kernels.reference.paged_decode_attention.
#pragma once

#include <cstdint>
#include <vector>

namespace fastgpt2 {

// One (sequence, head): q, out (head_dim,); the sequence's K/V rows are at k_cache/v_cache + slot * token_stride +
// head_offset, slot = table[t / block_size] * block_size + t % block_size for t < seq_len. scores is scratch.
void attend_one_head(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
                     int64_t seq_len, int64_t block_size, int64_t token_stride, int64_t head_offset,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores);

// q, out: (B, H, D); k_cache, v_cache: (num_blocks, block_size, H, D); block_tables: (B, max_blocks) int32;
// seq_lens: (B,) int32 in [1, max_blocks * block_size]. Work is split over (sequence, head) pairs across threads.
void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t batch_size,
                                int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                float scale, int num_threads);

}  // namespace fastgpt2
