// Checked entry points of the CPU sampler: validate every numpy buffer, release the GIL, run sampling.cpp.
// Every error a caller can cause is a TypeError/ValueError with one sentence naming the problem and the fix.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "logprobs.h"
#include "sampling.h"

namespace py = pybind11;

namespace fastgpt2 {
namespace {

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_of(const py::array& a) {
  std::string shape = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(a.shape(d));
  return shape + (a.ndim() == 1 ? ",)" : ")");
}

// logits: (num_rows, vocab_size) float32 with a contiguous vocab dimension (rows may be strided).
void check_logits(const py::array& logits) {
  if (!py::isinstance<py::array_t<float>>(logits)) {
    throw py::type_error("logits must be a float32 array, got dtype " + dtype_name(logits) +
                         "; convert it before the call");
  }
  if (logits.ndim() != 2) {
    throw py::value_error("logits must be 2-D (batch, vocab), got shape " + shape_of(logits));
  }
  if (logits.shape(1) < 1) throw py::value_error("logits must have a vocab dimension of at least 1 token");
  if (logits.shape(1) > std::numeric_limits<int32_t>::max()) {
    throw py::value_error("logits has more than 2^31 - 1 tokens per row, which the CPU sampler does not support");
  }
  constexpr py::ssize_t ITEM = sizeof(float);
  const bool vocab_contiguous = logits.shape(0) == 0 || logits.shape(1) == 1 || logits.strides(1) == ITEM;
  const bool rows_apart = logits.shape(0) <= 1 ||
                          (logits.strides(0) % ITEM == 0 && logits.strides(0) >= logits.shape(1) * ITEM);
  if (!vocab_contiguous || !rows_apart) {
    throw py::value_error("logits must have a contiguous vocab dimension and non-overlapping rows; pass a "
                          "contiguous copy (np.ascontiguousarray or tensor.contiguous())");
  }
}

// A (num_rows,) contiguous vector of T or U, copied (exactly) into a vector of T.
template <typename T, typename U>
std::vector<T> read_vector(const py::array& a, const char* name, const char* allowed, py::ssize_t num_rows) {
  const bool is_t = py::isinstance<py::array_t<T>>(a);
  if (!is_t && !py::isinstance<py::array_t<U>>(a)) {
    throw py::type_error(std::string(name) + " must be " + allowed + " array, got dtype " + dtype_name(a) +
                         "; convert it before the call");
  }
  if (a.ndim() != 1 || a.shape(0) != num_rows) {
    throw py::value_error(std::string(name) + " must have shape (" + std::to_string(num_rows) +
                          ",), one value per logits row, got " + shape_of(a));
  }
  if (num_rows > 1 && a.strides(0) != static_cast<py::ssize_t>(is_t ? sizeof(T) : sizeof(U))) {
    throw py::value_error(std::string(name) + " must be contiguous; pass a contiguous copy");
  }
  std::vector<T> out(num_rows);
  for (py::ssize_t i = 0; i < num_rows; ++i) {
    out[i] = is_t ? static_cast<const T*>(a.data())[i] : static_cast<T>(static_cast<const U*>(a.data())[i]);
  }
  return out;
}

// Every value lies in [lo, hi] (open ends where asked); NaN is out of range.
void check_range(const std::vector<double>& v, const char* name, double lo, bool lo_open, double hi, bool hi_open,
                 const char* allowed) {
  for (size_t i = 0; i < v.size(); ++i) {
    const double x = v[i];
    if (!((lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi))) {
      throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] = " +
                            py::str(py::float_(x)).cast<std::string>() + " is outside " + allowed +
                            "; clamp it in the sampling parameters");
    }
  }
}

struct Checked {
  const float* logits_ptr;
  int64_t num_rows, vocab_size, stride_row;
  std::vector<int64_t> top_k;
  std::vector<double> top_p, min_p;
};

// The parameters' ranges and the thread count.
void check_values(const Checked& in, int num_threads) {
  check_range(in.top_p, "top_p", 0.0, true, 1.0, false, "(0, 1]");
  check_range(in.min_p, "min_p", 0.0, false, 1.0, false, "[0, 1]");
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
}

Checked check_inputs(const py::array& logits, const py::array& top_k, const py::array& top_p, const py::array& min_p,
                     int num_threads) {
  check_logits(logits);  // logits: (num_rows, vocab_size) float32
  const py::ssize_t num_rows = logits.shape(0);
  Checked in{static_cast<const float*>(logits.data()),
             static_cast<int64_t>(num_rows),
             static_cast<int64_t>(logits.shape(1)),
             num_rows > 1 ? static_cast<int64_t>(logits.strides(0) / static_cast<py::ssize_t>(sizeof(float))) : 0,
             read_vector<int64_t, int32_t>(top_k, "top_k", "an int64 or int32", num_rows),  // (num_rows,)
             read_vector<double, float>(top_p, "top_p", "a float64 or float32", num_rows),  // (num_rows,)
             read_vector<double, float>(min_p, "min_p", "a float64 or float32", num_rows)};  // (num_rows,)
  check_values(in, num_threads);
  return in;
}

// Turns the first failed row into a ValueError.
void raise_for_status(const std::vector<int32_t>& status) {
  for (size_t row = 0; row < status.size(); ++row) {
    const std::string where = "logits row " + std::to_string(row);
    switch (status[row]) {
      case kOk:
        break;
      case kNaN:
        throw py::value_error(where + " contains NaN; the model output is corrupt or the penalties produced NaN");
      case kPosInf:
        throw py::value_error(where + " contains +inf, for which softmax is undefined; clamp or fix the logits");
      case kNoFinite:
        throw py::value_error(where + " is -inf everywhere, so every token is banned; allow at least one token");
      default:
        throw std::logic_error("unknown row status from the CPU sampler");
    }
  }
}

// Checks the uniforms, then draws every row of checked inputs into out_ptr (num_rows,) without the GIL.
void sample_rows(const Checked& in, const std::vector<double>& uniform, int64_t* out_ptr, int num_threads) {
  check_range(uniform, "uniform", 0.0, false, 1.0, true, "[0, 1)");
  std::vector<int32_t> status(in.num_rows, kOk);
  {
    py::gil_scoped_release release;
    topk_topp_minp_sample(in.logits_ptr, in.num_rows, in.vocab_size, in.stride_row, in.top_k.data(), in.top_p.data(),
                          in.min_p.data(), uniform.data(), out_ptr, status.data(), num_threads);
  }
  raise_for_status(status);
}

}  // namespace

// Returns (num_rows,) int64 sampled token ids.
py::array_t<int64_t> topk_topp_minp_sample_checked(const py::array& logits, const py::array& top_k,
                                                   const py::array& top_p, const py::array& min_p,
                                                   const py::array& uniform, int num_threads) {
  const Checked in = check_inputs(logits, top_k, top_p, min_p, num_threads);
  const std::vector<double> u = read_vector<double, float>(uniform, "uniform", "a float64 or float32", in.num_rows);
  py::array_t<int64_t> out(in.num_rows);
  sample_rows(in, u, out.mutable_data(), num_threads);
  return out;
}

// The lean entry point of fastgpt2.kernels.cpu_sampling, which has checked the tensors' dtypes, devices and layout:
// logits and out are addresses (tensor.data_ptr()) of a (num_rows, vocab_size) float32 buffer with row stride
// stride_row (elements, vocab dimension contiguous) and of a (num_rows,) int64 buffer; the parameters come as
// lists. Saves the ~15 us per call that four numpy conversions and their checks cost at batch 1.
void topk_topp_minp_sample_raw(uintptr_t logits_addr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                               std::vector<int64_t> top_k, std::vector<double> top_p, std::vector<double> min_p,
                               const std::vector<double>& uniform, uintptr_t out_addr, int num_threads) {
  if (num_rows < 0 || vocab_size < 1 || vocab_size > std::numeric_limits<int32_t>::max() ||
      (num_rows > 1 && stride_row < vocab_size)) {
    throw py::value_error("logits must be (batch, vocab) with 1 <= vocab < 2^31 and non-overlapping rows");
  }
  for (const auto& [name, size] : {std::pair<const char*, size_t>{"top_k", top_k.size()}, {"top_p", top_p.size()},
                                   {"min_p", min_p.size()}, {"uniform", uniform.size()}}) {
    if (static_cast<int64_t>(size) != num_rows) {
      throw py::value_error(std::string(name) + " must have " + std::to_string(num_rows) +
                            " values, one per logits row, got " + std::to_string(size));
    }
  }
  const Checked in{reinterpret_cast<const float*>(logits_addr), num_rows, vocab_size, stride_row, std::move(top_k),
                   std::move(top_p), std::move(min_p)};
  check_values(in, num_threads);
  sample_rows(in, uniform, reinterpret_cast<int64_t*>(out_addr), num_threads);
}

// The entry point of fastgpt2.kernels.cpu_sampling.argmax, which has checked the tensors: addresses as for
// topk_topp_minp_sample_raw.
void argmax_rows_raw(uintptr_t logits_addr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                     uintptr_t out_addr, int num_threads) {
  if (num_rows < 0 || vocab_size < 1 || (num_rows > 1 && stride_row < vocab_size) || num_threads < 1) {
    throw py::value_error("argmax needs (batch, vocab) logits with vocab >= 1, non-overlapping rows and "
                          "num_threads >= 1");
  }
  py::gil_scoped_release release;
  argmax_rows(reinterpret_cast<const float*>(logits_addr), num_rows, vocab_size, stride_row,
              reinterpret_cast<int64_t*>(out_addr), num_threads);
}

// The entry point of fastgpt2.kernels.cpu_sampling.row_logprobs, which has checked the logits tensor (its address as
// for topk_topp_minp_sample_raw): for the logits rows listed in rows (an empty list: every row, in order), the
// logprob of targets[i] (an empty list: no targets; -1: none for that row) and the top_n tokens with theirs, as
// (target logprobs, top ids, top logprobs) lists; None when a row holds a NaN or +inf or is -inf everywhere
// (log_softmax is NaN there: the caller takes torch's).
py::object logprob_rows_raw(uintptr_t logits_addr, int64_t logits_rows, int64_t vocab_size, int64_t stride_row,
                            const std::vector<int64_t>& rows, const std::vector<int64_t>& targets, int64_t top_n,
                            int num_threads) {
  if (logits_rows < 0 || vocab_size < 1 || (logits_rows > 1 && stride_row < vocab_size) || num_threads < 1) {
    throw py::value_error("logprobs need (rows, vocab) logits with vocab >= 1, non-overlapping rows and "
                          "num_threads >= 1");
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] >= logits_rows) {
      throw py::value_error("row " + std::to_string(rows[i]) + " is outside the logits' " +
                            std::to_string(logits_rows) + " rows");
    }
  }
  const int64_t num_rows = rows.empty() ? logits_rows : static_cast<int64_t>(rows.size());
  if (top_n < 0 || top_n > vocab_size) {
    throw py::value_error("the number of top logprobs must be in [0, " + std::to_string(vocab_size) + "], got " +
                          std::to_string(top_n));
  }
  const bool has_targets = !targets.empty();
  if (has_targets && static_cast<int64_t>(targets.size()) != num_rows) {
    throw py::value_error("targets must have one token id per logits row (" + std::to_string(num_rows) + "), got " +
                          std::to_string(targets.size()));
  }
  for (size_t row = 0; row < targets.size(); ++row) {
    if (targets[row] < -1 || targets[row] >= vocab_size) {
      throw py::value_error("target token id " + std::to_string(targets[row]) + " (row " + std::to_string(row) +
                            ") is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    }
  }
  std::vector<float> target_logprob(has_targets ? num_rows : 0);
  std::vector<int64_t> top_ids(num_rows * top_n);
  std::vector<float> top_logprobs(num_rows * top_n);
  std::vector<int32_t> status(num_rows, kOk);
  {
    py::gil_scoped_release release;
    logprob_rows(reinterpret_cast<const float*>(logits_addr), rows.empty() ? nullptr : rows.data(), num_rows,
                 vocab_size, stride_row, has_targets ? targets.data() : nullptr, top_n, target_logprob.data(),
                 top_ids.data(), top_logprobs.data(), status.data(), num_threads);
  }
  if (std::any_of(status.begin(), status.end(), [](int32_t s) { return s != kOk; })) return py::none();
  py::list ids(num_rows), values(num_rows);
  for (int64_t row = 0; row < num_rows; ++row) {
    py::list row_ids(top_n), row_values(top_n);
    for (int64_t j = 0; j < top_n; ++j) {
      row_ids[j] = py::int_(top_ids[row * top_n + j]);
      row_values[j] = py::float_(top_logprobs[row * top_n + j]);
    }
    ids[row] = row_ids;
    values[row] = row_values;
  }
  return py::make_tuple(py::cast(target_logprob), ids, values);
}

// Returns (ids (num_rows, max_count) int64 padded with -1, probs (num_rows, max_count) float32 padded with 0,
// counts (num_rows,) int64); ids ascend within a row.
py::tuple topk_topp_minp_select_checked(const py::array& logits, const py::array& top_k, const py::array& top_p,
                                        const py::array& min_p, int num_threads) {
  const Checked in = check_inputs(logits, top_k, top_p, min_p, num_threads);
  std::vector<RowCandidates> candidates;
  std::vector<int32_t> status(in.num_rows, kOk);
  {
    py::gil_scoped_release release;
    topk_topp_minp_select(in.logits_ptr, in.num_rows, in.vocab_size, in.stride_row, in.top_k.data(),
                          in.top_p.data(), in.min_p.data(), candidates, status.data(), num_threads);
  }
  raise_for_status(status);
  int64_t max_count = 0;
  for (const RowCandidates& c : candidates) max_count = std::max<int64_t>(max_count, c.ids.size());
  py::array_t<int64_t> ids({in.num_rows, max_count});
  py::array_t<float> probs({in.num_rows, max_count});
  py::array_t<int64_t> counts(in.num_rows);
  int64_t* ids_ptr = ids.mutable_data();
  float* probs_ptr = probs.mutable_data();
  int64_t* counts_ptr = counts.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t row = 0; row < in.num_rows; ++row) {
      const RowCandidates& c = candidates[row];
      const int64_t count = static_cast<int64_t>(c.ids.size());
      std::copy(c.ids.begin(), c.ids.end(), ids_ptr + row * max_count);
      std::fill(ids_ptr + row * max_count + count, ids_ptr + (row + 1) * max_count, int64_t{-1});
      std::copy(c.probs.begin(), c.probs.end(), probs_ptr + row * max_count);
      std::fill(probs_ptr + row * max_count + count, probs_ptr + (row + 1) * max_count, 0.0f);
      counts_ptr[row] = count;
    }
  }
  return py::make_tuple(ids, probs, counts);
}

}  // namespace fastgpt2
