// See packed_gemm.h. One microkernel template, instantiated per (tokens, panels) register tile: MR tokens x NP panels
// of accumulators, per k one load of each panel's 16 weights (bf16 widened by a 16-bit shift, exact), one broadcast
// of each token's x and MR x NP FMAs. Tokens are tiled 12 at a time (6 with AVX2), the remainder as one smaller tile.
#include "packed_gemm.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "thread_pool.h"

namespace fastgpt2 {
namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kTileTokens = 8;
constexpr int kMaxAccumulators = 24;  // of 32 zmm registers
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }

// exp256 / gelu256 of simd.h on 16 lanes, the same operations in the same order.
inline Vec vexp(Vec x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const Vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  Vec p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
inline Vec vgelu(Vec v) {
  const Vec v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  const Vec u2 = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                               _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
  const Vec d = _mm512_add_ps(_mm512_set1_ps(1.0f), vexp(u2));
  return _mm512_sub_ps(v, _mm512_div_ps(v, d));
}
constexpr const char* kIsa = "avx512";
#elif defined(FASTGPT2_AVX2)
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kTileTokens = 6;
constexpr int kMaxAccumulators = 12;  // of 16 ymm registers
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const bf16* p) { return load8(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vgelu(Vec v) { return gelu256(v); }
constexpr const char* kIsa = "avx2";
#else
// Portable: one float per "vector", std::fma, the same chains.
using Vec = float;
constexpr int kLanes = 1;
constexpr int kTileTokens = 4;
constexpr int kMaxAccumulators = 64;
inline Vec vzero() { return 0.0f; }
inline Vec vset1(float v) { return v; }
inline Vec vload(const float* p) { return *p; }
inline Vec vload(const bf16* p) { return to_float(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline void vstore(float* p, Vec v) { *p = v; }
inline Vec vgelu(Vec v) { return gelu_scalar(v); }
constexpr const char* kIsa = "portable";
#endif

constexpr int kVecsPerPanel = kPanelRows / kLanes;

// Panels per register tile for a tile of mr tokens: enough independent chains to cover the FMA latency at one token,
// as many accumulators as the registers hold beyond that.
constexpr int panels_for(int mr) {
  const int by_registers = kMaxAccumulators / (mr * kVecsPerPanel);
  const int cap = 8;
  return std::max(1, std::min(cap, by_registers));
}

// acc (MR x NP*16) continued over k in [k_begin, k_end) (from zero when k_begin == 0, else from acc's stored
// values: the chains carry on exactly) with the X tile (packed (K, MR)) and the NP panels at b (panel stride
// pstride).
template <int MR, int NP, typename W>
inline void microkernel(const W* b, int64_t pstride, const float* xp, int64_t k_begin, int64_t k_end, float* acc) {
  constexpr int NV = NP * kVecsPerPanel;
  Vec c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = k_begin == 0 ? vzero() : vload(acc + i * NP * kPanelRows + j * kLanes);
  for (int64_t k = k_begin; k < k_end; ++k) {
    Vec bv[NV];
    for (int j = 0; j < NV; ++j)
      bv[j] = vload(b + (j / kVecsPerPanel) * pstride + k * kPanelRows + (j % kVecsPerPanel) * kLanes);
    for (int i = 0; i < MR; ++i) {
      const Vec a = vset1(xp[k * MR + i]);
      for (int j = 0; j < NV; ++j) c[i][j] = vfma(a, bv[j], c[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(acc + i * NP * kPanelRows + j * kLanes, c[i][j]);
}

// y[t0 + i, row + j] = epilogue(acc + bias) for the tile's mr tokens and the np panels from panel row `row`; columns
// past `rows` (the zero padding of the last panel) are computed like the others and not stored.
inline void store_tile(const float* acc, int mr, int np, const float* bias, int64_t row, int64_t rows, float* y,
                       int64_t ldy, int64_t t0, Epilogue epilogue) {
  alignas(64) float v[kPanelRows];
  for (int i = 0; i < mr; ++i) {
    float* out = y + (t0 + i) * ldy;
    for (int p = 0; p < np; ++p) {
      const int64_t r0 = row + p * kPanelRows;
      const int64_t cols = std::min<int64_t>(kPanelRows, rows - r0);
      if (cols <= 0) break;
      const float* a = acc + i * np * kPanelRows + p * kPanelRows;
      if (cols == kPanelRows) {  // the common case: straight from registers
        for (int h = 0; h < kVecsPerPanel; ++h) {
          Vec s = vload(a + h * kLanes);
          if (bias) s = vadd(s, vload(bias + r0 + h * kLanes));
          if (epilogue == Epilogue::kGelu) s = vgelu(s);
          if (epilogue == Epilogue::kAccumulate) s = vadd(vload(out + r0 + h * kLanes), s);
          vstore(out + r0 + h * kLanes, s);
        }
        continue;
      }
      // The last, partial panel: the same operations on a padded copy, only the real columns stored.
      alignas(64) float bb[kPanelRows] = {}, yy[kPanelRows] = {};
      for (int64_t j = 0; j < cols; ++j) bb[j] = bias ? bias[r0 + j] : 0.0f, yy[j] = out[r0 + j];
      for (int h = 0; h < kVecsPerPanel; ++h) {
        Vec s = vload(a + h * kLanes);
        if (bias) s = vadd(s, vload(bb + h * kLanes));
        if (epilogue == Epilogue::kGelu) s = vgelu(s);
        if (epilogue == Epilogue::kAccumulate) s = vadd(vload(yy + h * kLanes), s);
        vstore(v + h * kLanes, s);
      }
      std::memcpy(out + r0, v, cols * sizeof(float));
    }
  }
}

// Where a tile's running sums live between K blocks: MR x NP*16 floats per tile.
constexpr int64_t kAccFloats = kTileTokens * 8 * kPanelRows;

// One tile over k in [k_begin, k_end): the MR-token kernel over NP panels; acc holds the tile's running sums. The
// last K block applies the epilogue and stores.
template <int MR, int NP, typename W>
void run_tile_np(const PackedMatrix<W>& w, const float* bias, const float* tile_x, int64_t panel, int64_t k_begin,
                 int64_t k_end, float* acc, float* y, int64_t ldy, int64_t t0, Epilogue epilogue) {
  microkernel<MR, NP>(w.panel(panel), w.cols * kPanelRows, tile_x, k_begin, k_end, acc);
  if (k_end == w.cols) store_tile(acc, MR, NP, bias, panel * kPanelRows, w.rows, y, ldy, t0, epilogue);
}

template <int MR, typename W, int... NPs>
void run_tile(int np, const PackedMatrix<W>& w, const float* bias, const float* tile_x, int64_t panel,
              int64_t k_begin, int64_t k_end, float* acc, float* y, int64_t ldy, int64_t t0, Epilogue epilogue,
              std::integer_sequence<int, NPs...>) {
  ((np == NPs + 1 ? run_tile_np<MR, NPs + 1>(w, bias, tile_x, panel, k_begin, k_end, acc, y, ldy, t0, epilogue)
                  : void()),
   ...);
}

// The kernel for a tile of mr tokens and np <= panels_for(mr) panels.
template <typename W, int... MRs>
void dispatch_tile(int mr, int np, const PackedMatrix<W>& w, const float* bias, const float* tile_x, int64_t panel,
                   int64_t k_begin, int64_t k_end, float* acc, float* y, int64_t ldy, int64_t t0, Epilogue epilogue,
                   std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? run_tile<MRs + 1>(np, w, bias, tile_x, panel, k_begin, k_end, acc, y, ldy, t0, epilogue,
                                      std::make_integer_sequence<int, panels_for(MRs + 1)>{})
                  : void()),
   ...);
}

// Tokens in ceil(T / kTileTokens) tiles of nearly equal size (the first T % tiles one token larger): 64 tokens make
// tiles of 11 and 10 rather than five of 12 and a slow one of 4.
struct Tiling {
  int64_t num_tiles, base, extra;
  explicit Tiling(int64_t num_tokens)
      : num_tiles((num_tokens + kTileTokens - 1) / kTileTokens),
        base(num_tokens / num_tiles),
        extra(num_tokens % num_tiles) {}
  int64_t start(int64_t i) const { return i * base + std::min(i, extra); }
  int size(int64_t i) const { return static_cast<int>(base + (i < extra)); }
  int max_size() const { return static_cast<int>(base + (extra > 0)); }
};

// X tile by tile, each (K, mr) k-major.
void pack_tile(const float* x, int64_t ldx, int64_t t0, int mr, int64_t K, float* p) {
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < mr; ++i) p[k * mr + i] = x[(t0 + i) * ldx + k];
}

// Blocking (GotoBLAS): tokens in blocks whose packed X (block x K floats) stays in L2; per block, each group of
// panels is swept in K blocks whose panel slice (NP x Kc x 16 values) stays in L1 while every tile of the token block
// runs over it. The tiles' running sums wait in `sums` between K blocks. None of this changes a chain's order.
constexpr int64_t kL2Floats = int64_t{1} << 18;  // 1 MiB of packed X per token block
constexpr int64_t kL1Bytes = 24 * 1024;          // panel slice per K block

// Panels [p_begin, p_end) for tokens [0, num_tokens).
template <typename W>
void run_panels(const PackedMatrix<W>& w, const float* bias, const float* xp, int64_t num_tokens, float* y,
                int64_t ldy, int64_t p_begin, int64_t p_end, Epilogue epilogue) {
  const int64_t K = w.cols;
  const Tiling tiling(num_tokens);
  const int group = panels_for(tiling.max_size());  // every tile's kernel takes at least this many panels at once
  const int64_t block_tiles = std::max<int64_t>(1, kL2Floats / K / tiling.max_size());
  int64_t kc = K;
  if (tiling.num_tiles > 1) {  // several tiles share each panel slice
    kc = std::max<int64_t>(8, kL1Bytes / (group * kPanelRows * static_cast<int64_t>(sizeof(W))) / 8 * 8);
    kc = std::min(kc, K);
  }
  thread_local std::vector<float> sums;
  sums.resize(static_cast<size_t>(block_tiles * kAccFloats));
  for (int64_t first = 0; first < tiling.num_tiles; first += block_tiles) {
    const int64_t last = std::min(tiling.num_tiles, first + block_tiles);
    for (int64_t p = p_begin; p < p_end; p += group) {
      const int np = static_cast<int>(std::min<int64_t>(group, p_end - p));
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = std::min(K, k0 + kc);
        for (int64_t i = first; i < last; ++i)
          dispatch_tile(tiling.size(i), np, w, bias, xp + tiling.start(i) * K, p, k0, k1,
                        sums.data() + (i - first) * kAccFloats, y, ldy, tiling.start(i), epilogue,
                        std::make_integer_sequence<int, kTileTokens>{});
      }
    }
  }
}

void* aligned_bytes(size_t bytes) {
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  return p;
}

}  // namespace

template <typename W>
PackedMatrix<W> pack_matrix(const float* w, int64_t rows, int64_t cols) {
  PackedMatrix<W> m;
  m.rows = rows, m.cols = cols;
  const int64_t n = m.num_panels() * cols * kPanelRows;
  m.data = std::shared_ptr<W>(static_cast<W*>(aligned_bytes(n * sizeof(W))), std::free);
  W* out = m.data.get();
  for (int64_t p = 0; p < m.num_panels(); ++p) {
    W* panel = out + p * cols * kPanelRows;
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

template <typename W>
void pack_all(ThreadPool* pool, const float* x, int64_t ldx, int64_t num_tokens, int64_t K, float* xp) {
  const Tiling tiling(num_tokens);
  auto tile = [&](int64_t i) { pack_tile(x, ldx, tiling.start(i), tiling.size(i), K, xp + tiling.start(i) * K); };
  if (pool && num_tokens * K >= (int64_t{1} << 16))
    pool->parallel_for(tiling.num_tiles, tile);
  else
    for (int64_t i = 0; i < tiling.num_tiles; ++i) tile(i);
}

}  // namespace

template <typename W>
void packed_linear(ThreadPool& pool, const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx,
                   float* y, int64_t ldy, int64_t num_tokens, Epilogue epilogue) {
  if (num_tokens <= 0) return;
  std::vector<float>& buffer = packed_x_buffer();
  buffer.resize(static_cast<size_t>(num_tokens * w.cols));
  float* xp = buffer.data();
  pack_all<W>(&pool, x, ldx, num_tokens, w.cols, xp);
  // Tasks of whole panel groups, about 4 per thread (a late thread takes fewer).
  const int64_t group = panels_for(Tiling(num_tokens).max_size());
  const int64_t panels = w.num_panels();
  int64_t per_task = (panels + 4 * pool.num_threads() - 1) / (4 * pool.num_threads());
  per_task = std::max(group, (per_task + group - 1) / group * group);
  pool.parallel_for((panels + per_task - 1) / per_task, [&](int64_t i) {
    run_panels(w, bias, xp, num_tokens, y, ldy, i * per_task, std::min(panels, (i + 1) * per_task), epilogue);
  });
}

template <typename W>
void packed_linear_serial(const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx, float* y,
                          int64_t ldy, int64_t num_tokens, Epilogue epilogue) {
  if (num_tokens <= 0) return;
  std::vector<float>& xp = packed_x_buffer();
  xp.resize(static_cast<size_t>(num_tokens * w.cols));
  pack_all<W>(nullptr, x, ldx, num_tokens, w.cols, xp.data());
  run_panels(w, bias, xp.data(), num_tokens, y, ldy, 0, w.num_panels(), epilogue);
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
                                   float*, int64_t, int64_t, Epilogue);
template void packed_linear<bf16>(ThreadPool&, const PackedMatrix<bf16>&, const float*, const float*, int64_t, float*,
                                  int64_t, int64_t, Epilogue);
template void packed_linear_serial<float>(const PackedMatrix<float>&, const float*, const float*, int64_t, float*,
                                          int64_t, int64_t, Epilogue);
template void packed_linear_serial<bf16>(const PackedMatrix<bf16>&, const float*, const float*, int64_t, float*,
                                         int64_t, int64_t, Epilogue);

}  // namespace fastgpt2
