// The host side of the CUDA kernels: checks, allocations, the bias terms and
// the final reductions around the block programs. Templated on a Runner that
// either launches a program on the GPU (dynamic_conv2d_kernel.cu) or runs its
// blocks one by one on the host (host_emulation.cpp), so both run this code.
//
// Runner: template <class Program, class... Extra>
//         void run(int64_t blocks, const Geometry&, const Tensors<T, A>&);
//         int64_t resident_blocks() const;  // blocks that keep the device busy
//         bool poison_outputs() const;      // fill outputs with NaN first (tests:
//                                           // an element no block writes shows)
#pragma once

#include "../dynamic_conv2d.h"
#include "block_programs.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <cmath>
#include <tuple>

namespace chanflex {
namespace cuda {

inline Geometry to_geometry(const ConvGeometry& c) {
  Geometry g;
  g.batch = c.batch;
  g.in_channels = c.in_channels;
  g.height = c.height;
  g.width = c.width;
  g.num_kernels = c.num_kernels;
  g.out_channels = c.out_channels;
  g.group_in = c.group_in_channels;
  g.group_out = c.out_channels / c.groups;
  g.kernel_h = c.kernel_h;
  g.kernel_w = c.kernel_w;
  g.groups = c.groups;
  g.out_h = c.out_h;
  g.out_w = c.out_w;
  g.stride_h = c.stride[0];
  g.stride_w = c.stride[1];
  g.pad_h = c.padding[0];
  g.pad_w = c.padding[1];
  g.dil_h = c.dilation[0];
  g.dil_w = c.dilation[1];
  return g;
}

template <typename T, typename A>
Tensors<T, A> no_tensors() {
  return Tensors<T, A>{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, false, 1};
}

template <class Runner>
at::Tensor forward(Runner& runner, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& attn_in,
                   const c10::optional<at::Tensor>& bias_in, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry c = check_dynamic_conv2d_args(x_in, weight_in, attn_in, bias_in, stride, padding, dilation, groups);
  const Geometry g = to_geometry(c);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), attn = attn_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
  if (y.numel() == 0) return y;
  if (runner.poison_outputs()) y.fill_(NAN);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_conv2d_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    Tensors<scalar_t, A> p = no_tensors<scalar_t, A>();
    p.x = x.const_data_ptr<scalar_t>();
    p.weight = weight.const_data_ptr<scalar_t>();
    p.attn = attn.const_data_ptr<scalar_t>();
    p.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    p.y = y.mutable_data_ptr<scalar_t>();
    runner.template run<ForwardProgram<scalar_t, A>>(ForwardProgram<scalar_t, A>::blocks(g), g, p);
  });
  return y;
}

// Blocks of the weight program that share one tile's samples: enough blocks
// to fill the device, at most ceil(batch / 4) of them. Each split stores its
// own dW slab, so the extra memory is below resident_blocks weight tiles per
// kernel ((splits - 1) * tiles < resident_blocks).
inline int64_t weight_batch_splits(int64_t tiles, int64_t batch, int64_t resident_blocks) {
  if (batch <= 1 || tiles <= 0) return 1;
  const int64_t wanted = ceil_div(resident_blocks, tiles);
  const int64_t most = ceil_div(batch, 4);
  const int64_t splits = wanted < most ? wanted : most;
  if (splits <= 1) return 1;
  // Slices of ceil(batch / splits) samples; as many as it takes to cover the batch, so that no split
  // is left empty (25 samples in 6 splits are 5 slices of 5).
  return ceil_div(batch, ceil_div(batch, splits));
}

template <class Runner>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    Runner& runner, const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& attn_in, const c10::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 4> output_mask) {
  const ConvGeometry c = check_dynamic_conv2d_args(x_in, weight_in, attn_in, bias_in, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == c.batch && grad_out_in.size(1) == c.out_channels &&
                  grad_out_in.size(2) == c.out_h && grad_out_in.size(3) == c.out_w,
              "dynamic_conv2d_backward: expected grad_out of shape (", c.batch, ", ", c.out_channels, ", ", c.out_h,
              ", ", c.out_w, "), got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == x_in.scalar_type() && grad_out_in.device() == x_in.device(),
              "dynamic_conv2d_backward: expected grad_out with dtype ", x_in.scalar_type(), " on ", x_in.device(),
              ", got ", grad_out_in.scalar_type(), " on ", grad_out_in.device());
  TORCH_CHECK(!output_mask[3] || bias_in.has_value(), "dynamic_conv2d_backward: grad of bias requested without a bias");
  const Geometry g = to_geometry(c);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_attn = output_mask[2], need_bias = output_mask[3];
  const at::Tensor grad_out = grad_out_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous(),
                   attn = attn_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc = x.options().dtype(acc_type);
  // Unrequested gradients are empty tensors, each its own (outputs of a custom op must not alias).
  const auto unrequested = [&x] { return at::empty({0}, x.options()); };

  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options()) : unrequested();
  if (need_x && runner.poison_outputs()) grad_x.fill_(NAN);
  at::Tensor grad_w_slabs, grad_attn_part;
  int64_t splits = 1;
  if (need_w || need_attn) {
    const int64_t tiles = GradWeightProgram<float, float>::tiles(g);  // the tiling is the same for every dtype
    splits = weight_batch_splits(tiles, g.batch, runner.resident_blocks());
    if (need_w) {
      // Every (split, kernel, o, q) entry is stored by one block, which runs only for batch > 0.
      grad_w_slabs = at::empty({splits, g.num_kernels, g.out_channels, g.weight_cols()}, acc);
      if (g.batch == 0) {
        grad_w_slabs.zero_();
      } else if (runner.poison_outputs()) {
        grad_w_slabs.fill_(NAN);
      }
    }
    // Every (tile, sample, kernel) entry is written by one block.
    grad_attn_part = at::empty({tiles, g.batch, g.num_kernels}, acc).fill_(runner.poison_outputs() ? NAN : 0.0);
  }
  if (g.batch > 0 && (need_x || need_w || need_attn)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_conv2d_backward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      Tensors<scalar_t, A> p = no_tensors<scalar_t, A>();
      p.x = x.const_data_ptr<scalar_t>();
      p.weight = weight.const_data_ptr<scalar_t>();
      p.attn = attn.const_data_ptr<scalar_t>();
      p.grad_out = grad_out.const_data_ptr<scalar_t>();
      if (need_x) {
        p.grad_x = grad_x.mutable_data_ptr<scalar_t>();
        runner.template run<GradInputProgram<scalar_t, A>>(GradInputProgram<scalar_t, A>::blocks(g), g, p);
      }
      if (need_w || need_attn) {
        p.grad_weight = need_w ? grad_w_slabs.mutable_data_ptr<A>() : nullptr;
        p.grad_attn_part = grad_attn_part.mutable_data_ptr<A>();
        p.want_grad_weight = need_w;
        p.batch_splits = splits;
        runner.template run<GradWeightProgram<scalar_t, A>>(GradWeightProgram<scalar_t, A>::blocks(g, splits), g, p);
      }
    });
  }

  at::Tensor grad_w = unrequested();
  if (need_w) {
    // at::sum reduces in a fixed order on every device: dW is the same bits run after run.
    const at::Tensor summed = splits == 1 ? grad_w_slabs : grad_w_slabs.sum(0);
    grad_w = summed.view(weight.sizes()).to(x.scalar_type());
  }
  at::Tensor grad_attn_acc = need_attn ? grad_attn_part.sum(0) : at::Tensor();
  at::Tensor grad_bias = unrequested();
  if (bias.defined() && (need_bias || need_attn)) {
    // Bias terms: grad_bias[k, o] = sum_b attn[b, k] s[b, o], grad_attn[b, k] += s[b, o] . bias[k, o],
    // with s[b, o] = sum over the pixels of grad_out[b, o].
    const at::Tensor sums = grad_out.to(acc_type).sum({2, 3});
    if (need_bias) grad_bias = attn.to(acc_type).t().mm(sums).to(x.scalar_type());
    if (need_attn) grad_attn_acc.add_(sums.mm(bias.to(acc_type).t()));
  }
  at::Tensor grad_attn = need_attn ? grad_attn_acc.to(x.scalar_type()) : unrequested();
  return {grad_x, grad_w, grad_attn, grad_bias};
}

}  // namespace cuda
}  // namespace chanflex
