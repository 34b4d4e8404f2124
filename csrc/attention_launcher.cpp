// Checked entry point of the CPU paged decode attention: validates every buffer, then runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "attention.h"

namespace py = pybind11;

namespace fastgpt2 {
namespace {

using F32 = py::array_t<float, py::array::c_style>;
using I32 = py::array_t<int32_t, py::array::c_style>;

template <typename T>
py::array_t<T, py::array::c_style> checked(const py::array& a, const char* name, int ndim, const char* dtype) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::type_error(std::string(name) + " must be a " + dtype + " array");
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got " +
                          std::to_string(a.ndim()));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous; call .contiguous() first");
  return py::array_t<T, py::array::c_style>::ensure(a);
}

}  // namespace

void paged_decode_attention_checked(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                    const py::array& block_tables, const py::array& seq_lens, py::array& out,
                                    float scale, int num_threads) {
  F32 q_ = checked<float>(q, "q", 3, "float32");              // (B, H, D)
  F32 k_ = checked<float>(k_cache, "k_cache", 4, "float32");  // (num_blocks, block_size, H, D)
  F32 v_ = checked<float>(v_cache, "v_cache", 4, "float32");
  I32 t_ = checked<int32_t>(block_tables, "block_tables", 2, "int32");  // (B, max_blocks)
  I32 l_ = checked<int32_t>(seq_lens, "seq_lens", 1, "int32");          // (B,)
  F32 o_ = checked<float>(out, "out", 3, "float32");
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

}  // namespace fastgpt2
