// Checked entry point of the packed GEMM (packed_gemm.h) for tests and benchmarks: PackedLinear packs a float32
// nn.Linear weight once; forward() runs y = epilogue(x W^T + b) on the pool without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "checks.h"
#include "packed_gemm.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace fastgpt2 {
namespace {

Epilogue parse_epilogue(const std::string& name) {
  if (name == "store") return Epilogue::kStore;
  if (name == "gelu") return Epilogue::kGelu;
  if (name == "accumulate") return Epilogue::kAccumulate;
  throw py::value_error("epilogue must be 'store', 'gelu' or 'accumulate', got '" + name + "'");
}

class PackedLinear {
 public:
  PackedLinear(const py::array& weight, const std::string& weight_dtype) {
    if (weight_dtype != "float32" && weight_dtype != "bfloat16")
      throw py::value_error("weight_dtype must be 'float32' or 'bfloat16', got '" + weight_dtype + "'");
    auto w = checked_array<float>(weight, "weight", "float32", {-1, -1});
    if (w.shape(1) % 8 != 0) throw py::value_error("weight's in_features must be a multiple of 8, got " +
                                                   std::to_string(w.shape(1)));
    bf16_ = weight_dtype == "bfloat16";
    if (bf16_)
      b_ = pack_matrix<bf16>(w.data(), w.shape(0), w.shape(1));
    else
      f_ = pack_matrix<float>(w.data(), w.shape(0), w.shape(1));
    rows_ = w.shape(0), cols_ = w.shape(1);
  }

  void forward(const py::array& x, py::array& out, const py::object& bias, const std::string& epilogue,
               int num_threads) {
    const Epilogue e = parse_epilogue(epilogue);
    auto xs = checked_array<float>(x, "x", "float32", {-1, cols_});
    const int64_t T = xs.shape(0);
    auto ys = checked_array<float>(out, "out", "float32", {T, rows_});
    py::array_t<float, py::array::c_style> bs;
    const float* bp = nullptr;
    if (!bias.is_none()) {
      bs = checked_array<float>(bias.cast<py::array>(), "bias", "float32", {rows_});
      bp = bs.data();
    }
    if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0: the calling thread only)");
    const float* xp = xs.data();
    float* yp = ys.mutable_data();
    py::gil_scoped_release release;
    if (num_threads == 0) {
      if (bf16_) packed_linear_serial(b_, bp, xp, cols_, yp, rows_, T, e);
      else packed_linear_serial(f_, bp, xp, cols_, yp, rows_, T, e);
      return;
    }
    ThreadPool::with_pool(num_threads, /*linger=*/false, [&](ThreadPool& pool) {
      if (bf16_) packed_linear(pool, b_, bp, xp, cols_, yp, rows_, T, e);
      else packed_linear(pool, f_, bp, xp, cols_, yp, rows_, T, e);
    });
  }

 private:
  bool bf16_ = false;
  int64_t rows_ = 0, cols_ = 0;
  PackedMatrix<float> f_;
  PackedMatrix<bf16> b_;
};

}  // namespace

void bind_packed_gemm(py::module_& m) {
  m.attr("GEMM_ISA") = py::str(packed_gemm_isa());
  m.def("_fma_peak_gflops", &fma_peak_gflops, "Measured float32 FMA peak of one core for this build (GFLOP/s).",
        py::arg("seconds") = 0.2, py::call_guard<py::gil_scoped_release>());
  py::class_<PackedLinear>(m, "PackedLinear",
                           "A float32 nn.Linear weight (out, in) packed for the CPU step's GEMM (float32 or bfloat16 "
                           "storage, float32 arithmetic).")
      .def(py::init<const py::array&, const std::string&>(), py::arg("weight"), py::arg("weight_dtype") = "float32")
      .def("forward", &PackedLinear::forward,
           "out = epilogue(x W^T + bias): 'store', 'gelu' (tanh) or 'accumulate' (out += ...); num_threads 0 runs on "
           "the calling thread.",
           py::arg("x"), py::arg("out"), py::arg("bias") = py::none(), py::arg("epilogue") = "store",
           py::arg("num_threads") = 1);
}

}  // namespace fastgpt2
