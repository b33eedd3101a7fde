// The CUDA kernels of dynamic_conv2d, written once as block programs that run
// on the GPU (one CUDA block) and on the host (csrc/cuda/host_emulation.cpp),
// so that CPU-only machines test the very code the GPU runs.
//
//   y[b] = conv2d(x[b], sum_k attn[b,k] W_k, sum_k attn[b,k] bias_k)
//
// Each program is an implicit GEMM over one sample and one group, tiled
// BM x BN with a reduction step of BK; 256 threads, each owning a TM x TN
// patch of the tile. Kernel mixing happens while a weight tile is staged into
// shared memory, so per-sample weights are never stored (SPEC section 2).
//
// A block program is a sequence of phases (CF_THREADS blocks), every two
// separated by CF_SYNC(); the host emulation raises an error where a sync is
// missing. Inside a phase each thread may write shared memory or read it,
// never both on the same words: then the GPU's parallel threads and the
// host's sequential ones (in either order, see emulated_thread) compute the
// same. Per-thread registers are CF_LOCAL state: one struct on the GPU, an
// array indexed by thread on the host.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#ifdef __CUDACC__
#define CF_HOST_DEVICE __host__ __device__
#else
#define CF_HOST_DEVICE
#endif

#ifdef __CUDA_ARCH__
#define CF_THREADS(t) for (int t = static_cast<int>(threadIdx.x), cf_once_ = 1; cf_once_; cf_once_ = 0)
#define CF_SYNC() __syncthreads()
#define CF_SHARED(type, name) __shared__ type name
#define CF_LOCAL(type, name) \
  type name##_one_;          \
  auto name = [&](int) -> type& { return name##_one_; }
#else
#include <vector>
namespace chanflex {
namespace cuda {
// Host emulation: the order in which a phase visits the block's threads
// (reversed in tests, so a phase that reads another thread's write shows).
bool& emulate_threads_reversed();
inline int emulated_thread(int i, int threads) {
  return emulate_threads_reversed() ? threads - 1 - i : i;
}
// A phase begins; raises if the previous one was not closed by CF_SYNC()
// (on the GPU the two would run as one, racing).
void begin_emulated_phase();
// CF_SYNC(), and the start of each block: no phase is open.
void end_emulated_phase();
}  // namespace cuda
}  // namespace chanflex
#define CF_THREADS(t)                                                            \
  for (int cf_i_ = (::chanflex::cuda::begin_emulated_phase(), 0), t = 0;           \
       cf_i_ < kThreads && ((t = ::chanflex::cuda::emulated_thread(cf_i_, kThreads)), true); \
       ++cf_i_)
#define CF_SYNC() ::chanflex::cuda::end_emulated_phase()
#define CF_SHARED(type, name) type name
#define CF_LOCAL(type, name)                     \
  std::vector<type> name##_all_(kThreads);       \
  auto name = [&](int t) -> type& { return name##_all_[t]; }
#endif

namespace chanflex {
namespace cuda {

// The conv's sizes, in elements; every tensor is contiguous NCHW.
struct Geometry {
  int64_t batch, in_channels, height, width;
  int64_t num_kernels, out_channels, group_in, group_out, kernel_h, kernel_w, groups;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  CF_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  // Reduction length of the forward and weight GEMMs: one group's (c, r, s).
  CF_HOST_DEVICE int64_t weight_cols() const { return group_in * taps(); }
  CF_HOST_DEVICE int64_t out_pixels() const { return out_h * out_w; }
  CF_HOST_DEVICE int64_t in_pixels() const { return height * width; }
};

// Tile shape shared by the three programs.
struct Tile {
  static constexpr int kThreads = 256;
  static constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
  static constexpr int kColThreads = BN / TN;  // threads along a tile row
  static_assert((BM / TM) * (BN / TN) == kThreads, "one TM x TN patch per thread");

  // First row and column of thread t's patch of the BM x BN tile.
  static CF_HOST_DEVICE int patch_row(int t) { return (t / kColThreads) * TM; }
  static CF_HOST_DEVICE int patch_col(int t) { return (t % kColThreads) * TN; }

  template <typename A>
  static CF_HOST_DEVICE void zero(A (&patch)[TM][TN]) {
    for (int i = 0; i < TM; ++i)
      for (int j = 0; j < TN; ++j) patch[i][j] = A(0);
  }

  // One reduction step of thread t's patch: acc += a[:, rows]^T b[:, cols], from shared memory.
  template <typename A>
  static CF_HOST_DEVICE void multiply_step(A (&acc)[TM][TN], const A (&a)[BK][BM], const A (&b)[BK][BN], int t) {
    const int row = patch_row(t), col = patch_col(t);
    for (int kk = 0; kk < BK; ++kk)
      for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] += a[kk][row + i] * b[kk][col + j];
  }
};

inline CF_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x's im2col entry (q = (c, r, s) of one group, output pixel): 0 in the padding.
template <typename T, typename A>
CF_HOST_DEVICE A im2col(const Geometry& g, const T* x, int64_t b, int64_t group, int64_t q, int64_t pixel) {
  if (q >= g.weight_cols() || pixel >= g.out_pixels()) return A(0);
  const int64_t c = q / g.taps(), tap = q % g.taps();
  const int64_t r = tap / g.kernel_w, s = tap % g.kernel_w;
  const int64_t ih = (pixel / g.out_w) * g.stride_h - g.pad_h + r * g.dil_h;
  const int64_t iw = (pixel % g.out_w) * g.stride_w - g.pad_w + s * g.dil_w;
  if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) return A(0);
  return static_cast<A>(x[((b * g.in_channels + group * g.group_in + c) * g.height + ih) * g.width + iw]);
}

// sum_k attn[b,k] * w[k * k_stride]: one entry of sample b's mixed kernel.
template <typename T, typename A>
CF_HOST_DEVICE A mix(const Geometry& g, const T* attn, int64_t b, const T* w, int64_t k_stride) {
  A v = A(0);
  for (int64_t k = 0; k < g.num_kernels; ++k) {
    v += static_cast<A>(attn[b * g.num_kernels + k]) * static_cast<A>(w[k * k_stride]);
  }
  return v;
}

template <typename T, typename A>
struct Tensors {
  const T* x;        // (B, C_in, H, W)
  const T* weight;   // (K, C_out, C_in/groups, kh, kw)
  const T* attn;     // (B, K)
  const T* bias;     // (K, C_out) or nullptr
  const T* grad_out; // (B, C_out, H_out, W_out)
  T* y;              // forward output
  T* grad_x;         // (B, C_in, H, W)
  A* grad_weight;    // (batch splits, K, C_out, C_in/groups * kh * kw): each split's dW, or nullptr
  A* grad_attn_part; // (tiles, B, K): each weight tile's share of grad_attn
  bool want_grad_weight;
  int64_t batch_splits;  // weight program: blocks that share one tile's samples
};

// Forward: y[b, o, p] = sum_q mixW_b[o, q] im2col_b[q, p] + mixbias_b[o].
// Block (p tile, o tile, sample x group): M = output channels, N = pixels.
template <typename T, typename A>
struct ForwardProgram : Tile {
  struct Shared { A w[BK][BM]; A x[BK][BN]; };
  struct Local { A acc[TM][TN]; };

  static int64_t blocks(const Geometry& g) {
    return ceil_div(g.out_pixels(), BN) * ceil_div(g.group_out, BM) * g.batch * g.groups;
  }

  static CF_HOST_DEVICE void run(const Geometry& g, const Tensors<T, A>& p, int64_t block) {
    CF_SHARED(Shared, sm);
    CF_LOCAL(Local, local);
    const int64_t n_tiles = ceil_div(g.out_pixels(), BN), m_tiles = ceil_div(g.group_out, BM);
    const int64_t n0 = (block % n_tiles) * BN;
    const int64_t m0 = ((block / n_tiles) % m_tiles) * BM;
    const int64_t sample_group = block / (n_tiles * m_tiles);
    const int64_t b = sample_group / g.groups, group = sample_group % g.groups;
    const int64_t cols = g.weight_cols(), k_stride = g.out_channels * cols;

    CF_THREADS(t) { zero(local(t).acc); }
    CF_SYNC();
    for (int64_t q0 = 0; q0 < cols; q0 += BK) {
      CF_THREADS(t) {
        for (int e = t; e < BM * BK; e += kThreads) {
          const int m = e / BK, kk = e % BK;  // consecutive threads read consecutive q
          const int64_t o = m0 + m, q = q0 + kk;
          sm.w[kk][m] = (o < g.group_out && q < cols)
                            ? mix<T, A>(g, p.attn, b, p.weight + (group * g.group_out + o) * cols + q, k_stride)
                            : A(0);
        }
        for (int e = t; e < BK * BN; e += kThreads) {
          const int kk = e / BN, n = e % BN;
          sm.x[kk][n] = im2col<T, A>(g, p.x, b, group, q0 + kk, n0 + n);
        }
      }
      CF_SYNC();
      CF_THREADS(t) { multiply_step(local(t).acc, sm.w, sm.x, t); }
      CF_SYNC();
    }
    CF_THREADS(t) {
      const Local& l = local(t);
      const int row = patch_row(t), col = patch_col(t);
      for (int i = 0; i < TM; ++i) {
        const int64_t o = m0 + row + i;
        if (o >= g.group_out) continue;
        const int64_t channel = group * g.group_out + o;
        const A bias = p.bias ? mix<T, A>(g, p.attn, b, p.bias + channel, g.out_channels) : A(0);
        for (int j = 0; j < TN; ++j) {
          const int64_t pixel = n0 + col + j;
          if (pixel < g.out_pixels()) {
            p.y[(b * g.out_channels + channel) * g.out_pixels() + pixel] = static_cast<T>(l.acc[i][j] + bias);
          }
        }
      }
    }
  }
};

// grad_x[b, c, i] = sum_{o, r, s} mixW_b[o, c, r, s] grad_out[b, o, (i + pad - tap) / stride]
// over the taps that land on an output pixel. Block (input-pixel tile,
// channel tile, sample x group): M = input channels, N = input pixels,
// reduction t = (o, r, s).
template <typename T, typename A>
struct GradInputProgram : Tile {
  struct Shared { A w[BK][BM]; A g[BK][BN]; };
  struct Local { A acc[TM][TN]; };

  static int64_t blocks(const Geometry& g) {
    return ceil_div(g.in_pixels(), BN) * ceil_div(g.group_in, BM) * g.batch * g.groups;
  }

  // grad_out[b, o, oh, ow] for input pixel `pixel` and reduction index t, 0 where no output pixel uses it.
  static CF_HOST_DEVICE A grad_entry(const Geometry& g, const T* grad_out, int64_t b, int64_t group, int64_t t,
                                     int64_t pixel) {
    if (t >= g.group_out * g.taps() || pixel >= g.in_pixels()) return A(0);
    const int64_t o = t / g.taps(), tap = t % g.taps();
    const int64_t h = pixel / g.width + g.pad_h - (tap / g.kernel_w) * g.dil_h;
    const int64_t w = pixel % g.width + g.pad_w - (tap % g.kernel_w) * g.dil_w;
    if (h < 0 || w < 0 || h % g.stride_h || w % g.stride_w) return A(0);
    const int64_t oh = h / g.stride_h, ow = w / g.stride_w;
    if (oh >= g.out_h || ow >= g.out_w) return A(0);
    return static_cast<A>(grad_out[((b * g.out_channels + group * g.group_out + o) * g.out_h + oh) * g.out_w + ow]);
  }

  static CF_HOST_DEVICE void run(const Geometry& g, const Tensors<T, A>& p, int64_t block) {
    CF_SHARED(Shared, sm);
    CF_LOCAL(Local, local);
    const int64_t n_tiles = ceil_div(g.in_pixels(), BN), m_tiles = ceil_div(g.group_in, BM);
    const int64_t n0 = (block % n_tiles) * BN;
    const int64_t m0 = ((block / n_tiles) % m_tiles) * BM;
    const int64_t sample_group = block / (n_tiles * m_tiles);
    const int64_t b = sample_group / g.groups, group = sample_group % g.groups;
    const int64_t reduction = g.group_out * g.taps();
    const int64_t cols = g.weight_cols(), k_stride = g.out_channels * cols;

    CF_THREADS(t) { zero(local(t).acc); }
    CF_SYNC();
    for (int64_t t0 = 0; t0 < reduction; t0 += BK) {
      CF_THREADS(t) {
        for (int e = t; e < BM * BK; e += kThreads) {
          const int m = e / BK, kk = e % BK;
          const int64_t c = m0 + m, r = t0 + kk;
          A v = A(0);
          if (c < g.group_in && r < reduction) {
            const int64_t o = r / g.taps(), tap = r % g.taps();
            v = mix<T, A>(g, p.attn, b, p.weight + (group * g.group_out + o) * cols + c * g.taps() + tap, k_stride);
          }
          sm.w[kk][m] = v;
        }
        for (int e = t; e < BK * BN; e += kThreads) {
          const int kk = e / BN, n = e % BN;
          sm.g[kk][n] = grad_entry(g, p.grad_out, b, group, t0 + kk, n0 + n);
        }
      }
      CF_SYNC();
      CF_THREADS(t) { multiply_step(local(t).acc, sm.w, sm.g, t); }
      CF_SYNC();
    }
    CF_THREADS(t) {
      const Local& l = local(t);
      const int row = patch_row(t), col = patch_col(t);
      for (int i = 0; i < TM; ++i) {
        const int64_t c = m0 + row + i;
        if (c >= g.group_in) continue;
        for (int j = 0; j < TN; ++j) {
          const int64_t pixel = n0 + col + j;
          if (pixel < g.in_pixels()) {
            p.grad_x[(b * g.in_channels + group * g.group_in + c) * g.in_pixels() + pixel] =
                static_cast<T>(l.acc[i][j]);
          }
        }
      }
    }
  }
};

// Weight side. For each sample b the block forms one tile of
// G_b[o, q] = sum_p grad_out[b, o, p] im2col_b[q, p] in registers, then
//   grad_W_k[o, q] += attn[b, k] G_b[o, q]       (registers, for KC kernels)
//   grad_attn[b, k] = sum_{o, q} G_b[o, q] W_k[o, q]  (reduced over the block,
//                      written to this tile's row of grad_attn_part),
// so neither G_b nor per-sample kernels reach memory. Blocks: (q tile,
// o tile, group x kernel chunk x batch split); each split stores its dW in
// its own slab, which launch.h sums in a fixed order (no atomics, so dW is
// deterministic). K > KC recomputes G_b once per chunk of KC kernels.
template <typename T, typename A>
struct GradWeightProgram : Tile {
  static constexpr int KC = 4;
  static constexpr int kReduceLanes = 8;  // threads that add a kernel's 256 partial sums, 32 each
  struct Shared {
    A grad[BK][BM];
    A x[BK][BN];
    A partial[KC][kThreads];
    A lane_sum[KC][kReduceLanes];
  };
  struct Local { A acc[TM][TN]; A dw[KC][TM][TN]; };

  static int64_t tiles(const Geometry& g) {
    return ceil_div(g.weight_cols(), BN) * ceil_div(g.group_out, BM) * g.groups;
  }
  static int64_t kernel_chunks(const Geometry& g) { return ceil_div(g.num_kernels, KC); }
  static int64_t blocks(const Geometry& g, int64_t batch_splits) {
    return tiles(g) * kernel_chunks(g) * batch_splits;
  }

  static CF_HOST_DEVICE void run(const Geometry& g, const Tensors<T, A>& p, int64_t block) {
    CF_SHARED(Shared, sm);
    CF_LOCAL(Local, local);
    const int64_t cols = g.weight_cols(), pixels = g.out_pixels(), k_stride = g.out_channels * cols;
    const int64_t n_tiles = ceil_div(cols, BN), m_tiles = ceil_div(g.group_out, BM);
    const int64_t tile = block % (n_tiles * m_tiles * g.groups);  // = grad_attn_part's row
    const int64_t n0 = (tile % n_tiles) * BN;
    const int64_t m0 = ((tile / n_tiles) % m_tiles) * BM;
    const int64_t group = tile / (n_tiles * m_tiles);
    const int64_t rest = block / (n_tiles * m_tiles * g.groups);
    const int64_t k0 = (rest % ceil_div(g.num_kernels, KC)) * KC;
    const int64_t split = rest / ceil_div(g.num_kernels, KC);
    const int64_t per_split = ceil_div(g.batch, p.batch_splits);
    const int64_t b_begin = split * per_split;
    const int64_t b_end = b_begin + per_split < g.batch ? b_begin + per_split : g.batch;

    CF_THREADS(t) {
      for (int kc = 0; kc < KC; ++kc) zero(local(t).dw[kc]);
    }
    CF_SYNC();
    for (int64_t b = b_begin; b < b_end; ++b) {
      CF_THREADS(t) { zero(local(t).acc); }
      CF_SYNC();
      for (int64_t p0 = 0; p0 < pixels; p0 += BK) {
        CF_THREADS(t) {
          for (int e = t; e < BM * BK; e += kThreads) {
            const int m = e / BK, kk = e % BK;  // consecutive threads read consecutive pixels
            const int64_t o = m0 + m, pixel = p0 + kk;
            sm.grad[kk][m] = (o < g.group_out && pixel < pixels)
                                 ? static_cast<A>(p.grad_out[(b * g.out_channels + group * g.group_out + o) * pixels + pixel])
                                 : A(0);
          }
          for (int e = t; e < BK * BN; e += kThreads) {
            const int n = e / BK, kk = e % BK;
            sm.x[kk][n] = im2col<T, A>(g, p.x, b, group, n0 + n, p0 + kk);
          }
        }
        CF_SYNC();
        CF_THREADS(t) { multiply_step(local(t).acc, sm.grad, sm.x, t); }
        CF_SYNC();
      }
      // This sample's G tile is complete: fold it into dW and into <G_b, W_k>.
      CF_THREADS(t) {
        Local& l = local(t);
        const int row = patch_row(t), col = patch_col(t);
        for (int kc = 0; kc < KC; ++kc) {
          const int64_t k = k0 + kc;
          A dot = A(0);
          if (k < g.num_kernels) {
            const A a = static_cast<A>(p.attn[b * g.num_kernels + k]);
            for (int i = 0; i < TM; ++i) {
              const int64_t o = m0 + row + i;
              for (int j = 0; j < TN; ++j) {
                const int64_t q = n0 + col + j;
                l.dw[kc][i][j] += a * l.acc[i][j];
                if (o < g.group_out && q < cols) {
                  dot += l.acc[i][j] * static_cast<A>(p.weight[k * k_stride + (group * g.group_out + o) * cols + q]);
                }
              }
            }
          }
          sm.partial[kc][t] = dot;
        }
      }
      CF_SYNC();
      CF_THREADS(t) {
        if (t < KC * kReduceLanes) {
          const int kc = t / kReduceLanes, lane = t % kReduceLanes;
          const int span = kThreads / kReduceLanes;
          A s = A(0);
          for (int i = 0; i < span; ++i) s += sm.partial[kc][lane * span + i];
          sm.lane_sum[kc][lane] = s;
        }
      }
      CF_SYNC();
      CF_THREADS(t) {
        if (t < KC && k0 + t < g.num_kernels) {
          A s = A(0);
          for (int lane = 0; lane < kReduceLanes; ++lane) s += sm.lane_sum[t][lane];
          p.grad_attn_part[(tile * g.batch + b) * g.num_kernels + k0 + t] = s;
        }
      }
      CF_SYNC();
    }
    if (!p.want_grad_weight) return;
    CF_THREADS(t) {
      const Local& l = local(t);
      const int row = patch_row(t), col = patch_col(t);
      for (int kc = 0; kc < KC; ++kc) {
        const int64_t k = k0 + kc;
        if (k >= g.num_kernels) break;
        for (int i = 0; i < TM; ++i) {
          const int64_t o = m0 + row + i;
          if (o >= g.group_out) continue;
          for (int j = 0; j < TN; ++j) {
            const int64_t q = n0 + col + j;
            if (q < cols) {
              p.grad_weight[(split * g.num_kernels + k) * k_stride + (group * g.group_out + o) * cols + q] =
                  l.dw[kc][i][j];
            }
          }
        }
      }
    }
  }
};

}  // namespace cuda
}  // namespace chanflex
