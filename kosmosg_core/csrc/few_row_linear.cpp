// y = x W^T + b for float32 on AVX2 CPUs, built for products with few rows (an encode's prompt
// tokens, the aligner's 77 queries) against large weights that must be streamed from memory.
//
// Why: oneDNN computes such products and then reads the next weights, without overlapping the two
// (11 rows x the MLLM's 2048 x 8192 weights: ~85 GFLOP/s, ~15 GB/s on the project's 2-core CPU). This
// kernel streams each weight panel once, prefetching 32 KiB ahead while it computes, and reaches
// ~115 GFLOP/s, ~21 GB/s there; from ~75 rows up it matches oneDNN (kosmosg_core/cpu_linear.py).
//
// Layout: W [N, K] is packed once into panels [ceil(N / 16), K, 16] (16 output columns per panel,
// zero-padded), so one panel is one sequential stream of 64-byte lines, one line per k.
// Register tile: 6 rows x 16 columns = 12 of the 16 ymm registers as accumulators.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kPanelCols = 16;    // output columns per panel: two ymm registers
constexpr int64_t kTileRows = 6;      // rows per register tile
constexpr int64_t kDepth = 512;       // k per chunk: the panel slice the row tiles share (32 KiB)
constexpr int64_t kPrefetch = 8192;   // floats ahead in the panel stream (32 KiB)

// acc[r][0..16) += sum over k in [k0, k1) of x[r][k] * panel[k][0..16), for R rows.
// xt is x transposed and row-padded: [K, padded_rows]. The first row tile of each chunk prefetches.
template <int R, bool Prefetch>
inline void tile(const float* __restrict xt, int64_t padded_rows, const float* __restrict panel,
                 int64_t k0, int64_t k1, float* __restrict acc) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_loadu_ps(acc + r * kPanelCols);
    hi[r] = _mm256_loadu_ps(acc + r * kPanelCols + 8);
  }
  const float* w = panel + k0 * kPanelCols;
  const float* xk = xt + k0 * padded_rows;
  for (int64_t k = k0; k < k1; ++k, w += kPanelCols, xk += padded_rows) {
    if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
    const __m256 w_lo = _mm256_loadu_ps(w), w_hi = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6  // keeps the accumulators in registers (a rolled loop spills them)
    for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_broadcast_ss(xk + r);
      lo[r] = _mm256_fmadd_ps(xr, w_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(xr, w_hi, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc + r * kPanelCols, lo[r]);
    _mm256_storeu_ps(acc + r * kPanelCols + 8, hi[r]);
  }
}

template <bool Prefetch>
void tile_rows(int64_t rows, const float* xt, int64_t padded_rows, const float* panel, int64_t k0, int64_t k1,
               float* acc) {
  switch (rows) {
    case 6: tile<6, Prefetch>(xt, padded_rows, panel, k0, k1, acc); break;
    case 5: tile<5, Prefetch>(xt, padded_rows, panel, k0, k1, acc); break;
    case 4: tile<4, Prefetch>(xt, padded_rows, panel, k0, k1, acc); break;
    case 3: tile<3, Prefetch>(xt, padded_rows, panel, k0, k1, acc); break;
    case 2: tile<2, Prefetch>(xt, padded_rows, panel, k0, k1, acc); break;
    default: tile<1, Prefetch>(xt, padded_rows, panel, k0, k1, acc); break;
  }
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
  const int64_t padded_rows = (m + kTileRows - 1) / kTileRows * kTileRows;
  auto xt = torch::zeros({k, padded_rows}, x.options());  // [K, M padded]: one k's rows side by side
  xt.narrow(1, 0, m).copy_(x.t());
  auto y = torch::empty({m, n}, x.options());
  const float* xt_data = xt.data_ptr<float>();
  const float* panel_data = panels.data_ptr<float>();
  const float* bias_data = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();

  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(padded_rows * kPanelCols);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t col0 = p * kPanelCols, cols = std::min(kPanelCols, n - col0);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < kPanelCols; ++c)
          acc[r * kPanelCols + c] = (bias_data && c < cols) ? bias_data[col0 + c] : 0.f;
      const float* panel = panel_data + p * k * kPanelCols;
      for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
        const int64_t k1 = std::min(k, k0 + kDepth);
        for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
          const int64_t rows = std::min(kTileRows, m - r0);
          if (r0 == 0) tile_rows<true>(rows, xt_data + r0, padded_rows, panel, k0, k1, acc.data() + r0 * kPanelCols);
          else tile_rows<false>(rows, xt_data + r0, padded_rows, panel, k0, k1, acc.data() + r0 * kPanelCols);
        }
      }
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(y_data + r * n + col0, acc.data() + r * kPanelCols, cols * sizeof(float));
    }
  });
  return y;
}

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
  m.def("parallel_for_threads", &parallel_for_threads, "threads at::parallel_for uses for this many items");
}
