// See packed_gemm.h. One microkernel template, instantiated per (tokens, panels) register tile: MR tokens x NP panels
// of accumulators, per k one load of each panel's 16 weights (bf16 widened by a 16-bit shift, exact; int8 widened
// and multiplied by its block's scale), one broadcast of each token's x and MR x NP FMAs. Tokens are tiled 8 at a
// time (6 with AVX2), the remainder as one smaller tile. The vector operations are in packed_gemm_kernels.h.
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

#include "packed_gemm_kernels.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

constexpr int kVecsPerPanel = kPanelRows / kLanes;

// Panels per register tile for a tile of mr tokens: as many accumulators as the registers hold, at most 8 panels.
constexpr int panels_for(int mr) {
  const int by_registers = kMaxAccumulators / (mr * kVecsPerPanel);
  // (Two panels at a time for one or two tokens looked faster once, 1.17x the bandwidth floor against 1.32x, but
  // did not reproduce: a later A/B on one Intel Xeon core gave 1.34-1.39x with two and 1.25-1.27x with eight.
  // Software prefetch did not help either.)
  const int cap = 8;
  return std::max(1, std::min(cap, by_registers));
}

// The weights of a register tile: panels at b (panel stride pstride) holding k in [koff, ...): the packed matrix
// (koff 0), or a dequantised slice of it. q8 also reads its scales (per panel (K / 32, 16) at s, stride sstride).
template <typename W>
struct Panels {
  const W* b;
  int64_t pstride, koff;
  const float* s = nullptr;
  int64_t sstride = 0;
};

template <int MR, int NV>
inline void fma_step(Vec (&c)[MR][NV], const Vec (&bv)[NV], const float* xk) {
  for (int i = 0; i < MR; ++i) {
    const Vec a = vset1(xk[i]);
    for (int j = 0; j < NV; ++j) c[i][j] = vfma(a, bv[j], c[i][j]);
  }
}

// acc (MR x NP*16) continued over k in [k_begin, k_end) (from zero when k_begin == 0, else from acc's stored
// values: the chains carry on exactly) with the X tile (packed (K, MR)) and the NP panels of w. q8: k_begin and
// k_end are multiples of 32, and each weight is float(q) * d (one multiply) before its FMA.
template <int MR, int NP, typename W>
inline void microkernel(const Panels<W>& w, const float* xp, int64_t k_begin, int64_t k_end, float* acc) {
  constexpr int NV = NP * kVecsPerPanel;
  Vec c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = k_begin == 0 ? vzero() : vload(acc + i * NP * kPanelRows + j * kLanes);
  const W* b = w.b - w.koff * kPanelRows;
  auto weights = [&](int j) { return b + (j / kVecsPerPanel) * w.pstride + (j % kVecsPerPanel) * kLanes; };
  if constexpr (std::is_same_v<W, q8>) {
    for (int64_t kb = k_begin; kb < k_end; kb += kQ8Block) {
      Vec d[NV];
      for (int j = 0; j < NV; ++j)
        d[j] = vload(w.s + (j / kVecsPerPanel) * w.sstride + kb / kQ8Block * kPanelRows + (j % kVecsPerPanel) * kLanes);
      for (int64_t k = kb; k < kb + kQ8Block; ++k) {
        Vec bv[NV];
        for (int j = 0; j < NV; ++j) bv[j] = vmul(vload(weights(j) + k * kPanelRows), d[j]);
        fma_step<MR, NV>(c, bv, xp + k * MR);
      }
    }
  } else {
    for (int64_t k = k_begin; k < k_end; ++k) {
      Vec bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = vload(weights(j) + k * kPanelRows);
      fma_step<MR, NV>(c, bv, xp + k * MR);
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

// Where the tiles' outputs go (when the K block ending at `cols` completes their chains).
struct Output {
  const float* bias;
  int64_t rows, cols;
  float* y;
  int64_t ldy;
  Epilogue epilogue;
};

// One tile over k in [k_begin, k_end): the MR-token kernel over the NP panels from `panel`; acc holds the tile's
// running sums. The last K block applies the epilogue and stores.
template <int MR, int NP, typename W>
void run_tile_np(const Panels<W>& w, const float* tile_x, int64_t k_begin, int64_t k_end, float* acc,
                 const Output& o, int64_t panel, int64_t t0) {
  microkernel<MR, NP>(w, tile_x, k_begin, k_end, acc);
  if (k_end == o.cols) store_tile(acc, MR, NP, o.bias, panel * kPanelRows, o.rows, o.y, o.ldy, t0, o.epilogue);
}

template <int MR, typename W, int... NPs>
void run_tile(int np, const Panels<W>& w, const float* tile_x, int64_t k_begin, int64_t k_end, float* acc,
              const Output& o, int64_t panel, int64_t t0, std::integer_sequence<int, NPs...>) {
  ((np == NPs + 1 ? run_tile_np<MR, NPs + 1>(w, tile_x, k_begin, k_end, acc, o, panel, t0) : void()), ...);
}

// The kernel for a tile of mr tokens and np <= panels_for(mr) panels.
template <typename W, int... MRs>
void dispatch_tile(int mr, int np, const Panels<W>& w, const float* tile_x, int64_t k_begin, int64_t k_end,
                   float* acc, const Output& o, int64_t panel, int64_t t0, std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? run_tile<MRs + 1>(np, w, tile_x, k_begin, k_end, acc, o, panel, t0,
                                      std::make_integer_sequence<int, panels_for(MRs + 1)>{})
                  : void()),
   ...);
}

// The np panels from p over k in [k0, k1) dequantised (float(q) * d, as the q8 microkernel does in registers) into
// `slice`: np panels of (k1 - k0, 16) float32.
void dequantize_slice(const PackedMatrix<q8>& w, int64_t p, int np, int64_t k0, int64_t k1, float* slice) {
  for (int pp = 0; pp < np; ++pp) {
    const q8* q = w.panel(p + pp);
    const float* d = w.panel_scales(p + pp);
    float* out = slice + pp * (k1 - k0) * kPanelRows;
    for (int64_t k = k0; k < k1; ++k)
      for (int h = 0; h < kVecsPerPanel; ++h)
        vstore(out + (k - k0) * kPanelRows + h * kLanes,
               vmul(vload(q + k * kPanelRows + h * kLanes), vload(d + k / kQ8Block * kPanelRows + h * kLanes)));
  }
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

// Panels [p_begin, p_end) for tokens [0, num_tokens). q8 with several tiles: each panel slice is dequantised once
// into L1 and the tiles run the float32 kernel over it (the same weights, so the same chains).
template <typename W>
void run_panels(const PackedMatrix<W>& w, const float* bias, const float* xp, int64_t num_tokens, float* y,
                int64_t ldy, int64_t p_begin, int64_t p_end, Epilogue epilogue) {
  constexpr bool kQ8 = std::is_same_v<W, q8>;
  const int64_t K = w.cols;
  const Output out{bias, w.rows, K, y, ldy, epilogue};
  const Tiling tiling(num_tokens);
  const int group = panels_for(tiling.max_size());  // every tile's kernel takes at least this many panels at once
  const int64_t block_tiles = std::max<int64_t>(1, kL2Floats / K / tiling.max_size());
  const bool shared = tiling.num_tiles > 1;  // several tiles share each panel slice
  int64_t kc = K;
  if (shared) {
    const int64_t bytes = kQ8 ? sizeof(float) : sizeof(W), step = kQ8 ? kQ8Block : 8;
    kc = std::min(K, std::max<int64_t>(step, kL1Bytes / (group * kPanelRows * bytes) / step * step));
  }
  thread_local std::vector<float> sums, slice;
  sums.resize(static_cast<size_t>(block_tiles * kAccFloats));
  if (kQ8 && shared) slice.resize(static_cast<size_t>(group * kc * kPanelRows));
  for (int64_t first = 0; first < tiling.num_tiles; first += block_tiles) {
    const int64_t last = std::min(tiling.num_tiles, first + block_tiles);
    for (int64_t p = p_begin; p < p_end; p += group) {
      const int np = static_cast<int>(std::min<int64_t>(group, p_end - p));
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = std::min(K, k0 + kc);
        auto run = [&](const auto& panels) {
          for (int64_t i = first; i < last; ++i)
            dispatch_tile(tiling.size(i), np, panels, xp + tiling.start(i) * K, k0, k1,
                          sums.data() + (i - first) * kAccFloats, out, p, tiling.start(i),
                          std::make_integer_sequence<int, kTileTokens>{});
        };
        if constexpr (kQ8) {
          if (shared) {
            dequantize_slice(w, p, np, k0, k1, slice.data());
            run(Panels<float>{slice.data(), (k1 - k0) * kPanelRows, k0});
          } else {
            run(Panels<q8>{w.panel(p), K * kPanelRows, 0, w.panel_scales(p), K / kQ8Block * kPanelRows});
          }
        } else {
          run(Panels<W>{w.panel(p), K * kPanelRows, 0});
        }
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

float quantize_q8_block(const float* w, int8_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(w[i]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int64_t i = 0; i < kQ8Block; ++i) q[i] = static_cast<int8_t>(std::roundf(w[i] * id));
  return d;
}

void dequantize_q8(const float* w, int64_t rows, int64_t cols, float* out) {
  if (cols % kQ8Block != 0)
    throw std::invalid_argument("int8 weights need in_features to be a multiple of 32, got " + std::to_string(cols));
  int8_t q[kQ8Block];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k0 = 0; k0 < cols; k0 += kQ8Block) {
      const float d = quantize_q8_block(w + r * cols + k0, q);
      for (int64_t i = 0; i < kQ8Block; ++i) out[r * cols + k0 + i] = static_cast<float>(q[i]) * d;
    }
}

template <typename W>
PackedMatrix<W> pack_matrix(const float* w, int64_t rows, int64_t cols) {
  constexpr bool kQ8 = std::is_same_v<W, q8>;
  if (kQ8 && cols % kQ8Block != 0)
    throw std::invalid_argument("int8 weights need in_features to be a multiple of 32, got " + std::to_string(cols));
  PackedMatrix<W> m;
  m.rows = rows, m.cols = cols;
  const int64_t n = m.num_panels() * cols * kPanelRows;
  m.data = std::shared_ptr<W>(static_cast<W*>(aligned_bytes(n * sizeof(W))), std::free);
  if (kQ8) m.scales = std::shared_ptr<float>(static_cast<float*>(aligned_bytes(n / kQ8Block * sizeof(float))), std::free);
  W* out = m.data.get();
  for (int64_t p = 0; p < m.num_panels(); ++p) {
    W* panel = out + p * cols * kPanelRows;
    for (int64_t j = 0; j < kPanelRows; ++j) {
      const int64_t r = p * kPanelRows + j;
      if constexpr (kQ8) {  // the padding rows quantise to zeros with scale 0
        float* scales = m.scales.get() + p * (cols / kQ8Block) * kPanelRows;
        const float zeros[kQ8Block] = {};
        int8_t q[kQ8Block];
        for (int64_t k0 = 0; k0 < cols; k0 += kQ8Block) {
          scales[k0 / kQ8Block * kPanelRows + j] = quantize_q8_block(r < rows ? w + r * cols + k0 : zeros, q);
          for (int64_t i = 0; i < kQ8Block; ++i) panel[(k0 + i) * kPanelRows + j] = q8{q[i]};
        }
        continue;
      }
      for (int64_t k = 0; k < cols; ++k) {
        const float v = r < rows ? w[r * cols + k] : 0.0f;
        if constexpr (sizeof(W) == 4)
          panel[k * kPanelRows + j] = v;
        else if constexpr (sizeof(W) == 2)
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
template PackedMatrix<q8> pack_matrix<q8>(const float*, int64_t, int64_t);
template void packed_linear<q8>(ThreadPool&, const PackedMatrix<q8>&, const float*, const float*, int64_t, float*,
                                int64_t, int64_t, Epilogue);
template void packed_linear_serial<q8>(const PackedMatrix<q8>&, const float*, const float*, int64_t, float*, int64_t,
                                       int64_t, Epilogue);

}  // namespace fastgpt2
