// See packed_gemm.h: the float32 and bf16 kernels (int8 is packed_gemm_q8.cpp). One microkernel template,
// instantiated per (tokens, panels) register tile: MR tokens x NP panels of accumulators, per k one load of each
// panel's 16 weights (bf16 widened by a 16-bit shift, exact), one broadcast of each token's x and MR x NP FMAs. Tokens
// are tiled 8 at a time (6 with AVX2), the remainder as one smaller tile. The vector operations are in
// packed_gemm_kernels.h, the tiling and epilogue in packed_gemm_tiles.h.
#include "packed_gemm.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "packed_gemm_tiles.h"

namespace fastgpt2 {
namespace {

// Panels per register tile for a tile of mr tokens: as many accumulators as the registers hold, at most 8 panels.
constexpr int panels_for(int mr) {
  const int by_registers = kMaxAccumulators / (mr * kVecsPerPanel);
  // (Two panels at a time for one or two tokens looked faster once, 1.17x the bandwidth floor against 1.32x, but
  // did not reproduce: a later A/B on one Intel Xeon core gave 1.34-1.39x with two and 1.25-1.27x with eight.
  // Software prefetch did not help either.)
  const int cap = 8;
  return std::max(1, std::min(cap, by_registers));
}

// The weights of a register tile: panels at b (panel stride pstride).
template <typename W>
struct Panels {
  const W* b;
  int64_t pstride;
};

template <int MR, int NV>
inline void fma_step(Vec (&c)[MR][NV], const Vec (&bv)[NV], const float* xk) {
  for (int i = 0; i < MR; ++i) {
    const Vec a = vset1(xk[i]);
    for (int j = 0; j < NV; ++j) c[i][j] = vfma(a, bv[j], c[i][j]);
  }
}

// acc (MR x NP*16) continued over k in [k_begin, k_end) (from zero when k_begin == 0, else from acc's stored
// values: the chains carry on exactly) with the X tile (packed (K, MR)) and the NP panels of w. Meanwhile, the next
// slice's share: pf_lines cache lines of each of pf_np panels (pf[j] + 64 * i), spread evenly over the call, a few at
// the start of each run of kRun k (at most one line per k).
// AVX-512 runs 8 k per run, unrolled: pf_np lines per k for the first pf_lines k, as before, came in bursts that
// stalled on the line fill buffers (a 64-token decode step's GEMMs of 124M, 2 threads, Intel Xeon: 1.05-1.1x faster
// spread, 16 tokens 1.1x, 512 tokens the same). AVX2 keeps runs of one k: unrolled, its 16 registers spilled (512
// tokens 4-5% slower with the forced AVX2 variant on the same Xeon), and at most one line per k is close to its old
// schedule (a tile of 6 tokens takes one panel).
template <int MR, int NP, typename W>
inline void microkernel(const Panels<W>& w, const float* xp, int64_t k_begin, int64_t k_end, float* acc,
                        const char* const* pf, int pf_np, int64_t pf_lines) {
  constexpr int NV = NP * kVecsPerPanel;
  Vec c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = k_begin == 0 ? vzero() : vload(acc + i * NP * kPanelRows + j * kLanes);
  auto weights = [&](int j) { return w.b + (j / kVecsPerPanel) * w.pstride + (j % kVecsPerPanel) * kLanes; };
  auto step = [&](int64_t k) {
    Vec bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload(weights(j) + k * kPanelRows);
    fma_step<MR, NV>(c, bv, xp + k * MR);
  };
  constexpr int kRun = kLanes == 16 ? 8 : 1;
  const int64_t lines = pf_np * pf_lines, runs = (k_end - k_begin) / kRun;
  const int64_t per_run = runs > 0 ? (lines + runs - 1) / runs : lines;
  int64_t issued = 0, line = 0;
  int panel = 0;
  int64_t k = k_begin;
  for (; k + kRun <= k_end; k += kRun) {
    for (const int64_t stop = std::min(lines, issued + per_run); issued < stop; ++issued) {
      __builtin_prefetch(pf[panel] + line * 64, 0, 3);
      if (++panel == pf_np) panel = 0, ++line;
    }
#pragma GCC unroll 8
    for (int u = 0; u < kRun; ++u) step(k + u);
  }
  for (; k < k_end; ++k) step(k);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(acc + i * NP * kPanelRows + j * kLanes, c[i][j]);
}

// The panel slice each K block sweeps: with AVX-512, 192 KB, which L2 holds (kc = 1024 of three panels: the whole K of
// a 768-input matrix). Its tiles then store and reload their running sums less often, and each kernel call runs
// longer: one Intel Xeon core, 512 tokens, 24 KB (in L1) -> 192 KB, 768 x 768 154-165 -> 163-172 GFLOP/s, 2304 x 768
// 148-163 -> 156-172, 768 x 3072 133-147 -> 146-158; 64 tokens 4-7% faster. AVX2 keeps 24 KB (its 6 x 16 tile ran
// 5% slower with 192 KB on the same Xeon).
constexpr int64_t kSliceBytes = kLanes == 16 ? 192 * 1024 : kL1Bytes;

// Where a tile's running sums live between K blocks: MR x NP*16 floats per tile.
constexpr int64_t kAccFloats = kTileTokens * 8 * kPanelRows;

// X tile by tile, each (K, mr) k-major. A whole 8-token tile (AVX-512's) goes through 8 x 8 transposes in ymm
// registers (24 shuffles per 64 values instead of a load and a store each: the scalar loop was 3.5-4.5% of a 512-token
// GEMM on one Intel Xeon core); K is a multiple of 8 (PackedMatrix).
void pack_tile(const float* x, int64_t ldx, int64_t t0, int mr, int64_t K, float* p) {
  int64_t k0 = 0;
#ifdef FASTGPT2_AVX512
  if (mr == 8) {
    const float* row = x + t0 * ldx;
    for (; k0 + 8 <= K; k0 += 8) {
      __m256 r[8], t[8], s[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(row + i * ldx + k0);
      for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      for (int i = 0; i < 8; i += 4) {  // s[i + c]: rows i..i+3 of k = c and c + 4 (one per 128-bit half)
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(p + (k0 + c) * 8, _mm256_permute2f128_ps(s[c], s[c + 4], 0x20));
        _mm256_storeu_ps(p + (k0 + c + 4) * 8, _mm256_permute2f128_ps(s[c], s[c + 4], 0x31));
      }
    }
  }
#endif
  for (int64_t k = k0; k < K; ++k)
    for (int i = 0; i < mr; ++i) p[k * mr + i] = x[(t0 + i) * ldx + k];
}

// Panels [p_begin, p_end) for tokens [0, num_tokens), blocked by sweep_panels.
template <typename W>
void run_panels(const PackedMatrix<W>& w, const float* bias, const float* xp, int64_t num_tokens, float* y,
                int64_t ldy, int64_t p_begin, int64_t p_end, Epilogue epilogue,
                const ArgmaxParts* argmax = nullptr, const KVDestination* kv = nullptr) {
  const int64_t K = w.cols;
  const Output out{bias, w.rows, K, y, ldy, epilogue, argmax, kv, ask_output_ahead(num_tokens, w.rows)};
  const Tiling tiling(num_tokens, kTileTokens);
  const int group = panels_for(tiling.max_size());  // every tile's kernel takes at least this many panels at once
  const int64_t block_tiles = std::max<int64_t>(1, kL2Floats / K / tiling.max_size());
  // Several tiles share each panel slice: K blocks of it stay in cache (kSliceBytes).
  const int64_t kc = tiling.num_tiles == 1
                         ? K
                         : std::min(K, std::max<int64_t>(8, kSliceBytes / (group * kPanelRows * sizeof(W)) / 8 * 8));
  sweep_panels(tiling, group, K, kc, block_tiles, kAccFloats, p_begin, p_end,
               [&](int64_t i, int64_t p, int np, int64_t k0, int64_t k1, float* acc, const NextSlice& next) {
                 const Panels<W> panels{w.panel(p), K * kPanelRows};
                 const int64_t t0 = tiling.start(i);
                 constexpr int64_t kBytesPerK = kPanelRows * sizeof(W);
                 const char* pf[8];
                 for (int j = 0; j < next.np; ++j) pf[j] = next.start(w.panel(next.panel + j), kBytesPerK);
                 const int64_t pf_lines = next.np > 0 ? next.share(kBytesPerK) : 0;
                 if (k1 == K) prefetch_tile_output(out, tiling.size(i), np, p, t0);  // stored at the end of this call
                 dispatch_tile<kTileTokens, panels_for>(tiling.size(i), np, [&](auto mr, auto nr) {
                   microkernel<decltype(mr)::value, decltype(nr)::value>(panels, xp + t0 * K, k0, k1, acc, pf,
                                                                         next.np, pf_lines);
                   if (k1 == K) store_tile(acc, decltype(mr)::value, decltype(nr)::value, out, p, t0);
                 });
               });
}

}  // namespace

template <typename W>
PackedMatrix<W> pack_matrix(const float* w, int64_t rows, int64_t cols) {
  static_assert(sizeof(W) == 4 || sizeof(W) == 2, "int8 packing is packed_gemm_q8.cpp's");
  PackedMatrix<W> m;
  m.rows = rows, m.cols = cols;
  m.data = std::shared_ptr<W>(static_cast<W*>(aligned_bytes(m.num_panels() * cols * kPanelRows * sizeof(W))),
                              std::free);
  for (int64_t p = 0; p < m.num_panels(); ++p) {
    W* panel = m.data.get() + p * cols * kPanelRows;
    for (int64_t j = 0; j < kPanelRows; ++j) {
      const int64_t r = p * kPanelRows + j;
      for (int64_t k = 0; k < cols; ++k) {
        const float v = r < rows ? w[r * cols + k] : 0.0f;
        if constexpr (sizeof(W) == 4)
          panel[k * kPanelRows + j] = v;
        else
          panel[k * kPanelRows + j] = to_bf16(v);
      }
    }
  }
  return m;
}

namespace {

// The packed X of the calling thread (a lambda naming a thread_local would see the executing thread's own copy).
std::vector<float>& packed_x_buffer() {
  thread_local std::vector<float> buffer;
  return buffer;
}

void pack_all(ThreadPool* pool, const float* x, int64_t ldx, int64_t num_tokens, int64_t K, float* xp) {
  const Tiling tiling(num_tokens, kTileTokens);
  auto tile = [&](int64_t i) { pack_tile(x, ldx, tiling.start(i), tiling.size(i), K, xp + tiling.start(i) * K); };
  if (pool && num_tokens * K >= (int64_t{1} << 16))
    pool->parallel_for(tiling.num_tiles, tile);
  else
    for (int64_t i = 0; i < tiling.num_tiles; ++i) tile(i);
}

// From how many tokens per thread packed_linear (AVX-512) splits a product's tokens over the pool rather than its
// panels: each thread then packs its own share of X (it stays in that core's L2) and sweeps every panel over it, where
// with the panels split each thread's sweep reads every token block of X, half of it packed by the other core, again
// for each of its guided tasks. Both threads read all the weights, from the cache they share (a token block's reuse of
// them is unchanged). Measured on one Intel Xeon (AVX-512), 2 threads, float32, the four 124M shapes, the old and the
// new split alternated in one process: 512 tokens 1.02-1.03x as fast, 256 1.04x, 128 1.05x, 96 1.02x, 80 the same, 64
// 0.98x and 32 0.92x (there the weights, not X, are what each thread has to stream); 124M's prefill in the engine 512
// tokens 1.02-1.03x, 96-128 tokens 1.06-1.12x, 64 concurrent decodes unchanged; bfloat16 weights 1.01-1.02x. int8
// (packed_gemm_q8.cpp) keeps the panel split: split by tokens it ran 7-9% slower at 96-512 tokens. So do the AVX2
// kernels (6-token x 1-panel tiles): with the AVX2 variant forced on the same Xeon, prefill 200 tokens 0.97x, 512
// 1.01x, 1,000 1.02x (8 alternations each), no gain to take to the AVX2-only CPUs (Zen 3, unmeasured). Which thread
// computes a token changes no value.
constexpr int64_t kSplitTokensPerThread = 48;

inline bool splits_tokens(const ThreadPool& pool, int64_t num_tokens) {
  return kLanes == 16 && pool.num_threads() > 1 && num_tokens >= kSplitTokensPerThread * pool.num_threads();
}

// fn(t0, t1) for one share of the tokens per thread of the pool: whole tiles of `tile` tokens (as Tiling cuts
// num_tokens), nearly as many per share.
template <typename Fn>
void for_token_shares(ThreadPool& pool, int64_t num_tokens, int tile, const Fn& fn) {
  const Tiling tiling(num_tokens, tile);
  const int64_t shares = pool.num_threads();
  pool.parallel_for(shares, [&](int64_t s) {
    const int64_t i0 = tiling.num_tiles * s / shares, i1 = tiling.num_tiles * (s + 1) / shares;
    if (i1 > i0) fn(tiling.start(i0), i1 < tiling.num_tiles ? tiling.start(i1) : num_tokens);
  });
}

// A share's view of the product's destinations: y from row t0 on, and kv's slots of the tokens from t0 on (*share
// holds the shifted copy; null when kv is).
inline float* rows_from(float* y, int64_t ldy, int64_t t0) { return y ? y + t0 * ldy : nullptr; }
inline const KVDestination* kv_from(const KVDestination* kv, int64_t t0, KVDestination* share) {
  if (kv == nullptr) return nullptr;
  *share = *kv, share->slots = kv->slots + t0;
  return share;
}

// The product on the calling thread alone: x packed into its buffer, every panel swept.
template <typename W>
void linear_on_this_thread(const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx, float* y,
                           int64_t ldy, int64_t num_tokens, Epilogue epilogue, const KVDestination* kv) {
  float* xp = at_least(packed_x_buffer(), num_tokens * w.cols);
  pack_all(nullptr, x, ldx, num_tokens, w.cols, xp);
  run_panels(w, bias, xp, num_tokens, y, ldy, 0, w.num_panels(), epilogue, nullptr, kv);
}

}  // namespace

template <typename W>
void packed_linear(ThreadPool& pool, const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx,
                   float* y, int64_t ldy, int64_t num_tokens, Epilogue epilogue, const KVDestination* kv) {
  check_kv_destination(kv, w.rows, epilogue);
  if (num_tokens <= 0) return;
  if (splits_tokens(pool, num_tokens)) {
    for_token_shares(pool, num_tokens, kTileTokens, [&](int64_t t0, int64_t t1) {
      KVDestination share;
      linear_on_this_thread(w, bias, x + t0 * ldx, ldx, rows_from(y, ldy, t0), ldy, t1 - t0, epilogue,
                            kv_from(kv, t0, &share));
    });
    return;
  }
  float* xp = at_least(packed_x_buffer(), num_tokens * w.cols);
  pack_all(&pool, x, ldx, num_tokens, w.cols, xp);
  for_panel_tasks(pool, w.num_panels(), panels_for(Tiling(num_tokens, kTileTokens).max_size()),
                  [&](int64_t p0, int64_t p1) {
                    run_panels(w, bias, xp, num_tokens, y, ldy, p0, p1, epilogue, nullptr, kv);
                  });
}

template <typename W>
void packed_linear_serial(const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx, float* y,
                          int64_t ldy, int64_t num_tokens, Epilogue epilogue) {
  if (num_tokens <= 0) return;
  linear_on_this_thread(w, bias, x, ldx, y, ldy, num_tokens, epilogue, nullptr);
}

template <typename W>
void packed_argmax(ThreadPool& pool, const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx,
                   int64_t num_tokens, int64_t limit, int64_t* index) {
  if (num_tokens <= 0) return;
  float* xp = at_least(packed_x_buffer(), num_tokens * w.cols);
  pack_all(&pool, x, ldx, num_tokens, w.cols, xp);
  argmax_sweep(pool, w.num_panels(), panels_for(Tiling(num_tokens, kTileTokens).max_size()), num_tokens,
               std::min(limit, w.rows), index, [&](int64_t p0, int64_t p1, const ArgmaxParts* parts) {
                 run_panels(w, bias, xp, num_tokens, nullptr, 0, p0, p1, Epilogue::kArgmax, parts);
               });
}

const char* packed_gemm_isa() { return kIsa; }

double fma_peak_gflops(double seconds) {
  constexpr int kChains = 16;
  Vec c[kChains];
  for (int i = 0; i < kChains; ++i) c[i] = vset1(1.0f + i * 1e-3f);
  const Vec a = vset1(0.999999f), b = vset1(1e-7f);
  int64_t iterations = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  do {
    for (int it = 0; it < 4096; ++it)
      for (int i = 0; i < kChains; ++i) c[i] = vfma(c[i], a, b);
    iterations += 4096;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  float sink[kLanes];
  for (int i = 1; i < kChains; ++i) c[0] = vadd(c[0], c[i]);
  vstore(sink, c[0]);
  volatile float keep = sink[0];
  (void)keep;
  return static_cast<double>(iterations) * kChains * kLanes * 2 / elapsed * 1e-9;
}

template PackedMatrix<float> pack_matrix<float>(const float*, int64_t, int64_t);
template PackedMatrix<bf16> pack_matrix<bf16>(const float*, int64_t, int64_t);
template void packed_linear<float>(ThreadPool&, const PackedMatrix<float>&, const float*, const float*, int64_t,
                                   float*, int64_t, int64_t, Epilogue, const KVDestination*);
template void packed_linear<bf16>(ThreadPool&, const PackedMatrix<bf16>&, const float*, const float*, int64_t, float*,
                                  int64_t, int64_t, Epilogue, const KVDestination*);
template void packed_argmax<float>(ThreadPool&, const PackedMatrix<float>&, const float*, const float*, int64_t,
                                   int64_t, int64_t, int64_t*);
template void packed_argmax<bf16>(ThreadPool&, const PackedMatrix<bf16>&, const float*, const float*, int64_t, int64_t,
                                  int64_t, int64_t*);
template void packed_linear_serial<float>(const PackedMatrix<float>&, const float*, const float*, int64_t, float*,
                                          int64_t, int64_t, Epilogue);
template void packed_linear_serial<bf16>(const PackedMatrix<bf16>&, const float*, const float*, int64_t, float*,
                                         int64_t, int64_t, Epilogue);

}  // namespace fastgpt2
