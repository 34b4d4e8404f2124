// Paged attention on CPU, on raw float32 buffers (no Python, no torch): queries against their sequence's cached K/V,
// read in place through the block table (no gather copies). Semantics of
// fastgpt2.kernels.reference.paged_decode_attention; a query at position p attends to the p + 1 keys [0, p].
//
// Batch invariance: the result for one (query, head) is a fixed sequence of float32 operations that depends only on
// the query, its context length and the cached K/V: attend_one_head (one query) and attend_queries (several queries
// of one sequence, each K/V block read once for all of them) perform the same operations per query, in the same
// order (tests/test_batch_invariance.py checks them bitwise against each other).
#pragma once

#include <cstdint>
#include <vector>

namespace fastgpt2 {

class ThreadPool;

// One (sequence, head): q, out (head_dim,); the sequence's K/V rows are at k_cache/v_cache + slot * token_stride +
// head_offset, slot = table[t / block_size] * block_size + t % block_size for t < seq_len. scores is scratch.
void attend_one_head(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
                     int64_t seq_len, int64_t block_size, int64_t token_stride, int64_t head_offset,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores);

// num_queries queries of one sequence and head: query j at q + j * q_stride attends to the first seq_lens[j] keys
// (seq_lens[j] >= 1) and writes out + j * out_stride; otherwise as attend_one_head, whose floating-point operations
// each query repeats exactly. Each K and V block is read once per call, for every query whose context reaches it.
// scores is scratch.
void attend_queries(const float* q, int64_t q_stride, const int64_t* seq_lens, int64_t num_queries,
                    const float* k_cache, const float* v_cache, const int32_t* table, int64_t block_size,
                    int64_t token_stride, int64_t head_offset, int64_t head_dim, float scale, float* out,
                    int64_t out_stride, std::vector<float>& scores);

// q, out: (B, H, D); k_cache, v_cache: (num_blocks, block_size, H, D); block_tables: (B, max_blocks) int32;
// seq_lens: (B,) int32 in [1, max_blocks * block_size]. Work is split over (sequence, head) pairs across threads.
void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t batch_size,
                                int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                float scale, int num_threads);

// Packed queries of several sequences (a prefill chunk per sequence, or one decode token), on the given pool: query i
// at q + i * q_stride (H heads of head_dim) belongs to row seq_index[i] of block_tables (S, max_blocks) and attends
// to its first seq_lens[i] keys (its position + 1); its output goes to out + i * out_stride. Consecutive queries of one
// sequence are grouped, up to kQueryTile per task (attend_queries; a lone query runs attend_one_head); work is split
// over (group, head) pairs.
constexpr int64_t kQueryTile = 16;
void paged_packed_attention(ThreadPool& pool, const float* q, int64_t q_stride, const float* k_cache,
                            const float* v_cache, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* seq_index, const int64_t* seq_lens, int64_t num_queries, int64_t num_heads,
                            int64_t head_dim, int64_t block_size, float scale, float* out, int64_t out_stride);

}  // namespace fastgpt2
