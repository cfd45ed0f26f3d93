// y = x W^T + b on x86-64 CPUs, built for products with few rows (an encode's prompt tokens)
// against large weights that must be streamed from memory. float32 with AVX2 (12-row tiles with
// AVX-512VL); bfloat16 where the build has AVX512-BF16.
//
// Why: oneDNN computes such products and then reads the next weights, without overlapping the two
// (11 rows x the MLLM's 2048 x 8192 weights: ~140 GFLOP/s, ~26 GB/s on the project's 2-core CPU).
// This kernel streams each weight panel once, prefetching it into L2 32 KiB ahead while it
// computes, and holds 12 rows in registers where the CPU has 32 vector registers (AVX-512VL):
// float32 ~180 GFLOP/s, ~33 GB/s there; bfloat16 ~1.2-1.5x oneDNN's rate at 11 rows. From ~75
// rows up it is within ~0-10 % of oneDNN, which is as fast or faster there (measurements:
// kosmosg_core/cpu_linear.py).
//
// Layout: W [N, K] is packed once into panels [ceil(N / cols), ceil(K / step), cols, step]: `cols`
// output columns per panel (zero-padded), `step` consecutive k's per column (float32: 16 columns x
// 1 k; bfloat16: 32 columns x 2 k's, the pairs vdpbf16ps multiplies), so one panel is one sequential
// stream of 64-byte lines. x is packed per call into row tiles [tiles, ceil(K / step), kTileRows,
// step], so a tile's inputs are one stream too. Loop order: for each panel (threads split the
// panels), for each 128 KiB chunk of it, for each row tile: the first tile streams the chunk from
// memory, the later ones re-read it from L2.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

// Rows per register tile: 2 vector accumulators per row. AVX-512VL gives 32 vector registers
// (24 + 2 weights + 1 broadcast); plain AVX2 has 16 (12 + 3).
#if defined(__AVX512VL__)
constexpr int kTileRows = 12;
#else
constexpr int kTileRows = 6;
#endif
constexpr int64_t kChunkBytes = 128 * 1024;    // of a panel, re-read from L2 by later tiles
constexpr int64_t kPrefetchBytes = 32 * 1024;  // ahead in the panel stream

// into L2, not L1: a stream prefetched into L1 is capped by L1's few outstanding misses
// (20 GB/s here vs 33 GB/s into L2)
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// float32: a panel step is 16 columns x 1 k (64 bytes, two ymm registers).
struct Float32Tiles {
  using Weight = float;
  using Input = float;  // one x[k][r]
  static constexpr int64_t kCols = 16, kStep = 1;

  // acc[r][0..16) += sum over the `steps` k's of x[k][r] * w[k][0..16), for R rows.
  template <int R, bool Prefetch>
  static void tile(const Input* __restrict x, const Weight* __restrict w, int64_t steps, float* __restrict acc) {
    __m256 lo[R], hi[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm256_loadu_ps(acc + r * kCols);
      hi[r] = _mm256_loadu_ps(acc + r * kCols + 8);
    }
    for (int64_t s = 0; s < steps; ++s, w += kCols, x += kTileRows) {
      if (Prefetch) prefetch_l2(reinterpret_cast<const char*>(w) + kPrefetchBytes);
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
      _mm256_storeu_ps(acc + r * kCols, lo[r]);
      _mm256_storeu_ps(acc + r * kCols + 8, hi[r]);
    }
  }
};

// bfloat16 panel shape, also known to builds without AVX512-BF16 (to check the panels they refuse)
constexpr int64_t kBFloat16Cols = 32, kBFloat16Step = 2;

#if defined(__AVX512BF16__)
// bfloat16: a panel step is 32 columns x 2 k's (128 bytes, two zmm registers); vdpbf16ps adds
// x[2s][r] * w[2s][c] + x[2s+1][r] * w[2s+1][c] to a float32 accumulator (the products of two
// bf16 values are exact in float32).
struct BFloat16Tiles {
  using Weight = uint16_t;  // bf16 bits
  using Input = uint32_t;   // the pair x[2s][r], x[2s+1][r]
  static constexpr int64_t kCols = kBFloat16Cols, kStep = kBFloat16Step;

  template <int R, bool Prefetch>
  static void tile(const Input* __restrict x, const Weight* __restrict w, int64_t steps, float* __restrict acc) {
    __m512 lo[R], hi[R];
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm512_loadu_ps(acc + r * kCols);
      hi[r] = _mm512_loadu_ps(acc + r * kCols + 16);
    }
    for (int64_t s = 0; s < steps; ++s, w += kCols * kStep, x += kTileRows) {
      if (Prefetch) {
        prefetch_l2(reinterpret_cast<const char*>(w) + kPrefetchBytes);
        prefetch_l2(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64);
      }
      const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(w), w_hi = (__m512bh)_mm512_loadu_si512(w + 32);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r]));
        lo[r] = _mm512_dpbf16_ps(lo[r], xr, w_lo);
        hi[r] = _mm512_dpbf16_ps(hi[r], xr, w_hi);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(acc + r * kCols, lo[r]);
      _mm512_storeu_ps(acc + r * kCols + 16, hi[r]);
    }
  }
};
#endif

// Tile with `rows` <= kTileRows rows: the register tile of exactly that many rows.
template <typename Tiles, bool Prefetch, int R = kTileRows>
void tile_rows(int64_t rows, const typename Tiles::Input* x, const typename Tiles::Weight* w, int64_t steps,
               float* acc) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<Tiles, Prefetch, R - 1>(rows, x, w, steps, acc);
  }
  Tiles::template tile<R, Prefetch>(x, w, steps, acc);
}

// [rows, K] -> [ceil(rows / row_block), ceil(K / step), row_block, step], zero-padded: the layout of
// the weight panels (row_block = columns per panel), packed once.
torch::Tensor to_blocks(const torch::Tensor& matrix, int64_t row_block, int64_t step) {
  const int64_t rows = matrix.size(0), k = matrix.size(1);
  const int64_t blocks = (rows + row_block - 1) / row_block, steps = (k + step - 1) / step;
  auto padded = torch::zeros({blocks * row_block, steps * step}, matrix.options());
  padded.narrow(0, 0, rows).narrow(1, 0, k).copy_(matrix);
  return padded.view({blocks, row_block, steps, step}).permute({0, 2, 1, 3}).contiguous();
}

// x [M, K] -> row tiles [ceil(M / kTileRows), steps, kTileRows, Step], zero-padded: to_blocks'
// layout, written sequentially while reading the tile's rows side by side. Per call, so it must be
// cheap: ATen's permuted copy took ~2 ms for 75 rows x 8192 float32 (~15 % of that product).
template <typename Element, int64_t Step>
torch::Tensor pack_row_tiles(const torch::Tensor& x, int64_t steps) {
  const int64_t m = x.size(0), k = x.size(1), tiles = (m + kTileRows - 1) / kTileRows;
  auto out = torch::empty({tiles, steps, kTileRows, Step}, x.options());
  const auto* src = reinterpret_cast<const Element*>(x.data_ptr());
  auto* dst = reinterpret_cast<Element*>(out.data_ptr());
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rows = std::min<int64_t>(kTileRows, m - t * kTileRows);
      const Element* tile_src = src + t * kTileRows * k;
      Element* tile_dst = dst + t * steps * kTileRows * Step;
      for (int64_t s = 0; s < steps; ++s)
        for (int64_t r = 0; r < kTileRows; ++r)
          for (int64_t j = 0; j < Step; ++j, ++tile_dst) {
            const int64_t kk = s * Step + j;
            *tile_dst = (r < rows && kk < k) ? tile_src[r * k + kk] : Element(0);
          }
    }
  });
  return out;
}

// y [M, N] float32 = x [M, K] @ panels^T + bias, x and panels in Tiles' dtype.
template <typename Tiles>
torch::Tensor linear_blocks(const torch::Tensor& x, const torch::Tensor& panels, int64_t n,
                            const c10::optional<torch::Tensor>& bias) {
  constexpr int64_t cols = Tiles::kCols, step_bytes = Tiles::kCols * Tiles::kStep * sizeof(typename Tiles::Weight);
  constexpr int64_t chunk_steps = kChunkBytes / step_bytes;
  const int64_t m = x.size(0), steps = panels.size(1), num_panels = panels.size(0);
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  const auto x_tiles = pack_row_tiles<typename Tiles::Weight, Tiles::kStep>(x, steps);  // [tiles, steps, kTileRows, step]
  auto y = torch::empty({m, n}, x.options().dtype(torch::kFloat32));
  const auto bias32 = bias.has_value() ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
  const auto* x_data = reinterpret_cast<const typename Tiles::Input*>(x_tiles.data_ptr());
  const auto* panel_data = reinterpret_cast<const typename Tiles::Weight*>(panels.data_ptr());
  const float* bias_data = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();

  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(tiles * kTileRows * cols);  // [M padded, cols]
    for (int64_t p = begin; p < end; ++p) {
      const int64_t col0 = p * cols, valid_cols = std::min(cols, n - col0);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < cols; ++c)
          acc[r * cols + c] = (bias_data && c < valid_cols) ? bias_data[col0 + c] : 0.f;
      const auto* panel = panel_data + p * steps * cols * Tiles::kStep;
      for (int64_t s0 = 0; s0 < steps; s0 += chunk_steps) {
        const int64_t chunk = std::min(chunk_steps, steps - s0);
        const auto* panel_chunk = panel + s0 * cols * Tiles::kStep;
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t rows = std::min<int64_t>(kTileRows, m - t * kTileRows);
          const auto* x_tile = x_data + (t * steps + s0) * kTileRows;
          float* acc_tile = acc.data() + t * kTileRows * cols;
          if (t == 0) tile_rows<Tiles, true>(rows, x_tile, panel_chunk, chunk, acc_tile);
          else tile_rows<Tiles, false>(rows, x_tile, panel_chunk, chunk, acc_tile);
        }
      }
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(y_data + r * n + col0, acc.data() + r * cols, valid_cols * sizeof(float));
    }
  });
  return y;
}

bool has_bfloat16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

void check_dtype(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == torch::kFloat32 ||
                                      (has_bfloat16() && t.scalar_type() == torch::kBFloat16)),
              what, ": expected a float32", has_bfloat16() ? " or bfloat16" : "", " CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
}

}  // namespace

// weight [N, K] -> panels [ceil(N / cols), ceil(K / step), cols, step] (see the layout above).
torch::Tensor pack_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_weight: expected a 2-D weight [out, in]");
  check_dtype(weight, "pack_weight");
#if defined(__AVX512BF16__)
  if (weight.scalar_type() == torch::kBFloat16) return to_blocks(weight, BFloat16Tiles::kCols, BFloat16Tiles::kStep);
#endif
  return to_blocks(weight, Float32Tiles::kCols, Float32Tiles::kStep);
}

// x [M, K] contiguous, panels from pack_weight (same dtype), bias [N] or None -> y [M, N] in x's dtype.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t out_features,
                     const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "linear: expected a 2-D input [rows, in]");
  check_dtype(x, "linear");
  TORCH_CHECK(panels.scalar_type() == x.scalar_type(), "linear: panels are ", panels.scalar_type(),
              ", the input ", x.scalar_type());
  const bool float32 = x.scalar_type() == torch::kFloat32;
  const int64_t cols = float32 ? Float32Tiles::kCols : kBFloat16Cols, step = float32 ? Float32Tiles::kStep : kBFloat16Step;
  TORCH_CHECK(panels.dim() == 4 && panels.size(2) == cols && panels.size(3) == step &&
              panels.size(1) == (x.size(1) + step - 1) / step && panels.size(0) * cols >= out_features,
              "linear: panels do not match the input");
#if defined(__AVX512BF16__)
  // accumulated in float32 and rounded once, like oneDNN's bf16 linear
  if (!float32) return linear_blocks<BFloat16Tiles>(x, panels, out_features, bias).to(torch::kBFloat16);
#endif
  return linear_blocks<Float32Tiles>(x, panels, out_features, bias);
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
  m.def("pack_weight", &pack_weight, "W [N, K] -> panels [ceil(N/cols), ceil(K/step), cols, step]");
  m.def("linear", &linear, "x [M, K] @ panels^T + bias -> [M, N]");
  m.def("tile_rows", &tile_rows_count, "rows per register tile in this build (12 with AVX-512VL, else 6)");
  m.def("has_bfloat16", &has_bfloat16, "whether this build runs bfloat16 (built with AVX512-BF16)");
  m.def("parallel_for_threads", &parallel_for_threads, "threads at::parallel_for uses for this many items");
}
