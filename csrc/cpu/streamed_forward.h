// The forward of wide, shallow layers (stems), a block of output rows at a time.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "packed_forward.h"

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// Forward of wide, shallow layers: float32 on the packed ISAs, output planes
// above packed_max_pixels with at most kStreamMaxDepth reduction steps per
// group (stems: ResNet's 3-channel 7x7 one has 147 over 112x112 pixels;
// 1x1 convs on large planes). The BLAS path unfolded whole samples (7.4 MB
// each at that stem) and read them back in a GEMM that ran at a quarter of
// the FMA peak on AMD Zen 3. Here a thread takes (sample, group, block of
// output rows) tasks: it mixes the sample's A panels once for the whole
// group (K kernels packed once per call), unfolds the block's rows into B
// panels that stay in L2, and runs the micro-kernel over them for every row
// panel, writing the output once. AMD Zen 3 (AVX2), batch 32, K = 4, in-process
// A/B, ms, BLAS path -> streamed (static conv): ResNet18's stem 225 -> 145
// (191), VGG19's conv1_1 61.6 -> 47.8 (81.1), 1x1 64->128 stride 2 at 56x56
// 9.9 -> 8.5 (15.3).
constexpr int64_t kStreamMaxDepth = 256;
// Output pixels per task (whole output rows, at least one): enough calls to
// reuse each A panel from L1, a B block of at most 256 x 192 floats in L2.
constexpr int64_t kStreamBlockPixels = 192;
// Kernel taps up to which a single sample streams rather than mixing its
// kernel for the library's conv (see dynamic_conv2d_forward_cpu).
constexpr int64_t kStreamOneSampleMaxTaps = 9;

bool use_stream_forward(const Plan& p, at::ScalarType dtype, PackedIsa isa) {
  return dtype == at::kFloat && isa != PackedIsa::kGeneric && p.pixels > packed_max_pixels(isa) &&
         p.cols <= kStreamMaxDepth;
}

void forward_streamed(PackedIsa isa, const Plan& p, const at::Tensor& x, const float* w, const float* attn,
                      float* y) {
  const ConvGeometry& g = p.g;
  const int64_t K = g.num_kernels;
  const int64_t depth = p.cols;
  const int64_t panels = (p.rows + kMR - 1) / kMR;
  const int64_t a_floats = panels * depth * kMR;  // one sample's mixed A of one group
  const int64_t block_rows = std::clamp<int64_t>(kStreamBlockPixels / g.out_w, 1, g.out_h);
  const int64_t row_blocks = (g.out_h + block_rows - 1) / block_rows;
  const int64_t block_pixels = block_rows * g.out_w;
  const int64_t pixel_panels = (block_pixels + kNR - 1) / kNR;
  const int64_t rows_floats = depth * block_pixels;
  const int64_t b_floats = pixel_panels * depth * kNR;
  const int64_t worker_floats = a_floats + rows_floats + b_floats;
  const auto buffers =
      pass_scratch<2>({g.groups * K * a_floats, at::get_num_threads() * worker_floats});
  float* kernels = buffers[0];
  parallel_tasks(g.groups, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group)
      pack_weight_rows(w + group * p.group_size, p.kernel_size, p.cols, K, 0, p.rows, 0, depth,
                       kernels + group * K * a_floats);
  });
  const MixPackedTile mix = mix_packed_tile(isa, 1);
  const int64_t rows_per_call = row_panels_per_call(isa);
  const float* x_data = x.const_data_ptr<float>();
  for_each_range(g.batch * g.groups * row_blocks, [&](int64_t begin, int64_t end) {
    float* const a_mixed = buffers[1] + at::get_thread_num() * worker_floats;
    float* const rows = a_mixed + a_floats;
    float* const b_panels = rows + rows_floats;
    int64_t mixed_for = -1;  // the (sample, group) whose A is in a_mixed
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sample_group = task / row_blocks;
      const int64_t b = sample_group / g.groups, group = sample_group % g.groups;
      if (sample_group != mixed_for) {
        mix(kernels + group * K * a_floats, panels, depth, attn + b * K, K, 0, depth, a_mixed);
        mixed_for = sample_group;
      }
      const int64_t oh0 = (task % row_blocks) * block_rows;
      const int64_t pixels = std::min(block_rows, g.out_h - oh0) * g.out_w;
      // Unfold the block's rows (group-local reduction steps), then cut them
      // into B panels: one 6-float run per panel and step.
      const float* x_sample = x_data + b * p.plane;
      for (int64_t c = group * g.group_in_channels; c < (group + 1) * g.group_in_channels; ++c)
        unfold_channel_rows<float, true>(x_sample, rows - group * depth * pixels, pixels, p, c, oh0, oh0 + pixels / g.out_w);
      for (int64_t lp = 0; lp * kNR < pixels; ++lp) {
        const int64_t valid = std::min(kNR, pixels - lp * kNR);
        float* dst = b_panels + lp * depth * kNR;
        const float* src = rows + lp * kNR;
        if (valid == kNR) {
          for (int64_t q = 0; q < depth; ++q) std::memcpy(dst + q * kNR, src + q * pixels, kNR * sizeof(float));
          continue;
        }
        for (int64_t q = 0; q < depth; ++q)
          for (int64_t j = 0; j < valid; ++j) dst[q * kNR + j] = src[q * pixels + j];
      }
      float* y_block = y + (b * g.out_channels + group * p.rows) * p.pixels + oh0 * g.out_w;
      // Row panels outside, pixels inside: a call's A panels stay in L1.
      for (int64_t panel = 0; panel < panels; panel += rows_per_call) {
        const int64_t np = std::min(rows_per_call, panels - panel);
        for (int64_t first = 0, valid; first < pixels; first += valid) {
          valid = call_pixels(isa, first, pixels);
          const MicroOut out{y_block + panel * kMR * p.pixels + first, p.pixels, std::min(np * kMR, p.rows - panel * kMR),
                             nullptr, 0, /*load_partial=*/false, /*store_partial=*/false};
          micro_kernel(isa, np, valid)(depth, a_mixed + panel * depth * kMR, depth * kMR,
                                       b_panels + first / kNR * depth * kNR, depth * kNR, out, nullptr);
        }
      }
    }
  });
}

// Packs each group's grad_out block (rows x pixels) of samples [0, n) as B panels.
void pack_grad_out(const float* go, float* packed, const Plan& p, const PackedGemm& s, int64_t n) {
  parallel_tasks(n * s.groups, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / s.groups, group = t % s.groups;
      const float* src_group = go + (i * p.g.out_channels + group * p.rows) * p.pixels;
      float* dst_group = packed + i * s.sample_b + group * s.group_b;
      for (int64_t lp = 0; lp < s.pixel_panels; ++lp) {
        const int64_t pixel = lp * kNR;
        const int64_t valid = std::min(kNR, p.pixels - pixel);
        float* dst = dst_group + packed_b_offset(s, lp, 0);
        const float* src = src_group + pixel;
        for (int64_t q = 0; q < p.rows; ++q, dst += kNR, src += p.pixels) {
          for (int64_t j = 0; j < valid; ++j) dst[j] = src[j];
          for (int64_t j = valid; j < kNR; ++j) dst[j] = 0.f;
        }
      }
    }
  });
}

// Whether grad_x runs packed (backward_data_packed, or the transposed conv's
// forward): float32 planes within the packed limit, and on AVX2 strided
// convs with kernels of several taps past it (unfolded_sample_fits_avx2),
// which BLAS took, unless BLAS runs the weight side in the same call (it
// unfolds each sample once for both). AMD Zen 3, batch 32, K = 4, grad_x
// alone (in-process medians, BLAS -> packed, ms): 64->128 56->28 3x3/2
// 48.0 -> 36.7 and 53.8 -> 41.7, ResNet's 3->64 7x7/2 stem 196.6 -> 170.9,
// but the stem's fwd+bwd (weight side on BLAS: too few weight blocks) 491
// -> 507; the step's fwd+bwd peak at 56->28 0.55 -> 0.53 of the static
// conv's. 1x1 strided convs lose (56->28 8.0 -> 18.5), stride 1 keeps the
// library.
bool use_packed_grad_x(const Plan& p, at::ScalarType dtype, PackedIsa isa, bool blas_weight_side) {
  if (use_packed(p, dtype, isa)) return true;
  const bool strided = p.g.stride[0] > 1 || p.g.stride[1] > 1;
  return dtype == at::kFloat && isa == PackedIsa::kAvx2 && strided && p.g.kernel_h * p.g.kernel_w > 1 &&
         !blas_weight_side && unfolded_sample_fits_avx2(p);
}

// grad_x of dynamic_conv2d: dcols_b = W_b^T @ dy_b through run_packed_gemm,
// folded back per chunk (written in place when the unfold is the identity).
void backward_data_packed(PackedIsa isa, const Plan& p, const at::Tensor& grad_out, const float* w, const float* attn,
                          float* grad_x) {
  const ConvGeometry& g = p.g;
  const PackedGemm s = make_packed_gemm(isa, /*m=*/p.cols, /*depth=*/p.rows, p);
  const int64_t chunk = packed_gemm_chunk(p);
  const bool prepack = use_prepacked_kernels(g.batch, chunk);
  const auto buffers = pass_scratch<4>({chunk * s.sample_b, p.identity_unfold ? 0 : chunk * p.unfolded,
                                        prepack ? prepacked_floats(s) : 0,
                                        packed_gemm_worker_floats(s, chunk, prepack)});
  float* packed_b = buffers[0];
  float* dcols_buffer = buffers[1];
  auto pack_a = [&](int64_t group, int64_t c0, int64_t nc, int64_t q0, int64_t kc, float* out) {
    pack_weight_columns(w + group * p.group_size, p.kernel_size, p.rows, p.cols, g.num_kernels, c0, nc, q0, kc,
                        out);
  };
  const float* prepacked = prepack ? prepack_kernels(s, pack_a, buffers[2]) : nullptr;
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    float* dcols = p.identity_unfold ? grad_x + b0 * p.plane : dcols_buffer;
    pack_grad_out(grad_out.const_data_ptr<float>() + b0 * g.out_channels * p.pixels, packed_b, p, s, n);
    run_packed_gemm(s, packed_b, attn + b0 * g.num_kernels, n, pack_a, prepacked, buffers[3],
                    [&](int64_t i, int64_t group) { return dcols + i * p.unfolded + group * p.cols * p.pixels; });
    if (!p.identity_unfold) {
      fold_samples(/*vector=*/true, dcols, grad_x + b0 * p.plane, p, n);
    }
  }
}

}  // namespace
}  // namespace chanflex
