// Checked entry points of the CPU paged attention (decode: one query per sequence; packed: several queries per
// sequence, as the CPU step runs them): validate every buffer, then run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "checks.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace fastgpt2 {

void paged_decode_attention_checked(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                    const py::array& block_tables, const py::array& seq_lens, py::array& out,
                                    float scale, int num_threads) {
  auto q_ = checked_array<float>(q, "q", "float32", {-1, -1, -1});              // (B, H, D)
  auto k_ = checked_array<float>(k_cache, "k_cache", "float32", {-1, -1, -1, -1});  // (num_blocks, block_size, H, D)
  auto v_ = checked_array<float>(v_cache, "v_cache", "float32", {-1, -1, -1, -1});
  auto t_ = checked_array<int32_t>(block_tables, "block_tables", "int32", {-1, -1});  // (B, max_blocks)
  auto l_ = checked_array<int32_t>(seq_lens, "seq_lens", "int32", {-1});          // (B,)
  auto o_ = checked_array<float>(out, "out", "float32", {-1, -1, -1});
  const int64_t B = q_.shape(0), H = q_.shape(1), D = q_.shape(2);
  const int64_t num_blocks = k_.shape(0), block_size = k_.shape(1), max_blocks = t_.shape(1);
  for (int i = 0; i < 4; ++i)
    if (k_.shape(i) != v_.shape(i)) throw py::value_error("k_cache and v_cache must have the same shape");
  if (k_.shape(2) != H || k_.shape(3) != D) throw py::value_error("k_cache's heads/head_dim must match q's");
  if (t_.shape(0) != B || l_.shape(0) != B) throw py::value_error("block_tables and seq_lens need one row per query");
  if (o_.shape(0) != B || o_.shape(1) != H || o_.shape(2) != D) throw py::value_error("out must have q's shape");
  const int32_t* lens = l_.data();
  const int32_t* tables = t_.data();
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] < 1 || lens[b] > max_blocks * block_size)
      throw py::value_error("seq_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                            " is outside [1, max_blocks * block_size]");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      if (tables[b * max_blocks + i] < 0 || tables[b * max_blocks + i] >= num_blocks)
        throw py::value_error("block_tables has a block id outside the pool");
  }
  float* o = o_.mutable_data();
  const float *qp = q_.data(), *kp = k_.data(), *vp = v_.data();
  py::gil_scoped_release release;
  paged_decode_attention_f32(qp, kp, vp, tables, lens, o, B, H, D, block_size, max_blocks, scale, num_threads);
}

void paged_packed_attention_checked(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                    const py::array& block_tables, const py::array& seq_index,
                                    const py::array& seq_lens, py::array& out, float scale, int num_threads) {
  auto q_ = checked_array<float>(q, "q", "float32", {-1, -1, -1});  // (N, H, D)
  const int64_t N = q_.shape(0), H = q_.shape(1), D = q_.shape(2);
  auto k_ = checked_array<float>(k_cache, "k_cache", "float32", {-1, -1, H, D});  // (num_blocks, block_size, H, D)
  auto v_ = checked_array<float>(v_cache, "v_cache", "float32", {k_.shape(0), k_.shape(1), H, D});
  auto t_ = checked_array<int32_t>(block_tables, "block_tables", "int32", {-1, -1});  // (S, max_blocks)
  auto s_ = checked_array<int32_t>(seq_index, "seq_index", "int32", {N});
  auto l_ = checked_array<int32_t>(seq_lens, "seq_lens", "int32", {N});
  auto o_ = checked_array<float>(out, "out", "float32", {N, H, D});
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  const int64_t num_blocks = k_.shape(0), block_size = k_.shape(1), S = t_.shape(0), max_blocks = t_.shape(1);
  const int32_t *tables = t_.data(), *index = s_.data(), *lens32 = l_.data();
  std::vector<int64_t> lens(N);
  for (int64_t i = 0; i < N; ++i) {
    if (index[i] < 0 || index[i] >= S)
      throw py::value_error("seq_index[" + std::to_string(i) + "] = " + std::to_string(index[i]) +
                            " is outside [0, " + std::to_string(S) + "), the block tables' rows");
    if (lens32[i] < 1 || lens32[i] > max_blocks * block_size)
      throw py::value_error("seq_lens[" + std::to_string(i) + "] = " + std::to_string(lens32[i]) +
                            " is outside [1, max_blocks * block_size]");
    for (int64_t b = 0; b < (lens32[i] + block_size - 1) / block_size; ++b)
      if (tables[index[i] * max_blocks + b] < 0 || tables[index[i] * max_blocks + b] >= num_blocks)
        throw py::value_error("block_tables[" + std::to_string(index[i]) + "] has a block id outside the pool");
    lens[i] = lens32[i];
  }
  float* o = o_.mutable_data();
  const float *qp = q_.data(), *kp = k_.data(), *vp = v_.data();
  py::gil_scoped_release release;
  ThreadPool::with_pool(num_threads, /*linger=*/false, [&](ThreadPool& pool) {
    paged_packed_attention(pool, qp, H * D, kp, vp, tables, max_blocks, index, lens.data(), N, H, D, block_size,
                           scale, o, H * D);
  });
}

}  // namespace fastgpt2
