// Shared declarations of the dynamic_conv2d op: the output-size rule and the
// argument checks every device kernel runs before touching memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>

namespace chanflex {

// Geometry of one dynamic_conv2d call, derived once from the arguments.
struct ConvGeometry {
  int64_t batch, in_channels, height, width;
  int64_t num_kernels, out_channels, group_in_channels, kernel_h, kernel_w;
  int64_t groups;
  int64_t out_h, out_w;
  std::array<int64_t, 2> stride, padding, dilation;
};

// Validates x (B, C_in, H, W), weight (K, C_out, C_in/groups, kh, kw),
// attn (B, K) and bias (K, C_out) against each other and the conv arguments;
// raises with "expected ..., got ..." messages. Returns the geometry.
ConvGeometry check_dynamic_conv2d_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& attn,
    const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups);

}  // namespace chanflex
