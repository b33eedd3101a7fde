// The packed weight gradient (dW and dattn with G_b tiles kept in registers).
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "winograd.h"

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// Packed weight gradient: float32, AVX2 or AVX-512, few output pixels.
//
// With few pixels G_b = dy_b @ cols_b^T is a rank-`pixels` product, and
// writing it out for dW_k += attn[b,k] G_b and dattn[b,k] = <G_b, W_k> to
// read it back K times costs more than computing it. Here each tile of G_b
// is accumulated in registers, one vector per weight row and run of
// columns (cols^T panels give the vectors, grad_out's rows the broadcast
// values, read in place: a packed copy of them measured no faster and
// took as much scratch as the panels), parked in a small L1 buffer with
// the tiles of up to 7 more samples, and folded from there into the K
// weight-gradient tiles and the K dattn sums, reading W_k and updating dW_k
// in place in their own row-major layout. A thread owns a
// block of weight rows x columns for the whole chunk; the block's K weight
// and dW rows stay in L2 while every sample passes, so dW needs no partial
// copies, no tile buffers to gather and scatter, and the result does not
// depend on scheduling.

// Register blocking of one call, per ISA: `samples` samples' G tiles of
// `rows` weight rows by `vecs` vectors of `lanes`
// columns (cols^T panel width): 1 x 6 x 16 on AVX2 (12 of 16 registers);
// 2 x 6 x 32 on AVX-512 (24 of 32; 16 loads per 24 vector FMAs).
struct WeightGradShape {
  int64_t lanes, rows, vecs, samples;
};

WeightGradShape weight_grad_shape(PackedIsa isa) {
  return isa == PackedIsa::kAvx512 ? WeightGradShape{16, 6, 2, 2} : WeightGradShape{8, 6, 2, 1};
}
constexpr int64_t kMaxGradRows = 6;
constexpr int64_t kMaxGradSamples = 2;
// A thread block: kGradBlockRowCalls x kGradBlockColCalls calls; at 6 x 32
// per call that is 48 x 192 weight entries, whose K weight and dW rows (295
// KB) stay in L2 while each sample's dy rows and cols^T panels for the
// block (48 and 192 unfolded rows) are read once.
constexpr int64_t kGradBlockRowCalls = 8;
constexpr int64_t kGradBlockColCalls = 6;
// Bytes of the direct weight gradient's input panels at once. The weight
// side runs beside the K-fold weight gradient it writes, which a static
// conv does not have, so the batch's panels go in slabs of input channels
// (each slab reads grad_out again; chunks of samples, as before, moved
// every block's W and dW tiles through memory once more a chunk:
// 256->512@10 weight side +14% at 4 MiB, 512@10 +31%), but with at least
// kMinSlabTasksPerThread blocks a thread in each (slabs of 6 blocks for 2
// threads lost 13-15% at 21x21). In-process on AMD Zen 4, weight side,
// paired medians against one slab of the whole batch: 512@10 0.98-1.01,
// 256->512@10 1.01, 256->512 14->7 0.97, 512@7 1.04, 512@5 1.00, 256@14
// 1.00, 128->256 28->14 1.02, 256@21 1.06, 128->256@21 1.10. The fwd+bwd
// peak of VGG19's 512@10 fell from 53.1 MiB with slabs of 4 MiB (1.56x the
// static conv's) to 50.0 MiB (1.48x), where the output, grad_x and the
// K-fold gradient alone take 48.5 (and so does grad_x's Winograd pass with
// its scratch: 50.0).
constexpr int64_t kDirectGradScratchBytes = int64_t{1} << 20;
constexpr int64_t kMinSlabTasksPerThread = 8;

// With `direct` (see use_direct_weight_grad) the cols^T panels are the
// input itself, channels-last: [group][panel][input pixel][lanes channels],
// and a thread block owns block_rows weight rows x one call's width of input
// channels, every tap (block_cols = vecs * lanes * taps weight columns).
struct WeightGradBlocks {
  WeightGradShape shape;
  bool direct;
  int64_t col_panels;              // per group: cols^T panels of shape.lanes columns (direct: channels)
  int64_t block_rows, block_cols;  // weight entries per thread block
  int64_t row_blocks, col_blocks;  // per group
  int64_t tasks;                   // groups * row_blocks * col_blocks
  int64_t sample_cols;             // floats of one sample's packed cols^T (all groups)
};

WeightGradBlocks make_weight_grad_blocks(const Plan& p, PackedIsa isa, bool direct = false) {
  WeightGradBlocks w;
  w.shape = weight_grad_shape(isa);
  w.direct = direct;
  const int64_t call_cols = w.shape.vecs * w.shape.lanes;
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  w.col_panels = direct ? (p.g.group_in_channels + call_cols - 1) / call_cols * w.shape.vecs
                        : (p.cols + w.shape.lanes - 1) / w.shape.lanes;
  w.block_rows = kGradBlockRowCalls * w.shape.rows;
  w.block_cols = direct ? call_cols * taps : kGradBlockColCalls * call_cols;
  w.row_blocks = (p.rows + w.block_rows - 1) / w.block_rows;
  w.col_blocks = (p.cols + w.block_cols - 1) / w.block_cols;
  w.tasks = p.g.groups * w.row_blocks * w.col_blocks;
  const int64_t panel_pixels = direct ? p.g.height * p.g.width : p.pixels;
  w.sample_cols = p.g.groups * w.col_panels * panel_pixels * w.shape.lanes;
  return w;
}

// The packed weight gradient needs enough blocks to keep every thread busy.
// The packed weight gradient also wins at VGG19's 21x21 stage on AVX-512
// (weight side alone, 441 pixels: 70 vs 97-107 ms at 256->256, 37 vs 41-45
// at 128->256), not at 28x28 (784 pixels: 41 vs 37 ms). On AVX2 (AMD Zen
// 3, fwd+bwd interleaved in one process, ms, BLAS -> packed) it wins there
// too for kernels of several taps (direct: 256@21 331 -> 274 and 328 ->
// 259, 128->256@21 164 -> 135, the step's peak 1.22x -> 0.90x the static
// conv's; unfolded: 3x3 unpadded 256 channels 19x19 326 -> 301, 128->256
// 18x18 130 -> 121) but not for 1x1 convs (256@21 59 -> 70), which keep
// the forward's limit. On AVX2 kernels of several taps take it on larger
// planes too, in place of the library's conv backward (use_library, from
// 784 pixels) or BLAS, while one sample's unfolded panels fit
// (unfolded_sample_fits_avx2; past it the library's chunks need no
// unfold). AMD Zen 3, batch
// 32, K = 4, the weight side alone (dW and dattn, in-process medians,
// library -> packed, ms): 128@28 130.7 -> 67.4, 64->128 56->28 71.4 ->
// 51.6, 64@56 130.0 -> 96.9, 64->128@42 135.8 -> 89.8, 128@42 266.7 ->
// 179.9, 64@84 274.9 -> 219.0 (ResNet's 3->64 7x7/2 stem keeps BLAS: its
// 4 weight blocks are too few for 2 threads). The step's fwd+bwd peak: 0.46 -> 0.55 of the static
// conv's at 56->28, 0.58 -> 0.66 at 64@56, 0.57 -> 0.66 at 64@84 (the
// unfolded chunk), 0.74 -> 0.70 at 128@28.
constexpr int64_t kPackedWeightGradMaxPixels = 512;
bool packed_weight_grad_plane(const Plan& p, PackedIsa isa) {
  if (isa == PackedIsa::kAvx2) {
    if (p.g.kernel_h * p.g.kernel_w == 1) return p.pixels <= kPackedMaxPixelsAvx2;
    if (unfolded_sample_fits_avx2(p)) return true;
  }
  return p.pixels <= kPackedWeightGradMaxPixels;
}
bool use_packed_weight_grad(const Plan& p, at::ScalarType dtype, PackedIsa isa) {
  return dtype == at::kFloat && isa != PackedIsa::kGeneric && packed_weight_grad_plane(p, isa) &&
         make_weight_grad_blocks(p, isa).tasks >= 4 * at::get_num_threads();
}

// The direct weight gradient: dW_k[o, c, t] sums dy[o, q] x[c, q + shift_t]
// over only the output pixels q whose tap t reads inside the image, a
// rectangle per tap; the unfolded panels sum the padding's zeros too (at
// 3x3, pad 1: 16% of the products on 7x7, 21% on 5x5, 9% on 14x14). Each
// call covers one tap of a run of input channels, read straight from the
// channels-last input (9x less to pack than the unfolded panels at 3x3).
// The block's W and dW tiles are transposed into and out of the block
// layout (tap-major there, channel-major in W). Default where it skips at
// least kMinSkippedProducts, on AVX2 as on AVX-512, or as
// CHANFLEX_CPU_DIRECT_WEIGHT_GRAD says ("1": wherever the packed weight
// gradient runs, "0": never; tests force it on both ISAs). AMD Zen 3
// (AVX2 only), K = 4, fwd+bwd interleaved in one process, ms, unfolded ->
// direct: 512@7 281 -> 268, 256->512 14->7 121 -> 118, 256->512@10 226 ->
// 204, 512@10 361 -> 347, 512@5 135 -> 126, 256@14 206 -> 185; and the
// step's peak falls by the unfolded chunk (512@7 70 -> 44 MB).
struct TapRectangle {
  int64_t y0, y1, x0, x1;  // output pixels [y0, y1) x [x0, x1)
  int64_t in_y0, in_x0;    // the input pixel tap t reads at (y0, x0)
};

std::vector<TapRectangle> tap_rectangles(const Plan& p) {
  const ConvGeometry& g = p.g;
  std::vector<TapRectangle> rects;
  for (int64_t ki = 0; ki < g.kernel_h; ++ki)
    for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
      TapRectangle r;
      const int64_t row_off = ki * g.dilation[0] - g.padding[0], col_off = kj * g.dilation[1] - g.padding[1];
      valid_range(row_off, g.stride[0], g.height, g.out_h, &r.y0, &r.y1);
      valid_range(col_off, g.stride[1], g.width, g.out_w, &r.x0, &r.x1);
      r.in_y0 = r.y0 * g.stride[0] + row_off;
      r.in_x0 = r.x0 * g.stride[1] + col_off;
      rects.push_back(r);
    }
  return rects;
}

bool use_direct_weight_grad(const Plan& p, PackedIsa isa) {
  const char* env = std::getenv("CHANFLEX_CPU_DIRECT_WEIGHT_GRAD");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_DIRECT_WEIGHT_GRAD: expected '0' or '1', got '", value, "'");
  if (isa == PackedIsa::kGeneric) return false;
  if (!value.empty()) return value == "1";
  int64_t kept = 0;
  for (const TapRectangle& r : tap_rectangles(p)) kept += (r.y1 - r.y0) * (r.x1 - r.x0);
  const double skipped = 1.0 - static_cast<double>(kept) / static_cast<double>(p.pixels * p.g.kernel_h * p.g.kernel_w);
  return skipped >= kMinSkippedProducts &&
         make_weight_grad_blocks(p, isa, /*direct=*/true).tasks >= 4 * at::get_num_threads();
}

// One call's operands and destination: sample s's dy rows (grad_out's
// own, dy_row_stride floats apart) at dy + s * dy_sample_stride and its
// cols^T panels (pixels x lanes floats each, cols_panel_stride apart) at
// cols + s * cols_sample_stride; the weight/dW tile origin (row-major,
// leading dimension ld, kernels kernel_stride apart). `columns` of the
// tile's vecs x lanes are valid; the rest are padding, neither read from W
// nor written to dW. The pixels come as `pixel_rows` runs of `pixels`: a
// pixel advances the cols^T pointers by cols_step floats and the dy
// pointer by one, a run ends with a jump of cols_row_skip and dy_row_skip
// more (the direct weight gradient's rectangle of the pixels whose tap
// reads inside the image; one run with cols_step = lanes for the unfolded
// panels).
struct WeightGradCall {
  int64_t pixels;
  const float* dy;
  int64_t dy_row_stride, dy_sample_stride;
  const float* cols;
  int64_t cols_panel_stride, cols_sample_stride;
  int64_t columns;
  const float* w;  // null: no dattn
  float* dw;       // null: no dW
  int64_t ld, kernel_stride;
  bool store;      // the first contribution to dW: written, not added
  int64_t pixel_rows = 1;
  int64_t cols_step = 0;  // 0: lanes (the unfolded panels)
  int64_t cols_row_skip = 0, dy_row_skip = 0;
};

// Samples whose G tiles are folded together: each call's tiles wait in an
// L1 buffer (6 KB at 8 x 6 x 32) until the fold, so every W_k and dW_k vector
// it moves through L2 serves all of them. Folding two samples at a time (as
// they left the registers) was ~18 of 49 ms of the weight side at 512@7.
constexpr int64_t kFoldSamples = 8;
// Floats of one sample's G tile in that buffer: kMaxGradRows x 2 vectors.
constexpr int64_t kFoldTileFloats = kMaxGradRows * 2 * 16;

// G_s (R x CP*W) = sample (first + s)'s R dy rows @ cols^T panels, for
// s < NS, accumulated in registers over the pixels and stored to
// g + s * kFoldTileFloats as R x CP vectors. GCC vector types: the body
// compiles to the ISA of the function it is inlined into.
template <int W, int R, int CP, int NS>
CHANFLEX_INLINE void weight_grad_accumulate_body(const WeightGradCall& c, int64_t first, float* g) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  V acc[NS][R][CP];
#pragma GCC unroll 2
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) acc[s][r][v] = V{};
  // One pointer per panel, advanced by a step (see micro_kernel_avx512).
  const float* cp[NS][CP];
  const float* dp[NS];
#pragma GCC unroll 2
  for (int s = 0; s < NS; ++s) {
    dp[s] = c.dy + (first + s) * c.dy_sample_stride;
#pragma GCC unroll 2
    for (int v = 0; v < CP; ++v)
      cp[s][v] = c.cols + (first + s) * c.cols_sample_stride + v * c.cols_panel_stride;
  }
  const int64_t cols_step = c.cols_step == 0 ? W : c.cols_step;
  for (int64_t run = 0; run < c.pixel_rows; ++run) {
    for (int64_t q = 0; q < c.pixels; ++q) {
#pragma GCC unroll 2
      for (int s = 0; s < NS; ++s) {
        V x[CP];
#pragma GCC unroll 2
        for (int v = 0; v < CP; ++v) {
          __builtin_memcpy(&x[v], cp[s][v], sizeof(V));
          cp[s][v] += cols_step;
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
          const float d = dp[s][r * c.dy_row_stride];
#pragma GCC unroll 2
          for (int v = 0; v < CP; ++v) acc[s][r][v] += d * x[v];
        }
        dp[s] += 1;
      }
    }
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s) {
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) cp[s][v] += c.cols_row_skip;
      dp[s] += c.dy_row_skip;
    }
  }
#pragma GCC unroll 2
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) __builtin_memcpy(g + s * kFoldTileFloats + (r * CP + v) * W, &acc[s][r][v], sizeof(V));
}

// For every kernel k: dw_k (= or +=) sum_s attn[s,k] G_s and dattn[s,k] +=
// <G_s, w_k> lane-wise (lanes[s][k][W], summed by the caller), for the NF
// samples' G tiles in g (`rows` x CP*W each, see weight_grad_accumulate_body)
// and attn from sample 0's row (samples num_kernels apart). Kernels outside,
// tile vectors inside: each sample's dattn chain stays in a register.
template <int W, int CP, int NF>
CHANFLEX_INLINE void weight_grad_fold_body(const WeightGradCall& c, int64_t rows, const float* g,
                                           const float* attn, int64_t num_kernels, float* lanes) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  const bool full = c.columns == CP * W;
  for (int64_t k = 0; k < num_kernels; ++k) {
    float a[NF];
#pragma GCC unroll 8
    for (int s = 0; s < NF; ++s) a[s] = attn[s * num_kernels + k];
    float* dwk = c.dw != nullptr ? c.dw + k * c.kernel_stride : nullptr;
    const float* wk = c.w != nullptr ? c.w + k * c.kernel_stride : nullptr;
    if (!full) {
      // A partial tile (the last column panel): columns past c.columns are
      // padding, neither read from W nor written to dW.
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < c.columns; ++j) {
          const int64_t at = r * c.ld + j;
          float d = (dwk == nullptr || c.store) ? 0.f : dwk[at];
          for (int s = 0; s < NF; ++s) {
            const float gs = g[s * kFoldTileFloats + r * CP * W + j];
            d += a[s] * gs;
            if (wk != nullptr) lanes[(s * num_kernels + k) * W] += gs * wk[at];
          }
          if (dwk != nullptr) dwk[at] = d;
        }
      }
      continue;
    }
    V dot[NF];
#pragma GCC unroll 8
    for (int s = 0; s < NF; ++s) dot[s] = V{};
    for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) {
        const int64_t at = r * c.ld + v * W;
        const float* gv = g + (r * CP + v) * W;
        V gs[NF];
#pragma GCC unroll 8
        for (int s = 0; s < NF; ++s) __builtin_memcpy(&gs[s], gv + s * kFoldTileFloats, sizeof(V));
        // W before the dW store: W_k and dW_k share their offsets modulo
        // 4 KiB, so a W load after the store waited on it (4K aliasing).
        V wv = V{};
        if (wk != nullptr) __builtin_memcpy(&wv, wk + at, sizeof(V));
        if (dwk != nullptr) {
          V d = V{};
          if (!c.store) __builtin_memcpy(&d, dwk + at, sizeof(V));
#pragma GCC unroll 8
          for (int s = 0; s < NF; ++s) d += a[s] * gs[s];
          __builtin_memcpy(dwk + at, &d, sizeof(V));
        }
        if (wk != nullptr) {
#pragma GCC unroll 8
          for (int s = 0; s < NF; ++s) dot[s] += gs[s] * wv;
        }
      }
    }
    if (wk != nullptr) {
#pragma GCC unroll 8
      for (int s = 0; s < NF; ++s) {
        float* out = lanes + (s * num_kernels + k) * W;
        V sum;
        __builtin_memcpy(&sum, out, sizeof(V));
        sum += dot[s];
        __builtin_memcpy(out, &sum, sizeof(V));
      }
    }
  }
}

template <int R, int NS>
__attribute__((target("avx2,fma")))
void weight_grad_accumulate_avx2(const WeightGradCall& c, int64_t first, float* g) {
  weight_grad_accumulate_body<8, R, 2, NS>(c, first, g);
}

template <int R, int NS>
__attribute__((target("avx512f,avx2,fma")))
void weight_grad_accumulate_avx512(const WeightGradCall& c, int64_t first, float* g) {
  weight_grad_accumulate_body<16, R, 2, NS>(c, first, g);
}

template <int NF>
__attribute__((target("avx2,fma")))
void weight_grad_fold_avx2(const WeightGradCall& c, int64_t rows, const float* g, const float* attn,
                           int64_t num_kernels, float* lanes) {
  weight_grad_fold_body<8, 2, NF>(c, rows, g, attn, num_kernels, lanes);
}

template <int NF>
__attribute__((target("avx512f,avx2,fma")))
void weight_grad_fold_avx512(const WeightGradCall& c, int64_t rows, const float* g, const float* attn,
                             int64_t num_kernels, float* lanes) {
  weight_grad_fold_body<16, 2, NF>(c, rows, g, attn, num_kernels, lanes);
}

// Requests the W_k and dW_k rows a call's fold will touch, before its
// accumulation: they come from L2 or beyond (each row's run is two lines,
// a page away from the next row's, too short for the hardware prefetchers),
// and the fold stalled on them.
inline void prefetch_fold_rows(const WeightGradCall& c, int64_t rows, int64_t num_kernels) {
  for (int64_t k = 0; k < num_kernels; ++k) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = k * c.kernel_stride + r * c.ld;
      for (int64_t j = 0; j < c.columns; j += 16) {
        if (c.w != nullptr) __builtin_prefetch(c.w + at + j, 0, 3);
        if (c.dw != nullptr) __builtin_prefetch(c.dw + at + j, 1, 3);
      }
    }
  }
}

using WeightGradAccumulate = void (*)(const WeightGradCall&, int64_t, float*);
// [samples - 1][valid rows of the call] (the last row panel may be short).
using WeightGradAccumulates = std::array<std::array<WeightGradAccumulate, kMaxGradRows + 1>, kMaxGradSamples>;
template <size_t... R>
constexpr WeightGradAccumulates avx512_grad_accumulates(std::index_sequence<R...>) {
  return {{{nullptr, weight_grad_accumulate_avx512<static_cast<int>(R) + 1, 1>...},
           {nullptr, weight_grad_accumulate_avx512<static_cast<int>(R) + 1, 2>...}}};
}
template <size_t... R>
constexpr WeightGradAccumulates avx2_grad_accumulates(std::index_sequence<R...>) {
  return {{{nullptr, weight_grad_accumulate_avx2<static_cast<int>(R) + 1, 1>...}, {}}};
}
constexpr WeightGradAccumulates kWeightGradAccumulatesAvx512 =
    avx512_grad_accumulates(std::make_index_sequence<kMaxGradRows>{});
constexpr WeightGradAccumulates kWeightGradAccumulatesAvx2 =
    avx2_grad_accumulates(std::make_index_sequence<kMaxGradRows>{});

WeightGradAccumulate weight_grad_accumulate(PackedIsa isa, int64_t samples, int64_t rows) {
  return (isa == PackedIsa::kAvx512 ? kWeightGradAccumulatesAvx512 : kWeightGradAccumulatesAvx2)[samples - 1][rows];
}

using WeightGradFold = void (*)(const WeightGradCall&, int64_t, const float*, const float*, int64_t, float*);
// Indexed by the number of samples folded together.
template <size_t... NF>
constexpr std::array<WeightGradFold, kFoldSamples + 1> avx512_grad_folds(std::index_sequence<NF...>) {
  return {nullptr, weight_grad_fold_avx512<static_cast<int>(NF) + 1>...};
}
template <size_t... NF>
constexpr std::array<WeightGradFold, kFoldSamples + 1> avx2_grad_folds(std::index_sequence<NF...>) {
  return {nullptr, weight_grad_fold_avx2<static_cast<int>(NF) + 1>...};
}
constexpr std::array<WeightGradFold, kFoldSamples + 1> kWeightGradFoldsAvx512 =
    avx512_grad_folds(std::make_index_sequence<kFoldSamples>{});
constexpr std::array<WeightGradFold, kFoldSamples + 1> kWeightGradFoldsAvx2 =
    avx2_grad_folds(std::make_index_sequence<kFoldSamples>{});

WeightGradFold weight_grad_fold(PackedIsa isa, int64_t samples) {
  return (isa == PackedIsa::kAvx512 ? kWeightGradFoldsAvx512 : kWeightGradFoldsAvx2)[samples];
}

// Channels [c0, c1) of one sample, unfolded as cols^T column panels:
// [group][panel][pixel][lanes unfolded rows].
void unfold_channels_transposed(const float* x, float* out, const Plan& p, const WeightGradBlocks& wb,
                                int64_t c0, int64_t c1, float* rows) {
  const ConvGeometry& g = p.g;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t width = wb.shape.lanes;
  unfold_channel_block(x, p, c0, c1, rows);
  // A full block of one group's channels, starting at a multiple of 8 of its
  // columns: its rows go 8 at a time into 8 adjacent lanes of one panel.
  static_assert(kUnfoldChannelBlock % 8 == 0, "the block's rows must come in whole transposes of 8");
  const int64_t first_col = (c0 % g.group_in_channels) * taps;
  if (c1 - c0 == kUnfoldChannelBlock && first_col % 8 == 0 && width % 8 == 0 &&
      c0 / g.group_in_channels == (c1 - 1) / g.group_in_channels) {
    const int64_t group = c0 / g.group_in_channels;
    for (int64_t r = 0; r < kUnfoldChannelBlock * taps; r += 8) {
      const int64_t col = first_col + r;
      transpose_rows8(rows + r * p.pixels, p.pixels, p.pixels,
                      out + ((group * wb.col_panels + col / width) * p.pixels) * width + col % width, width);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t group = c / g.group_in_channels;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t col = (c % g.group_in_channels) * taps + t;
      float* dst = out + ((group * wb.col_panels + col / width) * p.pixels) * width + col % width;
      const float* src = rows + ((c - c0) * taps + t) * p.pixels;
      for (int64_t q = 0; q < p.pixels; ++q) dst[q * width] = src[q];
    }
  }
}

// Channels [c0, c1) of one group of one sample as the direct weight
// gradient's input panels (see WeightGradBlocks), 8 aligned channels at a
// time through transposes, into a slab of each group's panels [first_panel,
// first_panel + panels).
void pack_input_channels_last(const float* x, float* out, const Plan& p, const WeightGradBlocks& wb, int64_t panels,
                              int64_t first_panel, int64_t c0, int64_t c1) {
  const ConvGeometry& g = p.g;
  const int64_t plane = g.height * g.width, width = wb.shape.lanes;
  for (int64_t c = c0; c < c1;) {
    const int64_t group = c / g.group_in_channels, local = c % g.group_in_channels;
    float* dst = out + (group * panels + local / width - first_panel) * plane * width + local % width;
    if (local % 8 == 0 && local + 8 <= g.group_in_channels && c + 8 <= c1) {
      transpose_rows8(x + c * plane, plane, plane, dst, width);
      c += 8;
      continue;
    }
    for (int64_t q = 0; q < plane; ++q) dst[q * width] = x[c * plane + q];
    ++c;
  }
}

// Zeroes the columns past p.cols in each group's last cols^T panel of one
// sample, so that padding lanes of G are zero (there are none when the
// panel width divides the group's columns).
void zero_padding_columns(float* out, const Plan& p, const WeightGradBlocks& wb) {
  const int64_t width = wb.shape.lanes;
  const int64_t first = p.cols - (wb.col_panels - 1) * width;
  if (first == width) return;
  for (int64_t group = 0; group < p.g.groups; ++group) {
    float* panel = out + ((group * wb.col_panels + wb.col_panels - 1) * p.pixels) * width;
    for (int64_t q = 0; q < p.pixels; ++q)
      for (int64_t j = first; j < width; ++j) panel[q * width + j] = 0.f;
  }
}

// A thread block's K weight and dW tiles, copied out of the row-major
// layout into one contiguous run per call: [call row][call column][k][rows
// x call columns]. perf put half of the in-place fold's time on its W loads
// (from beyond L2; in place, a call's 96 W and dW lines also share 4 sets of
// L1). The copies alone measured no faster (the stall moved into them), but
// they let the next block's W be prefetched during the arithmetic and dW be
// written once, with streaming stores: 512@7 weight side 56 -> 53 ms.
struct GradBlockLayout {
  int64_t row_calls, col_calls;  // calls per block
  int64_t call_cols;             // columns per call (vecs x lanes)
  int64_t num_kernels;
  int64_t floats() const { return row_calls * col_calls * num_kernels * kFoldTileFloats; }
  // Start of kernel k's tile of call (ri, ci); rows call_cols floats apart.
  int64_t tile(int64_t ri, int64_t ci, int64_t k) const {
    return ((ri * col_calls + ci) * num_kernels + k) * kFoldTileFloats;
  }
};

// The weight entries a thread block task owns: rows [r_begin, r_end) and
// columns [c_begin, c_end) of one group (starting at `origin` in a kernel).
// Row blocks fastest: a thread's consecutive blocks share their cols^T panels
// (~1 MiB at 512@7 for the chunk, kept in L2) and stream the small dy
// rows instead.
struct GradTask {
  int64_t group, r_begin, r_end, c_begin, c_end, origin;
};

GradTask grad_task(const Plan& p, const WeightGradBlocks& wb, int64_t task) {
  GradTask t;
  t.group = task / (wb.row_blocks * wb.col_blocks);
  t.r_begin = task % wb.row_blocks * wb.block_rows;
  t.c_begin = (task / wb.row_blocks) % wb.col_blocks * wb.block_cols;
  t.r_end = std::min(p.rows, t.r_begin + wb.block_rows);
  t.c_end = std::min(p.cols, t.c_begin + wb.block_cols);
  t.origin = t.group * p.group_size;
  return t;
}

// Requests lines [first, first + count) of task t's K weight rows (lines of
// 16 floats, kernel-major, then row-major) into L2: a thread fetches the next
// task's W block during this one's arithmetic, not in a stalled copy after it
// (the rows are runs of 12 lines a page apart, which the hardware
// prefetchers do not follow).
void prefetch_grad_block(const float* w, const Plan& p, const GradTask& t, int64_t num_kernels, int64_t first,
                         int64_t count) {
  const int64_t row_lines = (t.c_end - t.c_begin + 15) / 16;
  const int64_t rows = t.r_end - t.r_begin;
  const int64_t last = std::min(num_kernels * rows * row_lines, first + count);
  for (int64_t l = first; l < last; ++l) {
    const int64_t k = l / (rows * row_lines), r = l / row_lines % rows, j = l % row_lines;
    __builtin_prefetch(w + t.origin + k * p.kernel_size + (t.r_begin + r) * p.cols + t.c_begin + j * 16, 0, 2);
  }
}

// Fold groups per chunk from which the block layout pays.
constexpr int64_t kMinBlockFoldGroups = 2;

// Whether the weight side may use the block layout (see weight_grad_packed):
// on AVX-512, or as CHANFLEX_CPU_GRAD_BLOCKS says ("1": wherever a chunk has
// the fold groups, "0": never; tests use it to cover the layout on AVX2).
bool grad_block_layout_enabled(PackedIsa isa) {
  const char* env = std::getenv("CHANFLEX_CPU_GRAD_BLOCKS");
  if (env == nullptr || *env == '\0') return isa == PackedIsa::kAvx512;
  const std::string value(env);
  TORCH_CHECK(value == "0" || value == "1", "CHANFLEX_CPU_GRAD_BLOCKS: expected '0' or '1', got '", value, "'");
  return value == "1";
}

// Runs run(at, in_block, n) for every run of n contiguous block entries:
// `at` into the K row-major kernels (leading dimension ld, kernel_stride
// apart), `in_block` into the block layout, for rows [r_begin, r_end) and
// columns [c_begin, c_end) (rows_per_call rows per call).
template <typename F>
void for_each_grad_block_run(const GradBlockLayout& l, int64_t rows_per_call, int64_t ld, int64_t kernel_stride,
                             int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end, const F& run) {
  for (int64_t k = 0; k < l.num_kernels; ++k) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t ri = (r - r_begin) / rows_per_call, rr = (r - r_begin) % rows_per_call;
      for (int64_t c0 = c_begin; c0 < c_end; c0 += l.call_cols)
        run(k * kernel_stride + r * ld + c0, l.tile(ri, (c0 - c_begin) / l.call_cols, k) + rr * l.call_cols,
            std::min(l.call_cols, c_end - c0));
    }
  }
}

// dst[a * dst_ld + b] = src[b * src_ld + a] for b < rows, a < cols: 8x8
// blocks transposed in registers, the last block of a dimension of 8 or more
// overlapping the one before (rewriting equal values); one by one where a
// dimension is shorter. (Masked gathers took a quarter of the direct weight
// side at 512@5.)
__attribute__((target("avx2,fma")))
void transpose_strided(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst, int64_t dst_ld) {
  if (rows < 8 || cols < 8) {
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t a = 0; a < cols; ++a) dst[a * dst_ld + b] = src[b * src_ld + a];
    return;
  }
  for (int64_t b0 = 0; b0 < rows; b0 += 8) {
    const int64_t b = std::min(b0, rows - 8);
    for (int64_t a0 = 0; a0 < cols; a0 += 8) {
      const int64_t a = std::min(a0, cols - 8);
      __m256 m[8];
      for (int64_t i = 0; i < 8; ++i) m[i] = _mm256_loadu_ps(src + (b + i) * src_ld + a);
      transpose8x8(m);
      for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (a + i) * dst_ld + b, m[i]);
    }
  }
}

// The direct layout's block copies (see TapRectangle): a block row holds
// the task's channels at every tap, channel-major in the row-major kernels
// (column c * taps + t) and tap-major in the block (call (ri, t)'s tile
// row, lane c - first channel; taps num_kernels tiles apart).

// Kernel rows direct_block_in requests ahead of the one it transposes.
constexpr int64_t kDirectRowsAhead = 2;

// Task t's rows of the K row-major kernels (kernel_stride apart, leading
// dimension p.cols) into the block layout.
void direct_block_in(const float* kernels, const Plan& p, const GradTask& t, const GradBlockLayout& l,
                     int64_t rows_per_call, float* block) {
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  const int64_t channels = (t.c_end - t.c_begin) / taps;
  const int64_t rows = t.r_end - t.r_begin;
  for (int64_t k = 0; k < l.num_kernels; ++k)
    for (int64_t r = t.r_begin; r < t.r_end; ++r) {
      const int64_t ri = (r - t.r_begin) / rows_per_call, rr = (r - t.r_begin) % rows_per_call;
      // The row kDirectRowsAhead on: the transposes stalled on each row's
      // loads (a few lines, a page from the last; 512@7 weight side 45.9 ->
      // 43.0 ms, 512@5 27.3 -> 25.5, 256@14 42.8 -> 40.0).
      const int64_t ahead = k * rows + (r - t.r_begin) + kDirectRowsAhead;
      if (ahead < l.num_kernels * rows) {
        const float* next =
            kernels + t.origin + ahead / rows * p.kernel_size + (t.r_begin + ahead % rows) * p.cols + t.c_begin;
        for (int64_t j = 0; j < channels * taps; j += 16) __builtin_prefetch(next + j, 0, 3);
      }
      transpose_strided(kernels + t.origin + k * p.kernel_size + r * p.cols + t.c_begin, taps, channels, taps,
                        block + l.tile(ri, 0, k) + rr * l.call_cols, l.tile(0, 1, 0) - l.tile(0, 0, 0));
    }
}

// The reverse of direct_block_in, each kernel row assembled in `row` (taps x
// call_cols floats) and copied out with copy_streaming where `streaming`.
void direct_block_out(PackedIsa isa, const float* block, const Plan& p, const GradTask& t, const GradBlockLayout& l,
                      int64_t rows_per_call, bool streaming, float* row, float* kernels) {
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  const int64_t len = t.c_end - t.c_begin;
  for (int64_t k = 0; k < l.num_kernels; ++k)
    for (int64_t r = t.r_begin; r < t.r_end; ++r) {
      const int64_t ri = (r - t.r_begin) / rows_per_call, rr = (r - t.r_begin) % rows_per_call;
      float* dst = kernels + t.origin + k * p.kernel_size + r * p.cols + t.c_begin;
      transpose_strided(block + l.tile(ri, 0, k) + rr * l.call_cols, l.tile(0, 1, 0) - l.tile(0, 0, 0), taps,
                        len / taps, streaming ? row : dst, taps);
      if (streaming) copy_streaming(dst, row, len, isa);
    }
}

// grad_w (written: the first sample stores, later ones add) and/or
// grad_attn of dynamic_conv2d.
void weight_grad_packed(PackedIsa isa, const Plan& p, const at::Tensor& grad_out, const at::Tensor& x,
                        const float* w, const float* attn, float* grad_w, float* grad_attn) {
  const ConvGeometry& g = p.g;
  const int64_t K = g.num_kernels;
  const bool direct = use_direct_weight_grad(p, isa);
  const WeightGradBlocks wb = make_weight_grad_blocks(p, isa, direct);
  const WeightGradShape& shape = wb.shape;
  const int64_t call_cols = shape.vecs * shape.lanes;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t in_plane = g.height * g.width;
  const int64_t batch = std::max<int64_t>(g.batch, 1);
  // The samples of a chunk, and the column blocks of a slab: a pass packs
  // one slab's cols^T panels for the chunk, then runs the slab's tasks.
  // Unfolded: one slab of every column, chunks in the K kernels' size.
  // Direct: the panels are the input itself, channels-last, and slabs of
  // input channels for the whole batch keep them within the budget (see
  // kDirectGradScratchBytes); chunks of samples only where one column
  // block of the batch does not fit.
  int64_t chunk = chunk_samples(p, g.batch, sizeof(float), kernel_sized_budget(p, sizeof(float)));
  int64_t slab_blocks = wb.col_blocks;
  if (direct) {
    const int64_t budget = chunk_budget_bytes(kDirectGradScratchBytes);
    const int64_t block_bytes = g.groups * shape.vecs * in_plane * shape.lanes * static_cast<int64_t>(sizeof(float));
    slab_blocks = std::min(std::max<int64_t>(budget / (batch * block_bytes), 1), wb.col_blocks);
    const int64_t min_blocks = (kMinSlabTasksPerThread * at::get_num_threads() + g.groups * wb.row_blocks - 1) /
                               (g.groups * wb.row_blocks);
    slab_blocks = std::min(std::max(slab_blocks, min_blocks), wb.col_blocks);
    chunk = budget >= batch * block_bytes
                ? batch
                : std::min(batch, std::max<int64_t>(budget / block_bytes, at::get_num_threads()));
  }
  const int64_t slab_panels = direct ? slab_blocks * shape.vecs : wb.col_panels;  // per group
  const int64_t slab_sample = direct ? g.groups * slab_panels * in_plane * shape.lanes : wb.sample_cols;
  const int64_t rows_floats = direct ? 0 : unfold_block_floats(p);
  const GradBlockLayout layout{kGradBlockRowCalls, direct ? taps : kGradBlockColCalls, call_cols, K};
  const std::vector<TapRectangle> rects = direct ? tap_rectangles(p) : std::vector<TapRectangle>();
  // Per thread: the unfold's rows, then the block's W and dW tiles (direct:
  // and one kernel row of a block, copied out).
  const int64_t worker_floats = std::max(rows_floats, 2 * layout.floats() + (direct ? taps * call_cols : 0));
  const auto buffers =
      pass_scratch<2>({chunk * slab_sample, at::get_num_threads() * worker_floats}, /*fit=*/true);
  float* cols_chunk = buffers[0];
  float* workers = buffers[1];
  std::vector<double> attn_partial(grad_attn != nullptr ? wb.tasks * chunk * K : 0);
  const int64_t channel_blocks = (g.in_channels + kUnfoldChannelBlock - 1) / kUnfoldChannelBlock;
  const bool blocks_enabled = grad_block_layout_enabled(isa);  // read (and checked) whichever path runs
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const bool last_chunk = b0 + n == g.batch;
    // Where several fold groups reuse a block's W and dW tiles, they are
    // copied into the block layout (see GradBlockLayout); with one fold group
    // per chunk the copies cost more than they save (256@14, chunks of 5:
    // weight side 37 -> 49 ms). AVX-512 only: on AMD Zen 3 (AVX2, 512 KB of
    // L2, where the chunk's panels for a block do not fit next to its W and
    // dW tiles) folding in place was faster (in-process A/B, weight side,
    // block layout -> in place: 512@5 0.81-1.01x, 512@7 0.84-0.90x, 512@10
    // 0.94x, 256->512@10 0.95x).
    // The direct calls always go through the block layout (it is where
    // their tap-major tiles live).
    const bool use_blocks = direct || (blocks_enabled && n >= kMinBlockFoldGroups * kFoldSamples);
    const float* go = grad_out.const_data_ptr<float>() + b0 * g.out_channels * p.pixels;
    const float* x_chunk = x.const_data_ptr<float>() + b0 * p.plane;
    for (int64_t cb0 = 0; cb0 < wb.col_blocks; cb0 += slab_blocks) {
      const int64_t cb1 = std::min(wb.col_blocks, cb0 + slab_blocks);
      // Per sample: the slab's channel blocks' panels, and (unfolded) the
      // zeros of its last panel's padding columns. Direct: the lanes past a
      // group's last channel are left as they are; they reach only G columns
      // past the call's `columns`, which the fold never reads.
      const int64_t slab_c0 = cb0 * call_cols, slab_c1 = std::min(cb1 * call_cols, g.group_in_channels);
      const int64_t slab_channel_blocks = (slab_c1 - slab_c0 + kUnfoldChannelBlock - 1) / kUnfoldChannelBlock;
      const int64_t parts = direct ? g.groups * slab_channel_blocks : channel_blocks + 1;
      parallel_tasks(n * parts, [&](int64_t begin, int64_t end) {
        float* rows = workers + at::get_thread_num() * worker_floats;
        for (int64_t t = begin; t < end; ++t) {
          const int64_t i = t / parts, part = t % parts;
          float* out = cols_chunk + i * slab_sample;
          if (direct) {
            const int64_t c0 = part / slab_channel_blocks * g.group_in_channels + slab_c0 +
                               part % slab_channel_blocks * kUnfoldChannelBlock;
            const int64_t c1 = std::min(c0 + kUnfoldChannelBlock, c0 - c0 % g.group_in_channels + slab_c1);
            pack_input_channels_last(x_chunk + i * p.plane, out, p, wb, slab_panels, cb0 * shape.vecs, c0, c1);
          } else if (part == channel_blocks) {
            zero_padding_columns(out, p, wb);
          } else {
            const int64_t c0 = part * kUnfoldChannelBlock;
            unfold_channels_transposed(x_chunk + i * p.plane, out, p, wb, c0,
                                       std::min(g.in_channels, c0 + kUnfoldChannelBlock), rows);
          }
        }
      });
      // Slab task l: row blocks fastest, then the slab's column blocks, then
      // groups; its global index as grad_task takes it.
      const int64_t slab_width = cb1 - cb0;
      const auto slab_task = [&](int64_t l) {
        const int64_t in_group = l % (wb.row_blocks * slab_width);
        return (l / (wb.row_blocks * slab_width) * wb.col_blocks + cb0 + in_group / wb.row_blocks) * wb.row_blocks +
               in_group % wb.row_blocks;
      };
      const int64_t slab_tasks = g.groups * wb.row_blocks * slab_width;
      parallel_tasks(slab_tasks, [&](int64_t begin, int64_t end) {
        std::vector<float> lanes(kFoldSamples * K * shape.lanes);
        alignas(64) float g_tiles[kFoldSamples * kFoldTileFloats];
        float* const w_block = workers + at::get_thread_num() * worker_floats;
        float* const dw_block = w_block + layout.floats();
        for (int64_t l = begin; l < end; ++l) {
          const int64_t task = slab_task(l);
          const GradTask t = grad_task(p, wb, task);
          const int64_t group = t.group;
          const auto block_runs = [&](const auto& run) {
            for_each_grad_block_run(layout, shape.rows, p.cols, p.kernel_size, t.r_begin, t.r_end, t.c_begin, t.c_end,
                                    run);
          };
          if (direct && grad_attn != nullptr) direct_block_in(w, p, t, layout, shape.rows, w_block);
          if (!direct && use_blocks && grad_attn != nullptr)
            block_runs([&](int64_t at, int64_t in_block, int64_t len) {
              std::memcpy(w_block + in_block, w + t.origin + at, len * sizeof(float));
            });
          // A later chunk adds to what the earlier ones left in grad_w.
          if (direct && grad_w != nullptr && b0 > 0)
            direct_block_in(grad_w, p, t, layout, shape.rows, dw_block);
          if (!direct && use_blocks && grad_w != nullptr && b0 > 0)
            block_runs([&](int64_t at, int64_t in_block, int64_t len) {
              std::memcpy(dw_block + in_block, grad_w + t.origin + at, len * sizeof(float));
            });
          // Calls per row of calls: one per tap (direct) or per call_cols columns.
          const int64_t col_calls = direct ? taps : (t.c_end - t.c_begin + call_cols - 1) / call_cols;
          // Direct: the task's channels, and its first input panel in a group's.
          const int64_t channels = direct ? (t.c_end - t.c_begin) / taps : 0;
          const int64_t first_panel = direct ? t.c_begin / taps / shape.lanes - cb0 * shape.vecs : 0;
          // The next task's W lines, spread evenly over this task's calls.
          const bool prefetch_next = use_blocks && grad_attn != nullptr && l + 1 < slab_tasks;
          const GradTask next = prefetch_next ? grad_task(p, wb, slab_task(l + 1)) : t;
          const int64_t next_lines = K * (next.r_end - next.r_begin) * ((next.c_end - next.c_begin + 15) / 16);
          const int64_t task_calls = (n + kFoldSamples - 1) / kFoldSamples *
                                     ((t.r_end - t.r_begin + shape.rows - 1) / shape.rows) * col_calls;
          const int64_t lines_per_call = (next_lines + task_calls - 1) / task_calls;
          int64_t call_index = 0;
          for (int64_t i = 0, ns; i < n; i += ns) {
            ns = std::min(kFoldSamples, n - i);
            const float* dy_group = go + (i * g.out_channels + group * p.rows) * p.pixels;
            const float* cols_group = cols_chunk + i * slab_sample +
                                      group * slab_panels * (direct ? in_plane : p.pixels) * shape.lanes;
            std::fill(lanes.begin(), lanes.end(), 0.f);
            const WeightGradFold fold = weight_grad_fold(isa, ns);
            for (int64_t r0 = t.r_begin; r0 < t.r_end; r0 += shape.rows) {
              const int64_t rows = std::min(shape.rows, t.r_end - r0);
              const float* dy_rows = dy_group + r0 * p.pixels;
              for (int64_t ci = 0; ci < col_calls; ++ci) {
                const int64_t c0 = t.c_begin + ci * call_cols;
                // The call's W_k and dW_k tiles: in the block, or in place.
                const int64_t at = use_blocks ? layout.tile((r0 - t.r_begin) / shape.rows, ci, 0)
                                              : t.origin + r0 * p.cols + c0;
                const float* w_tiles = use_blocks ? w_block : w;
                float* dw_tiles = use_blocks ? dw_block : grad_w;
                WeightGradCall call{p.pixels,
                                    dy_rows,
                                    p.pixels,
                                    g.out_channels * p.pixels,
                                    cols_group + (c0 / shape.lanes) * p.pixels * shape.lanes,
                                    p.pixels * shape.lanes,
                                    slab_sample,
                                    std::min(call_cols, p.cols - c0),
                                    grad_attn != nullptr ? w_tiles + at : nullptr,
                                    grad_w != nullptr ? dw_tiles + at : nullptr,
                                    use_blocks ? call_cols : p.cols,
                                    use_blocks ? kFoldTileFloats : p.kernel_size,
                                    /*store=*/b0 == 0 && i == 0};
                if (direct) {
                  // Tap ci's rectangle of output pixels, and the input pixels it reads.
                  const TapRectangle& rc = rects[ci];
                  const int64_t width = rc.x1 - rc.x0;
                  call.pixels = width;
                  call.pixel_rows = width > 0 ? rc.y1 - rc.y0 : 0;
                  call.dy = dy_rows + rc.y0 * g.out_w + rc.x0;
                  call.dy_row_skip = g.out_w - width;
                  call.cols = cols_group + (first_panel * in_plane + rc.in_y0 * g.width + rc.in_x0) * shape.lanes;
                  call.cols_panel_stride = in_plane * shape.lanes;
                  call.cols_step = g.stride[1] * shape.lanes;
                  call.cols_row_skip = (g.stride[0] * g.width - width * g.stride[1]) * shape.lanes;
                  call.columns = channels;
                }
                prefetch_fold_rows(call, rows, K);
                if (prefetch_next) prefetch_grad_block(w, p, next, K, call_index++ * lines_per_call, lines_per_call);
                for (int64_t s0 = 0, together; s0 < ns; s0 += together) {
                  together = std::min(shape.samples, ns - s0);
                  weight_grad_accumulate(isa, together, rows)(call, s0, g_tiles + s0 * kFoldTileFloats);
                }
                fold(call, rows, g_tiles, attn + (b0 + i) * K, K, lanes.data());
              }
            }
            // The block's share of dattn[b0 + i + s, k], lanes summed in double.
            for (int64_t sk = 0; sk < ns * K && grad_attn != nullptr; ++sk) {
              double sum = 0;
              for (int64_t l = 0; l < shape.lanes; ++l) sum += lanes[sk * shape.lanes + l];
              attn_partial[(task * chunk + i) * K + sk] = sum;
            }
          }
          if (direct && grad_w != nullptr)
            direct_block_out(isa, dw_block, p, t, layout, shape.rows, last_chunk, dw_block + layout.floats(), grad_w);
          if (!direct && use_blocks && grad_w != nullptr)
            block_runs([&](int64_t at, int64_t in_block, int64_t len) {
              if (last_chunk)
                copy_streaming(grad_w + t.origin + at, dw_block + in_block, len, isa);
              else
                std::memcpy(grad_w + t.origin + at, dw_block + in_block, len * sizeof(float));
            });
        }
        _mm_sfence();
      });
    }
    if (grad_attn != nullptr) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < K; ++k) {
          double s = 0;
          for (int64_t t = 0; t < wb.tasks; ++t) s += attn_partial[(t * chunk + i) * K + k];
          grad_attn[(b0 + i) * K + k] = static_cast<float>(s);
        }
    }
  }
}

}  // namespace
}  // namespace chanflex
