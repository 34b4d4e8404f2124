// The compiled modules fastgpt2._C_<variant>: declarations only; the checked entry points live in
// sampling_launcher.cpp. setup.py compiles these sources once per ISA variant and names each module through
// FASTGPT2_MODULE_NAME (e.g. _C_avx512) and FASTGPT2_ISA_NAME (e.g. avx512, exposed as the module's ISA string).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "sampling.h"

namespace py = pybind11;

namespace fastgpt2 {
// Defined in sampling_launcher.cpp.
py::array_t<int64_t> topk_topp_minp_sample_checked(const py::array& logits, const py::array& top_k,
                                                   const py::array& top_p, const py::array& min_p,
                                                   const py::array& uniform, int num_threads);
void topk_topp_minp_sample_raw(uintptr_t logits_addr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                               std::vector<int64_t> top_k, std::vector<double> top_p, std::vector<double> min_p,
                               const std::vector<double>& uniform, uintptr_t out_addr, int num_threads);
void argmax_rows_raw(uintptr_t logits_addr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                     uintptr_t out_addr, int num_threads);
py::object logprob_rows_raw(uintptr_t logits_addr, int64_t logits_rows, int64_t vocab_size, int64_t stride_row,
                            const std::vector<int64_t>& rows, const std::vector<int64_t>& targets, int64_t top_n,
                            int num_threads);
py::tuple topk_topp_minp_select_checked(const py::array& logits, const py::array& top_k, const py::array& top_p,
                                        const py::array& min_p, int num_threads);
// Defined in attention_launcher.cpp.
void paged_decode_attention_checked(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                    const py::array& block_tables, const py::array& seq_lens, py::array& out,
                                    float scale, int num_threads);
void paged_packed_attention_checked(const py::array& q, const py::array& k_cache, const py::array& v_cache,
                                    const py::array& block_tables, const py::array& seq_index,
                                    const py::array& seq_lens, py::array& out, float scale, int num_threads);
// Defined in decode_launcher.cpp.
void bind_cpu_step(py::module_& m);
// Defined in gemm_launcher.cpp.
void bind_packed_gemm(py::module_& m);
// Defined in thread_pool_check.cpp.
std::tuple<int64_t, int64_t, int64_t> thread_pool_stress(int num_threads, int64_t num_regions, uint64_t seed,
                                                         bool linger, int64_t throw_region);
}  // namespace fastgpt2

#ifndef FASTGPT2_MODULE_NAME
#define FASTGPT2_MODULE_NAME _C
#endif
#ifndef FASTGPT2_ISA_NAME
#define FASTGPT2_ISA_NAME native
#endif
#define FASTGPT2_STR2(x) #x
#define FASTGPT2_STR(x) FASTGPT2_STR2(x)

namespace {
// One instruction of each ISA extension this module was compiled for, on values the compiler cannot fold: where CPU
// features cannot be read (no /proc/cpuinfo), native.py runs this in a child process, which dies of SIGILL instead
// of the caller when the CPU lacks one.
int64_t isa_probe(int64_t seed) {
  volatile int64_t v = seed;
  int64_t x = v;
  int64_t r = x;
#if defined(__AVX2__) && defined(__FMA__)
  {
    const __m256 a = _mm256_set1_ps(static_cast<float>(x));
    const __m256 f = _mm256_fmadd_ps(a, a, a);
    const __m256i i = _mm256_add_epi32(_mm256_cvttps_epi32(f), _mm256_set1_epi32(static_cast<int>(x)));
    r += _mm256_extract_epi32(i, 3);
  }
#endif
#ifdef __F16C__
  r += static_cast<int64_t>(_cvtsh_ss(_cvtss_sh(static_cast<float>(x), 0)));
#endif
#ifdef __BMI2__
  r += _pdep_u32(static_cast<unsigned>(x), 0x0f0f0f0fu);
#endif
#ifdef __LZCNT__
  r += _lzcnt_u32(static_cast<unsigned>(x) | 1u);
#endif
#ifdef __AVX512F__
  {
    const __m512 a = _mm512_set1_ps(static_cast<float>(x));
    r += static_cast<int64_t>(_mm512_reduce_add_ps(_mm512_fmadd_ps(a, a, a)));
  }
#endif
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  {
    const __m256i b = _mm256_set1_epi16(static_cast<short>(x));
    r += _mm256_movepi16_mask(_mm256_maskz_add_epi16(0xffffu, b, b)) + _mm256_movepi32_mask(_mm256_set1_epi32(-1));
  }
#endif
#ifdef __AVX512VNNI__
  {
    const __m512i a = _mm512_set1_epi32(static_cast<int>(x));
    r += _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(a, a, a));
  }
#endif
#ifdef __AVXVNNI__
  {
    const __m256i a = _mm256_set1_epi32(static_cast<int>(x));
    r += _mm256_extract_epi32(_mm256_dpbusd_avx_epi32(a, a, a), 5);
  }
#endif
#ifdef __AVX512BF16__
  {
    const __m512 a = _mm512_set1_ps(static_cast<float>(x));
    const __m512bh h = _mm512_cvtne2ps_pbh(a, a);
    r += static_cast<int64_t>(_mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), h, h)));
  }
#endif
  return r;
}
}  // namespace

PYBIND11_MODULE(FASTGPT2_MODULE_NAME, m) {
  m.doc() = "fastgpt2 CPU kernels: top-k / top-p / min-p sampling, paged attention and the float32 model step "
            "(semantics of "
            "fastgpt2.kernels.reference).";
  m.attr("ISA") = FASTGPT2_STR(FASTGPT2_ISA_NAME);
  m.def("_isa_probe", &isa_probe,
        "Internal (fastgpt2.kernels.native): executes one instruction of each ISA extension this module was built "
        "for; a CPU without one of them raises SIGILL.",
        py::arg("seed") = 3);
  m.def("topk_topp_minp_sample", &fastgpt2::topk_topp_minp_sample_checked,
        "Truncate float32 logits (B, V) by top_k (B,) int64|int32, top_p and min_p (B,) float64|float32, draw with "
        "uniform (B,) float64|float32; returns (B,) int64 token ids.",
        py::arg("logits"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("uniform"),
        py::arg("num_threads") = 1);
  m.def("_topk_topp_minp_sample_raw", &fastgpt2::topk_topp_minp_sample_raw,
        "Internal (fastgpt2.kernels.cpu_sampling): topk_topp_minp_sample on the addresses of a checked float32 logits "
        "tensor (rows, vocab, row stride) and an int64 output tensor, with the parameters as lists.",
        py::arg("logits_addr"), py::arg("num_rows"), py::arg("vocab_size"), py::arg("stride_row"), py::arg("top_k"),
        py::arg("top_p"), py::arg("min_p"), py::arg("uniform"), py::arg("out_addr"), py::arg("num_threads"));
  m.def("_argmax_rows_raw", &fastgpt2::argmax_rows_raw,
        "Internal (fastgpt2.kernels.cpu_sampling.argmax): torch.argmax(logits, dim=-1) on the addresses of a checked "
        "float32 logits tensor (rows, vocab, row stride) and an int64 output tensor.",
        py::arg("logits_addr"), py::arg("num_rows"), py::arg("vocab_size"), py::arg("stride_row"), py::arg("out_addr"),
        py::arg("num_threads"));
  m.def("_logprob_rows_raw", &fastgpt2::logprob_rows_raw,
        "Internal (fastgpt2.kernels.cpu_sampling.row_logprobs): for the listed rows (empty: all) of a checked "
        "float32 logits tensor (address, rows, vocab, row stride), the logprob of each row's target (targets: one id "
        "per listed row, -1 for none, or empty) and the top_n tokens with theirs: (target logprobs, top ids, top "
        "logprobs) lists, or None for a NaN, +inf or all -inf row.",
        py::arg("logits_addr"), py::arg("logits_rows"), py::arg("vocab_size"), py::arg("stride_row"), py::arg("rows"),
        py::arg("targets"), py::arg("top_n"), py::arg("num_threads"));
  m.def(
      "_sampler_fast_path_stats",
      [] {
        const fastgpt2::FastPathStats stats = fastgpt2::fast_path_stats();
        return py::make_tuple(stats.decided, stats.deferred);
      },
      "Internal (tests, benchmarks): (rows the fast top-p path decided, rows it handed to the exact path) so far.");
  m.def(
      "_sampler_window_stats",
      [] {
        const fastgpt2::FastPathStats stats = fastgpt2::fast_path_stats();
        return py::make_tuple(stats.narrow_tried, stats.narrow_missed);
      },
      "Internal (tests): (rows the fast top-p path tried in a window narrower than its bracket, rows of those it "
      "decided in the bracket's window or handed over) so far.");
  m.def(
      "_exp32_of_gaps",
      [](const py::array_t<float, py::array::c_style | py::array::forcecast>& gaps) {
        py::array_t<float> out(gaps.size());
        fastgpt2::exp32_of_gaps(gaps.data(), gaps.size(), out.mutable_data());
        const fastgpt2::Exp32Bound bound = fastgpt2::exp32_bound();
        return py::make_tuple(out, bound.rel_error, bound.gap_error, bound.gap_max);
      },
      "Internal (tests): the fast sampler path's float32 exp(-t) of gaps t = max - x (1-D float32), with its error "
      "bound (rel_error, gap_error, gap_max): |e / exp(x - max) - 1| <= rel_error + t * gap_error for t <= gap_max, "
      "e = 0 above.",
      py::arg("gaps"));
  m.def("topk_topp_minp_select", &fastgpt2::topk_topp_minp_select_checked,
        "Kept candidates per row: (ids (B, N) int64 padded -1, probs (B, N) float32 padded 0, counts (B,) int64).",
        py::arg("logits"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("num_threads") = 1);
  m.def("paged_decode_attention", &fastgpt2::paged_decode_attention_checked,
        "float32 q (B, H, D) against k_cache/v_cache (num_blocks, block_size, H, D) through block_tables (B, max_blocks) "
        "int32 and seq_lens (B,) int32; writes out (B, H, D).",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("out"), py::arg("scale"), py::arg("num_threads") = 1);
  m.def("paged_packed_attention", &fastgpt2::paged_packed_attention_checked,
        "float32 packed queries q (N, H, D), query i of block_tables row seq_index[i] (N,) int32 attending to its "
        "first seq_lens[i] (N,) int32 keys of k_cache/v_cache (num_blocks, block_size, H, D); writes out (N, H, D). "
        "Consecutive queries of one row share K/V block reads (the CPU step's prefill attention).",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_index"),
        py::arg("seq_lens"), py::arg("out"), py::arg("scale"), py::arg("num_threads") = 1);
  fastgpt2::bind_cpu_step(m);
  fastgpt2::bind_packed_gemm(m);
  m.def("_thread_pool_stress", &fastgpt2::thread_pool_stress,
        "Internal (tests): num_regions back-to-back regions of 1..300 random tasks on the pool of num_threads; returns "
        "(tasks, task indices not run exactly once, regions that returned early); region throw_region raises "
        "MemoryError.",
        py::arg("num_threads"), py::arg("num_regions"), py::arg("seed"), py::arg("linger"),
        py::arg("throw_region") = -1, py::call_guard<py::gil_scoped_release>());
}
