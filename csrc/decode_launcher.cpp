// Checked entry point of the CPU step: CpuStep keeps the model's weight arrays alive and packs the weight matrices
// for the GEMM once (float32, bfloat16 or int8, as asked for); forward() validates one step's ids, positions, slots,
// sequence indices, block tables and logits rows, then runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
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

class CpuStep {
 public:
  CpuStep(const py::array& wte, const py::array& wpe, const std::vector<std::vector<py::array>>& layers,
             const py::array& ln_f_weight, const py::array& ln_f_bias, int64_t n_head, float layer_norm_epsilon,
             const std::string& weight_dtype, bool greedy_screen) {
    if (weight_dtype != "float32" && weight_dtype != "bfloat16" && weight_dtype != "int8")
      throw py::value_error("weight_dtype must be 'float32', 'bfloat16' or 'int8', got '" + weight_dtype + "'");
    auto keep = [&](const py::array& a, const std::string& name, std::vector<py::ssize_t> shape) {
      kept_.push_back(checked_array<float>(a, name.c_str(), "float32", shape));
      return static_cast<const float*>(kept_.back().data());
    };
    const float* wte_p = keep(wte, "wte.weight", {-1, -1});
    vocab_size_ = kept_.back().shape(0);
    const int64_t C = n_embd_ = kept_.back().shape(1);
    const float* wpe_p = keep(wpe, "wpe.weight", {-1, C});
    n_positions_ = kept_.back().shape(0);
    if (n_head < 1 || C % n_head != 0) throw py::value_error("n_head must divide n_embd");
    if (C % 8 != 0) throw py::value_error("the CPU step needs n_embd to be a multiple of 8");
    const std::vector<std::vector<py::ssize_t>> shapes = {{C}, {C}, {3 * C, C}, {3 * C}, {C, C}, {C},
                                                          {C}, {C}, {4 * C, C}, {4 * C}, {C, 4 * C}, {C}};
    std::vector<RawLayer> raw;
    for (size_t l = 0; l < layers.size(); ++l) {
      if (layers[l].size() != 12) throw py::value_error("each layer needs its 12 weight arrays");
      const float* p[12];
      for (int i = 0; i < 12; ++i) p[i] = keep(layers[l][i], "h." + std::to_string(l) + "." + kLayerNames[i], shapes[i]);
      raw.push_back({p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]});
    }
    const float* ln_f_w = keep(ln_f_weight, "ln_f.weight", {C});
    const float* ln_f_b = keep(ln_f_bias, "ln_f.bias", {C});
    if (weight_dtype == "int8" && C % kQ8Block != 0)
      throw py::value_error("int8 weights need n_embd to be a multiple of " + std::to_string(kQ8Block) + ", got " +
                            std::to_string(C));
    if (weight_dtype == "bfloat16") {
      bf16_ = std::make_unique<ModelWeights<bf16>>();
      build(*bf16_, wte_p, wpe_p, raw, ln_f_w, ln_f_b, n_head, layer_norm_epsilon, greedy_screen);
    } else if (weight_dtype == "int8") {
      q8_ = std::make_unique<ModelWeights<q8>>();
      build(*q8_, wte_p, wpe_p, raw, ln_f_w, ln_f_b, n_head, layer_norm_epsilon, false);
    } else {
      f32_ = std::make_unique<ModelWeights<float>>();
      build(*f32_, wte_p, wpe_p, raw, ln_f_w, ln_f_b, n_head, layer_norm_epsilon, greedy_screen);
    }
  }

  std::string weight_dtype() const { return bf16_ ? "bfloat16" : q8_ ? "int8" : "float32"; }
  bool greedy_screen() const { return (f32_ && f32_->lm_head_screen) || (bf16_ && bf16_->lm_head_screen); }

  // token_ids, positions, slots: (N,) int64; seq_index: (N,) int32, rows of block_tables (S, max_blocks) int32;
  // logits_indices: (R,) int64 in [0, N); kv_cache: (n_layer, 2, num_blocks, block_size, n_head, head_dim) float32;
  // logits: (R, vocab_size) float32. Nothing is written when a check fails.
  void forward(const py::array& token_ids, const py::array& positions, const py::array& slots,
               const py::array& seq_index, const py::array& block_tables, const py::array& logits_indices,
               py::array& kv_cache, py::array& logits, int num_threads) {
    StepBatch batch = checked_batch(token_ids, positions, slots, seq_index, block_tables, logits_indices, kv_cache,
                                    num_threads);
    auto out = checked_array<float>(logits, "logits", "float32", {batch.num_logits, vocab_size_});
    batch.logits = out.mutable_data();
    run(batch, num_threads);
  }

  // forward's step with greedy decoding's tokens instead of the logits: tokens (R,) int64 gets, per row, the
  // first id < limit of the largest logit (or of the first NaN), as torch.argmax of forward's logits[:, :limit].
  void forward_greedy(const py::array& token_ids, const py::array& positions, const py::array& slots,
                      const py::array& seq_index, const py::array& block_tables, const py::array& logits_indices,
                      py::array& kv_cache, py::array& tokens, int64_t limit, int num_threads) {
    StepBatch batch = checked_batch(token_ids, positions, slots, seq_index, block_tables, logits_indices, kv_cache,
                                    num_threads);
    auto out = checked_array<int64_t>(tokens, "tokens", "int64", {batch.num_logits});
    if (limit < 1 || limit > vocab_size_)
      throw py::value_error("limit must be in [1, " + std::to_string(vocab_size_) + "], got " + std::to_string(limit));
    batch.greedy = out.mutable_data(), batch.greedy_limit = limit;
    run(batch, num_threads);
  }

 private:
  // The step's inputs checked (ValueError or TypeError naming the first problem); the batch points into the arrays
  // (views, no copies: each must already be of its dtype and C-contiguous), its output still to be set.
  StepBatch checked_batch(const py::array& token_ids, const py::array& positions, const py::array& slots,
                          const py::array& seq_index, const py::array& block_tables, const py::array& logits_indices,
                          py::array& kv_cache, int num_threads) {
    auto ids = checked_array<int64_t>(token_ids, "token_ids", "int64", {-1});
    const int64_t N = ids.shape(0);
    auto pos = checked_array<int64_t>(positions, "positions", "int64", {N});
    auto slot = checked_array<int64_t>(slots, "slots", "int64", {N});
    auto index = checked_array<int32_t>(seq_index, "seq_index", "int32", {N});
    auto tables = checked_array<int32_t>(block_tables, "block_tables", "int32", {-1, -1});
    auto rows = checked_array<int64_t>(logits_indices, "logits_indices", "int64", {-1});
    const int64_t R = rows.shape(0);
    const int64_t L = num_layers_, H = n_head_, D = n_embd_ / n_head_;
    auto cache = checked_array<float>(kv_cache, "kv_cache", "float32", {L, 2, -1, -1, H, D});
    if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
    StepBatch batch{ids.data(), pos.data(), slot.data(), index.data(), tables.data(), rows.data(), N,
                    tables.shape(0), tables.shape(1), R, cache.mutable_data(), cache.shape(2), cache.shape(3),
                    nullptr};
    const int64_t S = batch.num_seqs, bs = batch.block_size, span = batch.max_blocks * bs;
    std::vector<int64_t> last(S, -1);  // per block-table row: the highest position that reads it
    for (int64_t i = 0; i < N; ++i) {
      check_index(batch.token_ids[i], vocab_size_, "token_ids", i, "vocabulary");
      check_index(batch.positions[i], n_positions_, "positions", i, "model's context");
      check_index(batch.positions[i], span, "positions", i, "block table's span");
      check_index(batch.slots[i], batch.num_blocks * bs, "slots", i, "KV pool's slots");
      check_index(batch.seq_index[i], S, "seq_index", i, "block tables' rows");
      last[batch.seq_index[i]] = std::max(last[batch.seq_index[i]], batch.positions[i]);
    }
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b <= last[s] / bs && last[s] >= 0; ++b)
        check_index(batch.block_tables[s * batch.max_blocks + b], batch.num_blocks, "block_tables", s, "pool's blocks");
    for (int64_t i = 0; i < N; ++i) {
      const int64_t p = batch.positions[i];
      const int64_t want = batch.block_tables[batch.seq_index[i] * batch.max_blocks + p / bs] * bs + p % bs;
      if (batch.slots[i] != want)
        throw py::value_error("slots[" + std::to_string(i) + "] = " + std::to_string(batch.slots[i]) +
                              " is not the slot of positions[" + std::to_string(i) + "] = " + std::to_string(p) +
                              " in block_tables[" + std::to_string(batch.seq_index[i]) + "] (" +
                              std::to_string(want) + ")");
    }
    for (int64_t r = 0; r < R; ++r) check_index(batch.logits_indices[r], N, "logits_indices", r, "step's tokens");
    return batch;
  }

  void run(const StepBatch& batch, int num_threads) {
    py::gil_scoped_release release;
    if (bf16_)
      model_step(*bf16_, batch, num_threads);
    else if (q8_)
      model_step(*q8_, batch, num_threads);
    else
      model_step(*f32_, batch, num_threads);
  }

  // The step's weights from the model's float32 arrays: the matrices packed as W (bf16: rounded to nearest even, as
  // torch; q8: llama.cpp's q8_0 quantiser with float32 scales, packed_gemm.h); for bf16 every other parameter rounded too, in float32
  // copies, so that the step computes the model GPT2.round_weights_to_bfloat16 makes; for int8 the embedding rows
  // dequantised (the model GPT2.quantize_weights_int8 makes). float32 reads the vectors and rows in place.
  template <typename W>
  void build(ModelWeights<W>& m, const float* wte, const float* wpe, const std::vector<RawLayer>& raw,
             const float* ln_f_weight, const float* ln_f_bias, int64_t n_head, float eps, bool greedy_screen) {
    const int64_t C = n_embd_;
    constexpr bool kRound = sizeof(W) == 2;
    auto vec = [&](const float* src, int64_t n) {
      if (!kRound) return src;
      rounded_storage_.emplace_back(n);
      for (int64_t i = 0; i < n; ++i) rounded_storage_.back()[i] = to_float(to_bf16(src[i]));
      return static_cast<const float*>(rounded_storage_.back().data());
    };
    auto pack = [&](const float* src, int64_t rows, int64_t cols) { return pack_matrix<W>(src, rows, cols); };
    if constexpr (kRound) {
      bf16_rows_.resize(vocab_size_ * C);
      for (int64_t i = 0; i < vocab_size_ * C; ++i) bf16_rows_[i] = to_bf16(wte[i]);
      m.wte_rows = bf16_rows_.data();
    } else if constexpr (std::is_same_v<W, q8>) {
      dequantized_rows_.resize(vocab_size_ * C);
      dequantize_q8(wte, vocab_size_, C, dequantized_rows_.data());
      m.wte_rows = dequantized_rows_.data();
    } else {
      m.wte_rows = wte;
    }
    m.lm_head = pack(wte, vocab_size_, C);
    if constexpr (!std::is_same_v<W, q8>) {
      if (greedy_screen) m.lm_head_screen = build_argmax_screen(m.wte_rows, vocab_size_, C);
    }
    m.wpe = vec(wpe, n_positions_ * C);
    for (const RawLayer& L : raw)
      m.layers.push_back({vec(L.ln_1_weight, C), vec(L.ln_1_bias, C), pack(L.c_attn_weight, 3 * C, C),
                          vec(L.c_attn_bias, 3 * C), pack(L.attn_proj_weight, C, C), vec(L.attn_proj_bias, C),
                          vec(L.ln_2_weight, C), vec(L.ln_2_bias, C), pack(L.c_fc_weight, 4 * C, C),
                          vec(L.c_fc_bias, 4 * C), pack(L.mlp_proj_weight, C, 4 * C), vec(L.mlp_proj_bias, C)});
    m.ln_f_weight = vec(ln_f_weight, C), m.ln_f_bias = vec(ln_f_bias, C);
    m.n_embd = C, m.n_head = n_head, m.vocab_size = vocab_size_, m.n_positions = n_positions_;
    m.layer_norm_epsilon = eps;
    num_layers_ = static_cast<int64_t>(raw.size()), n_head_ = n_head;
  }

  int64_t vocab_size_ = 0, n_embd_ = 0, n_positions_ = 0, num_layers_ = 0, n_head_ = 0;
  std::unique_ptr<ModelWeights<float>> f32_;
  std::unique_ptr<ModelWeights<bf16>> bf16_;
  std::unique_ptr<ModelWeights<q8>> q8_;
  std::vector<float> dequantized_rows_;
  std::vector<py::array_t<float, py::array::c_style>> kept_;  // the model's arrays, read in place (float32)
  std::vector<bf16> bf16_rows_;
  std::vector<std::vector<float>> rounded_storage_;
};

void bind_cpu_step(py::module_& m) {
  py::class_<CpuStep>(m, "CpuStep",
                      "GPT-2's step on CPU over packed prefill and decode tokens (float32 arithmetic, float32, bfloat16 "
                      "or int8 weight matrices; each token's result independent of the rest of the step); holds the "
                      "weight arrays it is given.")
      .def(py::init<const py::array&, const py::array&, const std::vector<std::vector<py::array>>&, const py::array&,
                    const py::array&, int64_t, float, const std::string&, bool>(),
           py::arg("wte"), py::arg("wpe"), py::arg("layers"), py::arg("ln_f_weight"), py::arg("ln_f_bias"),
           py::arg("n_head"), py::arg("layer_norm_epsilon"), py::arg("weight_dtype") = "float32",
           py::arg("greedy_screen") = true)
      .def_property_readonly("weight_dtype", &CpuStep::weight_dtype)
      .def_property_readonly("greedy_screen", &CpuStep::greedy_screen,
                             "Whether greedy steps screen the LM head in int8 (argmax_screen.h) before float32.")
      .def("forward", &CpuStep::forward,
           "Packed tokens (N,): writes their K/V into kv_cache, attends each over its sequence's context, and writes "
           "the logits of the rows logits_indices into logits (R, vocab).",
           py::arg("token_ids"), py::arg("positions"), py::arg("slots"), py::arg("seq_index"),
           py::arg("block_tables"), py::arg("logits_indices"), py::arg("kv_cache"), py::arg("logits"),
           py::arg("num_threads") = 1)
      .def("forward_greedy", &CpuStep::forward_greedy,
           "forward's step with greedy decoding's tokens instead of the logits: tokens (R,) int64 gets the argmax of "
           "each row's logits over ids [0, limit) (the first of equal ones, or the first NaN), without writing them.",
           py::arg("token_ids"), py::arg("positions"), py::arg("slots"), py::arg("seq_index"),
           py::arg("block_tables"), py::arg("logits_indices"), py::arg("kv_cache"), py::arg("tokens"),
           py::arg("limit"), py::arg("num_threads") = 1);
}

}  // namespace fastgpt2
