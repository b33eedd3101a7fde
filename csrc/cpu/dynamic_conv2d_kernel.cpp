// CPU kernels of chanflex::dynamic_conv2d and its backward.
//
// Batch-chunked implicit formulation: for a chunk of samples the input is
// unfolded (im2col), the chunk's per-sample weights are mixed from the K
// kernels with one GEMM, and one batched GEMM per (sample, group) applies them.
// Extra memory is bounded by the chunk budget, never O(B * |W|). Half and
// bfloat16 inputs are computed in float32 and rounded once at the end.
#include "../dynamic_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

namespace chanflex {
namespace {

// Working-set budget for one chunk of samples (unfolded input, mixed weights,
// per-sample weight gradients): 64 MiB keeps the GEMMs efficient. The
// environment variable CHANFLEX_CPU_CHUNK_BYTES overrides it (tests use a tiny
// budget to cross chunk boundaries).
int64_t chunk_budget_bytes() {
  const char* env = std::getenv("CHANFLEX_CPU_CHUNK_BYTES");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && value > 0,
                "CHANFLEX_CPU_CHUNK_BYTES: expected a positive integer, got '", env, "'");
    return value;
  }
  return int64_t{64} << 20;
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

int64_t weight_row_size(const ConvGeometry& g) {  // C_in/groups * kh * kw
  return g.group_in_channels * g.kernel_h * g.kernel_w;
}

int64_t chunk_size(const ConvGeometry& g, int64_t elem_bytes) {
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t per_sample =
      (g.in_channels * g.kernel_h * g.kernel_w * pixels +  // unfolded input
       g.out_channels * weight_row_size(g) +               // mixed weight
       g.out_channels * pixels) *                          // output
      elem_bytes;
  return std::max<int64_t>(1, chunk_budget_bytes() / std::max<int64_t>(per_sample, 1));
}

// x[b0:b1] unfolded to (chunk * groups, C_in/groups * kh * kw, H_out * W_out).
at::Tensor unfold_chunk(const at::Tensor& x, const ConvGeometry& g, int64_t b0,
                        int64_t b1, at::ScalarType dtype) {
  at::Tensor cols = at::im2col(x.slice(0, b0, b1).to(dtype).contiguous(),
                               {g.kernel_h, g.kernel_w},
                               {g.dilation[0], g.dilation[1]},
                               {g.padding[0], g.padding[1]},
                               {g.stride[0], g.stride[1]});
  return cols.view({(b1 - b0) * g.groups, weight_row_size(g), g.out_h * g.out_w});
}

// sum_k attn[b, k] * weight[k] for b in [b0, b1), as
// (chunk * groups, C_out/groups, C_in/groups * kh * kw).
at::Tensor mix_chunk(const at::Tensor& attn, const at::Tensor& weight_flat,
                     const ConvGeometry& g, int64_t b0, int64_t b1) {
  return at::mm(attn.slice(0, b0, b1), weight_flat)
      .view({(b1 - b0) * g.groups, g.out_channels / g.groups, weight_row_size(g)});
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
  at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  const at::ScalarType dtype = compute_dtype(x.scalar_type());
  const at::Tensor weight_flat = weight.to(dtype).contiguous().view({g.num_kernels, -1});
  const at::Tensor attn_c = attn.to(dtype).contiguous();
  at::Tensor bias_mixed;  // (B, C_out)
  if (bias.has_value()) {
    bias_mixed = at::mm(attn_c, bias->to(dtype));
  }
  const int64_t chunk = chunk_size(g, c10::elementSize(dtype));
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t b1 = std::min(g.batch, b0 + chunk);
    const at::Tensor cols = unfold_chunk(x, g, b0, b1, dtype);
    const at::Tensor w_mixed = mix_chunk(attn_c, weight_flat, g, b0, b1);
    at::Tensor out = at::bmm(w_mixed, cols).view(
        {b1 - b0, g.out_channels, g.out_h, g.out_w});
    if (bias_mixed.defined()) {
      out.add_(bias_mixed.slice(0, b0, b1).view({b1 - b0, g.out_channels, 1, 1}));
    }
    y.slice(0, b0, b1).copy_(out);
  }
  return y;
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
  const at::Tensor weight_flat = weight.to(dtype).contiguous().view({g.num_kernels, -1});
  const at::Tensor attn_c = attn.to(dtype).contiguous();

  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = at::zeros(need_w ? weight_flat.sizes() : at::IntArrayRef{0}, opts);
  at::Tensor grad_attn = at::zeros(need_attn ? attn.sizes() : at::IntArrayRef{0}, opts);
  at::Tensor grad_bias;

  // Sum of grad_out over pixels, per sample and channel: (B, C_out).
  at::Tensor grad_sum;
  if (need_bias || (need_attn && bias.has_value())) {
    grad_sum = grad_out.to(dtype).sum({2, 3});
  }

  if (g.batch > 0 && (need_x || need_w || need_attn)) {
    const int64_t pixels = g.out_h * g.out_w;
    const int64_t chunk = chunk_size(g, c10::elementSize(dtype));
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      const int64_t b1 = std::min(g.batch, b0 + chunk);
      const int64_t n = b1 - b0;
      const at::Tensor go = grad_out.slice(0, b0, b1).to(dtype).contiguous().view(
          {n * g.groups, g.out_channels / g.groups, pixels});
      if (need_x) {
        const at::Tensor w_mixed = mix_chunk(attn_c, weight_flat, g, b0, b1);
        const at::Tensor grad_cols =
            at::bmm(w_mixed.transpose(1, 2), go)
                .view({n, g.in_channels * g.kernel_h * g.kernel_w, pixels});
        grad_x.slice(0, b0, b1).copy_(at::col2im(
            grad_cols, {g.height, g.width}, {g.kernel_h, g.kernel_w},
            {g.dilation[0], g.dilation[1]}, {g.padding[0], g.padding[1]},
            {g.stride[0], g.stride[1]}));
      }
      if (need_w || need_attn) {
        // Per-sample weight gradients of this chunk, (n, |W|): the only
        // per-sample weight-sized tensor, reduced over K right away.
        const at::Tensor cols = unfold_chunk(x, g, b0, b1, dtype);
        const at::Tensor grad_w_sample = at::bmm(go, cols.transpose(1, 2)).view({n, -1});
        if (need_w) {
          grad_w.addmm_(attn_c.slice(0, b0, b1).t(), grad_w_sample);
        }
        if (need_attn) {
          grad_attn.slice(0, b0, b1).copy_(at::mm(grad_w_sample, weight_flat.t()));
        }
      }
    }
  }
  if (need_attn && bias.has_value()) {
    grad_attn.add_(at::mm(grad_sum, bias->to(dtype).t()));
  }
  if (need_bias) {
    grad_bias = at::mm(attn_c.t(), grad_sum).to(x.scalar_type());
  } else {
    grad_bias = at::empty({0}, x.options());
  }
  if (need_w) {
    grad_w = grad_w.view(weight.sizes()).to(x.scalar_type());
  } else {
    grad_w = grad_w.to(x.scalar_type());
  }
  return {grad_x, grad_w, grad_attn.to(x.scalar_type()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(chanflex, CPU, m) {
  m.impl("dynamic_conv2d", &dynamic_conv2d_forward_cpu);
  m.impl("dynamic_conv2d_backward", &dynamic_conv2d_backward_cpu);
}

}  // namespace chanflex
