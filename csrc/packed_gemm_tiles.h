// What the packed GEMM's float (packed_gemm.cpp) and int8 (packed_gemm_q8.cpp) kernels share: the token tiling, the
// epilogue that stores a finished tile, and the split of the panels into tasks over the pool. Included by those two
// files only (an anonymous namespace: each keeps its own copy, compiled with its variant's flags).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>  // madvise
#endif

#include "packed_gemm_kernels.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

constexpr int kVecsPerPanel = kPanelRows / kLanes;

// Blocking (GotoBLAS): tokens in blocks whose packed X stays in L2; per block, each group of panels is swept in K
// blocks whose panel slice stays in L1 while every tile of the token block runs over it.
constexpr int64_t kL2Floats = int64_t{1} << 18;  // 1 MiB of packed X per token block
constexpr int64_t kL1Bytes = 24 * 1024;          // panel slice per K block

// The kArgmax epilogue's partial results: per (panel group g, token t), at g * tokens + t, the best column < limit of
// that group's tile (index -1: none), as argmax_beats ranks them.
struct ArgmaxParts {
  float* value;
  int64_t* index;
  int64_t tokens, limit;
  int group;  // panels per group: the sweep's register-tile width, so a group is one tile's panels
};

// Where the tiles' outputs go (when the K block ending at `cols` completes their chains).
struct Output {
  const float* bias;
  int64_t rows, cols;
  float* y;
  int64_t ldy;
  Epilogue epilogue;
  const ArgmaxParts* argmax = nullptr;  // kArgmax only
  const KVDestination* kv = nullptr;    // kStore only: columns [C, 3C) into the KV pool
  bool ask_ahead = false;               // prefetch_tile_output asks for the lines (see ask_output_ahead)
};

// Whether prefetch_tile_output asks for a product's output lines ahead: with the AVX-512 kernels when the product of
// num_tokens x rows floats outgrows one core's L2 (taken as 1 MiB), so that its stores would miss. Smaller outputs
// stay in cache between steps, and there the prefetches only cost instructions (64 tokens: 3% slower GEMMs with them,
// one Intel Xeon core); the AVX2 kernels take long enough per tile for the misses to hide behind them (with the AVX2
// variant forced on the same Xeon, 512 tokens: 1.3% slower GEMMs and a 1-2% slower prefill with the prefetches).
inline bool ask_output_ahead(int64_t num_tokens, int64_t rows) {
  return kLanes == 16 && num_tokens * rows * static_cast<int64_t>(sizeof(float)) > (int64_t{1} << 20);
}

// packed_linear's check of a KVDestination against the matrix and the epilogue.
inline void check_kv_destination(const KVDestination* kv, int64_t rows, Epilogue epilogue) {
  if (kv == nullptr) return;
  if (epilogue != Epilogue::kStore || kv->channels <= 0 || kv->channels % kPanelRows != 0 || rows != 3 * kv->channels)
    throw std::invalid_argument("packed_linear: a KV destination needs the kStore epilogue and a matrix of 3 x " +
                                std::to_string(kv->channels) + " rows (a multiple of 16 channels), got " +
                                std::to_string(rows) + " rows");
}

// Whether value v at column i beats the best so far (value best at column best_i < i; best_i < 0: none yet), as
// torch.argmax ranks them: a NaN beats every number and no later NaN beats it; else only a strictly larger value.
inline bool argmax_beats(float v, float best, int64_t best_i) {
  return best_i < 0 || (std::isnan(v) ? !std::isnan(best) : v > best);
}

// The kArgmax epilogue's search over a tile's columns for one token: lane l keeps the largest value among its
// columns and the first column holding it (a later column replaces it only with a strictly larger value); finish()
// takes the largest over the lanes and, among the lanes holding it, the first column. add() reports a NaN instead
// (its first lane): the caller stops there, as a NaN beats every later column.
#if defined(FASTGPT2_AVX512)
struct LaneArgmax {
  __m512 value = _mm512_set1_ps(-INFINITY);
  __m512i column = _mm512_set1_epi32(INT32_MAX);  // INT32_MAX: no column yet
  // Values v[0..n) at columns col0 + lane (n <= 16); returns the first NaN's lane, or -1.
  int add(const float* v, int n, int64_t col0) {
    const __mmask16 live = static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(live, v);
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(live, x, x, _CMP_UNORD_Q);
    if (nan) return __builtin_ctz(nan);
    // Strictly larger, or the lane's first column (so that a lane of -inf values still holds its first column).
    const __mmask16 take = _mm512_mask_cmp_ps_mask(live, x, value, _CMP_GT_OQ) |
                           (live & _mm512_cmpeq_epi32_mask(column, _mm512_set1_epi32(INT32_MAX)));
    const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(col0)),
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    value = _mm512_mask_mov_ps(value, take, x);
    column = _mm512_mask_mov_epi32(column, take, cols);
    return -1;
  }
  void finish(float* best, int64_t* best_i) const {
    const float m = _mm512_reduce_max_ps(value);
    const int32_t c = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(value, _mm512_set1_ps(m), _CMP_EQ_OQ), column);
    *best = m, *best_i = c == INT32_MAX ? -1 : c;
  }
};
#else
struct LaneArgmax {  // one lane: the plain scan
  float value = 0.0f;
  int64_t column = -1;
  int add(const float* v, int n, int64_t col0) {
    for (int j = 0; j < n; ++j) {
      if (std::isnan(v[j])) return j;
      if (column < 0 || v[j] > value) value = v[j], column = col0 + j;
    }
    return -1;
  }
  void finish(float* best, int64_t* best_i) const { *best = value, *best_i = column; }
};
#endif

// kArgmax: the tile's best column per token (of the values store_tile would store) into o.argmax's partials.
inline void argmax_tile(const float* acc, int mr, int np, const Output& o, int64_t panel, int64_t t0) {
  const ArgmaxParts& parts = *o.argmax;
  const int64_t g = panel / parts.group;
  alignas(64) float v[kPanelRows];
  for (int i = 0; i < mr; ++i) {
    LaneArgmax lanes;
    float best = 0.0f;
    int64_t best_i = -1;
    bool nan = false;
    for (int p = 0; p < np && !nan; ++p) {
      const int64_t r0 = (panel + p) * kPanelRows;
      const int64_t cols = std::min<int64_t>(kPanelRows, parts.limit - r0);
      if (cols <= 0) break;
      const float* a = acc + i * np * kPanelRows + p * kPanelRows;
      for (int h = 0; h < kVecsPerPanel; ++h) {
        Vec s = vload(a + h * kLanes);
        if (o.bias) {  // store_tile's addition; the padded columns' bias (past rows, so past limit) is never read
          alignas(64) float b[kLanes] = {};
          for (int j = 0; j < kLanes && r0 + h * kLanes + j < parts.limit; ++j) b[j] = o.bias[r0 + h * kLanes + j];
          s = vadd(s, vload(b));
        }
        vstore(v + h * kLanes, s);
      }
      const int first_nan = lanes.add(v, static_cast<int>(cols), r0);
      if (first_nan >= 0) best = v[first_nan], best_i = r0 + first_nan, nan = true;
    }
    if (!nan) lanes.finish(&best, &best_i);
    parts.value[g * parts.tokens + t0 + i] = best;
    parts.index[g * parts.tokens + t0 + i] = best_i;
  }
}

// The partials of num_groups groups reduced in column order into index (tokens,).
inline void finish_argmax(const ArgmaxParts& parts, int64_t num_groups, int64_t* index) {
  for (int64_t t = 0; t < parts.tokens; ++t) {
    float best = 0.0f;
    int64_t best_i = -1;
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t i = parts.index[g * parts.tokens + t];
      const float v = parts.value[g * parts.tokens + t];
      if (i >= 0 && argmax_beats(v, best, best_i)) best = v, best_i = i;
    }
    index[t] = best_i;
  }
}

// Where store_tile writes whole column panel r0 (a multiple of 16) of token t's output: y's row t, or for a K or V
// column panel with a KV destination, the token's row of the pool.
inline float* panel_destination(const Output& o, int64_t t, int64_t r0) {
  if (o.kv != nullptr && r0 >= o.kv->channels) {
    const int64_t C = o.kv->channels, part = r0 / C;
    return (part == 1 ? o.kv->k : o.kv->v) + o.kv->slots[t] * C + (r0 - part * C);
  }
  return o.y + t * o.ldy + r0;
}

// y[t0 + i, row + j] = epilogue(acc + bias) for a finished tile of mr tokens x np panels (acc: (mr, np * 16)) from
// panel `panel`; columns past `rows` (the zero padding of the last panel) are computed like the others and not stored.
inline void store_tile(const float* acc, int mr, int np, const Output& o, int64_t panel, int64_t t0) {
  if (o.epilogue == Epilogue::kArgmax) {
    argmax_tile(acc, mr, np, o, panel, t0);
    return;
  }
  const float* bias = o.bias;
  const int64_t row = panel * kPanelRows, rows = o.rows, ldy = o.ldy;
  float* y = o.y;
  const Epilogue epilogue = o.epilogue;
  alignas(64) float v[kPanelRows];
  for (int i = 0; i < mr; ++i) {
    float* out = y + (t0 + i) * ldy;
    for (int p = 0; p < np; ++p) {
      const int64_t r0 = row + p * kPanelRows;
      const int64_t cols = std::min<int64_t>(kPanelRows, rows - r0);
      if (cols <= 0) break;
      const float* a = acc + i * np * kPanelRows + p * kPanelRows;
      if (cols == kPanelRows) {  // the common case: straight from registers
        float* dst = panel_destination(o, t0 + i, r0);
        for (int h = 0; h < kVecsPerPanel; ++h) {
          Vec s = vload(a + h * kLanes);
          if (bias) s = vadd(s, vload(bias + r0 + h * kLanes));
          if (epilogue == Epilogue::kGelu) s = vgelu(s);
          if (epilogue == Epilogue::kAccumulate) s = vadd(vload(dst + h * kLanes), s);
          vstore(dst + h * kLanes, s);
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

// Loads into L1 the cache lines store_tile will write for the same tile (the same destinations: y's rows, or the KV
// pool's slot rows for a K or V column panel), so that they arrive while the tile's last K block is computed rather
// than stalling its stores (a line only this core holds needs no further request to be written). A token block's outputs exceed L2 in prefill (512 tokens x 2304 columns: 4.7 MB),
// and each tile writes 3 lines of each of its 8 rows, rows ~9 KB apart, so without it every line is a miss the
// stores wait on. Measured on one Intel Xeon (AVX-512), float32, 512 tokens: on one core 2304 x 768 162 -> 177
// GFLOP/s and 3072 x 768 156 -> 176 (768 x 768 and 768 x 3072 within the noise), the four 124M shapes together
// ~5% faster; a 512-token prefill on 2 threads ~2% faster (4 of 4 alternating runs). Changes no value.
inline void prefetch_tile_output(const Output& o, int mr, int np, int64_t panel, int64_t t0) {
  if (!o.ask_ahead || o.epilogue == Epilogue::kArgmax || o.y == nullptr) return;
  // The panels holding columns < rows (the last may be partial).
  const int panels = static_cast<int>(std::min<int64_t>(np, (o.rows - panel * kPanelRows + kPanelRows - 1) / kPanelRows));
  for (int i = 0; i < mr; ++i)
    for (int p = 0; p < panels; ++p)  // a panel's 16 floats: one line where the rows are 64-byte aligned
      prefetch_line<3>(panel_destination(o, t0 + i, (panel + p) * kPanelRows));
}

// Tokens in ceil(T / tile) tiles of at most `tile` tokens, of nearly equal size (the first T % tiles one token
// larger): with 12-token tiles, 64 tokens make tiles of 11 and 10 rather than five of 12 and a slow one of 4.
struct Tiling {
  int64_t num_tiles, base, extra;
  Tiling(int64_t num_tokens, int tile)
      : num_tiles((num_tokens + tile - 1) / tile),
        base(num_tokens / num_tiles),
        extra(num_tokens % num_tiles) {}
  int64_t start(int64_t i) const { return i * base + std::min(i, extra); }
  int size(int64_t i) const { return static_cast<int>(base + (i < extra)); }
  int max_size() const { return static_cast<int>(base + (extra > 0)); }
};

// Storage for packed weights (freed with std::free). Matrices of 2 MiB or more start on a 2 MiB boundary and ask
// for transparent huge pages (where the kernel has them in "madvise" mode, a common default, nothing else would give
// them): a decode step streams every weight once, and with 4 KiB pages that walk costs a TLB miss every 64 cache
// lines. Measured on one Intel Xeon (AVX-512), 2 threads: batch-1 float32 decode 17.5-17.9 -> 16.8-17.1 ms/token,
// 124M's GEMMs alone at one token 17.3 -> 16.3 ms; 64 concurrent and 512-token prefill within the noise. The advice
// is only advice: where it is refused or unsupported the pages are the usual ones.
void* aligned_bytes(size_t bytes) {
  constexpr size_t kHugePage = size_t{1} << 21;
  const size_t size = (bytes + 63) / 64 * 64;
  if (bytes >= kHugePage) {
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, size) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);  // whole huge pages only; the tail keeps small ones
#endif
    return p;
  }
  void* p = std::aligned_alloc(64, size);
  if (!p) throw std::bad_alloc();
  return p;
}


// v's storage for at least n values: grown when too small, never shrunk (a per-thread buffer sized for one layer's
// input and then for the next would be zero-filled again on every regrowth: ~57 MB per 512-token step).
template <typename T>
T* at_least(std::vector<T>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

// fn(std::integral_constant<int, MR>, std::integral_constant<int, NP>) for a tile of mr <= Tile tokens and
// np <= PanelsFor(mr) panels: one instantiation of the caller's microkernel per register tile.
template <int MR, typename Fn, int... NPs>
void dispatch_panels(int np, const Fn& fn, std::integer_sequence<int, NPs...>) {
  ((np == NPs + 1 ? fn(std::integral_constant<int, MR>{}, std::integral_constant<int, NPs + 1>{}) : void()), ...);
}

template <int (*PanelsFor)(int), typename Fn, int... MRs>
void dispatch_tokens(int mr, int np, const Fn& fn, std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? dispatch_panels<MRs + 1>(np, fn, std::make_integer_sequence<int, PanelsFor(MRs + 1)>{})
                  : void()),
   ...);
}

template <int Tile, int (*PanelsFor)(int), typename Fn>
void dispatch_tile(int mr, int np, const Fn& fn) {
  dispatch_tokens<PanelsFor>(mr, np, fn, std::make_integer_sequence<int, Tile>{});
}

// The panel slice a sweep reads after the current one, and the share of it that the current tile loads ahead: the
// tiles of a token block split the next slice's cache lines into `parts` equal runs (each panel's lines
// [part * lines / parts, (part + 1) * lines / parts)), so that the weights arrive from memory while the current
// slice is still being computed on rather than all at once when its first tile starts (up to 1.25x on the LM head
// at 64 tokens, one thread). np == 0: nothing to load.
struct NextSlice {
  int64_t panel = 0, k0 = 0, k1 = 0;
  int np = 0;
  int64_t part = 0, parts = 1;
  // The first line of panel j's share (base: that panel's start; bytes_per_k: bytes of one k of a panel) and the
  // number of lines in each panel's share.
  const char* start(const void* base, int64_t bytes_per_k) const {
    return static_cast<const char*>(base) + k0 * bytes_per_k + part * lines(bytes_per_k) / parts * 64;
  }
  int64_t lines(int64_t bytes_per_k) const { return (k1 - k0) * bytes_per_k / 64; }
  int64_t share(int64_t bytes_per_k) const {
    const int64_t n = lines(bytes_per_k);
    return (part + 1) * n / parts - part * n / parts;
  }
};

// A kernel's share of a NextSlice as streams of cache lines (up to 16), loaded ahead a few lines per step: step n of
// a call of `steps` steps loads lines [n * per, (n + 1) * per) of every stream.
class Ahead {
 public:
  explicit Ahead(int64_t steps) : steps_(std::max<int64_t>(steps, 1)) {}
  // A stream: the share of the panel starting at base, bytes_per_k bytes per k.
  void add(const NextSlice& next, const void* base, int64_t bytes_per_k) {
    if (num_ == kMaxStreams) return;
    start_[num_] = next.start(base, bytes_per_k);
    lines_[num_] = next.share(bytes_per_k);
    per_[num_] = (lines_[num_] + steps_ - 1) / steps_;
    ++num_;
  }
  void load(int64_t n) const {
    for (int s = 0; s < num_; ++s)
      for (int64_t l = n * per_[s]; l < std::min(lines_[s], (n + 1) * per_[s]); ++l)
        prefetch_line<2>(start_[s] + l * 64);
  }

 private:
  static constexpr int kMaxStreams = 16;
  int64_t steps_;
  int num_ = 0;
  const char* start_[kMaxStreams];
  int64_t lines_[kMaxStreams], per_[kMaxStreams];
};

// The blocked sweep of both kernels over panels [p_begin, p_end) of a K-input matrix: tokens in blocks of block_tiles
// tiles (their packed X in L2); per block, each group of panels swept in K blocks of kc inputs (the group's slice in
// L1) by every tile of the block: kernel(tile, panel, np, k0, k1, acc, next), acc the tile's acc_floats running
// sums, which wait there between K blocks, and next the slice to load ahead (when the token block has more than one
// tile: a lone tile streams its panels once, as fast as the memory allows). None of this changes an output's chain of
// operations.
template <typename Kernel>
void sweep_panels(const Tiling& tiling, int group, int64_t K, int64_t kc, int64_t block_tiles, int64_t acc_floats,
                  int64_t p_begin, int64_t p_end, const Kernel& kernel) {
  thread_local std::vector<float> buffer;
  float* const sums = at_least(buffer, block_tiles * acc_floats);
  for (int64_t first = 0; first < tiling.num_tiles; first += block_tiles) {
    const int64_t last = std::min(tiling.num_tiles, first + block_tiles);
    for (int64_t p = p_begin; p < p_end; p += group) {
      const int np = static_cast<int>(std::min<int64_t>(group, p_end - p));
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        NextSlice next;
        if (last - first > 1) {
          next.panel = p, next.k0 = k0 + kc;
          if (next.k0 >= K) next.panel = p + group, next.k0 = 0;
          if (next.panel >= p_end && last < tiling.num_tiles) next.panel = p_begin;  // the next token block's
          if (next.panel < p_end) {
            next.k1 = std::min(K, next.k0 + kc);
            next.np = static_cast<int>(std::min<int64_t>(group, p_end - next.panel));
            next.parts = last - first;
          }
        }
        for (int64_t i = first; i < last; ++i) {
          next.part = i - first;
          kernel(i, p, np, k0, std::min(K, k0 + kc), sums + (i - first) * acc_floats, next);
        }
      }
    }
  }
}

// fn(p_begin, p_end) over the matrix's panels in tasks of whole groups of `group` panels, guided: each task takes
// 1 / (2 threads) of the panels still unassigned (at least one group), so the tasks shrink towards the end and a
// thread that falls behind (another guest on the host, a slower start) holds the others up by a small task rather
// than by one of equal tasks (about 4 per thread before). Measured on one Intel Xeon (AVX-512), 2 threads, float32,
// alternating processes: a 512-token prefill 1-3.5% faster in 3 of 3 runs (host noise +-10%), batch-1 and 64-
// concurrent decode unchanged. Which thread computes a panel changes no value.
template <typename Fn>
void for_panel_tasks(ThreadPool& pool, int64_t panels, int64_t group, const Fn& fn) {
  std::vector<int64_t> bounds{0};
  const int64_t share = 2 * static_cast<int64_t>(pool.num_threads());
  while (bounds.back() < panels) {
    const int64_t n = (panels - bounds.back() + share - 1) / share;
    bounds.push_back(std::min(panels, bounds.back() + std::max(group, (n + group - 1) / group * group)));
  }
  pool.parallel_for(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t i) { fn(bounds[i], bounds[i + 1]); });
}

// packed_argmax's sweep of both kernels: run(p_begin, p_end, &parts) over the pool in for_panel_tasks's tasks (kArgmax
// tiles of `group` panels), then the partials reduced into index (tokens,). limit: columns considered (<= panels * 16).
template <typename Run>
void argmax_sweep(ThreadPool& pool, int64_t num_panels, int group, int64_t tokens, int64_t limit, int64_t* index,
                  const Run& run) {
  const int64_t num_groups = (num_panels + group - 1) / group;
  thread_local std::vector<float> values;
  thread_local std::vector<int64_t> indices;
  const ArgmaxParts parts{at_least(values, num_groups * tokens), at_least(indices, num_groups * tokens), tokens, limit,
                          group};
  for_panel_tasks(pool, num_panels, group, [&](int64_t p0, int64_t p1) { run(p0, p1, &parts); });
  finish_argmax(parts, num_groups, index);
}

}  // namespace
}  // namespace fastgpt2
