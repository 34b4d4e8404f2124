// The C++ CPU sampler without Python: microseconds per row of 50257 float32 logits (one thread, medians), whole rows
// and the fast top-p path's passes one by one, or (with `dump`) every draw and candidate list of 1200 mixed rows, to
// compare builds. Build it beside the extension's flags, e.g. (from the repository root, one line):
//   g++ -O3 -std=c++17 -fno-math-errno -march=native -Icsrc bench/sampler_passes.cpp csrc/sampling.cpp
//       csrc/sampling_fast.cpp csrc/sampling_fast_passes.cpp csrc/sampling_passes.cpp csrc/sampling_select.cpp
//       -o /tmp/sampler_passes -lpthread
// (-mavx2 -mfma -mf16c for the AVX2 loops, no -m flag for the portable ones), then run /tmp/sampler_passes [repeats]
// or /tmp/sampler_passes dump > draws.txt. Rows: N(0, 3) and N(0, 1) logits, a flat row (N(0, 0.1)), a peaked row
// (N(0, 2) with two logits at 25 and 23) and Gumbel(0, 2) logits.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "sampling.h"
#include "sampling_fast.h"
#include "sampling_select.h"

using namespace fastgpt2;
using namespace fastgpt2::sampling_detail;

namespace {

constexpr int V = 50257;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <class F>
double median_us(F f, int reps) {
  std::vector<double> t(reps);
  for (int i = 0; i < 20; ++i) f();
  for (int r = 0; r < reps; ++r) {
    const double start = now();
    f();
    t[r] = (now() - start) * 1e6;
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return t[reps / 2];
}

// Draws and candidate lists (ids and float32 probabilities, hashed) of 1200 rows mixing scales, top-k, top-p, min-p,
// banned tokens and ties.
int dump() {
  const int R = 1200;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0, 1);
  std::uniform_real_distribution<double> uniform01(0, 1);
  std::vector<float> x(size_t{R} * V);
  std::vector<int64_t> k(R), out(R);
  std::vector<double> p(R), mp(R), u(R);
  std::vector<int32_t> status(R);
  const float scales[] = {0.05f, 0.3f, 1, 2, 3, 5, 8, 20};
  const double ps[] = {0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1 - 1e-6, 1.0};
  for (int r = 0; r < R; ++r) {
    float* row = &x[size_t(r) * V];
    for (int i = 0; i < V; ++i) row[i] = normal(rng) * scales[r % 8];
    if (r % 11 == 0) for (int i = 0; i < V; i += 7) row[i] = -INFINITY;
    if (r % 13 == 0) for (int i = 0; i < V; ++i) row[i] = std::round(row[i] * 4) / 4;
    if (r % 17 == 0) row[r % V] = 40;
    p[r] = ps[(r / 8) % 9];
    k[r] = r % 5 == 0 ? 50 : (r % 7 == 0 ? 1000 : 0);
    mp[r] = r % 6 == 0 ? 0.01 : 0.0;
    u[r] = uniform01(rng);
  }
  topk_topp_minp_sample(x.data(), R, V, V, k.data(), p.data(), mp.data(), u.data(), out.data(), status.data(), 1);
  for (int r = 0; r < R; ++r) printf("%d %ld %d\n", r, static_cast<long>(out[r]), status[r]);
  std::vector<RowCandidates> c;
  topk_topp_minp_select(x.data(), R, V, V, k.data(), p.data(), mp.data(), c, status.data(), 1);
  for (int r = 0; r < R; ++r) {
    uint64_t h = 1469598103934665603ull;
    for (size_t n = 0; n < c[r].ids.size(); ++n) {
      uint32_t bits;
      std::memcpy(&bits, &c[r].probs[n], 4);
      h = ((h ^ static_cast<uint64_t>(c[r].ids[n])) * 1099511628211ull ^ bits) * 1099511628211ull;
    }
    printf("candidates %d %zu %016llx\n", r, c[r].ids.size(), static_cast<unsigned long long>(h));
  }
  const FastPathStats stats = fast_path_stats();
  fprintf(stderr, "fast top-p path: %ld rows decided, %ld handed to the exact path\n", static_cast<long>(stats.decided),
          static_cast<long>(stats.deferred));
  return 0;
}

struct Row {
  std::string name;
  std::vector<float> x;
};

std::vector<Row> make_rows() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0, 1);
  std::extreme_value_distribution<float> gumbel(0, 2);
  std::vector<Row> rows;
  for (const auto& [name, scale] : {std::pair<const char*, float>{"N(0,3)", 3.0f}, {"N(0,1)", 1.0f}, {"flat", 0.1f}}) {
    Row r{name, std::vector<float>(V)};
    for (float& v : r.x) v = normal(rng) * scale;
    rows.push_back(r);
  }
  Row peaked{"peaked", std::vector<float>(V)};
  for (float& v : peaked.x) v = normal(rng) * 2.0f;
  peaked.x[123] = 25, peaked.x[4567] = 23;
  rows.push_back(peaked);
  Row g{"Gumbel(0,2)", std::vector<float>(V)};
  for (float& v : g.x) v = gumbel(rng);
  rows.push_back(g);
  return rows;
}

void passes(const Row& row, int reps) {
  printf("-- fast top-p 0.9 passes on %s\n", row.name.c_str());
  const float* x = row.x.data();
  Workspace ws;
  const int64_t padded = (V + BLOCK - 1) / BLOCK * BLOCK;
  ws.reserve(padded);
  RowScan scan = scan_row(x, V);
  printf("scan_row          %7.1f us\n", median_us([&] { scan = scan_row(x, V); }, reps));
  const BucketScale buckets = bucket_scale_of(scan);
  const float scale = buckets.scale;
  const int limit = static_cast<int>(std::log(2.0 * V / 0.1) * scale + 2);
  double total = 0;
  printf("fast_exp_pass     %7.1f us\n",
         median_us([&] { total = fast_exp_pass(x, V, scan, scale, limit, nullptr, ws); }, reps));
  Bracket br{};
  printf("bracket_mass      %7.1f us\n",
         median_us([&] { br = bracket_mass(ws.count.data(), 0.9 * total, buckets.inv_scale, buckets.slack); }, reps));
  const int first = std::max(br.first - 1, 0), last = std::min(br.last + 1, BUCKET_TINY - 1);
  FastWindow fw{};
  const double t = median_us(
      [&] { fw = fast_window_pass(ws, x, scan.max, scale, V, first, last, ws.list, ws.block_mass.data()); }, reps);
  printf("fast_window_pass  %7.1f us (%zu tokens in buckets %d..%d)\n", t, ws.list.size(), first, last);
  printf("resolve           %7.1f us\n",
         median_us([&] { resolve(ws.list, {0, 0.0}, 0, 0.5 * fw.window_e32, 0, ws); }, reps));
  printf("fast_mass_below   %7.1f us\n", median_us([&] { total = fast_mass_below(ws, padded, last); }, reps));
  printf("-- exact passes\n");
  printf("exp_pass<true>    %7.1f us\n", median_us([&] { exp_pass<true>(x, V, scan, scale, nullptr, ws); }, reps));
  printf("exp_pass<false>   %7.1f us\n", median_us([&] { exp_pass<false>(x, V, scan, scale, nullptr, ws); }, reps));
  printf("block_sums        %7.1f us\n",
         median_us([&] { block_sums(ws, padded, KEEP_ALL_POSITIVE, ws.block_mass.data()); }, reps));
  exp_pass<true>(x, V, scan, scale, nullptr, ws);
  printf("bucket_range_pass %7.1f us\n",
         median_us([&] { bucket_range_pass(ws, padded, 0, 40, ws.list, true); }, reps));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "dump") return dump();
  const int reps = argc > 1 ? std::atoi(argv[1]) : 2000;
  const std::vector<Row> rows = make_rows();
  int64_t out;
  int32_t status;
  const double u = 0.37;
  struct Case {
    const char* name;
    int64_t top_k;
    double top_p, min_p;
  };
  const Case cases[] = {{"top-p 0.9", 0, 0.9, 0.0},           {"top-p 0.95", 0, 0.95, 0.0},
                        {"top-k 50 + top-p 0.9", 50, 0.9, 0.0}, {"temperature only", 0, 1.0, 0.0},
                        {"top-p 0.9, exact path", 0, 0.9, 1e-300}};
  for (const Row& row : rows) {
    for (const Case& c : cases) {
      const double us = median_us([&] {
        topk_topp_minp_sample(row.x.data(), 1, V, V, &c.top_k, &c.top_p, &c.min_p, &u, &out, &status, 1);
      }, reps);
      printf("%-12s %-22s %7.1f us  (token %ld)\n", row.name.c_str(), c.name, us, static_cast<long>(out));
    }
  }
  passes(rows[0], reps);
  passes(rows[4], reps);
  return 0;
}
