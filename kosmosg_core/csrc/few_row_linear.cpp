// y = x W^T + b for float32 on AVX2 CPUs, built for products with few rows (an encode's prompt
// tokens, the aligner's 77 queries) against large weights that must be streamed from memory.
//
// Why: oneDNN computes such products and then reads the next weights, without overlapping the two
// (11 rows x the MLLM's 2048 x 8192 weights: ~140 GFLOP/s, ~26 GB/s on the project's 2-core CPU).
// This kernel streams each weight panel once, prefetching it into L2 32 KiB ahead while it
// computes, and holds 12 rows in registers where the CPU has 32 vector registers (AVX-512VL):
// ~180 GFLOP/s, ~33 GB/s there; from ~75 rows up it is within a few % of oneDNN
// (measurements: kosmosg_core/cpu_linear.py).
//
// Layout: W [N, K] is packed once into panels [ceil(N / 16), K, 16] (16 output columns per panel,
// zero-padded), so one panel is one sequential stream of 64-byte lines, one line per k. x is
// packed per call into row tiles [tiles, K, kTileRows], so a tile's inputs are one stream too.
// Loop order: for each panel (threads split the panels), for each chunk of kDepth k's, for each
// row tile: the first tile streams the chunk from memory, the later ones re-read it from L2.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kPanelCols = 16;  // output columns per panel: two ymm registers
// Rows per register tile: 2 x kTileRows accumulators. AVX-512VL gives 32 ymm registers (24 + 2
// weights + 1 broadcast); plain AVX2 has 16 (12 + 3).
#if defined(__AVX512VL__)
constexpr int kTileRows = 12;
#else
constexpr int kTileRows = 6;
#endif
constexpr int64_t kDepth = 2048;     // k per chunk: 128 KiB of a panel, re-read from L2 by later tiles
constexpr int64_t kPrefetch = 8192;  // floats ahead in the panel stream (32 KiB)

// acc[r][0..16) += sum over k < depth of x[k][r] * w[k][0..16), for R rows. x: the tile's
// [depth, kTileRows] slice; w: the panel's [depth, 16] slice. Prefetch: this tile streams from memory.
template <int R, bool Prefetch>
inline void tile(const float* __restrict x, const float* __restrict w, int64_t depth, float* __restrict acc) {
  __m256 lo[R], hi[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_loadu_ps(acc + r * kPanelCols);
    hi[r] = _mm256_loadu_ps(acc + r * kPanelCols + 8);
  }
  for (int64_t k = 0; k < depth; ++k, w += kPanelCols, x += kTileRows) {
    // into L2, not L1: a stream prefetched into L1 is capped by L1's few outstanding misses
    // (20 GB/s here vs 33 GB/s into L2)
    if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T1);
    const __m256 w_lo = _mm256_loadu_ps(w), w_hi = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 12  // keeps the accumulators in registers (a rolled loop spills them)
    for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r);
      lo[r] = _mm256_fmadd_ps(xr, w_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(xr, w_hi, hi[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kPanelCols, lo[r]);
    _mm256_storeu_ps(acc + r * kPanelCols + 8, hi[r]);
  }
}

template <bool Prefetch, int R = kTileRows>
void tile_rows(int64_t rows, const float* x, const float* w, int64_t depth, float* acc) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<Prefetch, R - 1>(rows, x, w, depth, acc);
  }
  tile<R, Prefetch>(x, w, depth, acc);
}

}  // namespace

// weight [N, K] float32 -> panels [ceil(N / 16), K, 16], columns past N zero.
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu(),
              "pack_weight: expected a 2-D float32 CPU weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  auto padded = torch::zeros({panels * kPanelCols, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanelCols, k}).transpose(1, 2).contiguous();
}

// x [M, K] float32 contiguous, panels from pack_weight, bias [N] or None -> y [M, N].
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t out_features,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "linear: expected a 2-D float32 CPU input");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x.size(1) && panels.size(2) == kPanelCols &&
              panels.size(0) * kPanelCols >= out_features, "linear: panels do not match the input");
  const int64_t m = x.size(0), k = x.size(1), n = out_features, num_panels = panels.size(0);
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  auto x_tiles = torch::zeros({tiles * kTileRows, k}, x.options());  // -> [tiles, K, kTileRows]
  x_tiles.narrow(0, 0, m).copy_(x);
  x_tiles = x_tiles.view({tiles, kTileRows, k}).transpose(1, 2).contiguous();
  auto y = torch::empty({m, n}, x.options());
  const float* x_data = x_tiles.data_ptr<float>();
  const float* panel_data = panels.data_ptr<float>();
  const float* bias_data = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();

  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(tiles * kTileRows * kPanelCols);  // [M padded, 16]
    for (int64_t p = begin; p < end; ++p) {
      const int64_t col0 = p * kPanelCols, cols = std::min(kPanelCols, n - col0);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < kPanelCols; ++c)
          acc[r * kPanelCols + c] = (bias_data && c < cols) ? bias_data[col0 + c] : 0.f;
      const float* panel = panel_data + p * k * kPanelCols;
      for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, k - k0);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t rows = std::min<int64_t>(kTileRows, m - t * kTileRows);
          const float* x_tile = x_data + (t * k + k0) * kTileRows;
          float* acc_tile = acc.data() + t * kTileRows * kPanelCols;
          if (t == 0) tile_rows<true>(rows, x_tile, panel + k0 * kPanelCols, depth, acc_tile);
          else tile_rows<false>(rows, x_tile, panel + k0 * kPanelCols, depth, acc_tile);
        }
      }
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(y_data + r * n + col0, acc.data() + r * kPanelCols, cols * sizeof(float));
    }
  });
  return y;
}

int64_t tile_rows_count() { return kTileRows; }

// How many threads at::parallel_for used for `items` items: the build must enable OpenMP, without
// which the inlined at::parallel_for runs everything on one thread (a test checks this).
int64_t parallel_for_threads(int64_t items) {
  std::vector<int> used(at::get_num_threads(), 0);
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) { used[at::get_thread_num()] = 1; });
  return std::accumulate(used.begin(), used.end(), int64_t{0});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "W [N, K] -> panels [ceil(N/16), K, 16]");
  m.def("linear", &linear, "x [M, K] @ panels^T + bias -> [M, N]");
  m.def("tile_rows", &tile_rows_count, "rows per register tile in this build (12 with AVX-512VL, else 6)");
  m.def("parallel_for_threads", &parallel_for_threads, "threads at::parallel_for uses for this many items");
}
