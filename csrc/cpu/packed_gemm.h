// The packed paths' shared parts: weight-gradient pool, scratch buffers, instruction set, packed GEMM layout.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "unfold.h"

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// Packed mixed GEMMs: float32 on CPUs with AVX2 and FMA, or AVX-512.
//
// The forward (y_b = W_b @ cols_b) and the backward-data product
// (dcols_b = W_b^T @ dy_b) are both, per sample and group,
//   C_b (m x pixels) = (sum_k attn[b,k] A_k) (m x depth) @ B_b (depth x pixels).
// Handing a freshly mixed weight tile to BLAS costs a write and a re-read of
// the tile plus BLAS's own repacking of both operands, for each sample; with
// few output pixels that dominates. Here B_b is written once per sample in
// packed panels (shared by all tiles), each thread packs the K kernels' rows
// of its A tile once per chunk (a reduction block at a time, in L2), mixes
// them into packed A panels (AVX-512: inside the micro-kernel, see MicroMix),
// and a register-blocked FMA micro-kernel (16x6 AVX2, 32x12 AVX-512) consumes them:
//   A panel: 16 rows x kc reduction steps, step by step (16 floats each);
//   B panel: kc reduction steps x 6 pixels, step by step (6 floats each).

// Memory of weight gradients of 32 MiB and more (K |W|: 38 MB for a K=4
// 512x512 3x3 layer). glibc maps blocks that large afresh on every
// allocation, so each backward paid ~9000 page faults (~9 ms at 512@7, where
// filling a reused buffer takes 1 ms), while the static conv's |W| gradient
// comes back from the heap. Freed gradients return here instead and the next
// backward reuses them; at most kGradPoolBytes are kept, and
// cpu_release_scratch() frees them.
constexpr size_t kPooledGradBytes = size_t{32} << 20;
constexpr size_t kGradPoolBytes = size_t{512} << 20;

class GradPool {
 public:
  // A block of exactly `bytes` (a gradient's size repeats from step to step).
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].second == bytes) {
          void* block = free_[i].first;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= bytes;
          return block;
        }
      }
    }
    void* block = nullptr;
    TORCH_CHECK(posix_memalign(&block, 64, bytes) == 0, "dynamic_conv2d: out of memory allocating ", bytes,
                " bytes for a kernel-sized buffer");
    return block;
  }
  void release(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kGradPoolBytes) {
        free_.emplace_back(block, bytes);
        cached_ += bytes;
        return;
      }
    }
    std::free(block);
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : free_) std::free(entry.first);
    free_.clear();
    cached_ = 0;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t cached_ = 0;
};

// Never destroyed: gradients may be freed during interpreter shutdown.
GradPool& grad_pool() {
  static GradPool* pool = new GradPool();
  return *pool;
}

// An uninitialised float tensor for a weight gradient (or another tensor of
// the K kernels' size made on every call): from grad_pool() when it is
// large, else from the ordinary allocator.
at::Tensor empty_pooled(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * sizeof(float);
  if (opts.dtype() != at::kFloat || bytes < kPooledGradBytes) return at::empty(sizes, opts);
  void* block = grad_pool().acquire(bytes);
  return at::from_blob(block, sizes, [bytes](void* data) { grad_pool().release(data, bytes); }, opts);
}

// t in the compute type (compute_dtype), contiguous. A half type's float32
// copy of the K kernels is as large as their gradient and made on every call:
// with `pooled`, from grad_pool() too (bfloat16 forward at 512@7: 47 -> 36
// ms; the fresh mapping's page faults took 9 of the 11 ms its copy took).
// The backward's copy is not pooled: freed before the float32 gradients are
// rounded to the half type, it would stay resident through that (fwd+bwd
// peak at 512@7 in bfloat16: 84 -> 98 MB).
at::Tensor to_compute(const at::Tensor& t, at::ScalarType dtype, bool pooled) {
  if (t.scalar_type() == dtype) return t.contiguous();
  if (!pooled) return t.to(dtype).contiguous();
  at::Tensor out = empty_pooled(t.sizes(), t.options().dtype(dtype));
  out.copy_(t);
  return out;
}

// Scratch memory of the packed paths, reused across calls. A fresh buffer of
// a few MiB is mapped anew by malloc and faults in page by page on first
// touch: at 256@14 that was ~6400 page faults, ~5 ms of a 40 ms grad_x.
// Each calling thread keeps one grow-only buffer (as oneDNN keeps its own
// scratchpad), out of which each pass (forward, grad_x, weight side) carves
// all its buffers at once, the pool threads' slices included: what is kept
// is the largest pass's need, not the sum of all passes', so a fwd+bwd
// step peaks where it did with buffers freed after each pass, except that
// the weight side gives a larger buffer back (see pass_scratch).
// torch.ops.chanflex.cpu_release_scratch() frees the calling thread's.
at::Tensor& scratch_buffer() {
  thread_local at::Tensor buffer;
  return buffer;
}

// One pass's buffers of floats[i] floats each (null where 0), carved out of
// the calling thread's scratch buffer, each 64-byte aligned; valid until the
// next pass_scratch on this thread. With `fit`, a kept buffer larger than
// the pass needs is given back first: the weight side runs beside the
// K-fold weight gradient it writes, and the forward's or grad_x's larger
// buffer, kept through it, stacked their scratch on top of K |W| (fwd+bwd
// peak at 256->512@10: 49.0 -> 37.5 MiB by this alone; see
// kDirectGradScratchBytes for the rest). The next forward faults its
// buffer in again: fwd+bwd +0-6% (in-process, Zen 4).
template <size_t N>
std::array<float*, N> pass_scratch(const std::array<int64_t, N>& floats, bool fit = false) {
  constexpr int64_t kAlign = 64 / sizeof(float);
  std::array<int64_t, N> offsets;
  int64_t total = 0;
  for (size_t i = 0; i < N; ++i) {
    offsets[i] = total;
    total += (floats[i] + kAlign - 1) / kAlign * kAlign;
  }
  at::Tensor& buffer = scratch_buffer();
  if (!buffer.defined() || buffer.numel() < total || (fit && buffer.numel() > total)) {
    buffer = at::Tensor();  // the old buffer goes before the new one comes
    buffer = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kFloat));
  }
  float* base = buffer.data_ptr<float>();
  std::array<float*, N> out;
  for (size_t i = 0; i < N; ++i) out[i] = floats[i] > 0 ? base + offsets[i] : nullptr;
  return out;
}

constexpr int64_t kMR = 16;   // rows per A panel (two AVX registers, one AVX-512 register)
constexpr int64_t kNR = 6;    // pixels per B panel

// Instruction set of the packed paths. AVX-512 doubles the vector width
// (the library's static conv uses it where the CPU has it, so the packed
// paths must too). CHANFLEX_CPU_ISA caps the choice below the hardware's
// best: "avx2", or "generic" for the BLAS paths; tests use it to cover every
// variant on one machine.
enum class PackedIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

PackedIsa hardware_packed_isa() {
  static const PackedIsa isa = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return PackedIsa::kGeneric;
    return __builtin_cpu_supports("avx512f") ? PackedIsa::kAvx512 : PackedIsa::kAvx2;
  }();
  return isa;
}

PackedIsa packed_isa() {
  const char* env = std::getenv("CHANFLEX_CPU_ISA");
  if (env == nullptr || *env == '\0') return hardware_packed_isa();
  const std::string name(env);
  PackedIsa cap;
  if (name == "avx512") {
    cap = PackedIsa::kAvx512;
  } else if (name == "avx2") {
    cap = PackedIsa::kAvx2;
  } else if (name == "generic") {
    cap = PackedIsa::kGeneric;
  } else {
    TORCH_CHECK(false, "CHANFLEX_CPU_ISA: expected one of 'avx512', 'avx2', 'generic', got '", name, "'");
  }
  return std::min(cap, hardware_packed_isa());
}

// The packed path wins where the per-sample GEMMs are small (few output
// pixels); above its limit the library's conv (use_library) takes the
// forward and grad_x. AVX2: at 441 pixels (VGG19's 21x21 stage) a chunk holds
// only 2 unfolded samples, and packing the K kernels per chunk cost more
// than the BLAS path (one full benchmark run: fwd 1.61 vs 1.38, fwd+bwd 1.76
// vs 1.50 of the static conv). AVX-512, since its micro-kernel prefetches B
// (AMD Zen 5, in-process A/B against the library path, ms): 441 pixels,
// forward 256@21 58.0 -> 50.3, 128->256@21 28.5 -> 25.5, grad_x 51.7 ->
// 47.0, 26.8 -> 26.1; but 784 pixels (128@28) grad_x 20.5 vs 23.2, and
// 1764 (64->128@42) forward 23.7 vs 26.7.
constexpr int64_t kPackedMaxPixelsAvx2 = 256;
constexpr int64_t kPackedMaxPixelsAvx512 = 441;
inline int64_t packed_max_pixels(PackedIsa isa) {
  return isa == PackedIsa::kAvx512 ? kPackedMaxPixelsAvx512 : isa == PackedIsa::kAvx2 ? kPackedMaxPixelsAvx2 : 0;
}

// On AVX2 two backward parts run packed past that limit too, where their
// other paths (BLAS, the library's conv backward) were slower on AMD Zen 3:
// grad_x of strided convs and the weight side, for kernels of several taps
// (use_packed_grad_x, packed_weight_grad_plane), as long as one sample's
// unfolded input fits this (their scratch holds a chunk of such samples,
// at least one a thread).
constexpr int64_t kPackedMaxUnfoldedSampleBytesAvx2 = int64_t{16} << 20;
inline bool unfolded_sample_fits_avx2(const Plan& p) {
  return p.unfolded * static_cast<int64_t>(sizeof(float)) <= kPackedMaxUnfoldedSampleBytesAvx2;
}

// Most reduction depth per block, per ISA: B panels stay in L1, the mixed A
// panels in L2; a deeper block halves the output read-modify-writes
// (AVX-512 at 512@7 and 512@10: 512 measured 2-7% faster than 256).
inline int64_t packed_depth_block(PackedIsa isa) { return isa == PackedIsa::kAvx512 ? 512 : 256; }

bool use_packed(const Plan& p, at::ScalarType dtype, PackedIsa isa) {
  return dtype == at::kFloat && isa != PackedIsa::kGeneric && p.pixels <= packed_max_pixels(isa);
}

struct PackedGemm {
  PackedIsa isa;
  int64_t m;             // output rows per group
  int64_t depth;         // reduction length per group
  int64_t groups;
  int64_t pixels;        // output columns
  int64_t num_kernels;
  int64_t pixel_panels;  // ceil(pixels / kNR)
  int64_t group_b;       // floats of one group's packed B: pixel_panels * depth * kNR
  int64_t sample_b;      // floats of one sample's packed B: groups * group_b
  int64_t depth_multiple = 8;  // reduction blocks are a multiple of this (taps per channel with TapClasses)
  bool separate_mix = false;   // mix A in a pass of its own even where the micro-kernels could (see winograd_gemm)
};

PackedGemm make_packed_gemm(PackedIsa isa, int64_t m, int64_t depth, const Plan& p) {
  PackedGemm s;
  s.isa = isa;
  s.m = m;
  s.depth = depth;
  s.groups = p.g.groups;
  s.pixels = p.pixels;
  s.num_kernels = p.g.num_kernels;
  s.pixel_panels = (p.pixels + kNR - 1) / kNR;
  s.group_b = s.pixel_panels * depth * kNR;
  s.sample_b = s.groups * s.group_b;
  return s;
}

// Where reduction step q of pixel panel lp starts in one group's packed B.
inline int64_t packed_b_offset(const PackedGemm& s, int64_t lp, int64_t q) {
  return (lp * s.depth + q) * kNR;
}

}  // namespace
}  // namespace chanflex
