// Schema of the chanflex ops and the argument checks shared by every backend.
//
//   y[b] = conv2d(x[b], sum_k attn[b,k] * weight[k], sum_k attn[b,k] * bias[k],
//                 stride, padding, dilation, groups)
//
// Device kernels live in csrc/<device>/ and register themselves with
// TORCH_LIBRARY_IMPL; fake kernels and autograd are registered in Python
// (chanflex_kernels/ops.py).
#include "dynamic_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>

namespace chanflex {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, "dynamic_conv2d: expected ", name,
              " to have 2 elements (h, w), got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, "dynamic_conv2d: expected ",
              name, " >= ", minimum, ", got ", v);
}

}  // namespace

ConvGeometry check_dynamic_conv2d_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& attn,
    const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  TORCH_CHECK(x.dim() == 4,
              "dynamic_conv2d: expected x of shape (B, C_in, H, W), got ",
              x.dim(), "-D tensor of shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 5,
              "dynamic_conv2d: expected weight of shape (K, C_out, C_in/groups, kh, kw), got ",
              weight.dim(), "-D tensor of shape ", shape_str(weight));
  TORCH_CHECK(attn.dim() == 2,
              "dynamic_conv2d: expected attn of shape (B, K), got ", attn.dim(),
              "-D tensor of shape ", shape_str(attn));
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1, "dynamic_conv2d: expected groups >= 1, got ", groups);

  ConvGeometry g;
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.num_kernels = weight.size(0);
  g.out_channels = weight.size(1);
  g.group_in_channels = weight.size(2);
  g.kernel_h = weight.size(3);
  g.kernel_w = weight.size(4);
  g.groups = groups;
  for (int i = 0; i < 2; ++i) {
    g.stride[i] = stride[i];
    g.padding[i] = padding[i];
    g.dilation[i] = dilation[i];
  }

  TORCH_CHECK(g.num_kernels >= 1 && g.out_channels >= 1 && g.kernel_h >= 1 &&
                  g.kernel_w >= 1,
              "dynamic_conv2d: expected a non-empty weight, got shape ",
              shape_str(weight));
  // C_in = 0 would reach the kernels' divisions by the reduction length.
  TORCH_CHECK(g.in_channels >= 1,
              "dynamic_conv2d: expected x with at least one input channel, got shape ",
              shape_str(x));
  TORCH_CHECK(g.in_channels % groups == 0,
              "dynamic_conv2d: expected C_in divisible by groups, got C_in=",
              g.in_channels, ", groups=", groups);
  TORCH_CHECK(g.out_channels % groups == 0,
              "dynamic_conv2d: expected C_out divisible by groups, got C_out=",
              g.out_channels, ", groups=", groups);
  TORCH_CHECK(g.group_in_channels * groups == g.in_channels,
              "dynamic_conv2d: expected weight.shape[2] == C_in/groups = ",
              g.in_channels / groups, ", got ", g.group_in_channels);
  TORCH_CHECK(attn.size(0) == g.batch && attn.size(1) == g.num_kernels,
              "dynamic_conv2d: expected attn of shape (B, K) = (", g.batch, ", ",
              g.num_kernels, "), got ", shape_str(attn));
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == g.num_kernels &&
                    b.size(1) == g.out_channels,
                "dynamic_conv2d: expected bias of shape (K, C_out) = (",
                g.num_kernels, ", ", g.out_channels, "), got ", shape_str(b));
  }
  for (const at::Tensor* t : {&weight, &attn}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(),
                "dynamic_conv2d: expected all tensors to have dtype ",
                x.scalar_type(), " (the dtype of x), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(),
                "dynamic_conv2d: expected all tensors on ", x.device(),
                " (the device of x), got ", t->device());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "dynamic_conv2d: expected bias with dtype ", x.scalar_type(),
                " on ", x.device(), ", got ", bias->scalar_type(), " on ",
                bias->device());
  }

  const int64_t span_h = g.dilation[0] * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.dilation[1] * (g.kernel_w - 1) + 1;
  const int64_t padded_h = g.height + 2 * g.padding[0];
  const int64_t padded_w = g.width + 2 * g.padding[1];
  TORCH_CHECK(span_h <= padded_h && span_w <= padded_w,
              "dynamic_conv2d: expected the dilated kernel (", span_h, "x",
              span_w, ") to fit in the padded input, got a padded input of ",
              padded_h, "x", padded_w);
  g.out_h = (padded_h - span_h) / g.stride[0] + 1;
  g.out_w = (padded_w - span_w) / g.stride[1] + 1;
  return g;
}

TORCH_LIBRARY(chanflex, m) {
  m.def(
      "dynamic_conv2d(Tensor x, Tensor weight, Tensor attn, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Gradients for (x, weight, attn, bias); output_mask says which to compute,
  // a gradient that is not asked for comes back as an empty tensor.
  m.def(
      "dynamic_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, "
      "Tensor attn, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The same two through the CUDA C++ kernels (csrc/cuda/), whatever kernel
  // serves dynamic_conv2d on CUDA; on CPU tensors they run those kernels'
  // host emulation (for tests).
  m.def(
      "dynamic_conv2d_cuda(Tensor x, Tensor weight, Tensor attn, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "dynamic_conv2d_backward_cuda(Tensor grad_out, Tensor x, Tensor weight, "
      "Tensor attn, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace chanflex
