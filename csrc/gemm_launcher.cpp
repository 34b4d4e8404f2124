// Checked entry point of the packed GEMM (packed_gemm.h) for tests and benchmarks: PackedLinear packs a float32
// nn.Linear weight once (float32, bfloat16 or int8 storage); forward() runs y = epilogue(x W^T + b) on the pool
// without the GIL. quantize_q8 returns an int8 PackedLinear's weights dequantised (float(q) * d).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "argmax_screen.h"
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
    if (weight_dtype != "float32" && weight_dtype != "bfloat16" && weight_dtype != "int8")
      throw py::value_error("weight_dtype must be 'float32', 'bfloat16' or 'int8', got '" + weight_dtype + "'");
    auto w = checked_array<float>(weight, "weight", "float32", {-1, -1});
    if (w.shape(1) % 8 != 0) throw py::value_error("weight's in_features must be a multiple of 8, got " +
                                                   std::to_string(w.shape(1)));
    dtype_ = weight_dtype;
    if (dtype_ == "bfloat16")
      b_ = pack_matrix<bf16>(w.data(), w.shape(0), w.shape(1));
    else if (dtype_ == "int8")
      q_ = pack_matrix<q8>(w.data(), w.shape(0), w.shape(1));  // std::invalid_argument (ValueError) unless K % 32 == 0
    else
      f_ = pack_matrix<float>(w.data(), w.shape(0), w.shape(1));
    rows_ = w.shape(0), cols_ = w.shape(1);
    weight_ = w;
  }

  const std::string& weight_dtype() const { return dtype_; }

  void forward(const py::array& x, py::array& out, const py::object& bias, const std::string& epilogue,
               int num_threads, int repeats) {
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
    if (repeats < 1) throw py::value_error("repeats must be >= 1, got " + std::to_string(repeats));
    const float* xp = xs.data();
    float* yp = ys.mutable_data();
    py::gil_scoped_release release;
    auto run = [&](const auto& m) {
      if (num_threads == 0) {
        for (int r = 0; r < repeats; ++r) packed_linear_serial(m, bp, xp, cols_, yp, rows_, T, e);
        return;
      }
      // Repeated calls keep the workers spinning between them, as between a model step's products.
      ThreadPool::with_pool(num_threads, /*linger=*/repeats > 1, [&](ThreadPool& pool) {
        for (int r = 0; r < repeats; ++r) packed_linear(pool, m, bp, xp, cols_, yp, rows_, T, e);
      });
    };
    if (dtype_ == "bfloat16") run(b_);
    else if (dtype_ == "int8") run(q_);
    else run(f_);
  }

  // index (T,) int64 = per row of x the argmax over columns [0, limit) of x W^T + bias, without the product stored.
  // screen: through the int8 screen (argmax_screen.h; float32 and bfloat16 storage, no bias), built on first use.
  void argmax(const py::array& x, py::array& index, const py::object& bias, int64_t limit, int num_threads,
              bool screen) {
    auto xs = checked_array<float>(x, "x", "float32", {-1, cols_});
    const int64_t T = xs.shape(0);
    auto out = checked_array<int64_t>(index, "index", "int64", {T});
    py::array_t<float, py::array::c_style> bs;
    const float* bp = nullptr;
    if (!bias.is_none()) {
      bs = checked_array<float>(bias.cast<py::array>(), "bias", "float32", {rows_});
      bp = bs.data();
    }
    if (limit < 1 || limit > rows_)
      throw py::value_error("limit must be in [1, " + std::to_string(rows_) + "], got " + std::to_string(limit));
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
    if (screen && (dtype_ == "int8" || bp != nullptr))
      throw py::value_error("the screened argmax takes float32 or bfloat16 weights and no bias");
    const float* xp = xs.data();
    int64_t* ip = out.mutable_data();
    py::gil_scoped_release release;
    if (screen && !screen_) {
      if (dtype_ == "bfloat16") {
        rounded_.resize(static_cast<size_t>(rows_ * cols_));
        for (int64_t i = 0; i < rows_ * cols_; ++i) rounded_[i] = to_bf16(weight_.data()[i]);
        screen_ = build_argmax_screen(rounded_.data(), rows_, cols_);
      } else {
        screen_ = build_argmax_screen(weight_.data(), rows_, cols_);
      }
      if (!screen_) throw py::value_error("no screen for this weight (in_features not a multiple of 32, or a "
                                          "non-finite weight)");
    }
    auto run = [&](const auto& m) {
      ThreadPool::with_pool(num_threads, /*linger=*/false, [&](ThreadPool& pool) {
        if constexpr (!std::is_same_v<std::decay_t<decltype(m)>, PackedMatrix<q8>>) {
          if (screen) {
            if constexpr (std::is_same_v<std::decay_t<decltype(m)>, PackedMatrix<bf16>>)
              screened_argmax(pool, *screen_, m, rounded_.data(), xp, cols_, T, limit, ip);
            else
              screened_argmax(pool, *screen_, m, weight_.data(), xp, cols_, T, limit, ip);
            return;
          }
        }
        packed_argmax(pool, m, bp, xp, cols_, T, limit, ip);
      });
    };
    if (dtype_ == "bfloat16") run(b_);
    else if (dtype_ == "int8") run(q_);
    else run(f_);
  }

 private:
  std::string dtype_;
  int64_t rows_ = 0, cols_ = 0;
  PackedMatrix<float> f_;
  PackedMatrix<bf16> b_;
  PackedMatrix<q8> q_;
  py::array_t<float, py::array::c_style> weight_;  // the weights as given (the screen's rows)
  std::vector<bf16> rounded_;                      // bfloat16 storage: the rows the bf16 panels hold
  std::shared_ptr<const ArgmaxScreen> screen_;
};

py::array_t<float> quantize_q8(const py::array& weight) {
  auto w = checked_array<float>(weight, "weight", "float32", {-1, -1});
  py::array_t<float> out({w.shape(0), w.shape(1)});
  const float* wp = w.data();
  float* op = out.mutable_data();
  const int64_t rows = w.shape(0), cols = w.shape(1);
  py::gil_scoped_release release;
  dequantize_q8(wp, rows, cols, op);
  return out;
}

}  // namespace

void bind_packed_gemm(py::module_& m) {
  m.attr("GEMM_ISA") = py::str(packed_gemm_isa());
  m.attr("GEMM_Q8_ISA") = py::str(packed_gemm_q8_isa());
  m.def("_fma_peak_gflops", &fma_peak_gflops, "Measured float32 FMA peak of one core for this build (GFLOP/s).",
        py::arg("seconds") = 0.2, py::call_guard<py::gil_scoped_release>());
  py::class_<PackedLinear>(m, "PackedLinear",
                           "A float32 nn.Linear weight (out, in) packed for the CPU step's GEMM: float32 or bfloat16 "
                           "storage with float32 arithmetic, or int8 (W8A8: weights and each token's activations "
                           "quantised per 32 inputs with float32 scales, integer dot products per block; in_features "
                           "a multiple of 32).")
      .def(py::init<const py::array&, const std::string&>(), py::arg("weight"), py::arg("weight_dtype") = "float32")
      .def_property_readonly("weight_dtype", &PackedLinear::weight_dtype)
      .def("forward", &PackedLinear::forward,
           "out = epilogue(x W^T + bias): 'store', 'gelu' (tanh) or 'accumulate' (out += ...); num_threads 0 runs on "
           "the calling thread. repeats (benchmarks): the product computed that many times in one session of the "
           "thread pool, whose workers wait for the next call spinning, as between a model step's products.",
           py::arg("x"), py::arg("out"), py::arg("bias") = py::none(), py::arg("epilogue") = "store",
           py::arg("num_threads") = 1, py::arg("repeats") = 1)
      .def("argmax", &PackedLinear::argmax,
           "index = per row of x the argmax of (x W^T + bias)[:, :limit] as torch.argmax picks it (the first of equal "
           "values, or the first NaN), computed in the GEMM's epilogue without storing the product; screen=True "
           "takes greedy decoding's int8 screen (float32 or bfloat16 storage, no bias), the same indices.",
           py::arg("x"), py::arg("index"), py::arg("bias") = py::none(), py::arg("limit"), py::arg("num_threads") = 1,
           py::arg("screen") = false);
  m.def("quantize_q8", &quantize_q8,
        "An int8 PackedLinear's weights, dequantised: weight (out, in) float32, in % 32 == 0, quantised per row "
        "and block of 32 inputs as llama.cpp's q8_0 (d = absmax / 127, q = roundf(w * (1 / d))) with a float32 scale, "
        "returned dequantised (float(q) * d) as a new float32 array.",
        py::arg("weight"));
}

}  // namespace fastgpt2
