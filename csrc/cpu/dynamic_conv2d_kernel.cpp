// Fused CPU kernels of chanflex::dynamic_conv2d and its backward.
//
//   y[b] = W_b @ unfold(x[b]),  W_b = sum_k attn[b,k] W_k        (per group)
//
// Per-sample weights are never materialised for the batch. Samples are taken
// in chunks whose unfolded inputs fit a working-set budget; inside a chunk the
// weight is cut into tiles (row tiles forward, column tiles backward), and each
// thread owns tiles: it reads the K kernels' tile once, mixes it for every
// sample of the chunk while it is in cache, and runs one BLAS GEMM per sample
// on the tile. Backward fuses per tile
//   dcols_b = W_b^T @ dy_b,  G_b = dy_b @ cols_b^T,
//   dW_k += attn[b,k] G_b,   dattn[b,k] += <G_b, W_k>,
// so extra memory is O(K |W| + chunk + one tile per thread), never O(B |W|).
// For float32 on AVX2 or AVX-512 CPUs and small outputs, the forward and the
// backward-data product instead mix into packed GEMM panels for their own
// micro-kernel (packed_gemm.h, packed_forward.h), and the weight side keeps
// each G_b tile in registers (weight_grad.h); wide, shallow layers
// (stems) stream their forward through the same micro-kernel a block of
// output rows at a time (streamed_forward.h); the packed forward skips the
// products of padding taps (micro_kernels.h),
// and so does grad_x where it runs as the transposed conv's packed
// forward; on AVX-512, 3x3 convs on 5x5 and 7x7 planes run both without an
// unfold, and so does the stride-2 forward from 14x14 to 7x7
// (plane_kernels.h); 3x3 stride-1 layers on 10x10 to 42x42 planes run
// their forward and grad_x as Winograd F(2x2, 3x3) (winograd.h), and on
// AVX-512, opt-in, their weight side (winograd_weight_grad.h). Large
// output planes run the library's direct conv on chunks of samples instead
// (see "Large output planes" below). Depthwise convs (one input channel per
// group) run on whole planes, with no unfold and no GEMM (depthwise.h).
// Half and bfloat16 run in float32 and are rounded once at the end, except
// on large planes where the CPU runs the library's conv in that type natively
// (see library_dtype).

// The kernel's parts, in order (each builds on the ones before it):
#include "loops.h"             // BLAS on row-major matrices, vector loops
#include "plan.h"              // shapes of a call, chunk budgets, tilings
#include "unfold.h"            // im2col / col2im
#include "packed_gemm.h"       // packed paths: ISA, scratch, gradient pool, GEMM layout
#include "micro_kernels.h"     // padding-tap classes, the micro-kernels
#include "plane_kernels.h"     // AVX-512 5x5 and 7x7 plane kernels
#include "packed_forward.h"    // the packed GEMM driver, packed forward and grad_x
#include "streamed_forward.h"  // wide, shallow layers' forward
#include "winograd.h"          // Winograd F(2x2, 3x3)
#include "weight_grad.h"       // the packed weight gradient
#include "winograd_weight_grad.h"  // Winograd F(2x2, 3x3) weight gradient
#include "depthwise.h"         // depthwise convs, on whole planes

#include <ATen/ATen.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_impl(const Plan& p, const at::Tensor& x, const T* w, const T* attn,
                  const T* bias_mixed, T* y) {
  const ConvGeometry& g = p.g;
  const int64_t K = g.num_kernels;
  const int64_t chunk = chunk_samples(p, g.batch, sizeof(T), kForwardChunkBytes);
  const Tiling tiles = make_tiling(p.rows, g.groups, /*balance=*/false);
  at::Tensor cols_buffer;
  if (!p.identity_unfold) {
    cols_buffer = at::empty({chunk * p.unfolded}, x.options());
  }
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const T* x_chunk = x.const_data_ptr<T>() + b0 * p.plane;
    const T* cols = x_chunk;
    if (!p.identity_unfold) {
      unfold_samples(x_chunk, cols_buffer.data_ptr<T>(), p, n);
      cols = cols_buffer.const_data_ptr<T>();
    }
    // Task = (group, row tile, block of samples), samples fastest: a thread's
    // consecutive tasks reuse the K-kernel tile from cache. Blocks shrink when
    // a layer has too few tiles to give every thread work.
    const int64_t threads = at::get_num_threads();
    const int64_t tile_tasks = g.groups * tiles.count;
    const int64_t block = std::clamp<int64_t>(tile_tasks * n / threads, 1, kSampleBlock);
    const int64_t blocks = (n + block - 1) / block;
    PerThread<std::vector<T>> mixed;
    for_each_range(tile_tasks * blocks, [&](int64_t begin, int64_t end) {
      std::vector<T>& w_mixed = mixed.get([&] { return std::vector<T>(block * tiles.size * p.cols); });
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i0 = (task % blocks) * block;
        const int64_t ns = std::min(block, n - i0);
        const int64_t tile = (task / blocks) % tiles.count;
        const int64_t group = task / (blocks * tiles.count);
        const int64_t r0 = tile * tiles.size;
        const int64_t nr = std::min(tiles.size, p.rows - r0);
        const int64_t tile_elems = nr * p.cols;
        mix_block(w + group * p.group_size + r0 * p.cols, p.kernel_size, p.cols,
                  attn + (b0 + i0) * K, K, ns, nr, p.cols, w_mixed.data(), p.cols, tile_elems);
        for (int64_t s = 0; s < ns; ++s) {
          const int64_t i = i0 + s;
          const int64_t b = b0 + i;
          T* y_tile = y + (b * g.out_channels + group * p.rows + r0) * p.pixels;
          const T* cols_g = cols + i * p.unfolded + group * p.cols * p.pixels;
          gemm_row_major<T>(false, false, nr, p.pixels, p.cols, w_mixed.data() + s * tile_elems,
                            p.cols, cols_g, p.pixels, T(0), y_tile, p.pixels);
          if (bias_mixed != nullptr) {
            const T* bm = bias_mixed + b * g.out_channels + group * p.rows + r0;
            for (int64_t r = 0; r < nr; ++r) {
              T* row = y_tile + r * p.pixels;
              for (int64_t j = 0; j < p.pixels; ++j) row[j] += bm[r];
            }
          }
        }
      }
    });
  }
}

// Large output planes: the library's direct convolution (oneDNN) on a chunk
// of samples at a time, as one grouped conv whose groups are the chunk's
// samples (times the layer's groups), each with its own mixed kernel. It
// beats unfold + GEMM there, and a few samples per call beat one. Measured on
// the benchmark machine (2-core AVX-512 Xeon VM, fp32, batch 32, K = 4, ms,
// the previous path -> chunks of 4, in one interleaved run):
//   forward, one sample per call before: 128@28 36.0 -> 32.7, 64@56 36.2 ->
//     34.9, 64->128@42 37.4 -> 35.6, 128@42 62.7 -> 59.3; packed or BLAS
//     path before (another run): 128->256@21 38.6 -> 36.4, 256@21 75.6 -> 75.1;
//   grad_x, unfold + GEMM before: 128@28 35.1 -> 32.1, 128->256@21 41.1 ->
//     35.9, 256@21 80.5 -> 67.2; but 256@14 30.6 vs 42.6 (packed path), and
//     strided convs lose (64->128 stride 2 at 56x56: 21.0 vs 44.9);
//   weight side, unfold + GEMM before: 128@28 43.6 -> 36.9, 64->128 stride 2
//     at 56x56 24.6 -> 21.9; but the packed path keeps 21x21 (256@21: 78.9
//     vs 95.2) and below.
// (Below 441 pixels the kernel's packed paths win every part: at 256@14 the
// library's forward 40.2 vs 34.4, its weight side 71.6 vs 37.1; on AVX-512
// they also take the forward and grad_x at 441, see packed_max_pixels.)
// Chunks of 2 to 8 samples were measured: 4 is within 5% of the best on
// every shape, 8 up to 20% slower at 56x56 and 21x21.
// Stems (few input channels per group) and 1x1 kernels (no unfold, or a cheap
// strided one) stay on the unfold path, which is faster there (a 1x1 stride-2
// 64->128 layer at 56x56: 1.60 per sample vs 0.99). Extra memory: one chunk's
// mixed kernels (and, backward, their gradients), O(chunk |W|).
constexpr int64_t kLibraryForwardMinPixels = 441;
constexpr int64_t kLibraryGradXMinPixels = 441;  // and stride 1
constexpr int64_t kLibraryWeightGradMinPixels = 784;
constexpr int64_t kLibraryMinGroupChannels = 16;
constexpr int64_t kLibraryChunkSamples = 4;
// Fewer samples per call where their input and output planes together pass
// this (large images).
constexpr int64_t kLibraryChunkBytes = int64_t{16} << 20;

bool use_library(const ConvGeometry& g, int64_t min_pixels) {
  return g.out_h * g.out_w >= min_pixels && g.in_channels / g.groups >= kLibraryMinGroupChannels &&
         g.kernel_h * g.kernel_w > 1;
}

// Whether the CPU has one of these features (keys of at::cpu::get_cpu_capabilities).
bool cpu_has_any(std::initializer_list<const char*> keys) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  for (const char* key : keys) {
    const auto it = caps.find(key);
    if (it != caps.end() && it->second.isBool() && it->second.toBool()) return true;
  }
  return false;
}

// The type the library path runs a call's convs in. Half types run in
// float32 (compute_dtype), except where the CPU has native instructions for
// them (bfloat16: AVX512-BF16 or AMX; float16: AVX512-FP16 or AMX-FP16):
// there oneDNN's conv of that type takes about half its float32 time, and
// the library path runs in it, as a half nn.Conv2d does: each chunk's mixed
// kernels rounded to the type, float32 accumulation inside the library, the
// K kernels' gradients and dattn summed in float32. On the development VM
// (Zen 4, AVX512-BF16; bfloat16, batch 32, K = 4, fwd+bwd, ms, the float32
// kernels -> the library in bfloat16, two full bench runs): 64@56 141.6 ->
// 68.1, 128@28 104.9 -> 80.0, 64@84 337.5 -> 148.4 (README "Mixed
// precision", results_cpu.md). CHANFLEX_CPU_HALF_LIBRARY=1 or 0 runs it
// always or never (tests, A/Bs).
at::ScalarType library_dtype(at::ScalarType input) {
  const at::ScalarType compute = compute_dtype(input);
  if (compute == input) return compute;
  const char* env = std::getenv("CHANFLEX_CPU_HALF_LIBRARY");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_HALF_LIBRARY: expected '0' or '1', got '", value, "'");
  if (!value.empty()) return value == "1" ? input : compute;
  static const bool native_bf16 = cpu_has_any({"avx512_bf16", "amx_bf16"});
  static const bool native_fp16 = cpu_has_any({"avx512_fp16", "amx_fp16"});
  const bool native = input == at::kBFloat16 ? native_bf16 : native_fp16;
  return native ? input : compute;
}

// Where a half type's library path (library_dtype) runs: as use_library,
// and also with few input channels (stems; bfloat16 3->64 7x7/2 at 224,
// fwd+bwd 325 -> 235 ms) and for strided convs from input planes of
// kLibraryMinPixelsHalfStrided pixels (128->256 3x3/2 at 28x28, forward 23.7
// -> 14.5 ms; from 14x14 it loses: chunks of 4 samples in bfloat16 took
// 256->512 3x3/2's fwd+bwd from 77 to 153 ms).
constexpr int64_t kLibraryMinPixelsHalfStrided = 784;

bool use_half_library(const ConvGeometry& g, int64_t min_pixels) {
  const bool strided = g.stride[0] > 1 || g.stride[1] > 1;
  return g.kernel_h * g.kernel_w > 1 &&
         (g.out_h * g.out_w >= min_pixels || (strided && g.height * g.width >= kLibraryMinPixelsHalfStrided));
}

// The forward's and grad_x's threshold: from min_pixels, but not where the
// packed paths take the plane (see packed_max_pixels). Only float32 has
// packed paths.
int64_t library_min_pixels(int64_t min_pixels, at::ScalarType dtype) {
  return dtype == at::kFloat ? std::max(min_pixels, packed_max_pixels(packed_isa()) + 1) : min_pixels;
}

// Samples per library call: kLibraryChunkSamples, fewer where they pass
// kLibraryChunkBytes (or CHANFLEX_CPU_CHUNK_BYTES, which tests use to cross
// chunk boundaries), at least one.
int64_t library_chunk(const ConvGeometry& g, size_t elem) {
  const int64_t sample_bytes =
      (g.in_channels * g.height * g.width + g.out_channels * g.out_h * g.out_w) * static_cast<int64_t>(elem);
  const int64_t fit = chunk_budget_bytes(kLibraryChunkBytes) / sample_bytes;
  return std::clamp<int64_t>(std::min(fit, kLibraryChunkSamples), 1, g.batch);
}

// The mixed kernels of samples [b0, b0 + n) as one grouped conv's weight
// (n * C_out, C_in / groups, kh, kw): attn[b0:b0+n] @ W viewed as (K, |W|).
at::Tensor mixed_kernels(const at::Tensor& attn_c, const at::Tensor& w_flat, int64_t b0, int64_t n,
                         const at::Tensor& weight) {
  return at::mm(attn_c.narrow(0, b0, n), w_flat)
      .view({n * weight.size(1), weight.size(2), weight.size(3), weight.size(4)});
}

// Samples [b0, b0 + n) of a contiguous (B, C, H, W) tensor as one sample of n * C channels.
at::Tensor as_one_sample(const at::Tensor& t, int64_t b0, int64_t n) {
  return t.narrow(0, b0, n).view({1, n * t.size(1), t.size(2), t.size(3)});
}

// dtype: the type the library's convs run in (library_dtype); attn_c and
// bias_mixed are in the compute type.
at::Tensor forward_library(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& attn_c, const at::Tensor& bias_mixed, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype) {
  const at::Tensor w_flat = weight.to(dtype).reshape({g.num_kernels, -1});
  const at::Tensor attn_mix = attn_c.to(dtype);
  const at::Tensor x_c = x.to(dtype).contiguous();
  const int64_t chunk = library_chunk(g, c10::elementSize(dtype));
  at::Tensor y;
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const c10::optional<at::Tensor> bias_n =
        bias_mixed.defined() ? c10::optional<at::Tensor>(bias_mixed.narrow(0, b0, n).reshape({-1}).to(dtype))
                             : c10::nullopt;
    at::Tensor y_n = at::conv2d(as_one_sample(x_c, b0, n), mixed_kernels(attn_mix, w_flat, b0, n, weight), bias_n,
                                stride, padding, dilation, n * groups)
                         .view({n, g.out_channels, g.out_h, g.out_w});
    if (n == g.batch) return y_n;  // one chunk: the library's output is the result
    if (!y.defined()) y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x_c.options());
    y.narrow(0, b0, n).copy_(y_n);
  }
  return y;
}

// grad_x (need_x) and the weight side (need_w, need_attn) from the library's
// convolution backward, a chunk of samples at a time: G_b, the gradient of
// sample b's mixed kernel, gives dW_k += attn[b,k] G_b and dattn[b,k] =
// <G_b, W_k> as each chunk's G is produced (summed in attn_c's compute type;
// dtype, as in forward_library, is the convs'). grad_w must be zeroed.
void backward_library(const ConvGeometry& g, const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& weight, const at::Tensor& attn_c, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                      bool need_x, bool need_w, bool need_attn, at::Tensor& grad_x, at::Tensor& grad_w,
                      at::Tensor& grad_attn) {
  const at::Tensor w_flat = weight.to(dtype).reshape({g.num_kernels, -1});
  const at::Tensor attn_mix = attn_c.to(dtype);
  // dattn's kernels in the compute type (the same tensor where the convs run in it).
  const at::Tensor w_sum = need_attn ? weight.to(attn_c.scalar_type()).reshape({g.num_kernels, -1}) : w_flat;
  const at::Tensor x_c = x.to(dtype).contiguous();
  const at::Tensor go = grad_out.to(dtype).contiguous();
  at::Tensor grad_w_flat = need_w ? grad_w.view({g.num_kernels, -1}) : at::Tensor();
  const bool need_g = need_w || need_attn;
  const int64_t chunk = library_chunk(g, c10::elementSize(dtype));
  const std::vector<int64_t> no_output_padding(2, 0);
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const auto grads = at::convolution_backward(
        as_one_sample(go, b0, n), as_one_sample(x_c, b0, n), mixed_kernels(attn_mix, w_flat, b0, n, weight),
        c10::nullopt, stride, padding, dilation, /*transposed=*/false, no_output_padding, n * groups,
        {need_x, need_g, false});
    if (need_x) grad_x.narrow(0, b0, n).copy_(std::get<0>(grads).view({n, g.in_channels, g.height, g.width}));
    if (!need_g) continue;
    const at::Tensor g_n = std::get<1>(grads).view({n, -1}).to(attn_c.scalar_type());
    if (need_w) grad_w_flat.addmm_(attn_c.narrow(0, b0, n).t(), g_n);
    if (need_attn) grad_attn.narrow(0, b0, n).copy_(at::mm(g_n, w_sum.t()));
  }
}

at::Tensor dynamic_conv2d_forward_cpu(const at::Tensor& x,
                                      const at::Tensor& weight,
                                      const at::Tensor& attn,
                                      const c10::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride,
                                      at::IntArrayRef padding,
                                      at::IntArrayRef dilation,
                                      int64_t groups) {
  const ConvGeometry g = check_dynamic_conv2d_args(x, weight, attn, bias, stride,
                                                   padding, dilation, groups);
  if (g.batch == 0) {
    return at::empty({0, g.out_channels, g.out_h, g.out_w}, x.options());
  }
  const at::ScalarType dtype = compute_dtype(x.scalar_type());
  const at::Tensor attn_c = attn.to(dtype).contiguous();
  at::Tensor bias_mixed;  // (B, C_out)
  if (bias.has_value()) {
    bias_mixed = at::mm(attn_c, bias->to(dtype));
  }
  if (use_depthwise(g)) {  // before every other path: as GEMMs they are too small for any
    const at::Tensor x_c = x.to(dtype).contiguous();
    const at::Tensor w_c = to_compute(weight, dtype, /*pooled=*/true);
    at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES(dtype, "dynamic_conv2d_depthwise", [&] {
      depthwise_forward<scalar_t>(g, x_c.const_data_ptr<scalar_t>(), w_c.const_data_ptr<scalar_t>(),
                                  attn_c.const_data_ptr<scalar_t>(),
                                  bias_mixed.defined() ? bias_mixed.const_data_ptr<scalar_t>() : nullptr,
                                  y.data_ptr<scalar_t>());
    });
    return y.to(x.scalar_type());
  }
  const at::ScalarType conv_dtype = library_dtype(x.scalar_type());
  if (conv_dtype != dtype && use_half_library(g, kLibraryForwardMinPixels)) {
    // A half type the CPU runs natively, on a large plane: the library in that type.
    return forward_library(g, x, weight, attn_c, bias_mixed, stride, padding, dilation, groups, conv_dtype);
  }
  const Plan p = make_plan(g);
  const PackedIsa isa = packed_isa();
  WinogradConv winograd_c = winograd_forward_conv(p);
  const bool winograd = plan_winograd(p, dtype, isa, winograd_c);
  // A plane shape past packed_max_pixels (56x56 -> 28x28 at stride 2) runs
  // the plane kernels too: they unfold nothing, where the library's grouped
  // conv lost (see kPlaneShapes).
  const bool plane = dtype == at::kFloat && plane_shape(g, isa, g.num_kernels) >= 0;
  const bool packed = plane || use_packed(p, dtype, isa);
  const bool streamed = !packed && use_stream_forward(p, dtype, isa);
  // One sample: the packed paths mix each kernel tile in cache as they apply
  // it, reading the K kernels once and writing no mixed kernel; elsewhere
  // (float64, no packed ISA) mix it once and run the library's conv. Batch 1,
  // fp32, AVX-512, against mix-then-conv (of the static conv, interleaved in
  // one process): 512@5 1.20 vs 1.97, 512@7 1.30 vs 1.96, 256@14 1.28 vs
  // 1.44 (AVX2 alike). Streamed stems win with 3x3 kernels (3->64@224 0.87 of
  // mix-then-conv) and lose with larger ones (7x7/2 @224 1.07-1.22, 5x5 1.02-1.10).
  const bool streamed_one = streamed && g.kernel_h * g.kernel_w <= kStreamOneSampleMaxTaps;
  const bool one_sample_library = g.batch == 1 && !packed && !streamed_one;
  if (!winograd && !plane &&
      (one_sample_library || use_library(g, library_min_pixels(kLibraryForwardMinPixels, dtype)))) {
    return forward_library(g, x, weight, attn_c, bias_mixed, stride, padding, dilation, groups, dtype)
        .to(x.scalar_type());
  }
  const at::Tensor x_c = x.to(dtype).contiguous();
  const at::Tensor w_c = to_compute(weight, dtype, /*pooled=*/true);
  at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options().dtype(dtype));
  if (winograd || packed || streamed) {
    if (winograd) {
      winograd_conv(isa, winograd_c, x_c.const_data_ptr<float>(), w_c.const_data_ptr<float>(),
                    p.kernel_size, attn_c.const_data_ptr<float>(), g.num_kernels, y.data_ptr<float>());
    } else {
      (packed ? forward_packed : forward_streamed)(isa, p, x_c, w_c.const_data_ptr<float>(),
                                                   attn_c.const_data_ptr<float>(), y.data_ptr<float>());
    }
    if (bias_mixed.defined()) {
      y.add_(bias_mixed.view({g.batch, g.out_channels, 1, 1}));
    }
    return y.to(x.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "dynamic_conv2d_forward_cpu", [&] {
    forward_impl<scalar_t>(p, x_c, w_c.const_data_ptr<scalar_t>(), attn_c.const_data_ptr<scalar_t>(),
                           bias_mixed.defined() ? bias_mixed.const_data_ptr<scalar_t>() : nullptr,
                           y.data_ptr<scalar_t>());
  });
  return y.to(x.scalar_type());
}

// ---------------------------------------------------------------------------
// Backward.

template <typename T>
void backward_impl(const Plan& p, const at::Tensor& grad_out, const at::Tensor& x, const T* w,
                   const T* attn, T* grad_x, T* grad_w, T* grad_attn) {
  const ConvGeometry& g = p.g;
  const int64_t K = g.num_kernels;
  const bool need_x = grad_x != nullptr;
  const bool need_g = grad_w != nullptr || grad_attn != nullptr;  // per-sample G_b needed
  // Each chunk packs and unpacks every weight tile once, so large weights get
  // larger chunks: up to the size of the K-fold weight gradient returned anyway.
  const int64_t chunk = chunk_samples(p, g.batch, sizeof(T), kernel_sized_budget(p, sizeof(T)));
  const int64_t threads = at::get_num_threads();
  Tiling tiles = make_tiling(p.cols, g.groups, /*balance=*/true);
  // grad_x: where tiles of whole channels still split evenly across threads,
  // each sample's unfolded gradient tile is folded into grad_x right after its
  // GEMM, while in cache, instead of a chunk of unfolded samples written to
  // memory and folded afterwards (64->128 at 56x56, stride 2: that buffer is
  // 1.8 MiB a sample, and zeroing it, BLAS's beta = 0 pass, ran at memory speed).
  const int64_t taps = g.kernel_h * g.kernel_w;
  const bool vector_fold = packed_isa() != PackedIsa::kGeneric;
  bool fold_in_tile = false;
  if (need_x && !p.identity_unfold) {
    const Tiling channel_tiles = make_channel_tiling(p.cols, taps, g.groups);
    const int64_t tasks = g.groups * channel_tiles.count;
    if (tasks % threads == 0 || tasks >= 4 * threads) {
      tiles = channel_tiles;
      fold_in_tile = true;
    }
  }
  const int64_t tile_tasks = g.groups * tiles.count;
  // Column tiles are independent, so a thread that owns a tile accumulates its
  // dW_k columns without races. Layers with fewer tiles than threads (tiny
  // weights) also split the samples into fixed slices; each (tile, slice)
  // writes its own partial dW, summed in slice order afterwards, so the
  // result does not depend on thread scheduling.
  const bool split_samples = tile_tasks < threads;
  const int64_t max_slices = split_samples ? (threads + tile_tasks - 1) / tile_tasks : 1;
  const int64_t max_tile = p.rows * tiles.size;
  const at::TensorOptions opts = grad_out.options();
  at::Tensor cols_buffer, dcols_buffer;
  if (need_g && !p.identity_unfold) cols_buffer = at::empty({chunk * p.unfolded}, opts);
  if (need_x && !p.identity_unfold && !fold_in_tile) dcols_buffer = at::empty({chunk * p.unfolded}, opts);
  // dattn partial sums per (tile, sample, kernel), reduced after the chunk.
  std::vector<double> attn_partial(grad_attn != nullptr ? tile_tasks * chunk * K : 0);
  std::vector<T> slice_dw(split_samples && grad_w != nullptr ? tile_tasks * max_slices * K * max_tile : 0);

  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const T* cols = nullptr;
    if (need_g) {
      const T* x_chunk = x.const_data_ptr<T>() + b0 * p.plane;
      cols = x_chunk;
      if (!p.identity_unfold) {
        unfold_samples(x_chunk, cols_buffer.data_ptr<T>(), p, n);
        cols = cols_buffer.const_data_ptr<T>();
      }
    }
    // With a 1x1 unit-stride conv the unfolded gradient is grad_x itself.
    T* dcols = !need_x || fold_in_tile ? nullptr
               : p.identity_unfold      ? grad_x + b0 * p.plane
                                        : dcols_buffer.data_ptr<T>();
    const T* go = grad_out.const_data_ptr<T>() + b0 * g.out_channels * p.pixels;
    std::fill(attn_partial.begin(), attn_partial.end(), 0.0);

    const int64_t slices = std::min(max_slices, n);
    // A column tile of a row-major kernel is rows x nc elements with stride
    // cols; the thread copies its K kernel tiles into one contiguous block
    // and accumulates dW there, so the per-sample passes stream contiguous
    // memory instead of touching a page per row.
    const int64_t block = kSampleBlock;
    const bool reads_w = need_x || grad_attn != nullptr;  // else w is not passed
    struct TileScratch {
      std::vector<T> w_pack, dw_pack, w_mixed, g_tile, dcols_tile;
    };
    PerThread<TileScratch> scratch;
    for_each_range(tile_tasks * slices, [&](int64_t begin, int64_t end) {
      TileScratch& tile_scratch = scratch.get([&] {
        return TileScratch{std::vector<T>(reads_w ? K * max_tile : 0), std::vector<T>(grad_w != nullptr ? K * max_tile : 0),
                           std::vector<T>(need_x ? block * max_tile : 0), std::vector<T>(need_g ? block * max_tile : 0),
                           std::vector<T>(fold_in_tile ? tiles.size * p.pixels : 0)};
      });
      std::vector<T>& w_pack = tile_scratch.w_pack;
      std::vector<T>& dw_pack = tile_scratch.dw_pack;
      std::vector<T>& w_mixed = tile_scratch.w_mixed;
      std::vector<T>& g_tile = tile_scratch.g_tile;
      std::vector<T>& dcols_tile = tile_scratch.dcols_tile;
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t tile_task = unit / slices;
        const int64_t slice = unit % slices;
        const int64_t group = tile_task / tiles.count;
        const int64_t c0 = (tile_task % tiles.count) * tiles.size;
        const int64_t nc = std::min(tiles.size, p.cols - c0);
        const int64_t w_off = group * p.group_size + c0;  // tile origin inside a kernel
        const int64_t tile_elems = p.rows * nc;
        const int64_t i_begin = slice * n / slices;
        const int64_t i_end = (slice + 1) * n / slices;
        for (int64_t k = 0; k < K && reads_w; ++k)
          for (int64_t r = 0; r < p.rows; ++r)
            std::copy_n(w + k * p.kernel_size + w_off + r * p.cols, nc,
                        w_pack.data() + k * tile_elems + r * nc);
        std::fill(dw_pack.begin(), dw_pack.end(), T(0));
        for (int64_t i0 = i_begin; i0 < i_end; i0 += block) {
          const int64_t ns = std::min(block, i_end - i0);
          if (need_x) {
            mix_block(w_pack.data(), tile_elems, nc, attn + (b0 + i0) * K, K, ns, p.rows, nc,
                      w_mixed.data(), nc, tile_elems);
          }
          for (int64_t s = 0; s < ns; ++s) {
            const int64_t i = i0 + s;
            const T* go_g = go + (i * g.out_channels + group * p.rows) * p.pixels;
            const int64_t unfolded_off = i * p.unfolded + (group * p.cols + c0) * p.pixels;
            if (need_x) {
              T* dst = fold_in_tile ? dcols_tile.data() : dcols + unfolded_off;
              gemm_row_major<T>(true, false, nc, p.pixels, p.rows, w_mixed.data() + s * tile_elems,
                                nc, go_g, p.pixels, T(0), dst, p.pixels);
              if (fold_in_tile) {
                const int64_t c_first = (group * p.cols + c0) / taps;
                T* planes = grad_x + (b0 + i) * p.plane + c_first * g.height * g.width;
                for (int64_t j = 0; j < nc / taps; ++j)
                  fold_plane_on(vector_fold, dst + j * taps * p.pixels, planes + j * g.height * g.width, p);
              }
            }
            if (need_g) {
              gemm_row_major<T>(false, true, p.rows, nc, p.pixels, go_g, p.pixels,
                                cols + unfolded_off, p.pixels, T(0), g_tile.data() + s * tile_elems, nc);
            }
          }
          if (!need_g) continue;
          // dW_k += attn[b,k] G_b and dattn[b,k] += <G_b, W_k> for the block,
          // each kernel's packed tile reused by every sample while in cache.
          for (int64_t k = 0; k < K; ++k) {
            const T* wk = reads_w ? w_pack.data() + k * tile_elems : nullptr;
            T* dwk = grad_w != nullptr ? dw_pack.data() + k * tile_elems : nullptr;
            for (int64_t s = 0; s < ns; ++s) {
              const T a = attn[(b0 + i0 + s) * K + k];
              const T* gs = g_tile.data() + s * tile_elems;
              if (grad_attn == nullptr) {
                axpy_row(dwk, gs, a, tile_elems);
                continue;
              }
              attn_partial[(tile_task * chunk + i0 + s) * K + k] +=
                  dwk != nullptr ? axpy_dot_row(dwk, wk, gs, a, tile_elems) : dot_row(gs, wk, tile_elems);
            }
          }
        }
        if (grad_w != nullptr && split_samples) {
          std::copy_n(dw_pack.data(), K * tile_elems, slice_dw.data() + unit * K * max_tile);
        } else if (grad_w != nullptr) {
          // Unpack the tile's dW; tiles are disjoint across threads.
          for (int64_t k = 0; k < K; ++k)
            for (int64_t r = 0; r < p.rows; ++r)
              add_row(grad_w + k * p.kernel_size + w_off + r * p.cols,
                      dw_pack.data() + k * tile_elems + r * nc, nc);
        }
      }
    });
    if (grad_w != nullptr && split_samples) {
      // The slices' partial dW, added in slice order (deterministic).
      for_each_range(tile_tasks * K, [&](int64_t begin, int64_t end) {
        for (int64_t task_k = begin; task_k < end; ++task_k) {
          const int64_t tile_task = task_k / K, k = task_k % K;
          const int64_t group = tile_task / tiles.count;
          const int64_t c0 = (tile_task % tiles.count) * tiles.size;
          const int64_t nc = std::min(tiles.size, p.cols - c0);
          const int64_t tile_elems = p.rows * nc;
          for (int64_t slice = 0; slice < slices; ++slice) {
            const T* part = slice_dw.data() + (tile_task * slices + slice) * K * max_tile + k * tile_elems;
            for (int64_t r = 0; r < p.rows; ++r)
              add_row(grad_w + k * p.kernel_size + group * p.group_size + c0 + r * p.cols, part + r * nc, nc);
          }
        }
      });
    }

    if (need_x && !p.identity_unfold && !fold_in_tile) {
      fold_samples(vector_fold, dcols, grad_x + b0 * p.plane, p, n);
    }
    if (grad_attn != nullptr) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < K; ++k) {
          double s = 0;
          for (int64_t t = 0; t < tile_tasks; ++t) s += attn_partial[(t * chunk + i) * K + k];
          grad_attn[(b0 + i) * K + k] = static_cast<T>(s);
        }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dynamic_conv2d_backward_cpu(const at::Tensor& grad_out,
                            const at::Tensor& x,
                            const at::Tensor& weight,
                            const at::Tensor& attn,
                            const c10::optional<at::Tensor>& bias,
                            at::IntArrayRef stride,
                            at::IntArrayRef padding,
                            at::IntArrayRef dilation,
                            int64_t groups,
                            std::array<bool, 4> output_mask) {
  const ConvGeometry g = check_dynamic_conv2d_args(x, weight, attn, bias, stride,
                                                   padding, dilation, groups);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.batch &&
                  grad_out.size(1) == g.out_channels &&
                  grad_out.size(2) == g.out_h && grad_out.size(3) == g.out_w,
              "dynamic_conv2d_backward: expected grad_out of shape (", g.batch,
              ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w, "), got ",
              grad_out.sizes());
  TORCH_CHECK(!output_mask[3] || bias.has_value(),
              "dynamic_conv2d_backward: grad of bias requested without a bias");
  const bool need_x = output_mask[0], need_w = output_mask[1],
             need_attn = output_mask[2], need_bias = output_mask[3];
  const at::ScalarType dtype = compute_dtype(x.scalar_type());
  const at::TensorOptions opts = x.options().dtype(dtype);
  const at::Tensor attn_c = attn.to(dtype).contiguous();
  // Unrequested gradients are empty tensors, each its own: outputs of a
  // custom op must not alias one another (torch.library checks it under torch.func).
  const auto unrequested = [&x] { return at::empty({0}, x.options()); };

  at::Tensor grad_x = need_x ? at::empty(x.sizes(), opts) : unrequested();
  // grad_w is zeroed by the paths that accumulate into it; the packed weight
  // gradient writes it, which saves a pass over K |W|.
  at::Tensor grad_w = need_w ? empty_pooled(weight.sizes(), opts) : unrequested();
  at::Tensor grad_attn = need_attn ? at::empty(attn.sizes(), opts) : unrequested();
  at::Tensor grad_bias = unrequested();

  // Per-sample, per-channel sums of grad_out: (B, C_out), for the bias terms.
  at::Tensor grad_sum;
  if (need_bias || (need_attn && bias.has_value())) {
    grad_sum = grad_out.to(dtype).sum({2, 3});
  }
  if (g.batch == 0) {
    // No samples: every gradient but grad_x (which is empty) is zero.
    if (need_w) grad_w.zero_();
    if (need_attn) grad_attn.zero_();
  }
  const bool depthwise = g.batch > 0 && use_depthwise(g);
  if (depthwise && (need_x || need_w || need_attn)) {
    const at::Tensor go = grad_out.to(dtype).contiguous();
    const at::Tensor w_c = (need_x || need_attn) ? to_compute(weight, dtype, /*pooled=*/false) : at::Tensor();
    const at::Tensor x_c = (need_w || need_attn) ? x.to(dtype).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(dtype, "dynamic_conv2d_backward_depthwise", [&] {
      const scalar_t* w_p = w_c.defined() ? w_c.const_data_ptr<scalar_t>() : nullptr;
      if (need_x) {
        depthwise_grad_x<scalar_t>(g, go.const_data_ptr<scalar_t>(), w_p, attn_c.const_data_ptr<scalar_t>(),
                                   grad_x.data_ptr<scalar_t>());
      }
      if (need_w || need_attn) {
        depthwise_weight_side<scalar_t>(g, go.const_data_ptr<scalar_t>(), x_c.const_data_ptr<scalar_t>(),
                                        need_attn ? w_p : nullptr, attn_c.const_data_ptr<scalar_t>(),
                                        need_w ? grad_w.data_ptr<scalar_t>() : nullptr,
                                        need_attn ? grad_attn.data_ptr<scalar_t>() : nullptr);
      }
    });
  }
  // What the depthwise path left to the other paths: nothing where it ran.
  const bool rest_x = need_x && !depthwise, rest_w = need_w && !depthwise, rest_attn = need_attn && !depthwise;
  // Large planes: grad_x and the weight side each through the library's
  // convolution backward where it wins (see use_library), the rest below.
  const Plan p = make_plan(g);
  const PackedIsa isa = packed_isa();
  WinogradConv winograd_c = winograd_grad_x_conv(p);
  const bool stride_one = g.stride[0] == 1 && g.stride[1] == 1;
  // A half type the CPU runs natively (library_dtype): large planes' library
  // path runs in it, and takes grad_x before Winograd does.
  const at::ScalarType conv_dtype = library_dtype(x.scalar_type());
  const bool half_library_x = conv_dtype != dtype && g.batch > 0 && rest_x && stride_one &&
                              use_half_library(g, kLibraryGradXMinPixels);
  const bool winograd_x = rest_x && !half_library_x && plan_winograd(p, dtype, isa, winograd_c);
  const bool library_x = half_library_x || (g.batch > 0 && rest_x && !winograd_x && stride_one &&
                                            use_library(g, library_min_pixels(kLibraryGradXMinPixels, dtype)));
  // (float32 on AVX2: where the packed weight side does not run.)
  const bool library_g = g.batch > 0 && (rest_w || rest_attn) &&
                         (conv_dtype != dtype ? use_half_library(g, kLibraryWeightGradMinPixels)
                                              : use_library(g, kLibraryWeightGradMinPixels) &&
                                                    !use_packed_weight_grad(p, dtype, isa));
  if (library_x || library_g) {
    if (rest_w && library_g) grad_w.zero_();
    backward_library(g, grad_out, x, weight, attn_c, stride, padding, dilation, groups, conv_dtype, library_x,
                     library_g && rest_w, library_g && rest_attn, grad_x, grad_w, grad_attn);
  }
  if (winograd_x) {
    winograd_conv(isa, winograd_c, grad_out.to(dtype).contiguous().const_data_ptr<float>(),
                  to_compute(weight, dtype, /*pooled=*/false).const_data_ptr<float>(), p.kernel_size,
                  attn_c.const_data_ptr<float>(), g.num_kernels, grad_x.data_ptr<float>());
  }
  const bool kernel_x = g.batch > 0 && rest_x && !library_x && !winograd_x;
  const bool kernel_w = g.batch > 0 && rest_w && !library_g;
  const bool kernel_attn = g.batch > 0 && rest_attn && !library_g;
  if (kernel_x || kernel_w || kernel_attn) {
    const at::Tensor go = grad_out.to(dtype).contiguous();
    const at::Tensor w_c = (kernel_x || kernel_attn) ? to_compute(weight, dtype, /*pooled=*/false) : at::Tensor();
    const at::Tensor x_c = (kernel_w || kernel_attn) ? x.to(dtype).contiguous() : at::Tensor();
    // Few output pixels: the packed paths (grad_x, and the weight side when
    // it has blocks for every thread; on AVX2 some larger planes); the rest
    // through BLAS.
    WinogradGradPlan winograd_plan;
    const bool winograd_g = (kernel_w || kernel_attn) && plan_winograd_weight_grad(p, dtype, isa, winograd_plan);
    const bool packed_g = (kernel_w || kernel_attn) && !winograd_g && use_packed_weight_grad(p, dtype, isa);
    const bool blas_g = (kernel_w || kernel_attn) && !packed_g && !winograd_g;
    const bool packed_x = kernel_x && use_packed_grad_x(p, dtype, isa, /*blas_weight_side=*/blas_g);
    // Stride 1 where the transposed conv's padding classes skip enough:
    // grad_x as that conv's packed forward.
    ConvGeometry transposed;
    const bool has_transposed = packed_x && transposed_conv_geometry(g, &transposed);
    const Plan t = has_transposed ? make_plan(transposed) : p;
    if (has_transposed && use_transposed_grad_x(t, dtype, isa)) {
      backward_data_transposed(isa, p, t, go.const_data_ptr<float>(), w_c.const_data_ptr<float>(),
                               attn_c.const_data_ptr<float>(), grad_x.data_ptr<float>());
    } else if (packed_x) {
      backward_data_packed(isa, p, go, w_c.const_data_ptr<float>(), attn_c.const_data_ptr<float>(),
                           grad_x.data_ptr<float>());
    }
    if (winograd_g) {
      winograd_weight_grad(winograd_plan, p, go.const_data_ptr<float>(), x_c.const_data_ptr<float>(),
                           kernel_attn ? w_c.const_data_ptr<float>() : nullptr, attn_c.const_data_ptr<float>(),
                           kernel_w ? grad_w.data_ptr<float>() : nullptr,
                           kernel_attn ? grad_attn.data_ptr<float>() : nullptr);
    }
    if (packed_g) {
      weight_grad_packed(isa, p, go, x_c, kernel_attn ? w_c.const_data_ptr<float>() : nullptr,
                         attn_c.const_data_ptr<float>(), kernel_w ? grad_w.data_ptr<float>() : nullptr,
                         kernel_attn ? grad_attn.data_ptr<float>() : nullptr);
    }
    const bool blas_x = kernel_x && !packed_x;
    if (blas_g && kernel_w) grad_w.zero_();
    if (blas_x || blas_g) {
      AT_DISPATCH_FLOATING_TYPES(dtype, "dynamic_conv2d_backward_cpu", [&] {
        backward_impl<scalar_t>(p, go, x_c, w_c.defined() ? w_c.const_data_ptr<scalar_t>() : nullptr,
                                attn_c.const_data_ptr<scalar_t>(), blas_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                                blas_g && kernel_w ? grad_w.data_ptr<scalar_t>() : nullptr,
                                blas_g && kernel_attn ? grad_attn.data_ptr<scalar_t>() : nullptr);
      });
    }
  }
  if (need_attn && bias.has_value()) {
    grad_attn.add_(at::mm(grad_sum, bias->to(dtype).t()));
  }
  if (need_bias) {
    grad_bias = at::mm(attn_c.t(), grad_sum);
  }
  const auto out_type = x.scalar_type();
  return {grad_x.to(out_type), grad_w.to(out_type), grad_attn.to(out_type),
          grad_bias.to(out_type)};
}

}  // namespace

// The instruction set the packed paths run with now (after CHANFLEX_CPU_ISA),
// for benchmark reports.
TORCH_LIBRARY_FRAGMENT(chanflex, m) {
  // Frees the calling thread's scratch buffers and the pooled weight
  // gradients no tensor holds (both are kept between calls).
  m.def("cpu_release_scratch() -> ()", []() {
    scratch_buffer() = at::Tensor();
    grad_pool().clear();
  });
  // For the tests of parallel_tasks (as CHANFLEX_CPU_SCHEDULE says): row 0
  // how often each of `tasks` tasks ran, row 1 the thread that ran it last.
  m.def("cpu_parallel_tasks_trace(int tasks) -> Tensor", [](int64_t tasks) {
    TORCH_CHECK(tasks >= 0, "cpu_parallel_tasks_trace: expected tasks >= 0, got ", tasks);
    at::Tensor trace = at::zeros({2, tasks}, at::kLong);
    int64_t* counts = trace.data_ptr<int64_t>();
    int64_t* threads = counts + tasks;
    parallel_tasks(tasks, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        __atomic_fetch_add(&counts[t], 1, __ATOMIC_RELAXED);
        threads[t] = at::get_thread_num();
      }
    });
    return trace;
  });
  m.def("cpu_packed_isa() -> str", []() -> std::string {
    switch (packed_isa()) {
      case PackedIsa::kAvx512: return "avx512";
      case PackedIsa::kAvx2: return "avx2";
      default: return "generic";
    }
  });
}

TORCH_LIBRARY_IMPL(chanflex, CPU, m) {
  m.impl("dynamic_conv2d", &dynamic_conv2d_forward_cpu);
  m.impl("dynamic_conv2d_backward", &dynamic_conv2d_backward_cpu);
}

}  // namespace chanflex
