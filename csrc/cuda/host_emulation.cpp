// Runs the CUDA kernels' block programs on the host, block after block and,
// inside a block, phase after phase over its 256 threads. It is the CPU kernel
// of chanflex::dynamic_conv2d_cuda and its backward, built into every
// extension (CUDA or not), so CPU-only CI checks the GPU code's arithmetic and
// indexing against the float64 reference (tests/test_cuda_kernels.py). What it
// cannot check is the hardware's part: launch limits, register and shared
// memory use, and a race inside a phase, except one that the thread order
// shows (tests run both orders).
//
// chanflex::set_cuda_emulation(reverse_threads, resident_blocks, poison_outputs):
// visit each phase's threads last to first; how many blocks the emulated
// device keeps busy (it sets the weight program's batch splits); fill the
// outputs with NaN before the blocks run. For the whole process; defaults
// false, 4, false.
#include "launch.h"

#include <torch/library.h>

namespace chanflex {
namespace cuda {

bool& emulate_threads_reversed() {
  static bool reversed = false;
  return reversed;
}

namespace {
bool phase_open = false;
}  // namespace

void begin_emulated_phase() {
  TORCH_CHECK(!phase_open,
              "CUDA block program: two phases (CF_THREADS) without CF_SYNC() between them; on a GPU "
              "they would run as one and race");
  phase_open = true;
}

void end_emulated_phase() { phase_open = false; }

namespace {

int64_t& emulated_resident_blocks() {
  static int64_t blocks = 4;  // small: a batch of 8 already splits
  return blocks;
}

bool& emulated_poison() {
  static bool poison = false;
  return poison;
}

struct HostRunner {
  int64_t resident = emulated_resident_blocks();

  template <class Program, typename T, typename A>
  void run(int64_t blocks, const Geometry& g, const Tensors<T, A>& p) {
    for (int64_t block = 0; block < blocks; ++block) {
      end_emulated_phase();  // a block starts with no phase open
      Program::run(g, p, block);
    }
  }
  int64_t resident_blocks() const { return resident; }
  bool poison_outputs() const { return emulated_poison(); }
};

at::Tensor forward_on_host(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& attn,
                           const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  HostRunner runner;
  return forward(runner, x, weight, attn, bias, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_on_host(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& attn,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 4> output_mask) {
  HostRunner runner;
  return backward(runner, grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chanflex, m) {
  m.def("set_cuda_emulation(bool reverse_threads, int resident_blocks, bool poison_outputs) -> ()",
        [](bool reverse_threads, int64_t resident_blocks, bool poison_outputs) {
          TORCH_CHECK(resident_blocks >= 1, "set_cuda_emulation: expected resident_blocks >= 1, got ",
                      resident_blocks);
          emulate_threads_reversed() = reverse_threads;
          emulated_resident_blocks() = resident_blocks;
          emulated_poison() = poison_outputs;
        });
}

TORCH_LIBRARY_IMPL(chanflex, CPU, m) {
  m.impl("dynamic_conv2d_cuda", &forward_on_host);
  m.impl("dynamic_conv2d_backward_cuda", &backward_on_host);
}

}  // namespace cuda
}  // namespace chanflex
