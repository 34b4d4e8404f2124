// Checked entry point of the CPU decode step: CpuDecoder holds the model's weight buffers (and keeps the arrays
// alive); forward() validates one batch's ids, positions, slots and block tables, then runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "checks.h"
#include "decode.h"

namespace py = pybind11;

namespace fastgpt2 {
namespace {

const char* kLayerNames[12] = {"ln_1.weight",      "ln_1.bias",      "attn.c_attn.weight", "attn.c_attn.bias",
                               "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight",        "ln_2.bias",
                               "mlp.c_fc.weight",  "mlp.c_fc.bias",  "mlp.c_proj.weight",  "mlp.c_proj.bias"};

void check_index(int64_t value, int64_t limit, const char* name, int64_t row, const char* what) {
  if (value < 0 || value >= limit)
    throw py::value_error(std::string(name) + "[" + std::to_string(row) + "] = " + std::to_string(value) +
                          " is outside [0, " + std::to_string(limit) + "), the " + what);
}

}  // namespace

class CpuDecoder {
 public:
  CpuDecoder(const py::array& wte, const py::array& wpe, const std::vector<std::vector<py::array>>& layers,
             const py::array& ln_f_weight, const py::array& ln_f_bias, int64_t n_head, float layer_norm_epsilon) {
    auto keep = [&](const py::array& a, const std::string& name, std::vector<py::ssize_t> shape) {
      kept_.push_back(checked_array<float>(a, name.c_str(), "float32", shape));
      return static_cast<const float*>(kept_.back().data());
    };
    w_.wte = keep(wte, "wte.weight", {-1, -1});
    w_.vocab_size = kept_.back().shape(0);
    const int64_t C = w_.n_embd = kept_.back().shape(1);
    w_.wpe = keep(wpe, "wpe.weight", {-1, C});
    w_.n_positions = kept_.back().shape(0);
    if (n_head < 1 || C % n_head != 0) throw py::value_error("n_head must divide n_embd");
    if (C % 8 != 0) throw py::value_error("the CPU decode step needs n_embd to be a multiple of 8");
    w_.n_head = n_head;
    w_.layer_norm_epsilon = layer_norm_epsilon;
    const std::vector<std::vector<py::ssize_t>> shapes = {{C}, {C}, {3 * C, C}, {3 * C}, {C, C}, {C},
                                                          {C}, {C}, {4 * C, C}, {4 * C}, {C, 4 * C}, {C}};
    for (size_t l = 0; l < layers.size(); ++l) {
      if (layers[l].size() != 12) throw py::value_error("each layer needs its 12 weight arrays");
      const float* p[12];
      for (int i = 0; i < 12; ++i) p[i] = keep(layers[l][i], "h." + std::to_string(l) + "." + kLayerNames[i], shapes[i]);
      w_.layers.push_back({p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]});
    }
    w_.ln_f_weight = keep(ln_f_weight, "ln_f.weight", {C});
    w_.ln_f_bias = keep(ln_f_bias, "ln_f.bias", {C});
  }

  // token_ids, positions, slots: (B,) int64; block_tables: (B, max_blocks) int32; seq_lens: (B,) int32;
  // kv_cache: (n_layer, 2, num_blocks, block_size, n_head, head_dim) float32; logits: (B, vocab_size) float32.
  void forward(const py::array& token_ids, const py::array& positions, const py::array& slots,
               const py::array& block_tables, const py::array& seq_lens, py::array& kv_cache, py::array& logits,
               int num_threads) {
    auto ids = checked_array<int64_t>(token_ids, "token_ids", "int64", {-1});
    const int64_t B = ids.shape(0);
    auto pos = checked_array<int64_t>(positions, "positions", "int64", {B});
    auto slot = checked_array<int64_t>(slots, "slots", "int64", {B});
    auto tables = checked_array<int32_t>(block_tables, "block_tables", "int32", {B, -1});
    auto lens = checked_array<int32_t>(seq_lens, "seq_lens", "int32", {B});
    const int64_t L = static_cast<int64_t>(w_.layers.size()), H = w_.n_head, D = w_.n_embd / w_.n_head;
    auto cache = checked_array<float>(kv_cache, "kv_cache", "float32", {L, 2, -1, -1, H, D});
    auto out = checked_array<float>(logits, "logits", "float32", {B, w_.vocab_size});
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
    DecodeBatch batch{ids.data(), pos.data(), slot.data(), tables.data(), lens.data(), B, tables.shape(1),
                      cache.mutable_data(), cache.shape(2), cache.shape(3), out.mutable_data()};
    for (int64_t b = 0; b < B; ++b) {
      check_index(batch.token_ids[b], w_.vocab_size, "token_ids", b, "vocabulary");
      check_index(batch.positions[b], w_.n_positions, "positions", b, "model's context");
      check_index(batch.slots[b], batch.num_blocks * batch.block_size, "slots", b, "KV pool's slots");
      check_index(batch.seq_lens[b] - 1, batch.max_blocks * batch.block_size, "seq_lens - 1", b, "block table's span");
      for (int64_t i = 0; i < (batch.seq_lens[b] + batch.block_size - 1) / batch.block_size; ++i)
        check_index(batch.block_tables[b * batch.max_blocks + i], batch.num_blocks, "block_tables", b, "pool's blocks");
    }
    py::gil_scoped_release release;
    decode_step_f32(w_, batch, num_threads);
  }

 private:
  ModelWeights w_;
  std::vector<py::array_t<float, py::array::c_style>> kept_;
};

void bind_cpu_decoder(py::module_& m) {
  py::class_<CpuDecoder>(m, "CpuDecoder",
                         "GPT-2's float32 decode step on CPU for small batches; holds the weight arrays it is given.")
      .def(py::init<const py::array&, const py::array&, const std::vector<std::vector<py::array>>&, const py::array&,
                    const py::array&, int64_t, float>(),
           py::arg("wte"), py::arg("wpe"), py::arg("layers"), py::arg("ln_f_weight"), py::arg("ln_f_bias"),
           py::arg("n_head"), py::arg("layer_norm_epsilon"))
      .def("forward", &CpuDecoder::forward,
           "One decode token per sequence: writes its K/V into kv_cache and the next-token logits (B, vocab).",
           py::arg("token_ids"), py::arg("positions"), py::arg("slots"), py::arg("block_tables"),
           py::arg("seq_lens"), py::arg("kv_cache"), py::arg("logits"), py::arg("num_threads") = 1);
}

}  // namespace fastgpt2
