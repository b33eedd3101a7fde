// CUDA C++ kernels of chanflex::dynamic_conv2d_cuda and its backward: each
// block program of block_programs.h becomes one __global__ kernel, one CUDA
// block per program block. Built only when torch has CUDA and nvcc is found
// (setup.py); the same programs run on the host in host_emulation.cpp.
#include "launch.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace chanflex {
namespace cuda {
namespace {

template <class Program, typename T, typename A>
__global__ void __launch_bounds__(Tile::kThreads) run_program(Geometry g, Tensors<T, A> p, int64_t first_block) {
  Program::run(g, p, first_block + static_cast<int64_t>(blockIdx.x));
}

struct DeviceRunner {
  int64_t resident = 1;

  template <class Program, typename T, typename A>
  void run(int64_t blocks, const Geometry& g, const Tensors<T, A>& p) {
    // A grid's x dimension holds 2^31 - 1 blocks; larger problems launch in parts.
    constexpr int64_t kMaxGrid = 2147483647;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    for (int64_t first = 0; first < blocks; first += kMaxGrid) {
      const int64_t count = blocks - first < kMaxGrid ? blocks - first : kMaxGrid;
      run_program<Program, T, A><<<static_cast<unsigned int>(count), Tile::kThreads, 0, stream>>>(g, p, first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  int64_t resident_blocks() const { return resident; }
  bool poison_outputs() const { return false; }
};

DeviceRunner device_runner(const at::Tensor& x) {
  DeviceRunner runner;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.device().index());
  runner.resident = 2 * static_cast<int64_t>(prop->multiProcessorCount);
  return runner;
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& attn,
                        const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  const c10::cuda::CUDAGuard guard(x.device());
  DeviceRunner runner = device_runner(x);
  return forward(runner, x, weight, attn, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& attn,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  DeviceRunner runner = device_runner(x);
  return backward(runner, grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(chanflex, CUDA, m) {
  m.impl("dynamic_conv2d_cuda", &forward_cuda);
  m.impl("dynamic_conv2d_backward_cuda", &backward_cuda);
}

}  // namespace cuda
}  // namespace chanflex
