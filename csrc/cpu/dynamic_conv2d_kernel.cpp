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
// micro-kernel (see "Packed mixed GEMMs"), and the weight side keeps each G_b
// tile in registers (see "Packed weight gradient"); wide, shallow layers
// (stems) stream their forward through the same micro-kernel a block of
// output rows at a time (see "Forward of wide, shallow layers"); the packed
// forward skips the products of padding taps (see "Padding taps skipped"),
// and so does grad_x where it runs as the transposed conv's packed
// forward; on AVX-512, 3x3 convs on 5x5 and 7x7 planes run both without an
// unfold, and so does the stride-2 forward from 14x14 to 7x7 (see "Direct
// small planes"). Large output planes run
// the library's direct conv on chunks of samples instead (see "Large output
// planes").
// Half and bfloat16 run in float32 and are rounded once at the end.
#include "../dynamic_conv2d.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// Fortran BLAS exported by libtorch_cpu (MKL); called on raw tile pointers
// because thousands of small GEMMs per layer make per-call tensor overhead show.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// BLAS on row-major matrices: C (m x n) = alpha op(A) op(B) + beta C.

void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const float* alpha, const float* a, const int* lda, const float* b,
               const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const double* alpha, const double* a, const int* lda, const double* b,
               const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
void gemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1;
  blas_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &mi, &ni, &ki, &one, b, &la, a,
            &lb, &beta, c, &lc);
}

// ---------------------------------------------------------------------------
// Vector loops, compiled for AVX2+FMA (haswell and later, zen) and for the
// baseline ISA, picked at load time. Rows never overlap (__restrict__), which
// the vectoriser needs to know. The bodies are templates inlined into thin
// per-dtype functions, because target_clones applies only to non-templates.

#define CHANFLEX_INLINE __attribute__((always_inline)) inline
#define CHANFLEX_CLONES __attribute__((target_clones("arch=haswell", "default")))

template <typename T>
CHANFLEX_INLINE void scale_row_body(T* __restrict__ out, const T* __restrict__ src, T a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a * src[j];
}
template <typename T>
CHANFLEX_INLINE void axpy_row_body(T* __restrict__ out, const T* __restrict__ src, T a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += a * src[j];
}
template <typename T>
CHANFLEX_INLINE void add_row_body(T* __restrict__ out, const T* __restrict__ src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += src[j];
}

// Independent partial sums (two vectors' worth) let the reductions vectorise.
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
CHANFLEX_INLINE double dot_row_body(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T acc[kLanes<T>] = {0};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>)
    for (int u = 0; u < kLanes<T>; ++u) acc[u] += a[j + u] * b[j + u];
  double total = 0;
  for (int u = 0; u < kLanes<T>; ++u) total += acc[u];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// out += a * g and returns <g, w>, in one pass over the three rows.
template <typename T>
CHANFLEX_INLINE double axpy_dot_row_body(T* __restrict__ out, const T* __restrict__ w,
                                         const T* __restrict__ g, T a, int64_t n) {
  T acc[kLanes<T>] = {0};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>)
    for (int u = 0; u < kLanes<T>; ++u) {
      out[j + u] += a * g[j + u];
      acc[u] += g[j + u] * w[j + u];
    }
  double total = 0;
  for (int u = 0; u < kLanes<T>; ++u) total += acc[u];
  for (; j < n; ++j) {
    out[j] += a * g[j];
    total += g[j] * w[j];
  }
  return total;
}

#define CHANFLEX_ROW_KERNELS(T)                                                            \
  CHANFLEX_CLONES void scale_row(T* __restrict__ out, const T* __restrict__ src, T a,      \
                                 int64_t n) {                                             \
    scale_row_body(out, src, a, n);                                                       \
  }                                                                                       \
  CHANFLEX_CLONES void axpy_row(T* __restrict__ out, const T* __restrict__ src, T a,       \
                                int64_t n) {                                              \
    axpy_row_body(out, src, a, n);                                                        \
  }                                                                                       \
  CHANFLEX_CLONES void add_row(T* __restrict__ out, const T* __restrict__ src, int64_t n) { \
    add_row_body(out, src, n);                                                            \
  }                                                                                       \
  CHANFLEX_CLONES double dot_row(const T* __restrict__ a, const T* __restrict__ b,         \
                                 int64_t n) {                                             \
    return dot_row_body(a, b, n);                                                         \
  }                                                                                       \
  CHANFLEX_CLONES double axpy_dot_row(T* __restrict__ out, const T* __restrict__ w,        \
                                      const T* __restrict__ g, T a, int64_t n) {          \
    return axpy_dot_row_body(out, w, g, a, n);                                            \
  }

CHANFLEX_ROW_KERNELS(float)
CHANFLEX_ROW_KERNELS(double)

// ---------------------------------------------------------------------------
// Shapes of one call, in the terms the loops use.

struct Plan {
  ConvGeometry g;
  int64_t rows;         // C_out / groups: rows of one group's weight matrix
  int64_t cols;         // C_in / groups * kh * kw: its columns
  int64_t pixels;       // H_out * W_out
  int64_t group_size;   // rows * cols
  int64_t kernel_size;  // groups * rows * cols = |W| of one kernel
  int64_t plane;        // C_in * H * W: one input sample
  int64_t unfolded;     // C_in * kh * kw * pixels: one unfolded sample
  bool identity_unfold; // 1x1, stride 1, no padding: unfold(x) is x itself
};

Plan make_plan(const ConvGeometry& g) {
  Plan p;
  p.g = g;
  p.rows = g.out_channels / g.groups;
  p.cols = g.group_in_channels * g.kernel_h * g.kernel_w;
  p.pixels = g.out_h * g.out_w;
  p.group_size = p.rows * p.cols;
  p.kernel_size = g.groups * p.group_size;
  p.plane = g.in_channels * g.height * g.width;
  p.unfolded = g.groups * p.cols * p.pixels;
  p.identity_unfold = g.kernel_h == 1 && g.kernel_w == 1 && g.stride[0] == 1 &&
                      g.stride[1] == 1 && g.padding[0] == 0 && g.padding[1] == 0;
  TORCH_CHECK(std::max({p.rows, p.cols, p.pixels}) < INT_MAX,
              "dynamic_conv2d: matrix dimensions must be < 2^31, got rows=", p.rows,
              ", cols=", p.cols, ", pixels=", p.pixels);
  return p;
}

// Budget for one chunk of unfolded samples: CHANFLEX_CPU_CHUNK_BYTES when set
// (tests use a tiny one to cross chunk boundaries), else `fallback`.
int64_t chunk_budget_bytes(int64_t fallback) {
  const char* env = std::getenv("CHANFLEX_CPU_CHUNK_BYTES");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && value > 0,
                "CHANFLEX_CPU_CHUNK_BYTES: expected a positive integer, got '", env, "'");
    return value;
  }
  return fallback;
}

// 8 MiB keeps a forward chunk's unfolded input in the last-level cache and the
// working memory near a static convolution's.
constexpr int64_t kForwardChunkBytes = int64_t{8} << 20;

// Samples per chunk: as many unfolded samples as fit the budget, but at
// least one per thread so single-tile layers still run in parallel.
int64_t chunk_samples(const Plan& p, int64_t batch, size_t elem, int64_t budget) {
  const int64_t per_sample = std::max<int64_t>(1, p.unfolded * static_cast<int64_t>(elem));
  const int64_t fit = std::max<int64_t>(chunk_budget_bytes(budget) / per_sample, 1);
  return std::min<int64_t>(std::max<int64_t>(fit, at::get_num_threads()), std::max<int64_t>(batch, 1));
}

// Chunk budget of passes that pack every weight tile once per chunk: up to the
// size of the K kernels (no more than the K-fold weight gradient the backward
// returns anyway), so large weights are packed few times.
int64_t kernel_sized_budget(const Plan& p, size_t elem) {
  return std::max(kForwardChunkBytes, p.g.num_kernels * p.kernel_size * static_cast<int64_t>(elem));
}

// Tiles of one weight dimension of length `extent`: about 64 wide, where
// single-threaded BLAS runs at its best on these shapes (a K-kernel tile of a
// 512x4608 layer is then ~5 MiB, resident in the last-level cache while every
// sample of the chunk uses it). With `balance`, as many tiles per group that
// the tile count over all groups splits evenly across threads (the backward
// gives each thread whole tiles).
struct Tiling {
  int64_t extent, size, count;  // tile i covers [i * size, min(extent, (i + 1) * size))
};

Tiling make_tiling(int64_t extent, int64_t groups, bool balance) {
  constexpr int64_t kTarget = 64;
  const int64_t threads = at::get_num_threads();
  int64_t count = (extent + kTarget - 1) / kTarget;
  while (balance && (groups * count) % threads != 0 && extent / (count + 1) >= 16) ++count;
  const int64_t size = (extent + count - 1) / count;
  return {extent, size, (extent + size - 1) / size};
}

// Tiles of a group's `extent` = channels * taps unfolded rows that hold whole
// channels, so that the thread owning a tile owns the input planes its rows
// fold into: the fewest channels that make at least 64 rows and a multiple of
// 16 (BLAS's edge cases cost: 64->128 at 56x56, stride 2, 3x3, grad_x 0.91
// of the time at 144 rows, 0.98 at 72, 1.10 at 63), else about 64 rows; as
// many tiles as split evenly across threads where the channels allow.
Tiling make_channel_tiling(int64_t extent, int64_t taps, int64_t groups) {
  constexpr int64_t kMinRows = 64, kMaxAlignedRows = 160, kRowMultiple = 16;
  const int64_t threads = at::get_num_threads();
  const int64_t channels = extent / taps;
  const int64_t aligned = std::lcm(taps, kRowMultiple);
  const int64_t aligned_rows = (kMinRows + aligned - 1) / aligned * aligned;
  const int64_t per_tile = aligned_rows <= kMaxAlignedRows ? aligned_rows / taps
                                                           : std::max<int64_t>(1, (kMinRows + taps / 2) / taps);
  int64_t count = (channels + per_tile - 1) / per_tile;
  while ((groups * count) % threads != 0 && count < channels) ++count;
  const int64_t tile_channels = (channels + count - 1) / count;
  return {extent, tile_channels * taps, (channels + tile_channels - 1) / tile_channels};
}

// Runs body(begin, end) over contiguous, evenly split ranges of [0, tasks),
// one per thread; serially when there are fewer tasks than threads, so that
// each GEMM can use every thread.
template <typename F>
void for_each_range(int64_t tasks, const F& body) {
  if (tasks >= at::get_num_threads()) {
    at::parallel_for(0, tasks, 1, body);
  } else {
    body(0, tasks);
  }
}

// ---------------------------------------------------------------------------
// im2col / col2im of one sample: x (C, H, W) <-> cols (C * kh * kw, pixels).

// Output columns [lo, hi) whose input column is inside the image.
inline void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out,
                        int64_t* lo, int64_t* hi) {
  // input index = o * stride + offset must lie in [0, size)
  *lo = offset >= 0 ? 0 : std::min(out, (-offset + stride - 1) / stride);
  *hi = size - offset <= 0 ? 0 : std::min(out, (size - offset + stride - 1) / stride);
  *hi = std::max(*hi, *lo);
}

// dst[i] = src[i * stride] for i < n, AVX2: 8 floats per step at strides 1
// and 2 (two loads, even lanes picked by a shuffle), the rest one by one.
// The stride-2 loop stops while its second load still ends inside the run,
// so no load passes the run's last element.
__attribute__((target("avx2,fma")))
void gather_run_avx2(const float* src, int64_t stride, int64_t n, float* dst) {
  int64_t i = 0;
  if (stride == 1) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  } else if (stride == 2) {
    for (; i + 8 < n; i += 8) {
      const __m256 v0 = _mm256_loadu_ps(src + 2 * i), v1 = _mm256_loadu_ps(src + 2 * i + 8);
      // [v0 0 2, v1 0 2, v0 4 6, v1 4 6] -> [v0 0 2 4 6, v1 0 2 4 6]
      const __m256 even = _mm256_shuffle_ps(v0, v1, 0x88);
      _mm256_storeu_ps(dst + i, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8)));
    }
  }
  for (; i < n; ++i) dst[i] = src[i * stride];
}

// Output rows [oh0, oh1) of channel c's unfolded rows: row (c, ki, kj) at
// cols + ((c * kh + ki) * kw + kj) * ld, pixel (oh - oh0) * out_w + ow.
// Plain loops rather than memcpy/memset: late layers have rows of a few
// elements, where a library call per row costs more than the copy. AVX2
// (float only; callers check the CPU) copies each row's run with
// gather_run_avx2: at ResNet's stride-2 stem the element loop took as long
// as the GEMM.
template <typename T, bool AVX2 = false>
__attribute__((optimize("no-tree-loop-distribute-patterns")))
void unfold_channel_rows(const T* x, T* cols, int64_t ld, const Plan& p, int64_t c, int64_t oh0, int64_t oh1) {
  const ConvGeometry& g = p.g;
  const int64_t sw = g.stride[1];
  const T* plane = x + c * g.height * g.width;
  for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
    for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
      T* dst = cols + ((c * g.kernel_h + ki) * g.kernel_w + kj) * ld;
      const int64_t col_off = kj * g.dilation[1] - g.padding[1];
      int64_t lo, hi;
      valid_range(col_off, sw, g.width, g.out_w, &lo, &hi);
      for (int64_t oh = oh0; oh < oh1; ++oh, dst += g.out_w) {
        const int64_t ih = oh * g.stride[0] + ki * g.dilation[0] - g.padding[0];
        if (ih < 0 || ih >= g.height) {
          for (int64_t ow = 0; ow < g.out_w; ++ow) dst[ow] = T(0);
          continue;
        }
        const T* src = plane + ih * g.width + col_off;
        for (int64_t ow = 0; ow < lo; ++ow) dst[ow] = T(0);
        if constexpr (AVX2) {
          gather_run_avx2(src + lo * sw, sw, hi - lo, dst + lo);
        } else if (sw == 1) {
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * sw];
        }
        for (int64_t ow = hi; ow < g.out_w; ++ow) dst[ow] = T(0);
      }
    }
  }
}

// The whole plane of channel c's unfolded rows, p.pixels apart.
template <typename T>
void unfold_channel(const T* x, T* cols, const Plan& p, int64_t c) {
  unfold_channel_rows(x, cols, p.pixels, p, c, 0, p.g.out_h);
}

// dst[i * stride] += src[i] for i < n, AVX2: 8 floats per step at strides 1
// and 2 (at 2, src spread to the even lanes of two vectors, whose odd lanes
// add zero), the rest one by one. The stride-2 loop stops while its second
// store still ends inside the run, so no store passes dst[(n - 1) * 2].
__attribute__((target("avx2,fma")))
void scatter_add_run_avx2(const float* src, int64_t stride, int64_t n, float* dst) {
  int64_t i = 0;
  if (stride == 1) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
  } else if (stride == 2) {
    const __m256i low = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), high = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    const __m256 zero = _mm256_setzero_ps();
    for (; i + 8 < n; i += 8) {
      const __m256 v = _mm256_loadu_ps(src + i);
      float* d = dst + 2 * i;
      _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), _mm256_blend_ps(_mm256_permutevar8x32_ps(v, low), zero, 0xAA)));
      _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), _mm256_blend_ps(_mm256_permutevar8x32_ps(v, high), zero, 0xAA)));
    }
  }
  for (; i < n; ++i) dst[i * stride] += src[i];
}

// Writes one input plane (H, W) as the sum of its channel's kh * kw
// unfolded rows, p.pixels apart from `rows` on. AVX2 (float only; callers
// check the CPU) adds each row's run with scatter_add_run_avx2: at stride 2
// the element loop took a quarter of grad_x's GEMM time (64->128 at 56x56).
template <typename T, bool AVX2 = false>
__attribute__((optimize("no-tree-loop-distribute-patterns")))
void fold_plane(const T* rows, T* plane, const Plan& p) {
  const ConvGeometry& g = p.g;
  const int64_t sw = g.stride[1];
  for (int64_t j = 0; j < g.height * g.width; ++j) plane[j] = T(0);
  for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
    for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
      const T* src = rows + (ki * g.kernel_w + kj) * p.pixels;
      const int64_t col_off = kj * g.dilation[1] - g.padding[1];
      int64_t lo, hi;
      valid_range(col_off, sw, g.width, g.out_w, &lo, &hi);
      for (int64_t oh = 0; oh < g.out_h; ++oh, src += g.out_w) {
        const int64_t ih = oh * g.stride[0] + ki * g.dilation[0] - g.padding[0];
        if (ih < 0 || ih >= g.height) continue;
        T* dst = plane + ih * g.width + col_off;
        if constexpr (AVX2) {
          scatter_add_run_avx2(src + lo, sw, hi - lo, dst + lo * sw);
        } else if (sw == 1) {
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += src[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow * sw] += src[ow];
        }
      }
    }
  }
}

// fold_plane, with AVX2 where `vector` says the CPU has it (float only).
template <typename T>
void fold_plane_on(bool vector, const T* rows, T* plane, const Plan& p) {
  if constexpr (std::is_same_v<T, float>) {
    if (vector) return fold_plane<float, true>(rows, plane, p);
  }
  fold_plane<T>(rows, plane, p);
}

template <typename T>
void fold_channel(bool vector, const T* cols, T* x, const Plan& p, int64_t c) {
  fold_plane_on(vector, cols + c * p.g.kernel_h * p.g.kernel_w * p.pixels, x + c * p.g.height * p.g.width, p);
}

// Runs body(b, c) for every sample b < n and input channel c, in parallel:
// each pair owns its own rows of the unfolded buffer and its own input plane.
template <typename F>
void for_each_sample_channel(const Plan& p, int64_t n, const F& body) {
  const int64_t channels = p.g.in_channels;
  at::parallel_for(0, n * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i / channels, i % channels);
  });
}

// x (n, C, H, W) -> cols (n, C*kh*kw, pixels), and the adjoint (summing overlaps).
template <typename T>
void unfold_samples(const T* x, T* cols, const Plan& p, int64_t n) {
  for_each_sample_channel(p, n, [&](int64_t b, int64_t c) {
    unfold_channel(x + b * p.plane, cols + b * p.unfolded, p, c);
  });
}

template <typename T>
void fold_samples(bool vector, const T* cols, T* x, const Plan& p, int64_t n) {
  for_each_sample_channel(p, n, [&](int64_t b, int64_t c) {
    fold_channel(vector, cols + b * p.unfolded, x + b * p.plane, p, c);
  });
}

// Mixes one weight block for `samples` samples at once:
//   out + s * out_stride  (nrows x ncols, leading dim ld_out) = sum_k a[s, k] W_k block,
// where the block starts at w and kernel k lies k * kernel_stride further (row
// stride ld). Columns go in spans whose K kernel slices stay in L1 while every
// sample uses them, so the kernels are read once per call, not once per sample.
template <typename T>
void mix_block(const T* w, int64_t kernel_stride, int64_t ld, const T* a, int64_t num_kernels,
               int64_t samples, int64_t nrows, int64_t ncols, T* out, int64_t ld_out,
               int64_t out_stride) {
  constexpr int64_t kSpan = 512;
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t j0 = 0; j0 < ncols; j0 += kSpan) {
      const int64_t len = std::min(kSpan, ncols - j0);
      const T* src = w + r * ld + j0;
      for (int64_t s = 0; s < samples; ++s) {
        const T* as = a + s * num_kernels;
        T* o = out + s * out_stride + r * ld_out + j0;
        scale_row(o, src, as[0], len);
        for (int64_t k = 1; k < num_kernels; ++k) {
          axpy_row(o, src + k * kernel_stride, as[k], len);
        }
      }
    }
  }
}

// Samples mixed per pass over a weight tile: enough to cut the kernel reads by
// this factor, few enough that the mixed tiles stay in cache for their GEMMs.
constexpr int64_t kSampleBlock = 4;

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

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
    TORCH_CHECK(posix_memalign(&block, 64, bytes) == 0, "dynamic_conv2d_backward: out of memory allocating ",
                bytes, " bytes for grad_weight");
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

// An uninitialised float tensor for a weight gradient: from grad_pool() when
// it is large, else from the ordinary allocator.
at::Tensor empty_weight_grad(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * sizeof(float);
  if (opts.dtype() != at::kFloat || bytes < kPooledGradBytes) return at::empty(sizes, opts);
  void* block = grad_pool().acquire(bytes);
  return at::from_blob(block, sizes, [bytes](void* data) { grad_pool().release(data, bytes); }, opts);
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

// ---------------------------------------------------------------------------
// Padding taps skipped (forward, AVX2 and AVX-512).
//
// With zero padding, part of a small plane's unfolded input is padding: a
// 3x3, pad-1 conv multiplies 18% of its products by zeros on a 7x7 plane,
// 25% on 5x5 and 13% on 10x10, which the library's direct conv skips (its
// 512@7 forward runs at 94% of the FMA peak on the products it does). Here
// the output pixels fall into classes whose taps (kernel positions ki * kw
// + kj) lie inside the image for each of their pixels: the interior (every
// tap), the edge rows (their rows' taps, every column) and the edge columns
// of the interior rows. The forward's GEMM runs class by class over a
// permuted pixel order; a class's packed B holds only its taps, and its
// micro-kernel calls step over the others in A (MicroOut::tap_steps).
struct TapClass {
  int64_t first;              // its first pixel in the permuted order
  int64_t pixels;
  int64_t b_offset;           // floats into one group's packed B where its pixel panels start
  std::vector<int32_t> taps;  // ascending
  int64_t gather_offset = 0;  // where its entries start in TapClasses::gather
  int64_t window_offset = 0;  // where its groups start in TapClasses::windows
};

struct TapClasses {
  std::vector<int32_t> order;     // permuted pixel -> output pixel oh * out_w + ow
  std::vector<TapClass> classes;  // classes[0] has every tap (the mixing calls run on it)
  int64_t taps = 0;               // kh * kw
  int64_t group_b = 0;            // floats of one group's packed B
  double kept = 1.0;              // products kept: sum of pixels * taps over pixels * kh * kw
  // One channel's packed B of every class, as offsets into the input plane
  // (-1: zero, for padding in the corners of edge rows and pixels past a
  // class's last): panel by panel, tap by tap, kNR pixels each.
  std::vector<int32_t> gather;
  // Per group of 16 entries of a panel (the last one may be short): the
  // lowest offset of a window of kWindowFloats that holds every offset of
  // the group that is not -1, or -1 where none does (see
  // unfold_channels_classes_windowed).
  std::vector<int32_t> windows;
};

constexpr int64_t kWindowFloats = 64;  // four AVX-512 registers

// The group's window start (TapClasses::windows) of offsets [at, at + n).
int32_t window_of(const int32_t* at, int64_t n) {
  int32_t low = std::numeric_limits<int32_t>::max(), high = -1;
  for (int64_t e = 0; e < n; ++e) {
    if (at[e] < 0) continue;
    low = std::min(low, at[e]);
    high = std::max(high, at[e]);
  }
  if (high < 0) return 0;  // every entry zero: any window
  return high - low < kWindowFloats ? low : -1;
}

// Bit t set where tap t of one kernel dimension reads inside the image at
// output position o.
uint64_t inside_taps(int64_t o, int64_t stride, int64_t pad, int64_t dilation, int64_t size, int64_t k) {
  uint64_t mask = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t i = o * stride - pad + t * dilation;
    if (i >= 0 && i < size) mask |= uint64_t{1} << t;
  }
  return mask;
}

// The classes of a conv's output pixels; empty (no classes) where no pixel
// has every tap, some pixel has none, or every pixel has every tap.
TapClasses make_tap_classes(const Plan& p) {
  const ConvGeometry& g = p.g;
  TapClasses c;
  if (g.kernel_h > 63 || g.kernel_w > 63) return c;
  const uint64_t all_rows = (uint64_t{1} << g.kernel_h) - 1, all_cols = (uint64_t{1} << g.kernel_w) - 1;
  std::vector<uint64_t> row_mask(g.out_h), col_mask(g.out_w);
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    row_mask[oh] = inside_taps(oh, g.stride[0], g.padding[0], g.dilation[0], g.height, g.kernel_h);
  for (int64_t ow = 0; ow < g.out_w; ++ow)
    col_mask[ow] = inside_taps(ow, g.stride[1], g.padding[1], g.dilation[1], g.width, g.kernel_w);
  const auto has = [](const std::vector<uint64_t>& m, uint64_t v) { return std::find(m.begin(), m.end(), v) != m.end(); };
  if (!has(row_mask, all_rows) || !has(col_mask, all_cols) || has(row_mask, 0) || has(col_mask, 0)) return c;
  // (row mask, column mask, pixels) of each class, the interior first.
  struct Members { uint64_t rows, cols; std::vector<int32_t> pixels; };
  std::vector<Members> members{{all_rows, all_cols, {}}};
  const auto class_of = [&](uint64_t rows, uint64_t cols) -> Members& {
    for (Members& m : members)
      if (m.rows == rows && m.cols == cols) return m;
    members.push_back({rows, cols, {}});
    return members.back();
  };
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      // Edge rows keep every column (their corners multiply a few zeros):
      // one class per distinct row mask, not one per corner.
      const bool edge_row = row_mask[oh] != all_rows;
      class_of(row_mask[oh], edge_row ? all_cols : col_mask[ow]).pixels.push_back(static_cast<int32_t>(oh * g.out_w + ow));
    }
  if (members.size() == 1) return c;
  c.taps = g.kernel_h * g.kernel_w;
  int64_t products = 0;
  for (const Members& m : members) {
    TapClass cl;
    cl.first = static_cast<int64_t>(c.order.size());
    cl.pixels = static_cast<int64_t>(m.pixels.size());
    cl.b_offset = c.group_b;
    for (int64_t ki = 0; ki < g.kernel_h; ++ki)
      for (int64_t kj = 0; kj < g.kernel_w; ++kj)
        if ((m.rows >> ki & 1) && (m.cols >> kj & 1)) cl.taps.push_back(static_cast<int32_t>(ki * g.kernel_w + kj));
    const int64_t depth = g.group_in_channels * static_cast<int64_t>(cl.taps.size());
    c.group_b += (cl.pixels + kNR - 1) / kNR * depth * kNR;
    products += cl.pixels * static_cast<int64_t>(cl.taps.size());
    cl.gather_offset = static_cast<int64_t>(c.gather.size());
    for (int64_t local = 0; local < cl.pixels; local += kNR)
      for (const int32_t tap : cl.taps)
        for (int64_t j = 0; j < kNR; ++j) {
          if (local + j >= cl.pixels) {
            c.gather.push_back(-1);
            continue;
          }
          const int64_t oh = m.pixels[local + j] / g.out_w, ow = m.pixels[local + j] % g.out_w;
          const int64_t ih = oh * g.stride[0] - g.padding[0] + tap / g.kernel_w * g.dilation[0];
          const int64_t iw = ow * g.stride[1] - g.padding[1] + tap % g.kernel_w * g.dilation[1];
          const bool inside = ih >= 0 && ih < g.height && iw >= 0 && iw < g.width;
          c.gather.push_back(inside ? static_cast<int32_t>(ih * g.width + iw) : -1);
        }
    cl.window_offset = static_cast<int64_t>(c.windows.size());
    const int64_t panel_entries = static_cast<int64_t>(cl.taps.size()) * kNR;
    for (int64_t entry = cl.gather_offset; entry < static_cast<int64_t>(c.gather.size()); entry += panel_entries)
      for (int64_t e = 0; e < panel_entries; e += 16)
        c.windows.push_back(window_of(c.gather.data() + entry + e, std::min<int64_t>(16, panel_entries - e)));
    c.order.insert(c.order.end(), m.pixels.begin(), m.pixels.end());
    c.classes.push_back(std::move(cl));
  }
  c.kept = static_cast<double>(products) / static_cast<double>(p.pixels * c.taps);
  return c;
}

// Whether the packed forward skips padding taps: where that drops at least
// kMinSkippedProducts of the products, or as CHANFLEX_CPU_SKIP_PADDING says
// ("1": wherever there are classes, "0": never; tests force it). Each class
// adds calls that stream the A panels again. AMD Zen 4, K = 4, interleaved
// in one process, ms, off -> on, AVX-512: 512@7 (16% of the products
// skipped) 45.7 -> 37.4, 512@5 (21%) 26.4 -> 21.1, 512@10 (12%) 93.5 ->
// 85.9, 256->512@10 43.9 -> 41.7, stride 2: 256->512 14->7 (9%) 23.7 ->
// 21.7, 128->256 28->14 (5%) 23.0 -> 21.6; the AVX2 micro-kernels (capped,
// not measured on an AVX2-only CPU): 48.7 -> 45.4, 27.7 -> 25.6, 90.5 ->
// 85.5, 44.6 -> 41.2, 24.0 -> 21.8, 31.3 -> 29.9.
constexpr double kMinSkippedProducts = 0.04;
bool use_tap_classes(const TapClasses& c, PackedIsa isa) {
  const char* env = std::getenv("CHANFLEX_CPU_SKIP_PADDING");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_SKIP_PADDING: expected '0' or '1', got '", value, "'");
  if (c.classes.empty() || isa == PackedIsa::kGeneric) return false;
  return value.empty() ? 1.0 - c.kept >= kMinSkippedProducts : value == "1";
}

// Transposes 8 registers holding an 8x8 block: r[i][j] -> r[j][i].
__attribute__((target("avx2,fma")))
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// The flipped taps of 8 adjacent 9-tap runs (run i at src + 9 i; runs from
// `valid` on read as zeros): taps[t] lane i = src[9 i + 8 - t]. The first 8
// taps through one 8x8 register transpose, the 9th element by element
// (grad_x's A: W's 9-tap runs of 16 input channels are adjacent).
__attribute__((target("avx2,fma")))
inline void flipped_taps8(const float* src, int64_t valid, __m256 taps[9]) {
  __m256 m[8];
  alignas(32) float last[8];
  for (int64_t i = 0; i < 8; ++i) {
    m[i] = i < valid ? _mm256_loadu_ps(src + i * 9) : _mm256_setzero_ps();
    last[i] = i < valid ? src[i * 9 + 8] : 0.f;
  }
  transpose8x8(m);
  taps[0] = _mm256_load_ps(last);
  for (int t = 1; t < 9; ++t) taps[t] = m[8 - t];
}

// Streaming copies of n floats (n a multiple of the vector width, dst
// vector-aligned), one function per ISA so that an AVX2 CPU never runs code
// compiled for AVX-512.
__attribute__((target("avx512f")))
void copy_streaming_avx512(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
}

__attribute__((target("avx2")))
void copy_streaming_avx2(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
}

// dst[0, n) = src[0, n), with stores that bypass the caches where dst is
// vector-aligned: a written line then costs no read for ownership (the K-fold
// weight gradient is written once, 38 MB at 512@7). Callers fence before
// other threads read dst.
void copy_streaming(float* dst, const float* src, int64_t n, PackedIsa isa) {
  const int64_t lanes = isa == PackedIsa::kAvx512 ? 16 : 8;
  if (reinterpret_cast<uintptr_t>(dst) % (lanes * sizeof(float)) != 0 || n % lanes != 0) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (isa == PackedIsa::kAvx512) {
    copy_streaming_avx512(dst, src, n);
  } else {
    copy_streaming_avx2(dst, src, n);
  }
}

// dst[q * width + i] = src[i * ld + q] for 8 rows i and pixels q < pixels:
// 8 rows of an unfolded block written as 8 adjacent lanes of a transposed
// (pixel-major) panel `width` floats wide, 8x8 blocks transposed in
// registers (one element per store made these copies a fifth of the
// weight gradient at 256@14); the last pixels % 8 in scalar.
__attribute__((target("avx2,fma")))
void transpose_rows8(const float* src, int64_t ld, int64_t pixels, float* dst, int64_t width) {
  const int64_t pixels8 = pixels - pixels % 8;
  for (int64_t q = 0; q < pixels8; q += 8) {
    __m256 m[8];
    for (int64_t i = 0; i < 8; ++i) m[i] = _mm256_loadu_ps(src + i * ld + q);
    transpose8x8(m);
    for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (q + j) * width, m[j]);
  }
  for (int64_t q = pixels8; q < pixels; ++q)
    for (int64_t i = 0; i < 8; ++i) dst[q * width + i] = src[i * ld + q];
}

// Where one micro-kernel call's sums start and end. A product deeper than
// one reduction block carries partial sums from block to block in `partial`,
// pixel-major (pixel j's rows at partial + j * partial_ld, 64-byte aligned),
// so that carrying them is a vector load and store per register; only the
// last block writes the mr x NR corner of row-major C (ldc), transposed.
// (Read-modify-writes of C itself, element by element, took up to 10% of
// the forward at 256@14, 5 reduction blocks deep.)
struct MicroOut {
  float* c;
  int64_t ldc;
  int64_t mr;             // valid rows
  float* partial;
  int64_t partial_ld;
  bool load_partial;      // not the first reduction block
  bool store_partial;     // not the last one
  // With TapClasses: the output pixel of each of the call's
  // pixels (C's columns are then relative to c), and for a class without
  // every tap, its taps' steps within each channel_steps-step channel of A
  // (kc counts B's steps: channels x ntaps).
  const int32_t* pixel_index = nullptr;
  const int32_t* tap_steps = nullptr;
  int64_t ntaps = 0;
  int64_t channel_steps = 0;
  // Plane kernels with pivoted attention (see PivotedAttention): the last
  // block multiplies the sums by *scale.
  const float* scale = nullptr;
  // AVX-512 kernels: a cache line a step requested into L2 from here on (the
  // next row tile's prepacked kernels, see run_packed_gemm), none if null.
  const char* l2_prefetch = nullptr;
};

// A call that mixes its own A panels (AVX-512): the first pixel call of a
// row panel pair computes each A vector as sum_k attn[k] A_k from the K
// packed kernels while it multiplies, and writes it to `mixed` (the A the
// pair's later calls read). A separate mixing pass wrote every mixed panel
// to L2 and the micro-kernel read it back: 13% of the forward at 512@7.
// Pair kernels (PAIR) also mix the next sample's A from the same kernel
// vectors, with attn_next, into mixed_next (see run_packed_gemm).
struct MicroMix {
  const float* kernels;   // kernel 0's first A panel, at the call's first reduction step
  int64_t panel_stride;   // floats between one kernel's adjacent A panels
  int64_t kernel_stride;  // floats between kernels
  const float* attn;      // the sample's num_kernels weights
  int64_t num_kernels;
  float* mixed;           // the mixed A panels (kc x 16 each, the call's a_panel_stride apart)
  const float* attn_next = nullptr;  // pair kernels: the next sample's weights
  float* mixed_next = nullptr;       // and where its mixed A panels go
};

// B panels are prefetched this many steps ahead (1.5 KB of a 6-pixel
// panel): a tile's calls read each sample's B block from L3 (the chunk's
// unfolded samples do not fit L2), and on AMD Zen 5 (1 MiB L2) the hardware
// prefetcher alone left them at ~60% of the FMA peak; in a replica of the
// forward's loop prefetching took one core from 150 to 225 GFLOP/s.
constexpr int64_t kBPrefetchSteps = 64;

// A panels (kc x 16 each, a_panel_stride floats apart) times the first NR
// pixels of B panels (kc x 6 each, b_panel_stride floats apart), into `out`.
// Accumulators hold C's columns. A short NR serves the last pixels without
// computing the padding (a 7x7 plane is 8 panels of 6 and one of 1). AVX2:
// one panel of 16 rows and one of 6 pixels, two registers per pixel.
// AVX-512: RP row panels (16 or 32 rows) and up to 12 pixels, one register
// per row panel and pixel.
// SKIP: the steps of A are those of the TapClasses taps (MicroOut::tap_steps).
template <int NR, bool SKIP = false>
__attribute__((target("avx2,fma")))
void micro_kernel_avx2(int64_t kc, const float* a, int64_t /*a_panel_stride*/, const float* b,
                       int64_t b_panel_stride, const MicroOut& out, const MicroMix* /*mix: AVX-512 only*/) {
  __m256 lo[NR], hi[NR];
#pragma GCC unroll 7
  for (int j = 0; j < NR; ++j) {
    lo[j] = out.load_partial ? _mm256_load_ps(out.partial + j * out.partial_ld) : _mm256_setzero_ps();
    hi[j] = out.load_partial ? _mm256_load_ps(out.partial + j * out.partial_ld + 8) : _mm256_setzero_ps();
  }
  // A 7-pixel call (a plane's last, see call_pixels) takes its 7th pixel
  // from the next B panel; its 14 accumulators leave no register for A's
  // second half, which the FMAs read from L1 instead.
  const float* b_next = b + b_panel_stride;
  // SKIP: the current channel of A starts at a_channel, its step `tap` at a.
  const float* a_channel = a;
  int64_t tap = 0;
  if constexpr (SKIP) a = a_channel + out.tap_steps[0] * kMR;
  const auto next_step = [&] {
    if constexpr (SKIP) {
      if (++tap == out.ntaps) {
        tap = 0;
        a_channel += out.channel_steps * kMR;
      }
      a = a_channel + out.tap_steps[tap] * kMR;
    } else {
      a += kMR;
    }
  };
  for (int64_t q = 0; q < kc; ++q, next_step(), b += kNR, b_next += kNR) {
    _mm_prefetch(reinterpret_cast<const char*>(b + kBPrefetchSteps * kNR), _MM_HINT_T0);
    if constexpr (NR > kNR) {
      _mm_prefetch(reinterpret_cast<const char*>(b_next + kBPrefetchSteps * kNR), _MM_HINT_T0);
      const __m256 a0 = _mm256_loadu_ps(a);
#pragma GCC unroll 7
      for (int j = 0; j < NR; ++j) {
        const __m256 bj = _mm256_broadcast_ss(j < kNR ? b + j : b_next + (j - kNR));
        lo[j] = _mm256_fmadd_ps(a0, bj, lo[j]);
        // hi[j] += A[8:16] * bj with A as the FMA's memory operand: as an
        // intrinsic GCC hoists the load into a register and spills an
        // accumulator instead (a store-load chain through every step).
        asm("vfmadd231ps %[a], %[b], %[acc]"
            : [acc] "+x"(hi[j])
            : [b] "x"(bj), [a] "m"(*reinterpret_cast<const __m256_u*>(a + 8)));
      }
      continue;
    }
    const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) {
      const __m256 bj = _mm256_broadcast_ss(b + j);
      lo[j] = _mm256_fmadd_ps(a0, bj, lo[j]);
      hi[j] = _mm256_fmadd_ps(a1, bj, hi[j]);
    }
  }
  if (out.store_partial) {
#pragma GCC unroll 7
    for (int j = 0; j < NR; ++j) {
      _mm256_store_ps(out.partial + j * out.partial_ld, lo[j]);
      _mm256_store_ps(out.partial + j * out.partial_ld + 8, hi[j]);
    }
    return;
  }
  alignas(32) float tile[NR][kMR];
#pragma GCC unroll 7
  for (int j = 0; j < NR; ++j) {
    _mm256_store_ps(tile[j], lo[j]);
    _mm256_store_ps(tile[j] + 8, hi[j]);
  }
  for (int64_t i = 0; i < out.mr; ++i) {
    float* row = out.c + i * out.ldc;
    if (out.pixel_index != nullptr) {
      for (int j = 0; j < NR; ++j) row[out.pixel_index[j]] = tile[j][i];
    } else {
      for (int j = 0; j < NR; ++j) row[j] = tile[j][i];
    }
  }
}

// v * w and acc + v * w for a float w in memory, broadcast by the instruction
// itself ({1to16}) rather than into a register of its own. (GCC keeps a
// broadcast that several products use in a register.)
__attribute__((target("avx512f"))) inline __m512 mul_broadcast(__m512 v, const float* w) {
  __m512 out;
  asm("vmulps %2%{1to16%}, %1, %0" : "=v"(out) : "v"(v), "m"(*w));
  return out;
}
__attribute__((target("avx512f"))) inline __m512 fmadd_broadcast(__m512 v, const float* w, __m512 acc) {
  asm("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(v), "m"(*w));
  return acc;
}

// A panels are prefetched this many steps ahead: a row panel pair's first
// pixel call reads them from L2 (later calls find them in L1).
constexpr int64_t kPrefetchSteps = 16;

// One step of the mixing (MicroMix) for one 16-row A panel: returns sum_k
// attn[k] A_k at `kernels` (kernel k kernel_stride floats on) and writes it
// to `mixed`; PAIR also writes the next sample's to `mixed_next`. UNIT: the
// attention is pivoted (PivotedAttention), attn[0] and attn_next[0] are 1.
// One chain of K multiply-adds per mixed vector, the attention weights
// broadcast from memory by the instructions themselves: the 2K weight
// registers and a tree's partial sums did not fit beside the accumulators,
// and GCC spilled accumulators and reloaded the weights every step. AMD Zen
// 4, perf of the forward at 512@7: the 12-pixel mixing call went from 0.95x
// to 0.86x the time of the 13-pixel plain call beside it (the 9-pixel one at
// 512@5, which did not spill, the same within noise).
template <int MIX, bool PAIR, bool UNIT>
__attribute__((target("avx512f"), always_inline)) inline __m512 mix_step(const float* kernels, int64_t kernel_stride,
                                                                         const MicroMix& mix, float* mixed,
                                                                         float* mixed_next) {
  __m512 kv = _mm512_loadu_ps(kernels);
  __m512 a = UNIT ? kv : mul_broadcast(kv, mix.attn);
  __m512 an = PAIR ? (UNIT ? kv : mul_broadcast(kv, mix.attn_next)) : a;
#pragma GCC unroll 8
  for (int k = 1; k < MIX; ++k) {
    kv = _mm512_loadu_ps(kernels + k * kernel_stride);
    a = fmadd_broadcast(kv, mix.attn + k, a);
    if constexpr (PAIR) an = fmadd_broadcast(kv, mix.attn_next + k, an);
  }
#pragma GCC unroll 8
  for (int k = 0; k < MIX; ++k)
    _mm_prefetch(reinterpret_cast<const char*>(kernels + k * kernel_stride + kPrefetchSteps * kMR), _MM_HINT_T0);
  _mm512_storeu_ps(mixed, a);
  if constexpr (PAIR) _mm512_storeu_ps(mixed_next, an);
  return a;
}
template <int RP, int NR, int MIX, bool PAIR = false, bool SKIP = false>
__attribute__((target("avx512f,avx2,fma")))
void micro_kernel_avx512(int64_t kc, const float* a, int64_t a_panel_stride, const float* b,
                         int64_t b_panel_stride, const MicroOut& out, const MicroMix* mix) {
  __m512 acc[RP][NR];
#pragma GCC unroll 2
  for (int r = 0; r < RP; ++r)
#pragma GCC unroll 14
    for (int j = 0; j < NR; ++j)
      acc[r][j] = out.load_partial ? _mm512_load_ps(out.partial + j * out.partial_ld + r * kMR) : _mm512_setzero_ps();
  // One pointer per A and B panel, each advanced by a step: indexing off a
  // single base made GCC keep one offset register per pixel and spill them.
  constexpr int kBPanels = (NR + kNR - 1) / kNR;
  const float* ap[RP];
  const float* bp[kBPanels];
#pragma GCC unroll 2
  for (int r = 0; r < RP; ++r) ap[r] = a + r * a_panel_stride;
#pragma GCC unroll 3
  for (int i = 0; i < kBPanels; ++i) bp[i] = b + i * b_panel_stride;
  // MIX: ap walks kernel 0's panels, mp the mixed panels it writes.
  float* mp[RP];
  float* np[RP];
  const int64_t mix_stride = MIX ? mix->kernel_stride : 0;
  if constexpr (MIX) {
#pragma GCC unroll 2
    for (int r = 0; r < RP; ++r) {
      ap[r] = mix->kernels + r * mix->panel_stride;
      mp[r] = mix->mixed + r * a_panel_stride;
      if constexpr (PAIR) np[r] = mix->mixed_next + r * a_panel_stride;
    }
  }
  static_assert(!(SKIP && MIX), "calls that skip taps read mixed A");
  // SKIP: step `tap` of the current channel of A is tap_steps[tap] steps in.
  int64_t tap = 0, tap_offset = SKIP ? out.tap_steps[0] * kMR : 0;
  // SKIP prefetches the same tap whole channels ahead: kPrefetchSteps plain
  // steps ahead would land on taps the call skips as often as not (AMD Zen
  // 4, in-process A/B, forward 512@7 37.0 -> 36.7 ms, 512@5 21.3 -> 21.0).
  const int64_t prefetch_offset =
      SKIP ? (kPrefetchSteps + out.ntaps - 1) / out.ntaps * out.channel_steps * kMR : kPrefetchSteps * kMR;
  // Without a target, the line of A the step loads anyway (no branch a step).
  const char* l2_line = out.l2_prefetch != nullptr ? out.l2_prefetch : reinterpret_cast<const char*>(ap[0]);
  const int64_t l2_step = out.l2_prefetch != nullptr ? 64 : kMR * sizeof(float);
  for (int64_t q = 0; q < kc; ++q) {
    _mm_prefetch(l2_line, _MM_HINT_T1);
    l2_line += l2_step;
    __m512 ar[RP];
    if constexpr (MIX) {
#pragma GCC unroll 2
      for (int r = 0; r < RP; ++r) {
        ar[r] = mix_step<MIX, PAIR, false>(ap[r], mix_stride, *mix, mp[r], PAIR ? np[r] : nullptr);
        mp[r] += kMR;
        ap[r] += kMR;
        if constexpr (PAIR) np[r] += kMR;
      }
    } else {
#pragma GCC unroll 2
      for (int r = 0; r < RP; ++r) {
        ar[r] = _mm512_loadu_ps(ap[r] + tap_offset);
        _mm_prefetch(reinterpret_cast<const char*>(ap[r] + tap_offset + prefetch_offset), _MM_HINT_T0);
        if constexpr (!SKIP) ap[r] += kMR;
      }
      if constexpr (SKIP) {
        if (++tap == out.ntaps) {
          tap = 0;
#pragma GCC unroll 2
          for (int r = 0; r < RP; ++r) ap[r] += out.channel_steps * kMR;
        }
        tap_offset = out.tap_steps[tap] * kMR;
      }
    }
    const float* bq[kBPanels];
#pragma GCC unroll 3
    for (int i = 0; i < kBPanels; ++i) {
      bq[i] = bp[i];
      _mm_prefetch(reinterpret_cast<const char*>(bp[i] + kBPrefetchSteps * kNR), _MM_HINT_T0);
      bp[i] += kNR;
    }
#pragma GCC unroll 14
    for (int j = 0; j < NR; ++j) {
      // Pixel j is column j % 6 of B panel j / 6.
      const __m512 bj = _mm512_set1_ps(bq[j / kNR][j % kNR]);
#pragma GCC unroll 2
      for (int r = 0; r < RP; ++r) acc[r][j] = _mm512_fmadd_ps(ar[r], bj, acc[r][j]);
    }
  }
  if (out.store_partial) {
#pragma GCC unroll 14
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
      for (int r = 0; r < RP; ++r) _mm512_store_ps(out.partial + j * out.partial_ld + r * kMR, acc[r][j]);
    return;
  }
  alignas(64) float tile[NR][RP * kMR];
#pragma GCC unroll 14
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
    for (int r = 0; r < RP; ++r) _mm512_store_ps(tile[j] + r * kMR, acc[r][j]);
  for (int64_t i = 0; i < out.mr; ++i) {
    float* row = out.c + i * out.ldc;
    if (out.pixel_index != nullptr) {
      for (int j = 0; j < NR; ++j) row[out.pixel_index[j]] = tile[j][i];
    } else {
      for (int j = 0; j < NR; ++j) row[j] = tile[j][i];
    }
  }
}

// (kc, A, A panel stride, B, B panel stride, where the sums go).
using MicroKernel = void (*)(int64_t, const float*, int64_t, const float*, int64_t, const MicroOut&,
                             const MicroMix*);
// Row panels (of 16) and pixels one call of each ISA's micro-kernel covers:
// 16 x 6 on AVX2 (12 of its 16 registers), and 16 x 7 for a plane's last
// call where 7 pixels are left (a 7x7 plane is 7 x 6 + 7 pixels, a 5x5 one
// 3 x 6 + 7: no 1-pixel call, which did 2 FMAs per 2 A loads and took 7%
// of the micro-kernel time at 512@7 on AMD Zen 3; in-process A/B there,
// forward 512@7 0.98-1.0x, 512@5 0.95-0.98x, grad_x 0.98x, 0.96x); 32 x 12 on AVX-512 (24 of 32;
// it loads 14 values per 24 vector FMAs), and up to 32 x 14 for the last
// call of a plane, so that no call is left with 1 or 2 pixels (a 7x7 plane
// is 12 + 12 + 12 + 13 pixels, not 4 x 12 + 1: the A panels are streamed
// once per call, whatever its width).
constexpr int64_t kMaxRowPanels = 2;
constexpr int64_t kMaxCallPixels = 14;
constexpr int64_t kMaxCallPixelsAvx2 = 7;
inline int64_t row_panels_per_call(PackedIsa isa) { return isa == PackedIsa::kAvx512 ? 2 : 1; }

// Pixels of the call that starts at pixel `first` of a `pixels`-wide plane
// (a multiple of 6 as long as more remain).
inline int64_t call_pixels(PackedIsa isa, int64_t first, int64_t pixels) {
  const int64_t left = pixels - first;
  if (isa != PackedIsa::kAvx512) return left <= kMaxCallPixelsAvx2 ? left : std::min(kNR, left);
  return left <= kMaxCallPixels ? left : std::min<int64_t>(2 * kNR, left);
}

// [valid pixels]: up to 6 per pixel panel.
// MIX: kernels the row's micro-kernels mix (0: they read mixed A).
// PAIR rows exist only for the kernels that mix (MIX > 0).
template <int RP, int MIX, bool PAIR, size_t... NR>
constexpr std::array<MicroKernel, kMaxCallPixels + 1> avx512_kernel_row(std::index_sequence<NR...>) {
  if constexpr (PAIR && MIX == 0) return {};
  else return {nullptr, micro_kernel_avx512<RP, static_cast<int>(NR) + 1, MIX, PAIR>...};
}
template <size_t... NR>
constexpr std::array<MicroKernel, kMaxCallPixelsAvx2 + 1> avx2_kernel_row(std::index_sequence<NR...>) {
  return {nullptr, micro_kernel_avx2<static_cast<int>(NR) + 1>...};
}
constexpr std::array<MicroKernel, kMaxCallPixelsAvx2 + 1> kMicroKernelsAvx2 =
    avx2_kernel_row(std::make_index_sequence<kMaxCallPixelsAvx2>{});
// The most kernels a micro-kernel mixes itself (MicroMix; one instantiation
// per count). Layers with more mix in a pass of their own (mix_packed_tile).
constexpr int kMaxMicroMixKernels = 8;
template <int RP, bool PAIR, size_t... MIX>
constexpr std::array<std::array<MicroKernel, kMaxCallPixels + 1>, kMaxMicroMixKernels + 1> avx512_kernel_table(
    std::index_sequence<MIX...>) {
  return {avx512_kernel_row<RP, static_cast<int>(MIX), PAIR>(std::make_index_sequence<kMaxCallPixels>{})...};
}
// [row panels - 1][kernels it mixes, 0: none][valid pixels].
constexpr std::array<std::array<MicroKernel, kMaxCallPixels + 1>, kMaxMicroMixKernels + 1>
    kMicroKernelsAvx512[kMaxRowPanels] = {
        avx512_kernel_table<1, false>(std::make_index_sequence<kMaxMicroMixKernels + 1>{}),
        avx512_kernel_table<2, false>(std::make_index_sequence<kMaxMicroMixKernels + 1>{})};
// The pair kernels (MicroMix::mixed_next), indexed likewise (1-8 kernels).
constexpr std::array<std::array<MicroKernel, kMaxCallPixels + 1>, kMaxMicroMixKernels + 1>
    kPairMicroKernelsAvx512[kMaxRowPanels] = {
        avx512_kernel_table<1, true>(std::make_index_sequence<kMaxMicroMixKernels + 1>{}),
        avx512_kernel_table<2, true>(std::make_index_sequence<kMaxMicroMixKernels + 1>{})};

// Calls of TapClasses that skip taps (MicroOut::tap_steps), indexed
// [row panels - 1][valid pixels].
template <int RP, size_t... NR>
constexpr std::array<MicroKernel, kMaxCallPixels + 1> avx512_skip_kernel_row(std::index_sequence<NR...>) {
  return {nullptr, micro_kernel_avx512<RP, static_cast<int>(NR) + 1, 0, false, true>...};
}
constexpr std::array<MicroKernel, kMaxCallPixels + 1> kSkipMicroKernelsAvx512[kMaxRowPanels] = {
    avx512_skip_kernel_row<1>(std::make_index_sequence<kMaxCallPixels>{}),
    avx512_skip_kernel_row<2>(std::make_index_sequence<kMaxCallPixels>{})};
template <size_t... NR>
constexpr std::array<MicroKernel, kMaxCallPixelsAvx2 + 1> avx2_skip_kernel_row(std::index_sequence<NR...>) {
  return {nullptr, micro_kernel_avx2<static_cast<int>(NR) + 1, true>...};
}
constexpr std::array<MicroKernel, kMaxCallPixelsAvx2 + 1> kSkipMicroKernelsAvx2 =
    avx2_skip_kernel_row(std::make_index_sequence<kMaxCallPixelsAvx2>{});

MicroKernel skip_micro_kernel(PackedIsa isa, int64_t row_panels, int64_t pixels) {
  return isa == PackedIsa::kAvx512 ? kSkipMicroKernelsAvx512[row_panels - 1][pixels] : kSkipMicroKernelsAvx2[pixels];
}

// The micro-kernel of one call; it mixes `mix_kernels` packed kernels into
// its A panels (MicroMix, AVX-512 only) unless that is 0, and with `pair`
// the next sample's too.
MicroKernel micro_kernel(PackedIsa isa, int64_t row_panels, int64_t pixels, int64_t mix_kernels = 0,
                         bool pair = false) {
  if (isa != PackedIsa::kAvx512) return kMicroKernelsAvx2[pixels];
  return (pair ? kPairMicroKernelsAvx512 : kMicroKernelsAvx512)[row_panels - 1][mix_kernels][pixels];
}
// ---------------------------------------------------------------------------
// Direct small planes (forward and transposed grad_x, AVX-512): 3x3, pad 1
// convs onto W x W output planes (kPlaneShapes: stride 1 on 5x5 and 7x7,
// stride 2 from 14x14 to 7x7).
//
// The padding classes still multiply the corners of the edge rows (177
// products a channel pair at 5x5, where the direct conv does 169) and split
// the plane into calls of 3 to 9 pixels that stream A again each (at 512@5
// the 3- and 5-pixel calls took 10-40% more per product than the 9-pixel
// one). Here one call covers a
// band of whole rows (the whole plane at 5x5; rows 0-2 and 3-6 at 7x7)
// with one accumulator a pixel (16 rows of A): for each tap, one A vector
// times exactly the pixels whose input is inside the image, each input
// value broadcast from the sample's own plane by the FMA itself. No
// unfolded B is written, and the products are those of the direct conv.
struct PlaneShape {
  int64_t width, stride;  // output width (and height); input planes are stride x width square
};
constexpr PlaneShape kPlaneShapes[] = {{5, 1}, {7, 1}, {7, 2}};
constexpr int kPlaneTaps = 9;

// The kc steps (kc / 9 channels, 9 taps each) of one 16-row A panel (or,
// MIX, of the K kernels' panels, mixed as in micro_kernel_avx512) times
// output rows [ROW0, ROW0 + ROWS) of a W x W plane at stride S (input
// planes S W x S W): b is the first channel's input plane, b_plane floats
// between channels. Sums go as in
// micro_kernel_avx512 (MicroOut), pixel j of the band its column j.
// UNIT: the attention is pivoted (PivotedAttention): attn[0] (and
// attn_next[0]) are 1 and kernel 0 enters the mixed vectors unscaled.
template <int W, int S, int ROW0, int ROWS, int MIX, bool PAIR, bool UNIT = false>
__attribute__((target("avx512f,avx2,fma")))
void plane_kernel_avx512(int64_t kc, const float* a, int64_t /*a_panel_stride*/, const float* b, int64_t b_plane,
                         const MicroOut& out, const MicroMix* mix) {
  constexpr int NP = ROWS * W;
  constexpr int IW = S * W;  // input width and height
  static_assert(NP <= 28, "one register a pixel, beside A and the mixing's");
  __m512 acc[NP];
#pragma GCC unroll 28
  for (int j = 0; j < NP; ++j)
    acc[j] = out.load_partial ? _mm512_load_ps(out.partial + j * out.partial_ld) : _mm512_setzero_ps();
  const float* ap = MIX ? mix->kernels : a;
  float* mp = MIX ? mix->mixed : nullptr;
  float* np = PAIR ? mix->mixed_next : nullptr;
  const int64_t mix_stride = MIX ? mix->kernel_stride : 0;
  const int64_t channels = kc / kPlaneTaps;
  for (int64_t c = 0; c < channels; ++c, b += b_plane) {
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane), _MM_HINT_T0);
    for (int line = 16; line < IW * IW; line += 16)
      _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane + IW * IW - 1), _MM_HINT_T0);
#pragma GCC unroll 9
    for (int t = 0; t < kPlaneTaps; ++t) {
      __m512 av;
      if constexpr (MIX) {
        av = mix_step<MIX, PAIR, UNIT>(ap, mix_stride, *mix, mp, np);
        mp += kMR;
        if constexpr (PAIR) np += kMR;
      } else {
        av = _mm512_loadu_ps(ap);
        _mm_prefetch(reinterpret_cast<const char*>(ap + kPrefetchSteps * kMR), _MM_HINT_T0);
      }
      ap += kMR;
      const int ki = t / 3, kj = t % 3;
#pragma GCC unroll 28
      for (int j = 0; j < NP; ++j) {
        const int ih = S * (ROW0 + j / W) + ki - 1, iw = S * (j % W) + kj - 1;
        if (ih >= 0 && ih < IW && iw >= 0 && iw < IW) acc[j] = fmadd_broadcast(av, b + ih * IW + iw, acc[j]);
      }
    }
  }
  if (out.store_partial) {
#pragma GCC unroll 28
    for (int j = 0; j < NP; ++j) _mm512_store_ps(out.partial + j * out.partial_ld, acc[j]);
    return;
  }
  alignas(64) float tile[NP][kMR];
  const __m512 scale = _mm512_set1_ps(out.scale != nullptr ? *out.scale : 1.f);
#pragma GCC unroll 28
  for (int j = 0; j < NP; ++j) _mm512_store_ps(tile[j], _mm512_mul_ps(acc[j], scale));
  for (int64_t i = 0; i < out.mr; ++i) {
    float* row = out.c + i * out.ldc;
    for (int j = 0; j < NP; ++j) row[j] = tile[j][i];
  }
}

// The bands of output rows one call covers: (first row, rows), at most 28
// pixels each; the first band takes the mixing calls, so it is the smaller.
struct PlaneBand {
  int64_t row0, rows;
};
inline std::vector<PlaneBand> plane_bands(int64_t width) {
  if (width == 5) return {{0, 5}};
  return {{0, 3}, {3, 4}};
}

template <int W, int S, int ROW0, int ROWS, bool PAIR, bool UNIT, size_t... MIX>
constexpr std::array<MicroKernel, kMaxMicroMixKernels + 1> plane_kernel_row(std::index_sequence<MIX...>) {
  if constexpr (PAIR)
    return {nullptr, plane_kernel_avx512<W, S, ROW0, ROWS, static_cast<int>(MIX) + 1, true, UNIT>...};
  else return {plane_kernel_avx512<W, S, ROW0, ROWS, 0, false>,
               plane_kernel_avx512<W, S, ROW0, ROWS, static_cast<int>(MIX) + 1, false, UNIT>...};
}
// [shape (kPlaneShapes)][band][unit][pair][kernels it mixes, 0: none (not
// for pairs)]; the second band never mixes.
using PlaneKernelRow = std::array<MicroKernel, kMaxMicroMixKernels + 1>;
using PlaneBandKernels = std::array<std::array<PlaneKernelRow, 2>, 2>;
template <int W, int S, int ROWS>
constexpr PlaneBandKernels first_band_kernels() {
  return {std::array<PlaneKernelRow, 2>{
              plane_kernel_row<W, S, 0, ROWS, false, false>(std::make_index_sequence<kMaxMicroMixKernels>{}),
              plane_kernel_row<W, S, 0, ROWS, true, false>(std::make_index_sequence<kMaxMicroMixKernels>{})},
          std::array<PlaneKernelRow, 2>{
              plane_kernel_row<W, S, 0, ROWS, false, true>(std::make_index_sequence<kMaxMicroMixKernels>{}),
              plane_kernel_row<W, S, 0, ROWS, true, true>(std::make_index_sequence<kMaxMicroMixKernels>{})}};
}
template <int W, int S, int ROW0, int ROWS>
constexpr PlaneBandKernels later_band_kernels() {
  constexpr PlaneKernelRow plain{plane_kernel_avx512<W, S, ROW0, ROWS, 0, false>};
  return {std::array<PlaneKernelRow, 2>{plain, {}}, std::array<PlaneKernelRow, 2>{plain, {}}};
}
const PlaneBandKernels kPlaneKernels[std::size(kPlaneShapes)][2] = {
    {first_band_kernels<5, 1, 5>(), {}},
    {first_band_kernels<7, 1, 3>(), later_band_kernels<7, 1, 3, 4>()},
    {first_band_kernels<7, 2, 3>(), later_band_kernels<7, 2, 3, 4>()}};

MicroKernel plane_kernel(int shape, size_t band, int64_t mix_kernels, bool pair, bool unit) {
  const MicroKernel kernel = kPlaneKernels[shape][band][unit][pair][mix_kernels];
  TORCH_CHECK(kernel != nullptr, "plane_kernel: no kernel for shape ", shape, ", band ", band, ", mixing ",
              mix_kernels, pair ? " (pair)" : "");
  return kernel;
}

// The kPlaneShapes index of a forward (or grad_x's transposed forward) of
// geometry g on the plane kernels, -1 where it does not take them: AVX-512
// float32, 3x3, undilated, pad 1, one of kPlaneShapes, the K kernels mixed
// in the micro-kernel; CHANFLEX_CPU_DIRECT_PLANES=0 switches them off
// (tests, A/Bs).
int plane_shape(const ConvGeometry& g, PackedIsa isa, int64_t num_kernels) {
  const char* env = std::getenv("CHANFLEX_CPU_DIRECT_PLANES");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_DIRECT_PLANES: expected '0' or '1', got '", value, "'");
  if (value == "0" || isa != PackedIsa::kAvx512 || num_kernels < 1 || num_kernels > kMaxMicroMixKernels) return -1;
  if (g.kernel_h != 3 || g.kernel_w != 3 || g.dilation[0] != 1 || g.dilation[1] != 1 || g.padding[0] != 1 ||
      g.padding[1] != 1 || g.stride[0] != g.stride[1])
    return -1;
  for (int shape = 0; shape < static_cast<int>(std::size(kPlaneShapes)); ++shape) {
    const PlaneShape& ps = kPlaneShapes[shape];
    if (g.stride[0] == ps.stride && g.out_h == ps.width && g.out_w == ps.width && g.height == ps.stride * ps.width &&
        g.width == ps.stride * ps.width)
      return shape;
  }
  return -1;
}

// Whether run_packed_gemm's micro-kernels mix A themselves rather than a pass
// of its own for blocks of samples (AVX-512 A/B, ms, separate -> in the
// micro-kernel, K = 4: fwd 512@7 35.3 -> 33.8, 512@10 68.6 -> 64.1, 512@5
// 22.4 -> 20.4, 256@14 31.0 -> 30.9; grad_x 37.6 -> 35.5, 68.5 -> 67.9,
// 22.4 -> 21.9, 32.2 -> 31.2). Winograd's GEMMs of 36 tiles and more mix
// in the pass anyway (PackedGemm::separate_mix, see winograd_gemm).
inline bool mixes_in_micro_kernel(PackedIsa isa, int64_t num_kernels) {
  return isa == PackedIsa::kAvx512 && num_kernels >= 1 && num_kernels <= kMaxMicroMixKernels;
}

// Forward A: the K kernels' rows [r0, r0 + nr) and columns (reduction
// steps) [q0, q0 + kc) of a group (W_k, rows x cols) in panel layout
// out[k][panel][q - q0][16] (rows past nr zero), 8x8 blocks transposed in
// registers.
__attribute__((target("avx2,fma")))
void pack_weight_rows(const float* w_group, int64_t kernel_stride, int64_t cols, int64_t num_kernels,
                      int64_t r0, int64_t nr, int64_t q0, int64_t kc, float* out) {
  const int64_t panels = (nr + kMR - 1) / kMR;
  const int64_t kc8 = kc - kc % 8;
  for (int64_t k = 0; k < num_kernels; ++k) {
    for (int64_t panel = 0; panel < panels; ++panel) {
      float* panel_out = out + (k * panels + panel) * kc * kMR;
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t row0 = panel * kMR + half * 8;
        const float* src0 = w_group + k * kernel_stride + (r0 + row0) * cols + q0;
        for (int64_t q = 0; q < kc8; q += 8) {
          __m256 m[8];
          for (int64_t i = 0; i < 8; ++i)
            m[i] = row0 + i < nr ? _mm256_loadu_ps(src0 + i * cols + q) : _mm256_setzero_ps();
          transpose8x8(m);
          for (int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(panel_out + (q + j) * kMR + half * 8, m[j]);
        }
        for (int64_t q = kc8; q < kc; ++q)
          for (int64_t i = 0; i < 8; ++i)
            panel_out[q * kMR + half * 8 + i] = row0 + i < nr ? src0[i * cols + q] : 0.f;
      }
    }
  }
}

// Weight rows pack_weight_columns requests ahead of the one it copies.
constexpr int64_t kPackPrefetchRows = 8;

// Backward-data A = W_k^T: its rows [c0, c0 + nc) are columns of W_k, and
// its reduction steps [q0, q0 + kc) rows of W_k, so out[k][panel][q - q0][i]
// = W_k[q, c0 + 16 panel + i]: 16 contiguous floats of weight row q (zero
// past nc). Rows outside, panels inside: each weight row's run is read once,
// not once per panel (a run per page at 512@7).
void pack_weight_columns(const float* w_group, int64_t kernel_stride, int64_t rows, int64_t cols,
                         int64_t num_kernels, int64_t c0, int64_t nc, int64_t q0, int64_t kc, float* out) {
  const int64_t panels = (nc + kMR - 1) / kMR;
  for (int64_t k = 0; k < num_kernels; ++k) {
    for (int64_t q = q0; q < q0 + kc; ++q) {
      const float* src = w_group + k * kernel_stride + q * cols + c0;
      // Rows a page apart are too short a run for the hardware prefetchers.
      if (q + kPackPrefetchRows < rows)
        for (int64_t j = 0; j < nc; j += 16) __builtin_prefetch(src + kPackPrefetchRows * cols + j, 0, 3);
      for (int64_t panel = 0; panel < panels; ++panel) {
        const int64_t valid = std::min(kMR, nc - panel * kMR);
        float* dst = out + ((k * panels + panel) * kc + q - q0) * kMR;
        if (valid == kMR) {  // a fixed-size copy (one vector), not an element loop
          std::memcpy(dst, src + panel * kMR, kMR * sizeof(float));
          continue;
        }
        for (int64_t i = 0; i < valid; ++i) dst[i] = src[panel * kMR + i];
        for (int64_t i = valid; i < kMR; ++i) dst[i] = 0.f;
      }
    }
  }
}

// Samples mixed per pass over a packed A block: each K-kernel vector loaded
// from L2 serves all of them.
constexpr int64_t kPackedSampleBlock = 4;

// The separate mixing pass (AVX2, and AVX-512 with more than
// kMaxMicroMixKernels kernels): mixed A panels for NS samples from K packed
// kernel tiles (panels x depth x 16 each), reduction steps [q0, q0 + kc):
// out[s][panel][q][16]. A panel's kc x 16 floats are whole vectors of W floats. GCC vector types rather than
// intrinsics: the body compiles to the ISA of the function it is inlined into.
template <int W, int NS>
CHANFLEX_INLINE void mix_packed_tile_body(const float* packed, int64_t panels, int64_t depth, const float* attn,
                                          int64_t num_kernels, int64_t q0, int64_t kc, float* out) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  const int64_t kernel_floats = panels * depth * kMR;
  const int64_t sample_floats = panels * kc * kMR;
  for (int64_t panel = 0; panel < panels; ++panel) {
    const float* src = packed + (panel * depth + q0) * kMR;
    float* dst = out + panel * kc * kMR;
    for (int64_t e = 0; e < kc * kMR; e += W) {
      V acc[NS], v;
      __builtin_memcpy(&v, src + e, sizeof(V));
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) acc[s] = attn[s * num_kernels] * v;
      for (int64_t k = 1; k < num_kernels; ++k) {
        __builtin_memcpy(&v, src + k * kernel_floats + e, sizeof(V));
#pragma GCC unroll 4
        for (int s = 0; s < NS; ++s) acc[s] += attn[s * num_kernels + k] * v;
      }
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) __builtin_memcpy(dst + s * sample_floats + e, &acc[s], sizeof(V));
    }
  }
}

template <int NS>
__attribute__((target("avx2,fma")))
void mix_packed_tile_avx2(const float* packed, int64_t panels, int64_t depth, const float* attn,
                          int64_t num_kernels, int64_t q0, int64_t kc, float* out) {
  mix_packed_tile_body<8, NS>(packed, panels, depth, attn, num_kernels, q0, kc, out);
}

template <int NS>
__attribute__((target("avx512f,avx2,fma")))
void mix_packed_tile_avx512(const float* packed, int64_t panels, int64_t depth, const float* attn,
                            int64_t num_kernels, int64_t q0, int64_t kc, float* out) {
  mix_packed_tile_body<16, NS>(packed, panels, depth, attn, num_kernels, q0, kc, out);
}

using MixPackedTile = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*);
// Indexed by the number of samples mixed together.
constexpr std::array<MixPackedTile, kPackedSampleBlock + 1> kMixPackedTileAvx2 = {
    nullptr, mix_packed_tile_avx2<1>, mix_packed_tile_avx2<2>, mix_packed_tile_avx2<3>, mix_packed_tile_avx2<4>};
constexpr std::array<MixPackedTile, kPackedSampleBlock + 1> kMixPackedTileAvx512 = {
    nullptr, mix_packed_tile_avx512<1>, mix_packed_tile_avx512<2>, mix_packed_tile_avx512<3>,
    mix_packed_tile_avx512<4>};

MixPackedTile mix_packed_tile(PackedIsa isa, int64_t samples) {
  return (isa == PackedIsa::kAvx512 ? kMixPackedTileAvx512 : kMixPackedTileAvx2)[samples];
}

// Row tiles of A in run_packed_gemm, and the floats of one tile's K packed kernels.
Tiling packed_row_tiles(const PackedGemm& s) { return make_tiling(s.m, s.groups, /*balance=*/false); }
int64_t packed_tile_floats(const PackedGemm& s) {
  return s.num_kernels * ((packed_row_tiles(s).size + kMR - 1) / kMR) * s.depth * kMR;
}

// The largest prepacked kernel tile run_packed_gemm requests into L2 ahead
// of its use (MicroOut::l2_prefetch): a quarter of a 1 MiB L2.
constexpr int64_t kL2PrefetchTileBytes = int64_t{256} << 10;

// Every row tile's K packed kernels (tile task t at t * packed_tile_floats)
// into `out` (prepacked_floats(s) floats),
// for calls whose samples take several chunks: packed once per call, not once
// per chunk (at 256@14 the batch takes 7 chunks, and packing was 6% of the
// forward). It costs K|W| of memory, so only from 3 chunks on (at 512@10 the
// batch takes 2, and prepacking raised the forward's peak from 51 to 79 MB).
// pack_a as in run_packed_gemm.
constexpr int64_t kPrepackMinChunks = 3;
bool use_prepacked_kernels(int64_t batch, int64_t chunk) { return (batch + chunk - 1) / chunk >= kPrepackMinChunks; }

int64_t prepacked_floats(const PackedGemm& s) { return s.groups * packed_row_tiles(s).count * packed_tile_floats(s); }

template <typename PackA>
const float* prepack_kernels(const PackedGemm& s, const PackA& pack_a, float* out) {
  const Tiling tiles = packed_row_tiles(s);
  const int64_t tile_floats = packed_tile_floats(s);
  at::parallel_for(0, s.groups * tiles.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = (t % tiles.count) * tiles.size;
      pack_a(t / tiles.count, r0, std::min(tiles.size, s.m - r0), 0, s.depth, out + t * tile_floats);
    }
  });
  return out;
}

// Samples per chunk of the forward and grad_x packed paths: a multiple of
// the mixing block where more than one fits, so that no chunk ends in a
// short block that rereads the K kernels for one sample (at 256@14 a chunk
// of 5 took two mixing passes; chunks of 4 made the forward ~8% faster).
// Where the kernels are prepacked (K |W| of scratch), chunks take half the
// budget, so that the pass's scratch stays near 1.5 K |W|: at 256@14 (8
// chunks of 4 samples -> 16 of 2) that cut the fwd+bwd peak from 41 to 37 MB
// (1.50 -> 1.39 of the static conv's) for grad_x 38.8 -> 41.3 ms, the
// forward the same (38.3 vs 38.6).
int64_t packed_gemm_chunk(const Plan& p) {
  const int64_t budget = kernel_sized_budget(p, sizeof(float));
  int64_t chunk = chunk_samples(p, p.g.batch, sizeof(float), budget);
  if (use_prepacked_kernels(p.g.batch, chunk)) chunk = chunk_samples(p, p.g.batch, sizeof(float), budget / 2);
  const int64_t rounded = chunk - chunk % kPackedSampleBlock;
  return chunk > kPackedSampleBlock && chunk < p.g.batch && rounded >= at::get_num_threads() ? rounded : chunk;
}

// How run_packed_gemm splits the work of a chunk of n samples.
struct PackedGemmBlocking {
  Tiling tiles;          // row tiles of A
  int64_t tile_tasks;    // groups * tiles.count
  bool split_samples;    // threads split the samples (too few tiles for them all)
  int64_t depth;         // reduction steps per block
  bool fused_mix;        // the micro-kernels mix A (mixes_in_micro_kernel)
  int64_t block;         // samples mixed per pass
  int64_t mixed_floats;  // one thread's mixed A panels: a block of samples' tiles, or if fused_mix one call's
                         // panels and the next sample's tile (pair mixing)
  int64_t kernel_floats; // one thread's K packed kernels of a tile's depth block
  int64_t partial_ld;    // floats per pixel of a tile's partial sums (see MicroOut)
  int64_t partial_floats;// one thread's partial sums: every sample's tile, if more than one depth block
};

PackedGemmBlocking packed_gemm_blocking(const PackedGemm& s, int64_t n) {
  PackedGemmBlocking q;
  q.tiles = packed_row_tiles(s);
  q.tile_tasks = s.groups * q.tiles.count;
  const int64_t threads = at::get_num_threads();
  // Threads own whole row tiles (packing their K kernel tiles once per chunk)
  // when there are enough tiles; otherwise they split the samples.
  q.split_samples = q.tile_tasks < threads;
  // Reduction blocks of equal depth (multiple of 8): no short remainder block,
  // whose output read-modify-write would cost more than its arithmetic.
  const int64_t depth_blocks = (s.depth + packed_depth_block(s.isa) - 1) / packed_depth_block(s.isa);
  const int64_t multiple = s.depth_multiple;
  q.depth = std::min(s.depth, ((s.depth + depth_blocks - 1) / depth_blocks + multiple - 1) / multiple * multiple);
  q.block = q.split_samples ? std::clamp<int64_t>(q.tile_tasks * n / threads, 1, kPackedSampleBlock)
                            : kPackedSampleBlock;
  q.fused_mix = !s.separate_mix && mixes_in_micro_kernel(s.isa, s.num_kernels);
  q.mixed_floats = q.fused_mix ? (kMaxRowPanels + (q.tiles.size + kMR - 1) / kMR) * q.depth * kMR
                                : q.block * ((q.tiles.size + kMR - 1) / kMR) * q.depth * kMR;
  q.kernel_floats = s.num_kernels * ((q.tiles.size + kMR - 1) / kMR) * q.depth * kMR;
  q.partial_ld = (q.tiles.size + kMR - 1) / kMR * kMR;
  q.partial_floats = depth_blocks > 1 ? n * s.pixels * q.partial_ld : 0;
  return q;
}

// Floats of run_packed_gemm's per-thread scratch for chunks of up to n
// samples, all pool threads together (its `workers` argument).
int64_t packed_gemm_worker_floats(const PackedGemm& s, int64_t n, bool prepacked) {
  const PackedGemmBlocking q = packed_gemm_blocking(s, n);
  return at::get_num_threads() * ((prepacked ? 0 : q.kernel_floats) + q.mixed_floats + q.partial_floats);
}

// Attention rescaled to kernel 0 for the plane kernels: sum_k a_k A_k = a_0
// (A_0 + sum_{k>0} (a_k / a_0) A_k). Their mixing calls are bound by their
// FMAs (27 a step at 512@5, 8 of them mixing two samples); mixing with
// ratios drops the multiply by a_0 (2 FMAs a step), and the last
// reduction block multiplies each sum by a_0 once. AMD Zen 4, paired,
// pivoted / plain: forward 512@5 0.986 and 0.959, 512@7 0.971 and 0.977;
// fwd+bwd 0.976 and 0.988. (On the other micro-kernels, whose mixing calls
// wait on their kernel loads instead, it gained 0.4-0.6%: not used there.) Only where every
// sample's a_0 is a normal float and no ratio exceeds 2^24 in magnitude (no
// division overflows, no mixed vector grows much past the weights'); in
// exact arithmetic the same product, in float32 rounded like the plain
// mixing.
struct PivotedAttention {
  std::vector<float> coefficients;  // per sample: 1, a_1 / a_0, ..., a_{K-1} / a_0
  std::vector<float> scales;        // per sample: a_0
};

bool pivot_attention(const float* attn, int64_t n, int64_t num_kernels, PivotedAttention& out) {
  constexpr double kMaxRatio = 16777216.0;  // 2^24
  out.coefficients.resize(n * num_kernels);
  out.scales.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const float* a = attn + i * num_kernels;
    if (!std::isnormal(a[0])) return false;
    out.scales[i] = a[0];
    out.coefficients[i * num_kernels] = 1.f;
    for (int64_t k = 1; k < num_kernels; ++k) {
      const double ratio = static_cast<double>(a[k]) / a[0];
      if (!(std::abs(ratio) <= kMaxRatio)) return false;  // NaN too
      out.coefficients[i * num_kernels + k] = static_cast<float>(ratio);
    }
  }
  return true;
}

// For the n samples of a chunk and every group: C_i = (sum_k attn[i,k] A_k) @ B_i.
// pack_a(group, r0, nr, q0, kc, out) writes the K kernels' rows [r0, r0 +
// nr) and reduction steps [q0, q0 + kc) of a group's A in panel layout (see
// pack_weight_rows), unless `prepacked` (from prepack_kernels) holds them;
// b_packed holds each sample's packed B (s.sample_b floats apart); out_block(i, group) is row 0 of sample i's
// row-major (m x pixels) output block for the group; workers holds
// packed_gemm_worker_floats(s, n, prepacked) floats. With `classes` (and
// s.depth_multiple == classes->taps), the pixels go class by class in their
// permuted order, and b_packed holds each class's taps only (see TapClasses).
// With a plane shape (plane_shape, not -1), b_packed is the samples' input
// itself (s.sample_b and s.group_b apart, s.depth_multiple == 9) and the
// plane kernels take the calls, band by band.
template <typename PackA, typename OutBlock>
void run_packed_gemm(const PackedGemm& s, const float* b_packed, const float* attn, int64_t n,
                     const PackA& pack_a, const float* prepacked, float* workers, const OutBlock& out_block,
                     const TapClasses* classes = nullptr, int plane = -1) {
  TORCH_CHECK(classes == nullptr || s.depth_multiple == classes->taps,
              "run_packed_gemm: tap classes need reduction blocks of whole channels");
  TORCH_CHECK(plane < 0 || (classes == nullptr && s.depth_multiple == kPlaneTaps),
              "run_packed_gemm: plane kernels need reduction blocks of whole channels and no tap classes");
  const int64_t plane_width = plane >= 0 ? kPlaneShapes[plane].width : 0;
  const int64_t plane_floats = plane >= 0 ? plane_width * plane_width * kPlaneShapes[plane].stride *
                                                kPlaneShapes[plane].stride : 0;  // of an input channel
  const std::vector<PlaneBand> bands = plane >= 0 ? plane_bands(plane_width) : std::vector<PlaneBand>{};
  // Without classes, one class of every pixel and every tap.
  TapClasses all_pixels;
  all_pixels.classes.push_back(TapClass{0, s.pixels, 0, {}});
  const TapClasses& pixel_classes = classes != nullptr ? *classes : all_pixels;
  const int64_t K = s.num_kernels;
  const PackedGemmBlocking q = packed_gemm_blocking(s, n);
  const Tiling& tiles = q.tiles;
  const int64_t tile_tasks = q.tile_tasks;
  const bool split_samples = q.split_samples;
  const int64_t tile_floats = packed_tile_floats(s);
  const int64_t rows_per_call = plane >= 0 ? 1 : row_panels_per_call(s.isa);
  const int64_t depth = q.depth;
  const int64_t block = q.block;
  const int64_t blocks = (n + block - 1) / block;
  const int64_t scratch_floats = prepacked != nullptr ? 0 : q.kernel_floats;
  const int64_t mixed_floats = q.mixed_floats;
  const bool fused_mix = q.fused_mix;
  PivotedAttention pivoted;
  const bool pivot = plane >= 0 && fused_mix && pivot_attention(attn, n, K, pivoted);
  const float* const mix_attn = pivot ? pivoted.coefficients.data() : attn;
  // Samples in pairs: the first one's mixing calls also mix the second's A
  // (each K-kernel vector loaded once for both) into a_next, where the
  // second's calls read it. The mixing calls are L2-bound on the kernel
  // reads; in-process A/B on AMD Zen 5 (K = 4), unpaired -> paired: forward
  // 512@5 0.93-0.99x, 512@7 0.97, 512@10 0.98, 256->512@10 0.99, 256@14
  // 0.98; grad_x 0.91-0.93, 0.98, (512@10 not measured), 0.97, 0.98.
  for_each_range(split_samples ? tile_tasks * blocks : tile_tasks, [&](int64_t begin, int64_t end) {
    float* const a_scratch = workers + at::get_thread_num() * (scratch_floats + mixed_floats + q.partial_floats);
    float* const a_mixed = a_scratch + scratch_floats;
    float* const a_next = a_mixed + kMaxRowPanels * depth * kMR;  // pair mixing: the next sample's tile
    float* const partials = a_mixed + mixed_floats;  // sample i's tile at i * pixels * partial_ld
    // A run of units on one tile: its sample blocks [block_begin, block_end).
    for (int64_t unit = begin, run_end; unit < end; unit = run_end) {
      const int64_t tile_task = split_samples ? unit / blocks : unit;
      run_end = split_samples ? std::min(end, (tile_task + 1) * blocks) : unit + 1;
      const int64_t block_begin = split_samples ? unit % blocks : 0;
      const int64_t block_end = split_samples ? block_begin + (run_end - unit) : blocks;
      const int64_t group = tile_task / tiles.count;
      const int64_t r0 = (tile_task % tiles.count) * tiles.size;
      const int64_t nr = std::min(tiles.size, s.m - r0);
      const int64_t panels = (nr + kMR - 1) / kMR;
      // The thread's next tile's prepacked kernels, requested into L2 a line
      // a step by this tile's calls, so that its mixing (in the micro-kernels
      // or mix_packed_tile, each kernel vector read once for the chunk's
      // samples) finds them there, not in L3 or memory. Only tiles that fit
      // twice in L2 beside the B panels. (Winograd at 256@14: 16 MiB of
      // transformed kernels, each tile mixed for one pair of samples per
      // chunk. AMD Zen 4, in-process paired medians, with / without: with
      // the fused mixing, forward 0.980-0.986 (perf: the mixing call from
      // 2.8 to 2.4 times a plain call's time), grad_x 0.994, 128@28, 256@21,
      // 512@10 and 256->512@10 within 1%; with Winograd's mixing pass
      // (winograd_gemm), forward 256@14 0.908, 256@21 0.957, 128@28 0.978,
      // 256->512@10 (fused) 0.961.)
      const bool l2_next_tile = prepacked != nullptr && !split_samples && tile_task + 1 < end &&
                                tile_floats * static_cast<int64_t>(sizeof(float)) <= kL2PrefetchTileBytes;
      const char* l2_next = l2_next_tile ? reinterpret_cast<const char*>(prepacked + (tile_task + 1) * tile_floats)
                                         : nullptr;
      const char* const l2_end = l2_next_tile ? l2_next + tile_floats * sizeof(float) : nullptr;
      // Depth blocks outside, samples inside: the K kernels' block that every
      // sample's mixing reads stays in L2. Packed per depth block (not per
      // tile, 4.7 MB at 512@7): written and reread in L2, not through memory.
      for (int64_t q0 = 0; q0 < s.depth; q0 += depth) {
        const int64_t kc = std::min(depth, s.depth - q0);
        const bool pack = prepacked == nullptr;
        if (pack) pack_a(group, r0, nr, q0, kc, a_scratch);
        const float* a_kernels = pack ? a_scratch : prepacked + tile_task * tile_floats;
        const int64_t a_depth = pack ? kc : s.depth, a_q0 = pack ? 0 : q0;
        for (int64_t blk = block_begin; blk < block_end; ++blk) {
          const int64_t i0 = blk * block;
          const int64_t ns = std::min(block, n - i0);
          if (!fused_mix) mix_packed_tile(s.isa, ns)(a_kernels, panels, a_depth, attn + i0 * K, K, a_q0, kc, a_mixed);
          for (int64_t si = 0; si < ns; ++si) {
            const bool pair_first = fused_mix && si % 2 == 0 && si + 1 < ns;
            const bool pair_second = fused_mix && si % 2 == 1;
            const float* b_group = b_packed + (i0 + si) * s.sample_b + group * s.group_b;
            float* c_tile = out_block(i0 + si, group) + r0 * s.pixels;
            float* partial = partials + (i0 + si) * s.pixels * q.partial_ld;
            // Row panels outside, pixels inside: the mixed A panels of a call
            // stay in L1 while the (narrower) B panels stream from L2.
            for (int64_t panel = 0; panel < panels; panel += rows_per_call) {
              const int64_t np = std::min(rows_per_call, panels - panel);
              // Mixed in the micro-kernel, a row panel pair's A is used up
              // before the next pair's: every pair reuses the same buffer.
              float* a_call = pair_second ? a_next + panel * kc * kMR
                                          : a_mixed + (fused_mix ? 0 : (si * panels + panel) * kc * kMR);
              const MicroMix mix{a_kernels + (panel * a_depth + a_q0) * kMR, a_depth * kMR, panels * a_depth * kMR,
                                 mix_attn + (i0 + si) * K, K, a_call,
                                 pair_first ? mix_attn + (i0 + si + 1) * K : nullptr,
                                 pair_first ? a_next + panel * kc * kMR : nullptr};
              for (size_t band = 0; band < bands.size(); ++band) {
                const int64_t first = bands[band].row0 * plane_width;
                MicroOut out{c_tile + panel * kMR * s.pixels + first,
                             s.pixels,
                             std::min(kMR, nr - panel * kMR),
                             partial + first * q.partial_ld + panel * kMR,
                             q.partial_ld,
                             /*load_partial=*/q0 > 0,
                             /*store_partial=*/q0 + kc < s.depth};
                if (pivot) out.scale = &pivoted.scales[i0 + si];
                const bool mixes = fused_mix && band == 0 && !pair_second;
                plane_kernel(plane, band, mixes ? K : 0, mixes && pair_first, pivot)(
                    kc, a_call, kc * kMR, b_group + q0 / kPlaneTaps * plane_floats, plane_floats, out,
                    mixes ? &mix : nullptr);
              }
              if (plane >= 0) continue;
              for (const TapClass& cl : pixel_classes.classes) {
                // A class with fewer taps has that share of the steps, in
                // B panels of its own (classes[0] has every tap).
                const int64_t ntaps = static_cast<int64_t>(cl.taps.size());
                const bool skips = classes != nullptr && ntaps < classes->taps;
                const int64_t class_depth = skips ? s.depth / classes->taps * ntaps : s.depth;
                const int64_t class_kc = skips ? kc / classes->taps * ntaps : kc;
                const int64_t class_q0 = skips ? q0 / classes->taps * ntaps : q0;
                for (int64_t local = 0, valid; local < cl.pixels; local += valid) {
                  valid = call_pixels(s.isa, local, cl.pixels);
                  const int64_t first = cl.first + local;  // in the (permuted) pixel order
                  MicroOut out{c_tile + panel * kMR * s.pixels + (classes != nullptr ? 0 : first),
                               s.pixels,
                               std::min(np * kMR, nr - panel * kMR),
                               partial + first * q.partial_ld + panel * kMR,
                               q.partial_ld,
                               /*load_partial=*/q0 > 0,
                               /*store_partial=*/q0 + kc < s.depth};
                  if (classes != nullptr) out.pixel_index = classes->order.data() + first;
                  if (l2_next != nullptr && l2_next < l2_end) {
                    out.l2_prefetch = l2_next;
                    l2_next += class_kc * 64;
                  }
                  if (skips) {
                    out.tap_steps = cl.taps.data();
                    out.ntaps = ntaps;
                    out.channel_steps = classes->taps;
                  }
                  const bool mixes = fused_mix && first == 0 && !pair_second;
                  const MicroKernel kernel = skips ? skip_micro_kernel(s.isa, np, valid)
                                                   : micro_kernel(s.isa, np, valid, mixes ? K : 0, mixes && pair_first);
                  kernel(class_kc, a_call, kc * kMR,
                         b_group + cl.b_offset + ((local / kNR) * class_depth + class_q0) * kNR, class_depth * kNR,
                         out, mixes ? &mix : nullptr);
                }
              }
            }
          }
        }
      }
    }
  });
}

// Input channels the packed layouts are unfolded in at a time, and the
// floats of one such block's unfolded rows.
constexpr int64_t kUnfoldChannelBlock = 8;
inline int64_t unfold_block_floats(const Plan& p) {
  return kUnfoldChannelBlock * p.g.kernel_h * p.g.kernel_w * p.pixels;
}

// Unfolds channels [c0, c1) of one sample contiguously into `rows` (channel
// c0's taps first): the scratch the packed layouts below are copied from.
void unfold_channel_block(const float* x, const Plan& p, int64_t c0, int64_t c1, float* rows) {
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  for (int64_t c = c0; c < c1; ++c) {
    // unfold_channel writes channel c's rows at offset c * taps * pixels.
    unfold_channel(x, rows + (c - c0 - c) * taps * p.pixels, p, c);
  }
}

// Unfolds channels [c0, c1) of one sample into packed B panels: their rows
// are unfolded into `rows` (unfold_channel_block), then each
// pixel panel receives the block's rows as one contiguous run (channels of a
// block that share a conv group are adjacent rows). Pixels past the last full
// panel are zero.
void unfold_channels_packed(const float* x, float* packed, const Plan& p, const PackedGemm& s,
                            int64_t c0, int64_t c1, float* rows) {
  const ConvGeometry& g = p.g;
  const int64_t taps = g.kernel_h * g.kernel_w;
  unfold_channel_block(x, p, c0, c1, rows);
  for (int64_t lp = 0; lp < s.pixel_panels; ++lp) {
    const int64_t pixel = lp * kNR;
    const int64_t valid = std::min(kNR, p.pixels - pixel);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t group = c / g.group_in_channels;
      float* dst = packed + group * s.group_b + packed_b_offset(s, lp, (c % g.group_in_channels) * taps);
      const float* src = rows + (c - c0) * taps * p.pixels + pixel;
      if (valid == kNR) {
        // A fixed-size copy: a loop of `valid` steps ran element by element.
        for (int64_t t = 0; t < taps; ++t, dst += kNR, src += p.pixels) std::memcpy(dst, src, kNR * sizeof(float));
        continue;
      }
      for (int64_t t = 0; t < taps; ++t, dst += kNR, src += p.pixels) {
        for (int64_t j = 0; j < valid; ++j) dst[j] = src[j];
        for (int64_t j = valid; j < kNR; ++j) dst[j] = 0.f;
      }
    }
  }
}

// Where channel c's entries of pixel panel `panel` of class cl start in one
// sample's packed B (TapClasses, unfold_channels_classes).
inline float* class_panel_b(float* packed, const ConvGeometry& g, const PackedGemm& s, const TapClass& cl,
                            int64_t panel, int64_t c) {
  const int64_t ntaps = static_cast<int64_t>(cl.taps.size());
  return packed + (c / g.group_in_channels) * s.group_b + cl.b_offset +
         (panel * g.group_in_channels + c % g.group_in_channels) * ntaps * kNR;
}

// The 16 floats at indices idx of the 64 in v[0..3] (two two-register
// permutes; `high` has the lanes whose index has bit 5 set, from v[2..3]),
// zero outside `inside`.
__attribute__((target("avx512f,avx2,fma")))
inline __m512 pick_from_registers(const __m512 v[4], __m512i idx, __mmask16 high, __mmask16 inside) {
  const __m512 low_pair = _mm512_permutex2var_ps(v[0], idx, v[1]);
  const __m512 high_pair = _mm512_permutex2var_ps(v[2], idx, v[3]);
  return _mm512_maskz_mov_ps(inside, _mm512_mask_blend_ps(high, low_pair, high_pair));
}

// Input planes of at most this many floats (four AVX-512 registers) are
// unfolded by unfold_channels_classes_in_registers.
constexpr int64_t kRegisterPlaneFloats = 64;

// The AVX-512 class unfolds below write each (class, pixel panel)'s entries
// of the block's channels (adjacent in B: 8 x 54 floats at 9 taps) into an
// L1 run first and stream the run out (copy_streaming): B is written once
// per chunk and read back from the last-level cache or memory, and the
// entries' plain stores had stalled on reads for ownership. AMD Zen 4,
// interleaved, paired medians streamed / plain, in a slow spell of the VM
// (the static conv 20% slower than usual): forward 512@7 0.98, 512@5
// 0.89-0.94; grad_x 512@7 45.3 -> 39.3 ms, 512@5 25.5 -> 21.7; in a normal
// one: forward 512@7 0.97-0.98, 512@5 0.97-0.98, 128->256 28->14 and
// 256->512 14->7 0.97-1.01; grad_x 512@7 36.4 -> 35.0, 512@5 20.2 -> 20.0
// (bitwise equal).

// The run of channels [c0, c1) of one (class, pixel panel): up to
// kUnfoldChannelBlock channels' panel_entries floats each.
float* class_run_buffer(int64_t floats) {
  thread_local std::vector<float> run;
  if (static_cast<int64_t>(run.size()) < floats) run.resize(floats);
  return run.data();
}

// Streams the run of channels [c0, c1) of (class cl, panel) into B: one
// copy per conv group it spans (a group's channels are adjacent in B).
void stream_class_run(const float* run, int64_t c0, int64_t c1, float* packed, const ConvGeometry& g,
                      const PackedGemm& s, const TapClass& cl, int64_t panel, int64_t panel_entries) {
  for (int64_t c = c0, next; c < c1; c = next) {
    next = std::min(c1, (c / g.group_in_channels + 1) * g.group_in_channels);
    copy_streaming(class_panel_b(packed, g, s, cl, panel, c), run + (c - c0) * panel_entries,
                   (next - c) * panel_entries, PackedIsa::kAvx512);
  }
}

// unfold_channels_classes for planes of at most kRegisterPlaneFloats: each
// channel's plane is held in four registers, and every 16 entries of a
// class's panel are picked out of them by two two-register permutes and a
// blend (offset bit 5 picks the pair, a negative offset gives zero). The
// masked gathers it replaces took 5.7% of the kernel time of the forward at
// 512@7 on AMD Zen 4 (this: 3.4%); in-process A/Bs there, ms, gathers ->
// registers: forward 512@7 42.1 -> 40.0 and 38.0 -> 37.8, 512@5 22.4 ->
// 22.3 and 21.8 -> 21.3; grad_x 512@7 40.2 -> 40.2 and 41.2 -> 39.7, 512@5
// 24.1 -> 23.5 and 23.9 -> 23.2 (the outputs bitwise equal). The plane's
// four loads are redone per panel (from L1) so that a panel's run is
// written whole.
__attribute__((target("avx512f,avx2,fma")))
void unfold_channels_classes_in_registers(const float* x, float* packed, const Plan& p, const PackedGemm& s,
                                          const TapClasses& classes, int64_t c0, int64_t c1) {
  const ConvGeometry& g = p.g;
  const int64_t plane = g.height * g.width;
  const __m512i pair_bit = _mm512_set1_epi32(32);
  __mmask16 loads[4];
  for (int64_t r = 0; r < 4; ++r)
    loads[r] = static_cast<__mmask16>((uint32_t{1} << std::clamp<int64_t>(plane - r * 16, 0, 16)) - 1);
  float* const run = class_run_buffer((c1 - c0) * classes.taps * kNR);
  for (const TapClass& cl : classes.classes) {
    const int64_t panel_entries = static_cast<int64_t>(cl.taps.size()) * kNR;
    const int32_t* offsets = classes.gather.data() + cl.gather_offset;
    for (int64_t panel = 0; panel * kNR < cl.pixels; ++panel, offsets += panel_entries) {
      for (int64_t c = c0; c < c1; ++c) {
        __m512 v[4];
        for (int64_t r = 0; r < 4; ++r) v[r] = _mm512_maskz_loadu_ps(loads[r], x + c * plane + r * 16);
        float* dst = run + (c - c0) * panel_entries;
        for (int64_t e = 0; e < panel_entries; e += 16) {
          const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, panel_entries - e)) - 1);
          const __m512i at = _mm512_maskz_loadu_epi32(lanes, offsets + e);
          const __mmask16 inside = _mm512_cmpge_epi32_mask(at, _mm512_setzero_si512());
          _mm512_mask_storeu_ps(dst + e, lanes,
                                pick_from_registers(v, at, _mm512_test_epi32_mask(at, pair_bit), inside));
        }
      }
      stream_class_run(run, c0, c1, packed, g, s, cl, panel, panel_entries);
    }
  }
}

// unfold_channels_classes for larger planes on AVX-512: each group of 16
// entries whose offsets fit in a window of kWindowFloats (TapClasses::
// windows) is picked out of the window's four registers as in
// unfold_channels_classes_in_registers, the others by a masked gather. A
// group's indices are set up once for all the channels. At stride 2 the
// taps of a panel's 6 pixels span 13 columns, so most groups
// fit (128->256 28->14: 128 of 134; 256->512 14->7: 30 of 33). The gathers
// took 0.18 to 0.50 of the micro-kernels' time in the forward of those two
// on AMD Zen 4 (perf, from run to run), this 0.12 and 0.08; ms, 23.0 ->
// 21.6 and 23.8 -> 21.2 (outputs bitwise equal).
__attribute__((target("avx512f,avx2,fma")))
void unfold_channels_classes_windowed(const float* x, float* packed, const Plan& p, const PackedGemm& s,
                                      const TapClasses& classes, int64_t c0, int64_t c1) {
  const ConvGeometry& g = p.g;
  const int64_t plane = g.height * g.width;
  const __m512i pair_bit = _mm512_set1_epi32(32);
  float* const run = class_run_buffer((c1 - c0) * classes.taps * kNR);
  for (const TapClass& cl : classes.classes) {
    const int64_t panel_entries = static_cast<int64_t>(cl.taps.size()) * kNR;
    const int64_t panel_groups = (panel_entries + 15) / 16;
    const int32_t* offsets = classes.gather.data() + cl.gather_offset;
    const int32_t* windows = classes.windows.data() + cl.window_offset;
    for (int64_t panel = 0; panel * kNR < cl.pixels; ++panel, offsets += panel_entries, windows += panel_groups) {
      for (int64_t e = 0; e < panel_entries; e += 16) {  // the group's indices once, for every channel
        const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, panel_entries - e)) - 1);
        const __m512i at = _mm512_maskz_loadu_epi32(lanes, offsets + e);
        const __mmask16 inside = _mm512_cmpge_epi32_mask(at, _mm512_setzero_si512());
        const int32_t window = windows[e / 16];
        if (window < 0) {
          for (int64_t c = c0; c < c1; ++c)
            _mm512_mask_storeu_ps(run + (c - c0) * panel_entries + e, lanes,
                                  _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside, at, x + c * plane, 4));
          continue;
        }
        const __m512i local = _mm512_sub_epi32(at, _mm512_set1_epi32(window));
        const __mmask16 high_pair = _mm512_test_epi32_mask(local, pair_bit);
        // The window's part inside the plane (all of it but near the end).
        __mmask16 loads[4];
        for (int64_t r = 0; r < 4; ++r)
          loads[r] = static_cast<__mmask16>((uint32_t{1} << std::clamp<int64_t>(plane - window - r * 16, 0, 16)) - 1);
        for (int64_t c = c0; c < c1; ++c) {
          const float* src = x + c * plane + window;
          __m512 v[4];
          for (int64_t r = 0; r < 4; ++r)
            v[r] = loads[r] == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(loads[r], src + r * 16);
          _mm512_mask_storeu_ps(run + (c - c0) * panel_entries + e, lanes,
                                pick_from_registers(v, local, high_pair, inside));
        }
      }
      stream_class_run(run, c0, c1, packed, g, s, cl, panel, panel_entries);
    }
  }
}

// dst[e] = src[offsets[e]] (0 where the offset is -1) for e < n.
void gather_entries(const float* src, const int32_t* offsets, int64_t n, float* dst) {
  for (int64_t e = 0; e < n; ++e) dst[e] = offsets[e] >= 0 ? src[offsets[e]] : 0.f;
}

// unfold_channels_packed for TapClasses: each class's pixel panels (in
// the permuted order) gather the class's taps straight from the input
// planes of channels [c0, c1) (TapClasses::gather), with no unfolded rows
// in between; on AVX-512 from registers (the whole plane, or a window of
// it), element by element otherwise.
void unfold_channels_classes(PackedIsa isa, const float* x, float* packed, const Plan& p, const PackedGemm& s,
                             const TapClasses& classes, int64_t c0, int64_t c1) {
  const ConvGeometry& g = p.g;
  const int64_t plane = g.height * g.width;
  if (isa == PackedIsa::kAvx512) {
    (plane <= kRegisterPlaneFloats ? unfold_channels_classes_in_registers : unfold_channels_classes_windowed)(
        x, packed, p, s, classes, c0, c1);
    return;
  }
  for (const TapClass& cl : classes.classes) {
    const int64_t panel_entries = static_cast<int64_t>(cl.taps.size()) * kNR;
    const int32_t* offsets = classes.gather.data() + cl.gather_offset;
    for (int64_t panel = 0; panel * kNR < cl.pixels; ++panel, offsets += panel_entries)
      for (int64_t c = c0; c < c1; ++c)
        gather_entries(x + c * plane, offsets, panel_entries, class_panel_b(packed, g, s, cl, panel, c));
  }
}

// y = dynamic_conv2d(x, w, attn) without bias, through run_packed_gemm;
// pack_a(group, r0, nr, q0, kc, out) packs the K kernels' A as
// pack_weight_rows does (see run_packed_gemm).
template <typename PackA>
void forward_packed_with(PackedIsa isa, const Plan& p, const float* x, const PackA& pack_a, const float* attn,
                         float* y) {
  const ConvGeometry& g = p.g;
  PackedGemm s = make_packed_gemm(isa, /*m=*/p.rows, /*depth=*/p.cols, p);
  if (const int plane = plane_shape(g, isa, g.num_kernels); plane >= 0) {
    // B is the input itself: nothing to unfold.
    s.sample_b = p.plane;
    s.group_b = g.group_in_channels * g.height * g.width;
    s.depth_multiple = kPlaneTaps;
    // Chunks as the unfolding paths take them (bounding the partial sums).
    const int64_t chunk = packed_gemm_chunk(p);
    const bool prepack = use_prepacked_kernels(g.batch, chunk);
    const auto buffers = pass_scratch<2>({prepack ? prepacked_floats(s) : 0, packed_gemm_worker_floats(s, chunk, prepack)});
    const float* prepacked = prepack ? prepack_kernels(s, pack_a, buffers[0]) : nullptr;
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      run_packed_gemm(s, x + b0 * p.plane, attn + b0 * g.num_kernels, std::min(chunk, g.batch - b0), pack_a, prepacked,
                      buffers[1],
                      [&](int64_t i, int64_t group) { return y + ((b0 + i) * g.out_channels + group * p.rows) * p.pixels; },
                      nullptr, plane);
    }
    return;
  }
  TapClasses classes = make_tap_classes(p);
  const bool skip_taps = use_tap_classes(classes, isa);
  if (skip_taps) {
    s.group_b = classes.group_b;
    s.sample_b = s.groups * s.group_b;
    s.depth_multiple = classes.taps;
  }
  const int64_t chunk = packed_gemm_chunk(p);
  const bool prepack = use_prepacked_kernels(g.batch, chunk);
  const int64_t rows_floats = unfold_block_floats(p);
  // The unfold's rows and the GEMM's panels take turns in the workers' buffer.
  const int64_t worker_floats =
      std::max(at::get_num_threads() * rows_floats, packed_gemm_worker_floats(s, chunk, prepack));
  const auto buffers = pass_scratch<3>({chunk * s.sample_b, prepack ? prepacked_floats(s) : 0, worker_floats});
  float* b_chunk = buffers[0];
  float* workers = buffers[2];
  const float* prepacked = prepack ? prepack_kernels(s, pack_a, buffers[1]) : nullptr;
  const int64_t channel_blocks = (g.in_channels + kUnfoldChannelBlock - 1) / kUnfoldChannelBlock;
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const float* x_chunk = x + b0 * p.plane;
    at::parallel_for(0, n * channel_blocks, 1, [&](int64_t begin, int64_t end) {
      float* rows = workers + at::get_thread_num() * rows_floats;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t / channel_blocks;
        const int64_t c0 = (t % channel_blocks) * kUnfoldChannelBlock;
        const int64_t c1 = std::min(g.in_channels, c0 + kUnfoldChannelBlock);
        if (skip_taps) {
          unfold_channels_classes(isa, x_chunk + i * p.plane, b_chunk + i * s.sample_b, p, s, classes, c0, c1);
        } else {
          unfold_channels_packed(x_chunk + i * p.plane, b_chunk + i * s.sample_b, p, s, c0, c1, rows);
        }
      }
      _mm_sfence();  // streamed runs (the AVX-512 class unfolds), before the GEMM's threads read them
    });
    run_packed_gemm(s, b_chunk, attn + b0 * g.num_kernels, n, pack_a, prepacked, workers,
                    [&](int64_t i, int64_t group) { return y + ((b0 + i) * g.out_channels + group * p.rows) * p.pixels; },
                    skip_taps ? &classes : nullptr);
  }
}

void forward_packed(PackedIsa isa, const Plan& p, const at::Tensor& x, const float* w, const float* attn, float* y) {
  auto pack_a = [&](int64_t group, int64_t r0, int64_t nr, int64_t q0, int64_t kc, float* out) {
    pack_weight_rows(w + group * p.group_size, p.kernel_size, p.cols, p.g.num_kernels, r0, nr, q0, kc, out);
  };
  forward_packed_with(isa, p, x.const_data_ptr<float>(), pack_a, attn, y);
}

// grad_x of a stride-1 conv is the forward conv of grad_out with each
// kernel transposed (C_in x C_out) and flipped, padded d (k - 1) - p: the
// geometry of that conv, where its padding is not negative.
bool transposed_conv_geometry(const ConvGeometry& g, ConvGeometry* t) {
  if (g.stride[0] != 1 || g.stride[1] != 1) return false;
  const std::array<int64_t, 2> pad{g.dilation[0] * (g.kernel_h - 1) - g.padding[0],
                                   g.dilation[1] * (g.kernel_w - 1) - g.padding[1]};
  if (pad[0] < 0 || pad[1] < 0) return false;
  *t = g;
  t->in_channels = g.out_channels;
  t->height = g.out_h;
  t->width = g.out_w;
  t->out_channels = g.in_channels;
  t->group_in_channels = g.out_channels / g.groups;
  t->out_h = g.height;
  t->out_w = g.width;
  t->padding = pad;
  return true;
}

// A of that conv: the K kernels' transposed, flipped rows [r0, r0 + nr)
// (input channels of the conv) and steps [q0, q0 + kc) (output channel co,
// tap t: W_k[co, r, taps - 1 - t]) of one group in pack_weight_rows'
// panel layout; w_group is the group's first row of W_k (row length cols).
// Weight rows (output channels) pack_flipped_weight_rows requests ahead of
// the one it copies: a panel reads 16 channels' taps of each row, one short
// run per row, rows a page or more apart, which the hardware prefetchers do
// not follow.
constexpr int64_t kFlippedRowsAhead = 4;

__attribute__((target("avx2,fma")))
void pack_flipped_weight_rows(const float* w_group, int64_t kernel_stride, int64_t cols, int64_t taps,
                              int64_t num_kernels, int64_t r0, int64_t nr, int64_t q0, int64_t kc, float* out) {
  const int64_t panels = (nr + kMR - 1) / kMR;
  const int64_t row_end = (q0 + kc + taps - 1) / taps;
  for (int64_t k = 0; k < num_kernels; ++k) {
    for (int64_t panel = 0; panel < panels; ++panel) {
      float* dst = out + (k * panels + panel) * kc * kMR;
      const int64_t valid = std::min(kMR, nr - panel * kMR);
      const float* w_rows = w_group + k * kernel_stride + (r0 + panel * kMR) * taps;
      // Step q is output channel (row) q / taps, tap q % taps, counted
      // along rather than divided per step.
      for (int64_t q = q0, row = q0 / taps, t = q0 % taps; q < q0 + kc; ++q, dst += kMR) {
        // A panel's run of a row is `taps` lines long (fewer for a short
        // last panel): one line of the row kFlippedRowsAhead on per step.
        if (row + kFlippedRowsAhead < row_end && t * kMR < valid * taps)
          __builtin_prefetch(w_rows + (row + kFlippedRowsAhead) * cols + t * kMR, 0, 3);
        if (taps == 9 && t == 0 && q + 9 <= q0 + kc) {
          // A whole row's 9 steps at once from its 144 contiguous floats
          // (flipped_taps8), not 16 loads 9 floats apart per step. AMD Zen
          // 4, grad_x, interleaved, ms: 512@5 21.5 -> 20.7 and 25.9 ->
          // 24.8, 512@7 35.7 -> 35.1 and 43.9 -> 42.5 (bitwise equal).
          for (int64_t row_ahead = 1; row_ahead < 9 && row + kFlippedRowsAhead < row_end; ++row_ahead)
            if (row_ahead * kMR < valid * taps)
              __builtin_prefetch(w_rows + (row + kFlippedRowsAhead) * cols + row_ahead * kMR, 0, 3);
          const float* src = w_rows + row * cols;
          for (int64_t half = 0; half < 2; ++half) {
            __m256 steps[9];
            flipped_taps8(src + half * 72, valid - half * 8, steps);
            for (int s = 0; s < 9; ++s) _mm256_storeu_ps(dst + s * kMR + half * 8, steps[s]);
          }
          q += 8;
          dst += 8 * kMR;
          ++row;
          continue;
        }
        const float* src = w_rows + row * cols + (taps - 1 - t);
        for (int64_t i = 0; i < valid; ++i) dst[i] = src[i * taps];
        for (int64_t i = valid; i < kMR; ++i) dst[i] = 0.f;
        if (++t == taps) {
          t = 0;
          ++row;
        }
      }
    }
  }
}

// Whether grad_x runs as the packed forward of the transposed conv t: on
// AVX-512 where its padding classes skip at least kMinTransposedSkip of the
// products (with CHANFLEX_CPU_SKIP_PADDING=1: wherever they apply, on AVX2
// too). AMD Zen 4, K = 4, interleaved, ms, grad_x through dcols and fold ->
// transposed: 512@7 (16% skipped) 43.8 -> 39.0, 512@5 (21%) 28.5 -> 25.4;
// but 512@10 (12%) 87.4 -> 88.3 and 256->512@10 46.8 -> 62.2 (its
// transposed conv gathers 9 taps of 512 channels per pixel where the old
// path packs 512), and with the AVX2 micro-kernels (capped) 512@7 47.2 ->
// 52.3, 512@5 27.7 -> 29.1.
constexpr double kMinTransposedSkip = 0.15;
bool use_transposed_grad_x(const Plan& t, at::ScalarType dtype, PackedIsa isa) {
  if (!use_packed(t, dtype, isa)) return false;
  const TapClasses classes = make_tap_classes(t);
  if (!use_tap_classes(classes, isa)) return false;
  const char* env = std::getenv("CHANFLEX_CPU_SKIP_PADDING");
  if (env != nullptr && std::string(env) == "1") return true;
  return isa == PackedIsa::kAvx512 && 1.0 - classes.kept >= kMinTransposedSkip;
}

// grad_x by forward_packed_with on the transposed geometry t (see
// transposed_conv_geometry): no unfolded gradient to write and fold back,
// and the forward's padding classes apply.
void backward_data_transposed(PackedIsa isa, const Plan& p, const Plan& t, const float* grad_out, const float* w,
                              const float* attn, float* grad_x) {
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  auto pack_a = [&](int64_t group, int64_t r0, int64_t nr, int64_t q0, int64_t kc, float* out) {
    pack_flipped_weight_rows(w + group * p.group_size, p.kernel_size, p.cols, taps, p.g.num_kernels, r0, nr, q0,
                             kc, out);
  };
  forward_packed_with(isa, t, grad_out, pack_a, attn, grad_x);
}

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
  at::parallel_for(0, g.groups, 1, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, n * s.groups, 1, [&](int64_t begin, int64_t end) {
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

// ---------------------------------------------------------------------------
// Winograd F(2x2, 3x3): 3x3, stride-1, undilated convs in float32 on the
// packed ISAs, the forward and grad_x.
//
// Each 2x2 block of output pixels (a tile) comes from a 4x4 input patch d as
// Y = A^T [(G g G^T) .* (B^T d B)] A: per tile and channel pair the direct
// conv's 36 multiply-adds become 16. A sample's conv is 16 GEMMs, one per
// position of the 4x4 transform, M_pos = U_pos @ V_pos, with U_pos (out x in
// channels) the transformed kernel and V_pos (in channels x tiles) the
// transformed input. The kernel transform is linear, so mixing commutes with
// it: the K kernels are transformed once per call, and run_packed_gemm mixes
// them per sample as on the direct path, with the 16 positions (times the
// conv's groups) as its groups. GEMM FLOPs over the direct conv's: 16 tiles
// / (9 pixels): 0.44 at 14x14, 0.50 at 10x10, 0.58 at 7x7 (16 tiles for 49
// pixels), 0.64 at 5x5; the mixing's grow by 16/9. In exact arithmetic the
// same conv; in float32 the transforms add rounding of the order of the
// direct conv's own (the tests hold it to the same tolerance).

// One 3x3 conv, out[b][r][h][w] = sum_{q,i,j} in[b][q][h + i - pad_h][w + j - pad_w] * A[r][q][i][j]
// per group. Forward: in = x, A = W. grad_x: in = grad_out, A[c][o][i][j] =
// W[o][c][2-i][2-j] (transposed, flipped), pad = 2 - padding (negative pads
// crop).
struct WinogradConv {
  int64_t batch, groups;
  int64_t rows, depth;          // out and in channels per group (A's rows and reduction)
  int64_t in_h, in_w, out_h, out_w, pad_h, pad_w;
  int64_t tiles_w, tiles;       // 2x2 output tiles per row and per plane
  bool transposed;              // A = W transposed and flipped (grad_x)
  // Set by plan_winograd: the transform positions per pass over the batch
  // (16, or 8 or 4 to bound the scratch: fewer transformed kernels and
  // buffers per sample at once, for passes that each redo the input
  // transform and add to the output), the first one of the current pass,
  // and the samples per chunk.
  int64_t positions = 16, first = 0, chunk = 1;
};

constexpr int64_t kWinogradPositions = 16;
constexpr int64_t kWinogradPad = 64 / sizeof(float);

WinogradConv winograd_forward_conv(const Plan& p) {
  const ConvGeometry& g = p.g;
  WinogradConv c{g.batch, g.groups, p.rows, g.group_in_channels, g.height, g.width, g.out_h, g.out_w,
                 g.padding[0], g.padding[1], (g.out_w + 1) / 2, 0, false};
  c.tiles = (g.out_h + 1) / 2 * c.tiles_w;
  return c;
}

WinogradConv winograd_grad_x_conv(const Plan& p) {
  const ConvGeometry& g = p.g;
  WinogradConv c{g.batch, g.groups, g.group_in_channels, p.rows, g.out_h, g.out_w, g.height, g.width,
                 2 - g.padding[0], 2 - g.padding[1], (g.width + 1) / 2, 0, true};
  c.tiles = (g.height + 1) / 2 * c.tiles_w;
  return c;
}

// From this many tiles a sample, Winograd's GEMMs mix A in a pass of its own
// (mix_packed_tile: blocks of samples from each kernel load, the mixed
// panels read back from L2) rather than in the first call of each row-panel
// pair, whose 8 kernel loads a step held it at 2.4x a plain call's time for
// 1.67x its FMAs (256@14, perf). AMD Zen 4, in-process paired medians,
// separate / fused (with the next tile's kernels requested into L2):
// forward 256@14 0.958-0.959, 256@13 0.965, 256@12 (36 tiles) 0.989,
// 512@12 0.972, 256@16 0.926, 256@21 0.963, 128->256@21 0.928, 128@28
// 0.990, 128@42 0.993, 64->128@42 0.973; grad_x 256@14 0.969, 128@28 0.986,
// 256@21 0.968; but at 10x10 (25 tiles), where a mixed panel serves fewer
// tiles, forward 512@10 1.059, 256->512@10 1.106, grad_x 256->512@10 1.118.
constexpr int64_t kWinogradSeparateMixTiles = 36;

PackedGemm winograd_gemm(PackedIsa isa, const WinogradConv& c, int64_t num_kernels) {
  PackedGemm s;
  s.isa = isa;
  s.m = c.rows;
  s.depth = c.depth;
  s.groups = c.positions * c.groups;  // group (pos - first) * groups + conv group
  s.pixels = c.tiles;
  s.num_kernels = num_kernels;
  s.pixel_panels = (c.tiles + kNR - 1) / kNR;
  // One cache line past each group's panels: the input transform writes a
  // tile's 16 positions one group apart, and at 4 KiB multiples (512@7:
  // 36 KiB) they all fell into one L1 set.
  s.group_b = s.pixel_panels * s.depth * kNR + kWinogradPad;
  s.sample_b = s.groups * s.group_b;
  s.separate_mix = c.tiles >= kWinogradSeparateMixTiles;
  return s;
}

// Floats of one group's GEMM output (rows x tiles), one cache line more, as
// for group_b.
int64_t winograd_m_group(const WinogradConv& c) { return c.rows * c.tiles + kWinogradPad; }

// The 16 positions of U = G g G^T for one vector of lanes (rows of A): g
// the 9 taps (row-major), u the 16 positions' vectors (any vector type: the
// body compiles to the ISA of its caller). G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
template <typename V>
CHANFLEX_INLINE void winograd_kernel_transform(const V* g, V* u) {
  V h[4][3];
  for (int j = 0; j < 3; ++j) {
    const V g0 = g[j], g1 = g[3 + j], g2 = g[6 + j];
    h[0][j] = g0;
    h[1][j] = 0.5f * (g0 + g1 + g2);
    h[2][j] = 0.5f * (g0 - g1 + g2);
    h[3][j] = g2;
  }
  for (int a = 0; a < 4; ++a) {
    u[a * 4 + 0] = h[a][0];
    u[a * 4 + 1] = 0.5f * (h[a][0] + h[a][1] + h[a][2]);
    u[a * 4 + 2] = 0.5f * (h[a][0] - h[a][1] + h[a][2]);
    u[a * 4 + 3] = h[a][2];
  }
}

typedef float WinogradVec __attribute__((vector_size(kMR * sizeof(float)), aligned(4)));

// How winograd_store_step writes a position's vector (whole, aligned
// lines): plainly, or streamed past the caches (AVX-512). The pass's
// transformed kernels are written once and read by every chunk's GEMM from
// the last-level cache or memory. AMD Zen 4, interleaved, paired medians
// streamed / plain: forward 512@10 0.90-0.96, 256->512@10 0.96, 256@14
// 0.96-1.03, 128@28 and 256@21 1.00; grad_x 256@14 30.1 -> 27.2 ms;
// fwd+bwd 0.98-1.00 (bitwise equal).
struct PlainVecStore {
  void operator()(float* dst, const WinogradVec& v) const { std::memcpy(dst, &v, sizeof(v)); }
};
struct StreamVecStore {
  __attribute__((target("avx512f"))) void operator()(float* dst, const WinogradVec& v) const {
    _mm512_stream_ps(dst, reinterpret_cast<__m512>(v));
  }
};

// Transforms one reduction step's taps (g, 16 rows as lanes) and writes
// positions [first, first + positions)' panel vectors, pos_stride floats apart,
// through `store`.
template <typename Store = PlainVecStore>
CHANFLEX_INLINE void winograd_store_step(const WinogradVec* g, float* dst, int64_t pos_stride, int64_t first,
                                         int64_t positions, const Store& store = Store()) {
  WinogradVec u[kWinogradPositions];
  winograd_kernel_transform(g, u);
  for (int64_t pos = 0; pos < positions; ++pos) store(dst + pos * pos_stride, u[first + pos]);
}

// One 16-row panel of A (`valid` rows, row_stride floats apart in W; step q
// at q * step_stride; taps flipped for grad_x) for every reduction step.
struct WinogradPanel {
  const float* w;
  int64_t row_stride, step_stride, valid, depth;
  bool flipped;
  float* dst;  // position `first`'s panel
  int64_t pos_stride, first, positions;
};

__attribute__((target("avx512f,avx2,fma")))
void winograd_prepack_panel_avx512(const WinogradPanel& pn) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(pn.row_stride)));
  const __mmask16 mask = static_cast<__mmask16>((1u << pn.valid) - 1);
  int64_t q = 0;
  if (!pn.flipped && pn.step_stride == 9) {
    // The forward's rows hold each step's 9 taps contiguously: 8 steps of
    // a row are 72 floats, so 8 rows' runs go through nine 8x8 register
    // transposes per half panel instead of 9 gathers of 16 rows per step
    // (rows 9 KB apart at 256 channels). AMD Zen 4, 256@14 forward (perf):
    // the kernels' transform 0.16 / 0.13 -> 0.08 / 0.08 of the
    // micro-kernels' time. The steps past the last 8 keep the gathers.
    alignas(64) static const float zeros[72] = {};
    alignas(64) float taps[72][kMR];  // [step * 9 + tap][row]
    for (; q + 8 <= pn.depth; q += 8) {
      for (int64_t half = 0; half < 2; ++half) {
        const float* rows[8];
        for (int64_t i = 0; i < 8; ++i) {
          const int64_t r = half * 8 + i;
          rows[i] = r < pn.valid ? pn.w + r * pn.row_stride + q * 9 : zeros;
        }
        for (int64_t col = 0; col < 72; col += 8) {
          __m256 m[8];
          for (int64_t i = 0; i < 8; ++i) m[i] = _mm256_loadu_ps(rows[i] + col);
          transpose8x8(m);
          for (int64_t j = 0; j < 8; ++j) _mm256_store_ps(&taps[col + j][half * 8], m[j]);
        }
      }
      for (int64_t step = 0; step < 8; ++step) {
        WinogradVec g[9];
        for (int t = 0; t < 9; ++t) std::memcpy(&g[t], taps[step * 9 + t], sizeof(g[t]));
        winograd_store_step(g, pn.dst + (q + step) * kMR, pn.pos_stride, pn.first, pn.positions, StreamVecStore());
      }
    }
  }
  if (pn.flipped && pn.row_stride == 9) {
    // grad_x's rows are W's 9-tap runs, adjacent: per step, 8 rows' first
    // 8 taps through one 8x8 register transpose per half panel, the 9th
    // tap element by element, instead of 9 gathers. AMD Zen 4, grad_x,
    // interleaved, ms: 256@14 28.2 -> 25.5 and 28.9 -> 25.9, 256->512@10
    // 37.9 -> 31.4 (outputs bitwise equal).
    for (; q < pn.depth; ++q) {
      const float* src = pn.w + q * pn.step_stride;
      __m256 halves[2][9];
      for (int64_t half = 0; half < 2; ++half) flipped_taps8(src + half * 72, pn.valid - half * 8, halves[half]);
      WinogradVec g[9];
      for (int t = 0; t < 9; ++t)
        g[t] = reinterpret_cast<WinogradVec>(_mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(_mm512_castps256_ps512(halves[0][t])), _mm256_castps_pd(halves[1][t]), 1)));
      winograd_store_step(g, pn.dst + q * kMR, pn.pos_stride, pn.first, pn.positions, StreamVecStore());
    }
  }
  for (; q < pn.depth; ++q) {
    const float* src = pn.w + q * pn.step_stride;
    WinogradVec g[9];
    for (int t = 0; t < 9; ++t)
      g[t] = reinterpret_cast<WinogradVec>(
          _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, src + (pn.flipped ? 8 - t : t), 4));
    winograd_store_step(g, pn.dst + q * kMR, pn.pos_stride, pn.first, pn.positions, StreamVecStore());
  }
}

__attribute__((target("avx2,fma")))
void winograd_prepack_panel_avx2(const WinogradPanel& pn) {
  for (int64_t q = 0; q < pn.depth; ++q) {
    const float* src = pn.w + q * pn.step_stride;
    alignas(64) float taps[9][kMR] = {};
    for (int64_t l = 0; l < pn.valid; ++l)
      for (int t = 0; t < 9; ++t) taps[t][l] = src[l * pn.row_stride + (pn.flipped ? 8 - t : t)];
    WinogradVec g[9];
    std::memcpy(g, taps, sizeof(g));
    winograd_store_step(g, pn.dst + q * kMR, pn.pos_stride, pn.first, pn.positions);
  }
}

// The K transformed kernels in run_packed_gemm's prepacked layout (see
// prepack_kernels): for every row tile of group (pos - c.first) * groups +
// g, the K kernels' panels of U_pos, for the pass's positions. A task takes a 16-row panel of one kernel: per
// reduction step it gathers the 9 taps of its 16 rows (one vector each),
// transforms them and writes the 16 positions' panel vectors.
void winograd_prepack_kernels(const WinogradConv& c, const PackedGemm& s, const float* w, int64_t kernel_size,
                              float* out) {
  const Tiling tiles = packed_row_tiles(s);
  const int64_t tile_floats = packed_tile_floats(s);
  const int64_t max_panels = (tiles.size + kMR - 1) / kMR;
  const int64_t K = s.num_kernels;
  // W per kernel: (groups * out channels) x (in channels / groups) x 9; A's
  // rows and reduction steps are its out and in channels (forward) or the
  // reverse (grad_x).
  const int64_t w_rows = c.transposed ? c.depth : c.rows;  // W's out channels per group
  const int64_t w_cols = (c.transposed ? c.rows : c.depth) * 9;
  const int64_t row_stride = c.transposed ? 9 : w_cols;
  const int64_t step_stride = c.transposed ? w_cols : 9;
  at::parallel_for(0, c.groups * tiles.count * max_panels * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task % K;
      const int64_t lp = task / K % max_panels;
      const int64_t tile = task / (K * max_panels) % tiles.count;
      const int64_t group = task / (K * max_panels * tiles.count);
      const int64_t r0 = tile * tiles.size;
      const int64_t nr = std::min(tiles.size, s.m - r0);
      const int64_t panels = (nr + kMR - 1) / kMR;
      if (lp >= panels) continue;
      const WinogradPanel pn{w + k * kernel_size + group * w_rows * w_cols + (r0 + lp * kMR) * row_stride,
                             row_stride, step_stride, std::min(kMR, nr - lp * kMR), s.depth, c.transposed,
                             out + (group * tiles.count + tile) * tile_floats + (k * panels + lp) * s.depth * kMR,
                             c.groups * tiles.count * tile_floats, c.first, c.positions};
      (s.isa == PackedIsa::kAvx512 ? winograd_prepack_panel_avx512 : winograd_prepack_panel_avx2)(pn);
    }
    _mm_sfence();  // the streamed panels (AVX-512), before the GEMM's threads read them
  });
}

// One plane's V = B^T d B, vectorised over the tiles of a tile row: the
// zero-bordered plane is split into its even and odd columns (`even`,
// `odd`: rows of `cols` floats), so that a tile's 4x4 patch columns 2x ..
// 2x + 3 are even[x], odd[x], even[x + 1], odd[x + 1], contiguous in x.
// Writes position pos of tile t at v[pos * v_ld + t], whole vectors (up to
// a vector past the last tile), for the positions of rows [a0, a1) of V
// (positions 4 a .. 4 a + 3: a pass of 8 positions needs half of them).
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
template <typename V>
CHANFLEX_INLINE void winograd_input_tiles(const float* even, const float* odd, int64_t cols, int64_t tiles_h,
                                          int64_t tiles_w, int64_t a0, int64_t a1, float* v, int64_t v_ld) {
  constexpr int64_t lanes = sizeof(V) / sizeof(float);
  auto load = [](const float* at) {
    V x;
    std::memcpy(&x, at, sizeof(V));
    return x;
  };
  for (int64_t y = 0; y < tiles_h; ++y) {
    for (int64_t x0 = 0; x0 < tiles_w; x0 += lanes) {
      V d[4][4];
      for (int i = 0; i < 4; ++i) {
        const float* e = even + (2 * y + i) * cols + x0;
        const float* o = odd + (2 * y + i) * cols + x0;
        d[i][0] = load(e);
        d[i][1] = load(o);
        d[i][2] = load(e + 1);
        d[i][3] = load(o + 1);
      }
      float* out = v + y * tiles_w + x0;
      for (int64_t a = a0; a < a1; ++a) {
        V r[4];  // row a of B^T d
        for (int j = 0; j < 4; ++j)
          r[j] = a == 0 ? d[0][j] - d[2][j] : a == 1 ? d[1][j] + d[2][j] : a == 2 ? d[2][j] - d[1][j] : d[1][j] - d[3][j];
        const V u[4] = {r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]};
        for (int b = 0; b < 4; ++b) std::memcpy(out + (a * 4 + b) * v_ld, &u[b], sizeof(V));
      }
    }
  }
}

typedef float WinogradVec8 __attribute__((vector_size(8 * sizeof(float)), aligned(4)));

__attribute__((target("avx512f,avx2,fma")))
void winograd_input_tiles_avx512(const float* even, const float* odd, int64_t cols, int64_t tiles_h,
                                 int64_t tiles_w, int64_t a0, int64_t a1, float* v, int64_t v_ld) {
  winograd_input_tiles<WinogradVec>(even, odd, cols, tiles_h, tiles_w, a0, a1, v, v_ld);
}

__attribute__((target("avx2,fma")))
void winograd_input_tiles_avx2(const float* even, const float* odd, int64_t cols, int64_t tiles_h,
                               int64_t tiles_w, int64_t a0, int64_t a1, float* v, int64_t v_ld) {
  winograd_input_tiles<WinogradVec8>(even, odd, cols, tiles_h, tiles_w, a0, a1, v, v_ld);
}

// Channels per task of the input transform: each (position, pixel panel)
// then receives 8 channels' 6 tiles as one 192-byte run (3 whole lines)
// rather than 8 runs of 24 bytes from 8 tasks. AMD Zen 4, forward,
// interleaved in one process (8 timed first, since the first of each round
// pays up to 15% after the static conv), ms, 1 -> 8 channels: 256@14 29.3
// -> 27.4 and 29.2 -> 28.0, 128@28 28.5 -> 23.9, 256@21 73.6 -> 66.5,
// 64->128@42 61.1 -> 51.1 (a slow spell of the VM); 16 and 32 no better.
// Prefetching the runs a few panels ahead (for writing) gained nothing.
constexpr int64_t kWinogradInputBlock = 8;

// V = B^T d B of every tile of samples [0, n) of `in` (n x groups * depth
// planes of in_h x in_w), into run_packed_gemm's B panels for the pass's
// positions (position pos of conv group g is its group (pos - c.first) *
// groups + g; tiles are its pixels). Per (sample, block of channels): for
// each channel's plane, the zero-bordered plane that covers every tile's
// patch, split into even and odd columns, and the transform, vectorised
// (see winograd_input_tiles) into a scratch of the 16 positions' rows of
// tiles; then each position's rows go to its pixel panels, 6 tiles of the
// block's channels at a time.
void winograd_input_transform(const WinogradConv& c, const PackedGemm& s, const float* in, int64_t n, float* b) {
  const int64_t channels = c.groups * c.depth;
  const int64_t plane = c.in_h * c.in_w;
  const int64_t tiles_h = c.tiles / c.tiles_w;
  const int64_t padded_h = 2 * tiles_h + 2, padded_w = 2 * c.tiles_w + 2;  // rows from -pad_h, columns from -pad_w
  constexpr int64_t kMaxLanes = kMR;
  const int64_t cols = c.tiles_w + 1 + kMaxLanes;  // a vector's loads past the last tile stay inside
  const int64_t v_ld = c.tiles + kMaxLanes;        // and so do its stores
  const int64_t pos_stride = c.groups * s.group_b;
  const auto tiles_fn = s.isa == PackedIsa::kAvx512 ? winograd_input_tiles_avx512 : winograd_input_tiles_avx2;
  // Columns [j0, j1) of the padded rows hold the plane's (negative pads crop
  // it), the rest are zero.
  const int64_t j0 = std::clamp<int64_t>(c.pad_w, 0, padded_w);
  const int64_t j1 = std::clamp<int64_t>(c.in_w + c.pad_w, j0, padded_w);
  const int64_t block = kWinogradInputBlock;
  const int64_t q_blocks = (c.depth + block - 1) / block;
  at::parallel_for(0, n * c.groups * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> split(2 * padded_h * cols, 0.f);  // even columns' rows, then odd columns'
    std::vector<float> v(block * kWinogradPositions * v_ld);
    float* const even = split.data();
    float* const odd = even + padded_h * cols;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / (c.groups * q_blocks), group = task / q_blocks % c.groups;
      const int64_t q0 = task % q_blocks * block, q1 = std::min(q0 + block, c.depth);
      for (int64_t q = q0; q < q1; ++q) {
        const float* src = in + (i * channels + group * c.depth + q) * plane;
        for (int64_t r = 0; r < padded_h; ++r) {
          const int64_t h = r - c.pad_h;
          float* e = even + r * cols;
          float* o = odd + r * cols;
          std::fill(e, e + c.tiles_w + 1, 0.f);
          std::fill(o, o + c.tiles_w + 1, 0.f);
          if (h < 0 || h >= c.in_h) continue;
          const float* row = src + h * c.in_w;  // padded column j is row[j - pad_w]
          int64_t j = j0;
          if (j % 2 == 1 && j < j1) o[j++ / 2] = row[j0 - c.pad_w];
          for (; j + 1 < j1; j += 2) {
            e[j / 2] = row[j - c.pad_w];
            o[j / 2] = row[j + 1 - c.pad_w];
          }
          if (j < j1) e[j / 2] = row[j - c.pad_w];
        }
        // Only the pass's positions: AMD Zen 4, 256@14 forward (2 passes),
        // perf: the transform 0.056 -> 0.042 of the micro-kernels' time.
        tiles_fn(even, odd, cols, tiles_h, c.tiles_w, c.first / 4, (c.first + c.positions + 3) / 4,
                 v.data() + (q - q0) * kWinogradPositions * v_ld, v_ld);
      }
      float* dst = b + i * s.sample_b + group * s.group_b;
      for (int64_t pos = 0; pos < c.positions; ++pos) {
        for (int64_t lp = 0; lp < s.pixel_panels; ++lp) {
          if (q1 - q0 == block) {
            // A whole block's run (6 tiles of 8 channels, 3 lines) is
            // assembled here and streamed out (copy_streaming): B is written
            // once per chunk and read by the GEMM from the last-level cache
            // or memory anyway, and the plain stores stalled on reads for
            // ownership (perf: most of the transform's time). The tiles past
            // the last (a short last panel) come along from v's overhang;
            // no call reads them. AMD Zen 4, interleaved, paired medians
            // streamed / plain: forward 256@14 0.85-0.87, 128@28 0.77,
            // 512@10 0.93, 256@21 0.84, 64->128@42 0.82; grad_x 256@14
            // 35.3 -> 30.4 ms, 128@28 35.9 -> 26.9 (bitwise equal).
            alignas(64) float run[kWinogradInputBlock * kNR];
            for (int64_t q = q0; q < q1; ++q)
              std::memcpy(run + (q - q0) * kNR,
                          v.data() + ((q - q0) * kWinogradPositions + c.first + pos) * v_ld + lp * kNR,
                          kNR * sizeof(float));
            copy_streaming(dst + pos * pos_stride + packed_b_offset(s, lp, q0), run, block * kNR, s.isa);
            continue;
          }
          const int64_t valid = std::min(kNR, c.tiles - lp * kNR);
          for (int64_t q = q0; q < q1; ++q) {
            const float* from = v.data() + ((q - q0) * kWinogradPositions + c.first + pos) * v_ld + lp * kNR;
            float* to = dst + pos * pos_stride + packed_b_offset(s, lp, q);
            if (valid == kNR) {
              std::memcpy(to, from, kNR * sizeof(float));  // fixed size: inlined, not a libc call
            } else {
              for (int64_t l = 0; l < valid; ++l) to[l] = from[l];
            }
          }
        }
      }
    }
    _mm_sfence();  // the streamed runs, before the GEMM's threads read them
  });
}

// One plane's Y = A^T M A for the pass's positions, vectorised over the
// tiles of a tile row: v[pos * pos_stride + t] is position first + pos of
// tile t (contiguous in t), y[a][b][t] receives output pixel (2 ty + a, 2 tx
// + b) of tile t (whole vectors, up to one past the last tile; y_ld floats
// per (a, b)). A^T = [1 1 1 0; 0 1 -1 -1].
template <typename V>
CHANFLEX_INLINE void winograd_output_tiles(const float* v, int64_t pos_stride, int64_t first, int64_t positions,
                                           int64_t tiles, float* y, int64_t y_ld) {
  constexpr int64_t lanes = sizeof(V) / sizeof(float);
  for (int64_t t0 = 0; t0 < tiles; t0 += lanes) {
    V m[kWinogradPositions] = {};  // positions outside the pass add nothing
    for (int64_t pos = 0; pos < positions; ++pos) std::memcpy(&m[first + pos], v + pos * pos_stride + t0, sizeof(V));
    V r[2][4];
    for (int j = 0; j < 4; ++j) {
      r[0][j] = m[j] + m[4 + j] + m[8 + j];
      r[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
    }
    for (int a = 0; a < 2; ++a) {
      const V y0 = r[a][0] + r[a][1] + r[a][2], y1 = r[a][1] - r[a][2] - r[a][3];
      std::memcpy(y + (a * 2 + 0) * y_ld + t0, &y0, sizeof(V));
      std::memcpy(y + (a * 2 + 1) * y_ld + t0, &y1, sizeof(V));
    }
  }
}

__attribute__((target("avx512f,avx2,fma")))
void winograd_output_tiles_avx512(const float* v, int64_t pos_stride, int64_t first, int64_t positions,
                                  int64_t tiles, float* y, int64_t y_ld) {
  winograd_output_tiles<WinogradVec>(v, pos_stride, first, positions, tiles, y, y_ld);
}

__attribute__((target("avx2,fma")))
void winograd_output_tiles_avx2(const float* v, int64_t pos_stride, int64_t first, int64_t positions,
                                int64_t tiles, float* y, int64_t y_ld) {
  winograd_output_tiles<WinogradVec8>(v, pos_stride, first, positions, tiles, y, y_ld);
}

// One output row from its tile row's two columns of pixels: row[ow] =
// (ow even ? y0 : y1)[ow / 2] for ow < n, or added to it.
void winograd_output_row(const float* y0, const float* y1, int64_t n, bool add, float* row) {
  for (int64_t ow = 0; ow < n; ++ow) {
    const float value = (ow % 2 == 0 ? y0 : y1)[ow / 2];
    row[ow] = add ? row[ow] + value : value;
  }
}

// The same, 16 pixels at a time by a two-register permute (reading up to
// 15 floats past y0's and y1's last pixel). At 256@14 on AMD Zen 4 the
// output transform went from 0.120 to 0.097 of the micro-kernels' time
// (perf); the input transform's even/odd split, vectorised alike, gained
// nothing measurable (its time is in the stores to the B panels).
__attribute__((target("avx512f,avx2,fma")))
void winograd_output_row_avx512(const float* y0, const float* y1, int64_t n, bool add, float* row) {
  const __m512i zip = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  for (int64_t ow = 0; ow < n; ow += 16) {
    const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << std::min<int64_t>(16, n - ow)) - 1);
    __m512 value = _mm512_permutex2var_ps(_mm512_loadu_ps(y0 + ow / 2), zip, _mm512_loadu_ps(y1 + ow / 2));
    if (add) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(lanes, row + ow));
    _mm512_mask_storeu_ps(row + ow, lanes, value);
  }
}

// Y = A^T M A of every tile of samples [0, n), from the pass's positions:
// m holds each sample's c.positions * groups (rows x tiles) GEMM outputs,
// out is n x groups * rows planes of out_h x out_w, which the first pass
// writes and later ones add to (Y is linear in M).
void winograd_output_transform(const WinogradConv& c, PackedIsa isa, const float* m, int64_t n, float* out) {
  const int64_t channels = c.groups * c.rows;
  const int64_t plane = c.out_h * c.out_w;
  const int64_t m_group = winograd_m_group(c);
  const int64_t pos_stride = c.groups * m_group;
  const int64_t y_ld = c.tiles + kMR;  // a vector's stores past the last tile stay inside
  const bool add = c.first > 0;
  const auto tiles_fn = isa == PackedIsa::kAvx512 ? winograd_output_tiles_avx512 : winograd_output_tiles_avx2;
  const auto row_fn = isa == PackedIsa::kAvx512 ? winograd_output_row_avx512 : winograd_output_row;
  at::parallel_for(0, n * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(4 * y_ld);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / channels, ch = task % channels;
      tiles_fn(m + i * c.positions * pos_stride + ch / c.rows * m_group + ch % c.rows * c.tiles, pos_stride,
               c.first, c.positions, c.tiles, y.data(), y_ld);
      float* dst = out + task * plane;
      for (int64_t oh = 0; oh < c.out_h; ++oh) {
        const float* y0 = y.data() + (oh % 2) * 2 * y_ld + oh / 2 * c.tiles_w;  // b = 0, this tile row
        row_fn(y0, y0 + y_ld, c.out_w, add, dst + oh * c.out_w);                // b = 1
      }
    }
  });
}

// Floats of one sample's buffers in a pass: its B panels and GEMM outputs.
int64_t winograd_sample_floats(const WinogradConv& c, const PackedGemm& s) {
  return s.sample_b + c.positions * c.groups * winograd_m_group(c);
}

// Samples per chunk: their buffers in the budget (the packed paths'
// kernel-sized one), at least one per thread, even where more than one fits
// (run_packed_gemm mixes samples in pairs).
int64_t winograd_chunk(const WinogradConv& c, const PackedGemm& s, int64_t budget_bytes) {
  const int64_t per_sample = winograd_sample_floats(c, s) * static_cast<int64_t>(sizeof(float));
  int64_t chunk = std::min<int64_t>(std::max<int64_t>(budget_bytes / per_sample, at::get_num_threads()), c.batch);
  if (chunk > 2 && chunk < c.batch) chunk -= chunk % 2;
  return chunk;
}

// The pass's buffers (floats): the K transformed kernels of its positions,
// a chunk's B panels and GEMM outputs, run_packed_gemm's per-thread scratch.
std::array<int64_t, 4> winograd_scratch(const PackedGemm& s, const WinogradConv& c) {
  return {prepacked_floats(s), c.chunk * s.sample_b, c.chunk * c.positions * c.groups * winograd_m_group(c),
          packed_gemm_worker_floats(s, c.chunk, /*prepacked=*/true)};
}

int64_t winograd_scratch_floats(const PackedGemm& s, const WinogradConv& c) {
  int64_t total = 0;
  for (const int64_t floats : winograd_scratch(s, c)) total += floats;
  return total;
}

// out = the conv `c` of `in` with sample b's kernel sum_k attn[b,k] A_k (A
// from w as `c` says), without bias: per pass over the positions, the K
// kernels transformed, then per chunk of samples the input transform, the
// GEMMs and the output transform.
void winograd_conv(PackedIsa isa, WinogradConv c, const float* in, const float* w, int64_t kernel_size,
                   const float* attn, int64_t num_kernels, float* out) {
  const PackedGemm s = winograd_gemm(isa, c, num_kernels);
  const int64_t m_group = winograd_m_group(c);
  const int64_t m_sample = c.positions * c.groups * m_group;
  const auto buffers = pass_scratch<4>(winograd_scratch(s, c));
  const int64_t in_sample = c.groups * c.depth * c.in_h * c.in_w;
  const int64_t out_sample = c.groups * c.rows * c.out_h * c.out_w;
  auto no_packing = [](int64_t, int64_t, int64_t, int64_t, int64_t, float*) {};
  for (c.first = 0; c.first < kWinogradPositions; c.first += c.positions) {
    winograd_prepack_kernels(c, s, w, kernel_size, buffers[0]);
    for (int64_t b0 = 0; b0 < c.batch; b0 += c.chunk) {
      const int64_t n = std::min(c.chunk, c.batch - b0);
      winograd_input_transform(c, s, in + b0 * in_sample, n, buffers[1]);
      run_packed_gemm(s, buffers[1], attn + b0 * num_kernels, n, no_packing, buffers[0], buffers[3],
                      [&](int64_t i, int64_t group) { return buffers[2] + i * m_sample + group * m_group; });
      winograd_output_transform(c, isa, buffers[2], n, out + b0 * out_sample);
    }
  }
}

// Whether conv `c` takes it, and if so its passes and chunks (in `c`): 3x3,
// stride 1, undilated float32 on a packed ISA, as CHANFLEX_CPU_WINOGRAD
// says ("0": never; "1", "2" or "4": every such conv, in that many passes
// with the default chunks; tests use them for planes outside the default
// range), by default those with 100 to 1764 output pixels (10x10 to 42x42;
// on AVX2 to 441, 21x21) whose pass scratch fits in their activations plus
// the K kernels' size, in 1 or 2 passes. In-process A/B on AMD Zen 5, K =
// 4, ms, direct -> Winograd in one pass: forward 256@14 22.9 -> 14.4,
// 512@10 49.0 -> 32.1, 256@21 51.2 -> 36.4, 128@28 36.0 -> 21.3, 64->128@42
// 28.6 -> 24.1; fwd+bwd 256@21 162 -> 136, 128@21 50.9 -> 43.1, 256@28 321
// -> 240; but forward 512@7 25.9 vs 24.3, 512@5 20.4 vs 22.7, 64@56 21.6 vs
// 21.4 (too few tiles to pay for the transforms, or the library's conv as
// fast). AVX2 (the cap on the same machine): forward 256@21 107.9 -> 60.1,
// 512@10 92.5 -> 54.2, but 128@28 21.5 vs 23.1 and 64->128@42 25.9 vs 30.2
// against the library's conv, so there only up to 441 pixels. Memory: the
// transformed kernels are 16/9 K |W| per pass of all 16 positions and a
// sample's buffers 9x its activations; in one pass the fwd+bwd peak at
// 256@14 rose from 1.32 to 1.70 of the static conv's (512@10: 2.62 to
// 4.52); in 2 passes (with chunks of 4), 1.21, for fwd 27.1 -> 21.3,
// fwd+bwd 92.3 -> 82.1 (one pass: 20.2, 81.0); with chunks of 2 (below)
// one pass fits, 1.19 with the fitted scratch buffer. Each pass redoes the input
// and kernel transforms: 4 passes lost to the direct paths (512@10 fwd+bwd
// 188.5 vs 222.4); 2 passes won (Zen 4, fwd+bwd 241 -> 209 ms).
constexpr int64_t kWinogradMinPixels = 100;

// Samples per chunk of a pass: each chunk rereads the pass's transformed
// kernels. Where they stay in the last-level cache (at most 16 MiB, half a
// Zen 4 CCD's L3), the fewest samples, one per thread (even counts:
// run_packed_gemm mixes samples in pairs), keep the chunk's buffers
// closest; beyond it, from memory, a chunk needs 32 K sample tiles (16
// FLOPs per byte read). In-process on AMD Zen 4, K = 4, ms, paired
// medians against the previous rule (48 K tiles: 8 x 25 at 10x10, 4 x 49
// at 14x14, where 256@14 took 2 passes): forward 512@10 (2 passes of 32
// MiB kernels, chunks of 6) 0.977, 256->512@10 (2 x 16 MiB, chunks of 2)
// 0.963, 256@14 (1 x 16 MiB, chunks of 2) 0.977 and 0.95-0.96 in repeats;
// grad_x 0.985, 0.938, 0.943. At 512@10 chunks of 4 and 2 were slower
// than 6 (forward 1.07, 1.13; grad_x 1.10, 1.06). Smaller chunks also take
// less scratch.
int64_t winograd_pass_chunk(const WinogradConv& c, const PackedGemm& s) {
  constexpr int64_t kCachedKernelBytes = int64_t{16} << 20;
  const int64_t kernel_bytes = prepacked_floats(s) * static_cast<int64_t>(sizeof(float));
  const int64_t min_tiles = kernel_bytes <= kCachedKernelBytes ? 1 : 32 * s.num_kernels;
  int64_t chunk = std::min(std::max<int64_t>((min_tiles + c.tiles - 1) / c.tiles, at::get_num_threads()), c.batch);
  if (chunk < c.batch) chunk = std::min(chunk + chunk % 2, c.batch);
  return chunk;
}
constexpr int64_t kWinogradMaxPixelsAvx512 = 1764;
constexpr int64_t kWinogradMaxPixelsAvx2 = 441;
// Transforming and packing the K kernels is a cost per call that the
// batch's samples must pay back: by default at least 4 samples and this
// many output pixels in the batch. Measured break-even (forward, against
// the direct paths, 2 threads): AVX-512 at 512@10 about 7 samples, 256@14
// and 256@21 3-4, 128@28 and 128@42 4-5; AVX2, whose transforms take
// twice the instructions, 256@14 8, 256@21 4-5, 512@10 12-16. Below them
// Winograd cost up to 1.75x the direct forward (512@10, 2 samples).
constexpr int64_t kWinogradMinBatchPixelsAvx512 = 768;
constexpr int64_t kWinogradMinBatchPixelsAvx2 = 1536;
constexpr int64_t kWinogradMinBatch = 4;

bool plan_winograd(const Plan& p, at::ScalarType dtype, PackedIsa isa, WinogradConv& c) {
  const ConvGeometry& g = p.g;
  const bool eligible = dtype == at::kFloat && isa != PackedIsa::kGeneric && g.kernel_h == 3 && g.kernel_w == 3 &&
                        g.stride[0] == 1 && g.stride[1] == 1 && g.dilation[0] == 1 && g.dilation[1] == 1 &&
                        g.batch > 0;
  const int64_t kernels_bytes = g.num_kernels * p.kernel_size * static_cast<int64_t>(sizeof(float));
  const int64_t budget = chunk_budget_bytes(std::max(kForwardChunkBytes, kernels_bytes));
  const char* env = std::getenv("CHANFLEX_CPU_WINOGRAD");
  if (env != nullptr && *env != '\0') {
    const std::string value(env);
    TORCH_CHECK(value == "0" || value == "1" || value == "2" || value == "4",
                "CHANFLEX_CPU_WINOGRAD: expected '0', '1', '2' or '4', got '", value, "'");
    if (!eligible || value == "0") return false;
    c.positions = kWinogradPositions / std::stoi(value);
    c.chunk = winograd_chunk(c, winograd_gemm(isa, c, g.num_kernels), budget);
    return true;
  }
  const bool avx512 = isa == PackedIsa::kAvx512;
  const int64_t max_pixels = avx512 ? kWinogradMaxPixelsAvx512 : kWinogradMaxPixelsAvx2;
  const int64_t min_batch_pixels = avx512 ? kWinogradMinBatchPixelsAvx512 : kWinogradMinBatchPixelsAvx2;
  if (!eligible || p.pixels < kWinogradMinPixels || p.pixels > max_pixels || g.batch < kWinogradMinBatch ||
      g.batch * p.pixels < min_batch_pixels) {
    return false;
  }
  // The fewest passes (1 or 2) whose scratch fits in the activations plus
  // the K kernels' size (see winograd_pass_chunk for the chunks). 512@10
  // forward in 2 passes: 73 -> 60 ms. The activations or the K kernels
  // alone (the bound before) took it past every chunk of 48 K tiles, to the
  // direct paths. Since the weight side gives the scratch buffer back (see
  // pass_scratch), a pass's scratch is not stacked on the K-fold weight
  // gradient: its fwd+bwd peak is at most the activations held by the
  // step plus this bound.
  const int64_t activations = c.batch * c.groups * (c.depth * c.in_h * c.in_w + c.rows * c.out_h * c.out_w);
  const int64_t bound = activations + g.num_kernels * p.kernel_size;
  for (const int64_t positions : {kWinogradPositions, kWinogradPositions / 2}) {  // 4 per pass lost to the direct paths
    c.positions = positions;
    const PackedGemm s = winograd_gemm(isa, c, g.num_kernels);
    c.chunk = winograd_pass_chunk(c, s);
    if (winograd_scratch_floats(s, c) <= bound) return true;
  }
  return false;
}

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
    for_each_range(tile_tasks * blocks, [&](int64_t begin, int64_t end) {
      std::vector<T> w_mixed(block * tiles.size * p.cols);
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

at::Tensor forward_library(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& attn_c, const at::Tensor& bias_mixed, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype) {
  const at::Tensor w_flat = weight.to(dtype).reshape({g.num_kernels, -1});
  const at::Tensor x_c = x.to(dtype).contiguous();
  const int64_t chunk = library_chunk(g, c10::elementSize(dtype));
  at::Tensor y;
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const c10::optional<at::Tensor> bias_n =
        bias_mixed.defined() ? c10::optional<at::Tensor>(bias_mixed.narrow(0, b0, n).reshape({-1})) : c10::nullopt;
    at::Tensor y_n = at::conv2d(as_one_sample(x_c, b0, n), mixed_kernels(attn_c, w_flat, b0, n, weight), bias_n,
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
// <G_b, W_k> as each chunk's G is produced. grad_w must be zeroed.
void backward_library(const ConvGeometry& g, const at::Tensor& grad_out, const at::Tensor& x,
                      const at::Tensor& weight, const at::Tensor& attn_c, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                      bool need_x, bool need_w, bool need_attn, at::Tensor& grad_x, at::Tensor& grad_w,
                      at::Tensor& grad_attn) {
  const at::Tensor w_flat = weight.to(dtype).reshape({g.num_kernels, -1});
  const at::Tensor x_c = x.to(dtype).contiguous();
  const at::Tensor go = grad_out.to(dtype).contiguous();
  at::Tensor grad_w_flat = need_w ? grad_w.view({g.num_kernels, -1}) : at::Tensor();
  const bool need_g = need_w || need_attn;
  const int64_t chunk = library_chunk(g, c10::elementSize(dtype));
  const std::vector<int64_t> no_output_padding(2, 0);
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const auto grads = at::convolution_backward(
        as_one_sample(go, b0, n), as_one_sample(x_c, b0, n), mixed_kernels(attn_c, w_flat, b0, n, weight),
        c10::nullopt, stride, padding, dilation, /*transposed=*/false, no_output_padding, n * groups,
        {need_x, need_g, false});
    if (need_x) grad_x.narrow(0, b0, n).copy_(std::get<0>(grads).view({n, g.in_channels, g.height, g.width}));
    if (!need_g) continue;
    const at::Tensor g_n = std::get<1>(grads).view({n, -1});
    if (need_w) grad_w_flat.addmm_(attn_c.narrow(0, b0, n).t(), g_n);
    if (need_attn) grad_attn.narrow(0, b0, n).copy_(at::mm(g_n, w_flat.t()));
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
  const Plan p = make_plan(g);
  const PackedIsa isa = packed_isa();
  WinogradConv winograd_c = winograd_forward_conv(p);
  const bool winograd = plan_winograd(p, dtype, isa, winograd_c);
  const bool packed = use_packed(p, dtype, isa);
  const bool streamed = !packed && use_stream_forward(p, dtype, isa);
  // One sample: the packed paths mix each kernel tile in cache as they apply
  // it, reading the K kernels once and writing no mixed kernel; elsewhere
  // (float64, no packed ISA) mix it once and run the library's conv. Batch 1,
  // fp32, against mix-then-conv (of the static conv): 512@5 1.30 vs 2.19,
  // 512@7 1.25 vs 1.88, the 7x7 stem 0.65 vs 1.09 (AVX-512; AVX2 alike).
  const bool one_sample_library = g.batch == 1 && !packed && !streamed;
  if (!winograd && (one_sample_library || use_library(g, library_min_pixels(kLibraryForwardMinPixels, dtype)))) {
    return forward_library(g, x, weight, attn_c, bias_mixed, stride, padding, dilation, groups, dtype)
        .to(x.scalar_type());
  }
  const at::Tensor x_c = x.to(dtype).contiguous();
  const at::Tensor w_c = weight.to(dtype).contiguous();
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
// Packed weight gradient: float32, AVX2 or AVX-512, few output pixels.
//
// With few pixels G_b = dy_b @ cols_b^T is a rank-`pixels` product, and
// writing it out for dW_k += attn[b,k] G_b and dattn[b,k] = <G_b, W_k> to
// read it back K times costs more than computing it. Here each tile of G_b
// is accumulated in registers, one vector per weight row and run of
// columns (cols^T panels give the vectors, grad_out's rows the broadcast
// values, read in place: a packed copy of them measured no faster and
// took as much scratch as the panels), parked in a small L1 buffer with
// the tiles of up to 7 more samples, and folded from there into the K
// weight-gradient tiles and the K dattn sums, reading W_k and updating dW_k
// in place in their own row-major layout. A thread owns a
// block of weight rows x columns for the whole chunk; the block's K weight
// and dW rows stay in L2 while every sample passes, so dW needs no partial
// copies, no tile buffers to gather and scatter, and the result does not
// depend on scheduling.

// Register blocking of one call, per ISA: `samples` samples' G tiles of
// `rows` weight rows by `vecs` vectors of `lanes`
// columns (cols^T panel width): 1 x 6 x 16 on AVX2 (12 of 16 registers);
// 2 x 6 x 32 on AVX-512 (24 of 32; 16 loads per 24 vector FMAs).
struct WeightGradShape {
  int64_t lanes, rows, vecs, samples;
};

WeightGradShape weight_grad_shape(PackedIsa isa) {
  return isa == PackedIsa::kAvx512 ? WeightGradShape{16, 6, 2, 2} : WeightGradShape{8, 6, 2, 1};
}
constexpr int64_t kMaxGradRows = 6;
constexpr int64_t kMaxGradSamples = 2;
// A thread block: kGradBlockRowCalls x kGradBlockColCalls calls; at 6 x 32
// per call that is 48 x 192 weight entries, whose K weight and dW rows (295
// KB) stay in L2 while each sample's dy rows and cols^T panels for the
// block (48 and 192 unfolded rows) are read once.
constexpr int64_t kGradBlockRowCalls = 8;
constexpr int64_t kGradBlockColCalls = 6;
// Bytes of the direct weight gradient's input panels at once. The weight
// side runs beside the K-fold weight gradient it writes, which a static
// conv does not have, so the batch's panels go in slabs of input channels
// (each slab reads grad_out again; chunks of samples, as before, moved
// every block's W and dW tiles through memory once more a chunk:
// 256->512@10 weight side +14% at 4 MiB, 512@10 +31%), but with at least
// kMinSlabTasksPerThread blocks a thread in each (slabs of 6 blocks for 2
// threads lost 13-15% at 21x21). In-process on AMD Zen 4, weight side,
// paired medians against one slab of the whole batch: 512@10 0.98-1.01,
// 256->512@10 1.01, 256->512 14->7 0.97, 512@7 1.04, 512@5 1.00, 256@14
// 1.00, 128->256 28->14 1.02, 256@21 1.06, 128->256@21 1.10. The fwd+bwd
// peak of VGG19's 512@10 fell from 53.1 MiB with slabs of 4 MiB (1.56x the
// static conv's) to 50.0 MiB (1.48x), where the output, grad_x and the
// K-fold gradient alone take 48.5 (and so does grad_x's Winograd pass with
// its scratch: 50.0).
constexpr int64_t kDirectGradScratchBytes = int64_t{1} << 20;
constexpr int64_t kMinSlabTasksPerThread = 8;

// With `direct` (see use_direct_weight_grad) the cols^T panels are the
// input itself, channels-last: [group][panel][input pixel][lanes channels],
// and a thread block owns block_rows weight rows x one call's width of input
// channels, every tap (block_cols = vecs * lanes * taps weight columns).
struct WeightGradBlocks {
  WeightGradShape shape;
  bool direct;
  int64_t col_panels;              // per group: cols^T panels of shape.lanes columns (direct: channels)
  int64_t block_rows, block_cols;  // weight entries per thread block
  int64_t row_blocks, col_blocks;  // per group
  int64_t tasks;                   // groups * row_blocks * col_blocks
  int64_t sample_cols;             // floats of one sample's packed cols^T (all groups)
};

WeightGradBlocks make_weight_grad_blocks(const Plan& p, PackedIsa isa, bool direct = false) {
  WeightGradBlocks w;
  w.shape = weight_grad_shape(isa);
  w.direct = direct;
  const int64_t call_cols = w.shape.vecs * w.shape.lanes;
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  w.col_panels = direct ? (p.g.group_in_channels + call_cols - 1) / call_cols * w.shape.vecs
                        : (p.cols + w.shape.lanes - 1) / w.shape.lanes;
  w.block_rows = kGradBlockRowCalls * w.shape.rows;
  w.block_cols = direct ? call_cols * taps : kGradBlockColCalls * call_cols;
  w.row_blocks = (p.rows + w.block_rows - 1) / w.block_rows;
  w.col_blocks = (p.cols + w.block_cols - 1) / w.block_cols;
  w.tasks = p.g.groups * w.row_blocks * w.col_blocks;
  const int64_t panel_pixels = direct ? p.g.height * p.g.width : p.pixels;
  w.sample_cols = p.g.groups * w.col_panels * panel_pixels * w.shape.lanes;
  return w;
}

// The packed weight gradient needs enough blocks to keep every thread busy.
// The packed weight gradient also wins at VGG19's 21x21 stage on AVX-512
// (weight side alone, 441 pixels: 70 vs 97-107 ms at 256->256, 37 vs 41-45
// at 128->256), not at 28x28 (784 pixels: 41 vs 37 ms); AVX2 keeps the
// forward's limit, which is where it was measured.
int64_t packed_weight_grad_max_pixels(PackedIsa isa) { return isa == PackedIsa::kAvx512 ? 512 : kPackedMaxPixelsAvx2; }

bool use_packed_weight_grad(const Plan& p, at::ScalarType dtype, PackedIsa isa) {
  return dtype == at::kFloat && isa != PackedIsa::kGeneric && p.pixels <= packed_weight_grad_max_pixels(isa) &&
         make_weight_grad_blocks(p, isa).tasks >= 4 * at::get_num_threads();
}

// The direct weight gradient: dW_k[o, c, t] sums dy[o, q] x[c, q + shift_t]
// over only the output pixels q whose tap t reads inside the image, a
// rectangle per tap; the unfolded panels sum the padding's zeros too (at
// 3x3, pad 1: 16% of the products on 7x7, 21% on 5x5, 9% on 14x14). Each
// call covers one tap of a run of input channels, read straight from the
// channels-last input (9x less to pack than the unfolded panels at 3x3).
// The block's W and dW tiles are transposed into and out of the block
// layout (tap-major there, channel-major in W). Default where it skips at least
// kMinSkippedProducts on AVX-512 (the block layout's ISA), or as
// CHANFLEX_CPU_DIRECT_WEIGHT_GRAD says ("1": wherever the packed weight
// gradient runs, "0": never; tests force it on both ISAs).
struct TapRectangle {
  int64_t y0, y1, x0, x1;  // output pixels [y0, y1) x [x0, x1)
  int64_t in_y0, in_x0;    // the input pixel tap t reads at (y0, x0)
};

std::vector<TapRectangle> tap_rectangles(const Plan& p) {
  const ConvGeometry& g = p.g;
  std::vector<TapRectangle> rects;
  for (int64_t ki = 0; ki < g.kernel_h; ++ki)
    for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
      TapRectangle r;
      const int64_t row_off = ki * g.dilation[0] - g.padding[0], col_off = kj * g.dilation[1] - g.padding[1];
      valid_range(row_off, g.stride[0], g.height, g.out_h, &r.y0, &r.y1);
      valid_range(col_off, g.stride[1], g.width, g.out_w, &r.x0, &r.x1);
      r.in_y0 = r.y0 * g.stride[0] + row_off;
      r.in_x0 = r.x0 * g.stride[1] + col_off;
      rects.push_back(r);
    }
  return rects;
}

bool use_direct_weight_grad(const Plan& p, PackedIsa isa) {
  const char* env = std::getenv("CHANFLEX_CPU_DIRECT_WEIGHT_GRAD");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_DIRECT_WEIGHT_GRAD: expected '0' or '1', got '", value, "'");
  if (isa == PackedIsa::kGeneric) return false;
  if (!value.empty()) return value == "1";
  int64_t kept = 0;
  for (const TapRectangle& r : tap_rectangles(p)) kept += (r.y1 - r.y0) * (r.x1 - r.x0);
  const double skipped = 1.0 - static_cast<double>(kept) / static_cast<double>(p.pixels * p.g.kernel_h * p.g.kernel_w);
  return isa == PackedIsa::kAvx512 && skipped >= kMinSkippedProducts &&
         make_weight_grad_blocks(p, isa, /*direct=*/true).tasks >= 4 * at::get_num_threads();
}

// One call's operands and destination: sample s's dy rows (grad_out's
// own, dy_row_stride floats apart) at dy + s * dy_sample_stride and its
// cols^T panels (pixels x lanes floats each, cols_panel_stride apart) at
// cols + s * cols_sample_stride; the weight/dW tile origin (row-major,
// leading dimension ld, kernels kernel_stride apart). `columns` of the
// tile's vecs x lanes are valid; the rest are padding, neither read from W
// nor written to dW. The pixels come as `pixel_rows` runs of `pixels`: a
// pixel advances the cols^T pointers by cols_step floats and the dy
// pointer by one, a run ends with a jump of cols_row_skip and dy_row_skip
// more (the direct weight gradient's rectangle of the pixels whose tap
// reads inside the image; one run with cols_step = lanes for the unfolded
// panels).
struct WeightGradCall {
  int64_t pixels;
  const float* dy;
  int64_t dy_row_stride, dy_sample_stride;
  const float* cols;
  int64_t cols_panel_stride, cols_sample_stride;
  int64_t columns;
  const float* w;  // null: no dattn
  float* dw;       // null: no dW
  int64_t ld, kernel_stride;
  bool store;      // the first contribution to dW: written, not added
  int64_t pixel_rows = 1;
  int64_t cols_step = 0;  // 0: lanes (the unfolded panels)
  int64_t cols_row_skip = 0, dy_row_skip = 0;
};

// Samples whose G tiles are folded together: each call's tiles wait in an
// L1 buffer (6 KB at 8 x 6 x 32) until the fold, so every W_k and dW_k vector
// it moves through L2 serves all of them. Folding two samples at a time (as
// they left the registers) was ~18 of 49 ms of the weight side at 512@7.
constexpr int64_t kFoldSamples = 8;
// Floats of one sample's G tile in that buffer: kMaxGradRows x 2 vectors.
constexpr int64_t kFoldTileFloats = kMaxGradRows * 2 * 16;

// G_s (R x CP*W) = sample (first + s)'s R dy rows @ cols^T panels, for
// s < NS, accumulated in registers over the pixels and stored to
// g + s * kFoldTileFloats as R x CP vectors. GCC vector types: the body
// compiles to the ISA of the function it is inlined into.
template <int W, int R, int CP, int NS>
CHANFLEX_INLINE void weight_grad_accumulate_body(const WeightGradCall& c, int64_t first, float* g) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  V acc[NS][R][CP];
#pragma GCC unroll 2
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) acc[s][r][v] = V{};
  // One pointer per panel, advanced by a step (see micro_kernel_avx512).
  const float* cp[NS][CP];
  const float* dp[NS];
#pragma GCC unroll 2
  for (int s = 0; s < NS; ++s) {
    dp[s] = c.dy + (first + s) * c.dy_sample_stride;
#pragma GCC unroll 2
    for (int v = 0; v < CP; ++v)
      cp[s][v] = c.cols + (first + s) * c.cols_sample_stride + v * c.cols_panel_stride;
  }
  const int64_t cols_step = c.cols_step == 0 ? W : c.cols_step;
  for (int64_t run = 0; run < c.pixel_rows; ++run) {
    for (int64_t q = 0; q < c.pixels; ++q) {
#pragma GCC unroll 2
      for (int s = 0; s < NS; ++s) {
        V x[CP];
#pragma GCC unroll 2
        for (int v = 0; v < CP; ++v) {
          __builtin_memcpy(&x[v], cp[s][v], sizeof(V));
          cp[s][v] += cols_step;
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
          const float d = dp[s][r * c.dy_row_stride];
#pragma GCC unroll 2
          for (int v = 0; v < CP; ++v) acc[s][r][v] += d * x[v];
        }
        dp[s] += 1;
      }
    }
#pragma GCC unroll 2
    for (int s = 0; s < NS; ++s) {
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) cp[s][v] += c.cols_row_skip;
      dp[s] += c.dy_row_skip;
    }
  }
#pragma GCC unroll 2
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) __builtin_memcpy(g + s * kFoldTileFloats + (r * CP + v) * W, &acc[s][r][v], sizeof(V));
}

// For every kernel k: dw_k (= or +=) sum_s attn[s,k] G_s and dattn[s,k] +=
// <G_s, w_k> lane-wise (lanes[s][k][W], summed by the caller), for the NF
// samples' G tiles in g (`rows` x CP*W each, see weight_grad_accumulate_body)
// and attn from sample 0's row (samples num_kernels apart). Kernels outside,
// tile vectors inside: each sample's dattn chain stays in a register.
template <int W, int CP, int NF>
CHANFLEX_INLINE void weight_grad_fold_body(const WeightGradCall& c, int64_t rows, const float* g,
                                           const float* attn, int64_t num_kernels, float* lanes) {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  const bool full = c.columns == CP * W;
  for (int64_t k = 0; k < num_kernels; ++k) {
    float a[NF];
#pragma GCC unroll 8
    for (int s = 0; s < NF; ++s) a[s] = attn[s * num_kernels + k];
    float* dwk = c.dw != nullptr ? c.dw + k * c.kernel_stride : nullptr;
    const float* wk = c.w != nullptr ? c.w + k * c.kernel_stride : nullptr;
    if (!full) {
      // A partial tile (the last column panel): columns past c.columns are
      // padding, neither read from W nor written to dW.
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < c.columns; ++j) {
          const int64_t at = r * c.ld + j;
          float d = (dwk == nullptr || c.store) ? 0.f : dwk[at];
          for (int s = 0; s < NF; ++s) {
            const float gs = g[s * kFoldTileFloats + r * CP * W + j];
            d += a[s] * gs;
            if (wk != nullptr) lanes[(s * num_kernels + k) * W] += gs * wk[at];
          }
          if (dwk != nullptr) dwk[at] = d;
        }
      }
      continue;
    }
    V dot[NF];
#pragma GCC unroll 8
    for (int s = 0; s < NF; ++s) dot[s] = V{};
    for (int64_t r = 0; r < rows; ++r) {
#pragma GCC unroll 2
      for (int v = 0; v < CP; ++v) {
        const int64_t at = r * c.ld + v * W;
        const float* gv = g + (r * CP + v) * W;
        V gs[NF];
#pragma GCC unroll 8
        for (int s = 0; s < NF; ++s) __builtin_memcpy(&gs[s], gv + s * kFoldTileFloats, sizeof(V));
        // W before the dW store: W_k and dW_k share their offsets modulo
        // 4 KiB, so a W load after the store waited on it (4K aliasing).
        V wv = V{};
        if (wk != nullptr) __builtin_memcpy(&wv, wk + at, sizeof(V));
        if (dwk != nullptr) {
          V d = V{};
          if (!c.store) __builtin_memcpy(&d, dwk + at, sizeof(V));
#pragma GCC unroll 8
          for (int s = 0; s < NF; ++s) d += a[s] * gs[s];
          __builtin_memcpy(dwk + at, &d, sizeof(V));
        }
        if (wk != nullptr) {
#pragma GCC unroll 8
          for (int s = 0; s < NF; ++s) dot[s] += gs[s] * wv;
        }
      }
    }
    if (wk != nullptr) {
#pragma GCC unroll 8
      for (int s = 0; s < NF; ++s) {
        float* out = lanes + (s * num_kernels + k) * W;
        V sum;
        __builtin_memcpy(&sum, out, sizeof(V));
        sum += dot[s];
        __builtin_memcpy(out, &sum, sizeof(V));
      }
    }
  }
}

template <int R, int NS>
__attribute__((target("avx2,fma")))
void weight_grad_accumulate_avx2(const WeightGradCall& c, int64_t first, float* g) {
  weight_grad_accumulate_body<8, R, 2, NS>(c, first, g);
}

template <int R, int NS>
__attribute__((target("avx512f,avx2,fma")))
void weight_grad_accumulate_avx512(const WeightGradCall& c, int64_t first, float* g) {
  weight_grad_accumulate_body<16, R, 2, NS>(c, first, g);
}

template <int NF>
__attribute__((target("avx2,fma")))
void weight_grad_fold_avx2(const WeightGradCall& c, int64_t rows, const float* g, const float* attn,
                           int64_t num_kernels, float* lanes) {
  weight_grad_fold_body<8, 2, NF>(c, rows, g, attn, num_kernels, lanes);
}

template <int NF>
__attribute__((target("avx512f,avx2,fma")))
void weight_grad_fold_avx512(const WeightGradCall& c, int64_t rows, const float* g, const float* attn,
                             int64_t num_kernels, float* lanes) {
  weight_grad_fold_body<16, 2, NF>(c, rows, g, attn, num_kernels, lanes);
}

// Requests the W_k and dW_k rows a call's fold will touch, before its
// accumulation: they come from L2 or beyond (each row's run is two lines,
// a page away from the next row's, too short for the hardware prefetchers),
// and the fold stalled on them.
inline void prefetch_fold_rows(const WeightGradCall& c, int64_t rows, int64_t num_kernels) {
  for (int64_t k = 0; k < num_kernels; ++k) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = k * c.kernel_stride + r * c.ld;
      for (int64_t j = 0; j < c.columns; j += 16) {
        if (c.w != nullptr) __builtin_prefetch(c.w + at + j, 0, 3);
        if (c.dw != nullptr) __builtin_prefetch(c.dw + at + j, 1, 3);
      }
    }
  }
}

using WeightGradAccumulate = void (*)(const WeightGradCall&, int64_t, float*);
// [samples - 1][valid rows of the call] (the last row panel may be short).
using WeightGradAccumulates = std::array<std::array<WeightGradAccumulate, kMaxGradRows + 1>, kMaxGradSamples>;
template <size_t... R>
constexpr WeightGradAccumulates avx512_grad_accumulates(std::index_sequence<R...>) {
  return {{{nullptr, weight_grad_accumulate_avx512<static_cast<int>(R) + 1, 1>...},
           {nullptr, weight_grad_accumulate_avx512<static_cast<int>(R) + 1, 2>...}}};
}
template <size_t... R>
constexpr WeightGradAccumulates avx2_grad_accumulates(std::index_sequence<R...>) {
  return {{{nullptr, weight_grad_accumulate_avx2<static_cast<int>(R) + 1, 1>...}, {}}};
}
constexpr WeightGradAccumulates kWeightGradAccumulatesAvx512 =
    avx512_grad_accumulates(std::make_index_sequence<kMaxGradRows>{});
constexpr WeightGradAccumulates kWeightGradAccumulatesAvx2 =
    avx2_grad_accumulates(std::make_index_sequence<kMaxGradRows>{});

WeightGradAccumulate weight_grad_accumulate(PackedIsa isa, int64_t samples, int64_t rows) {
  return (isa == PackedIsa::kAvx512 ? kWeightGradAccumulatesAvx512 : kWeightGradAccumulatesAvx2)[samples - 1][rows];
}

using WeightGradFold = void (*)(const WeightGradCall&, int64_t, const float*, const float*, int64_t, float*);
// Indexed by the number of samples folded together.
template <size_t... NF>
constexpr std::array<WeightGradFold, kFoldSamples + 1> avx512_grad_folds(std::index_sequence<NF...>) {
  return {nullptr, weight_grad_fold_avx512<static_cast<int>(NF) + 1>...};
}
template <size_t... NF>
constexpr std::array<WeightGradFold, kFoldSamples + 1> avx2_grad_folds(std::index_sequence<NF...>) {
  return {nullptr, weight_grad_fold_avx2<static_cast<int>(NF) + 1>...};
}
constexpr std::array<WeightGradFold, kFoldSamples + 1> kWeightGradFoldsAvx512 =
    avx512_grad_folds(std::make_index_sequence<kFoldSamples>{});
constexpr std::array<WeightGradFold, kFoldSamples + 1> kWeightGradFoldsAvx2 =
    avx2_grad_folds(std::make_index_sequence<kFoldSamples>{});

WeightGradFold weight_grad_fold(PackedIsa isa, int64_t samples) {
  return (isa == PackedIsa::kAvx512 ? kWeightGradFoldsAvx512 : kWeightGradFoldsAvx2)[samples];
}

// Channels [c0, c1) of one sample, unfolded as cols^T column panels:
// [group][panel][pixel][lanes unfolded rows].
void unfold_channels_transposed(const float* x, float* out, const Plan& p, const WeightGradBlocks& wb,
                                int64_t c0, int64_t c1, float* rows) {
  const ConvGeometry& g = p.g;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t width = wb.shape.lanes;
  unfold_channel_block(x, p, c0, c1, rows);
  // A full block of one group's channels, starting at a multiple of 8 of its
  // columns: its rows go 8 at a time into 8 adjacent lanes of one panel.
  static_assert(kUnfoldChannelBlock % 8 == 0, "the block's rows must come in whole transposes of 8");
  const int64_t first_col = (c0 % g.group_in_channels) * taps;
  if (c1 - c0 == kUnfoldChannelBlock && first_col % 8 == 0 && width % 8 == 0 &&
      c0 / g.group_in_channels == (c1 - 1) / g.group_in_channels) {
    const int64_t group = c0 / g.group_in_channels;
    for (int64_t r = 0; r < kUnfoldChannelBlock * taps; r += 8) {
      const int64_t col = first_col + r;
      transpose_rows8(rows + r * p.pixels, p.pixels, p.pixels,
                      out + ((group * wb.col_panels + col / width) * p.pixels) * width + col % width, width);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t group = c / g.group_in_channels;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t col = (c % g.group_in_channels) * taps + t;
      float* dst = out + ((group * wb.col_panels + col / width) * p.pixels) * width + col % width;
      const float* src = rows + ((c - c0) * taps + t) * p.pixels;
      for (int64_t q = 0; q < p.pixels; ++q) dst[q * width] = src[q];
    }
  }
}

// Channels [c0, c1) of one group of one sample as the direct weight
// gradient's input panels (see WeightGradBlocks), 8 aligned channels at a
// time through transposes, into a slab of each group's panels [first_panel,
// first_panel + panels).
void pack_input_channels_last(const float* x, float* out, const Plan& p, const WeightGradBlocks& wb, int64_t panels,
                              int64_t first_panel, int64_t c0, int64_t c1) {
  const ConvGeometry& g = p.g;
  const int64_t plane = g.height * g.width, width = wb.shape.lanes;
  for (int64_t c = c0; c < c1;) {
    const int64_t group = c / g.group_in_channels, local = c % g.group_in_channels;
    float* dst = out + (group * panels + local / width - first_panel) * plane * width + local % width;
    if (local % 8 == 0 && local + 8 <= g.group_in_channels && c + 8 <= c1) {
      transpose_rows8(x + c * plane, plane, plane, dst, width);
      c += 8;
      continue;
    }
    for (int64_t q = 0; q < plane; ++q) dst[q * width] = x[c * plane + q];
    ++c;
  }
}

// Zeroes the columns past p.cols in each group's last cols^T panel of one
// sample, so that padding lanes of G are zero (there are none when the
// panel width divides the group's columns).
void zero_padding_columns(float* out, const Plan& p, const WeightGradBlocks& wb) {
  const int64_t width = wb.shape.lanes;
  const int64_t first = p.cols - (wb.col_panels - 1) * width;
  if (first == width) return;
  for (int64_t group = 0; group < p.g.groups; ++group) {
    float* panel = out + ((group * wb.col_panels + wb.col_panels - 1) * p.pixels) * width;
    for (int64_t q = 0; q < p.pixels; ++q)
      for (int64_t j = first; j < width; ++j) panel[q * width + j] = 0.f;
  }
}

// A thread block's K weight and dW tiles, copied out of the row-major
// layout into one contiguous run per call: [call row][call column][k][rows
// x call columns]. perf put half of the in-place fold's time on its W loads
// (from beyond L2; in place, a call's 96 W and dW lines also share 4 sets of
// L1). The copies alone measured no faster (the stall moved into them), but
// they let the next block's W be prefetched during the arithmetic and dW be
// written once, with streaming stores: 512@7 weight side 56 -> 53 ms.
struct GradBlockLayout {
  int64_t row_calls, col_calls;  // calls per block
  int64_t call_cols;             // columns per call (vecs x lanes)
  int64_t num_kernels;
  int64_t floats() const { return row_calls * col_calls * num_kernels * kFoldTileFloats; }
  // Start of kernel k's tile of call (ri, ci); rows call_cols floats apart.
  int64_t tile(int64_t ri, int64_t ci, int64_t k) const {
    return ((ri * col_calls + ci) * num_kernels + k) * kFoldTileFloats;
  }
};

// The weight entries a thread block task owns: rows [r_begin, r_end) and
// columns [c_begin, c_end) of one group (starting at `origin` in a kernel).
// Row blocks fastest: a thread's consecutive blocks share their cols^T panels
// (~1 MiB at 512@7 for the chunk, kept in L2) and stream the small dy
// rows instead.
struct GradTask {
  int64_t group, r_begin, r_end, c_begin, c_end, origin;
};

GradTask grad_task(const Plan& p, const WeightGradBlocks& wb, int64_t task) {
  GradTask t;
  t.group = task / (wb.row_blocks * wb.col_blocks);
  t.r_begin = task % wb.row_blocks * wb.block_rows;
  t.c_begin = (task / wb.row_blocks) % wb.col_blocks * wb.block_cols;
  t.r_end = std::min(p.rows, t.r_begin + wb.block_rows);
  t.c_end = std::min(p.cols, t.c_begin + wb.block_cols);
  t.origin = t.group * p.group_size;
  return t;
}

// Requests lines [first, first + count) of task t's K weight rows (lines of
// 16 floats, kernel-major, then row-major) into L2: a thread fetches the next
// task's W block during this one's arithmetic, not in a stalled copy after it
// (the rows are runs of 12 lines a page apart, which the hardware
// prefetchers do not follow).
void prefetch_grad_block(const float* w, const Plan& p, const GradTask& t, int64_t num_kernels, int64_t first,
                         int64_t count) {
  const int64_t row_lines = (t.c_end - t.c_begin + 15) / 16;
  const int64_t rows = t.r_end - t.r_begin;
  const int64_t last = std::min(num_kernels * rows * row_lines, first + count);
  for (int64_t l = first; l < last; ++l) {
    const int64_t k = l / (rows * row_lines), r = l / row_lines % rows, j = l % row_lines;
    __builtin_prefetch(w + t.origin + k * p.kernel_size + (t.r_begin + r) * p.cols + t.c_begin + j * 16, 0, 2);
  }
}

// Fold groups per chunk from which the block layout pays.
constexpr int64_t kMinBlockFoldGroups = 2;

// Whether the weight side may use the block layout (see weight_grad_packed):
// on AVX-512, or as CHANFLEX_CPU_GRAD_BLOCKS says ("1": wherever a chunk has
// the fold groups, "0": never; tests use it to cover the layout on AVX2).
bool grad_block_layout_enabled(PackedIsa isa) {
  const char* env = std::getenv("CHANFLEX_CPU_GRAD_BLOCKS");
  if (env == nullptr || *env == '\0') return isa == PackedIsa::kAvx512;
  const std::string value(env);
  TORCH_CHECK(value == "0" || value == "1", "CHANFLEX_CPU_GRAD_BLOCKS: expected '0' or '1', got '", value, "'");
  return value == "1";
}

// Runs run(at, in_block, n) for every run of n contiguous block entries:
// `at` into the K row-major kernels (leading dimension ld, kernel_stride
// apart), `in_block` into the block layout, for rows [r_begin, r_end) and
// columns [c_begin, c_end) (rows_per_call rows per call).
template <typename F>
void for_each_grad_block_run(const GradBlockLayout& l, int64_t rows_per_call, int64_t ld, int64_t kernel_stride,
                             int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end, const F& run) {
  for (int64_t k = 0; k < l.num_kernels; ++k) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t ri = (r - r_begin) / rows_per_call, rr = (r - r_begin) % rows_per_call;
      for (int64_t c0 = c_begin; c0 < c_end; c0 += l.call_cols)
        run(k * kernel_stride + r * ld + c0, l.tile(ri, (c0 - c_begin) / l.call_cols, k) + rr * l.call_cols,
            std::min(l.call_cols, c_end - c0));
    }
  }
}

// dst[a * dst_ld + b] = src[b * src_ld + a] for b < rows, a < cols: 8x8
// blocks transposed in registers, the last block of a dimension of 8 or more
// overlapping the one before (rewriting equal values); one by one where a
// dimension is shorter. (Masked gathers took a quarter of the direct weight
// side at 512@5.)
__attribute__((target("avx2,fma")))
void transpose_strided(const float* src, int64_t src_ld, int64_t rows, int64_t cols, float* dst, int64_t dst_ld) {
  if (rows < 8 || cols < 8) {
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t a = 0; a < cols; ++a) dst[a * dst_ld + b] = src[b * src_ld + a];
    return;
  }
  for (int64_t b0 = 0; b0 < rows; b0 += 8) {
    const int64_t b = std::min(b0, rows - 8);
    for (int64_t a0 = 0; a0 < cols; a0 += 8) {
      const int64_t a = std::min(a0, cols - 8);
      __m256 m[8];
      for (int64_t i = 0; i < 8; ++i) m[i] = _mm256_loadu_ps(src + (b + i) * src_ld + a);
      transpose8x8(m);
      for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (a + i) * dst_ld + b, m[i]);
    }
  }
}

// The direct layout's block copies (see TapRectangle): a block row holds
// the task's channels at every tap, channel-major in the row-major kernels
// (column c * taps + t) and tap-major in the block (call (ri, t)'s tile
// row, lane c - first channel; taps num_kernels tiles apart).

// Kernel rows direct_block_in requests ahead of the one it transposes.
constexpr int64_t kDirectRowsAhead = 2;

// Task t's rows of the K row-major kernels (kernel_stride apart, leading
// dimension p.cols) into the block layout.
void direct_block_in(const float* kernels, const Plan& p, const GradTask& t, const GradBlockLayout& l,
                     int64_t rows_per_call, float* block) {
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  const int64_t channels = (t.c_end - t.c_begin) / taps;
  const int64_t rows = t.r_end - t.r_begin;
  for (int64_t k = 0; k < l.num_kernels; ++k)
    for (int64_t r = t.r_begin; r < t.r_end; ++r) {
      const int64_t ri = (r - t.r_begin) / rows_per_call, rr = (r - t.r_begin) % rows_per_call;
      // The row kDirectRowsAhead on: the transposes stalled on each row's
      // loads (a few lines, a page from the last; 512@7 weight side 45.9 ->
      // 43.0 ms, 512@5 27.3 -> 25.5, 256@14 42.8 -> 40.0).
      const int64_t ahead = k * rows + (r - t.r_begin) + kDirectRowsAhead;
      if (ahead < l.num_kernels * rows) {
        const float* next =
            kernels + t.origin + ahead / rows * p.kernel_size + (t.r_begin + ahead % rows) * p.cols + t.c_begin;
        for (int64_t j = 0; j < channels * taps; j += 16) __builtin_prefetch(next + j, 0, 3);
      }
      transpose_strided(kernels + t.origin + k * p.kernel_size + r * p.cols + t.c_begin, taps, channels, taps,
                        block + l.tile(ri, 0, k) + rr * l.call_cols, l.tile(0, 1, 0) - l.tile(0, 0, 0));
    }
}

// The reverse of direct_block_in, each kernel row assembled in `row` (taps x
// call_cols floats) and copied out with copy_streaming where `streaming`.
void direct_block_out(PackedIsa isa, const float* block, const Plan& p, const GradTask& t, const GradBlockLayout& l,
                      int64_t rows_per_call, bool streaming, float* row, float* kernels) {
  const int64_t taps = p.g.kernel_h * p.g.kernel_w;
  const int64_t len = t.c_end - t.c_begin;
  for (int64_t k = 0; k < l.num_kernels; ++k)
    for (int64_t r = t.r_begin; r < t.r_end; ++r) {
      const int64_t ri = (r - t.r_begin) / rows_per_call, rr = (r - t.r_begin) % rows_per_call;
      float* dst = kernels + t.origin + k * p.kernel_size + r * p.cols + t.c_begin;
      transpose_strided(block + l.tile(ri, 0, k) + rr * l.call_cols, l.tile(0, 1, 0) - l.tile(0, 0, 0), taps,
                        len / taps, streaming ? row : dst, taps);
      if (streaming) copy_streaming(dst, row, len, isa);
    }
}

// grad_w (written: the first sample stores, later ones add) and/or
// grad_attn of dynamic_conv2d.
void weight_grad_packed(PackedIsa isa, const Plan& p, const at::Tensor& grad_out, const at::Tensor& x,
                        const float* w, const float* attn, float* grad_w, float* grad_attn) {
  const ConvGeometry& g = p.g;
  const int64_t K = g.num_kernels;
  const bool direct = use_direct_weight_grad(p, isa);
  const WeightGradBlocks wb = make_weight_grad_blocks(p, isa, direct);
  const WeightGradShape& shape = wb.shape;
  const int64_t call_cols = shape.vecs * shape.lanes;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t in_plane = g.height * g.width;
  const int64_t batch = std::max<int64_t>(g.batch, 1);
  // The samples of a chunk, and the column blocks of a slab: a pass packs
  // one slab's cols^T panels for the chunk, then runs the slab's tasks.
  // Unfolded: one slab of every column, chunks in the K kernels' size.
  // Direct: the panels are the input itself, channels-last, and slabs of
  // input channels for the whole batch keep them within the budget (see
  // kDirectGradScratchBytes); chunks of samples only where one column
  // block of the batch does not fit.
  int64_t chunk = chunk_samples(p, g.batch, sizeof(float), kernel_sized_budget(p, sizeof(float)));
  int64_t slab_blocks = wb.col_blocks;
  if (direct) {
    const int64_t budget = chunk_budget_bytes(kDirectGradScratchBytes);
    const int64_t block_bytes = g.groups * shape.vecs * in_plane * shape.lanes * static_cast<int64_t>(sizeof(float));
    slab_blocks = std::min(std::max<int64_t>(budget / (batch * block_bytes), 1), wb.col_blocks);
    const int64_t min_blocks = (kMinSlabTasksPerThread * at::get_num_threads() + g.groups * wb.row_blocks - 1) /
                               (g.groups * wb.row_blocks);
    slab_blocks = std::min(std::max(slab_blocks, min_blocks), wb.col_blocks);
    chunk = budget >= batch * block_bytes
                ? batch
                : std::min(batch, std::max<int64_t>(budget / block_bytes, at::get_num_threads()));
  }
  const int64_t slab_panels = direct ? slab_blocks * shape.vecs : wb.col_panels;  // per group
  const int64_t slab_sample = direct ? g.groups * slab_panels * in_plane * shape.lanes : wb.sample_cols;
  const int64_t rows_floats = direct ? 0 : unfold_block_floats(p);
  const GradBlockLayout layout{kGradBlockRowCalls, direct ? taps : kGradBlockColCalls, call_cols, K};
  const std::vector<TapRectangle> rects = direct ? tap_rectangles(p) : std::vector<TapRectangle>();
  // Per thread: the unfold's rows, then the block's W and dW tiles (direct:
  // and one kernel row of a block, copied out).
  const int64_t worker_floats = std::max(rows_floats, 2 * layout.floats() + (direct ? taps * call_cols : 0));
  const auto buffers =
      pass_scratch<2>({chunk * slab_sample, at::get_num_threads() * worker_floats}, /*fit=*/true);
  float* cols_chunk = buffers[0];
  float* workers = buffers[1];
  std::vector<double> attn_partial(grad_attn != nullptr ? wb.tasks * chunk * K : 0);
  const int64_t channel_blocks = (g.in_channels + kUnfoldChannelBlock - 1) / kUnfoldChannelBlock;
  const bool blocks_enabled = grad_block_layout_enabled(isa);  // read (and checked) whichever path runs
  for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
    const int64_t n = std::min(chunk, g.batch - b0);
    const bool last_chunk = b0 + n == g.batch;
    // Where several fold groups reuse a block's W and dW tiles, they are
    // copied into the block layout (see GradBlockLayout); with one fold group
    // per chunk the copies cost more than they save (256@14, chunks of 5:
    // weight side 37 -> 49 ms). AVX-512 only: on AMD Zen 3 (AVX2, 512 KB of
    // L2, where the chunk's panels for a block do not fit next to its W and
    // dW tiles) folding in place was faster (in-process A/B, weight side,
    // block layout -> in place: 512@5 0.81-1.01x, 512@7 0.84-0.90x, 512@10
    // 0.94x, 256->512@10 0.95x).
    // The direct calls always go through the block layout (it is where
    // their tap-major tiles live).
    const bool use_blocks = direct || (blocks_enabled && n >= kMinBlockFoldGroups * kFoldSamples);
    const float* go = grad_out.const_data_ptr<float>() + b0 * g.out_channels * p.pixels;
    const float* x_chunk = x.const_data_ptr<float>() + b0 * p.plane;
    for (int64_t cb0 = 0; cb0 < wb.col_blocks; cb0 += slab_blocks) {
      const int64_t cb1 = std::min(wb.col_blocks, cb0 + slab_blocks);
      // Per sample: the slab's channel blocks' panels, and (unfolded) the
      // zeros of its last panel's padding columns. Direct: the lanes past a
      // group's last channel are left as they are; they reach only G columns
      // past the call's `columns`, which the fold never reads.
      const int64_t slab_c0 = cb0 * call_cols, slab_c1 = std::min(cb1 * call_cols, g.group_in_channels);
      const int64_t slab_channel_blocks = (slab_c1 - slab_c0 + kUnfoldChannelBlock - 1) / kUnfoldChannelBlock;
      const int64_t parts = direct ? g.groups * slab_channel_blocks : channel_blocks + 1;
      at::parallel_for(0, n * parts, 1, [&](int64_t begin, int64_t end) {
        float* rows = workers + at::get_thread_num() * worker_floats;
        for (int64_t t = begin; t < end; ++t) {
          const int64_t i = t / parts, part = t % parts;
          float* out = cols_chunk + i * slab_sample;
          if (direct) {
            const int64_t c0 = part / slab_channel_blocks * g.group_in_channels + slab_c0 +
                               part % slab_channel_blocks * kUnfoldChannelBlock;
            const int64_t c1 = std::min(c0 + kUnfoldChannelBlock, c0 - c0 % g.group_in_channels + slab_c1);
            pack_input_channels_last(x_chunk + i * p.plane, out, p, wb, slab_panels, cb0 * shape.vecs, c0, c1);
          } else if (part == channel_blocks) {
            zero_padding_columns(out, p, wb);
          } else {
            const int64_t c0 = part * kUnfoldChannelBlock;
            unfold_channels_transposed(x_chunk + i * p.plane, out, p, wb, c0,
                                       std::min(g.in_channels, c0 + kUnfoldChannelBlock), rows);
          }
        }
      });
      // Slab task l: row blocks fastest, then the slab's column blocks, then
      // groups; its global index as grad_task takes it.
      const int64_t slab_width = cb1 - cb0;
      const auto slab_task = [&](int64_t l) {
        const int64_t in_group = l % (wb.row_blocks * slab_width);
        return (l / (wb.row_blocks * slab_width) * wb.col_blocks + cb0 + in_group / wb.row_blocks) * wb.row_blocks +
               in_group % wb.row_blocks;
      };
      at::parallel_for(0, g.groups * wb.row_blocks * slab_width, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> lanes(kFoldSamples * K * shape.lanes);
        alignas(64) float g_tiles[kFoldSamples * kFoldTileFloats];
        float* const w_block = workers + at::get_thread_num() * worker_floats;
        float* const dw_block = w_block + layout.floats();
        for (int64_t l = begin; l < end; ++l) {
          const int64_t task = slab_task(l);
          const GradTask t = grad_task(p, wb, task);
          const int64_t group = t.group;
          const auto block_runs = [&](const auto& run) {
            for_each_grad_block_run(layout, shape.rows, p.cols, p.kernel_size, t.r_begin, t.r_end, t.c_begin, t.c_end,
                                    run);
          };
          if (direct && grad_attn != nullptr) direct_block_in(w, p, t, layout, shape.rows, w_block);
          if (!direct && use_blocks && grad_attn != nullptr)
            block_runs([&](int64_t at, int64_t in_block, int64_t len) {
              std::memcpy(w_block + in_block, w + t.origin + at, len * sizeof(float));
            });
          // A later chunk adds to what the earlier ones left in grad_w.
          if (direct && grad_w != nullptr && b0 > 0)
            direct_block_in(grad_w, p, t, layout, shape.rows, dw_block);
          if (!direct && use_blocks && grad_w != nullptr && b0 > 0)
            block_runs([&](int64_t at, int64_t in_block, int64_t len) {
              std::memcpy(dw_block + in_block, grad_w + t.origin + at, len * sizeof(float));
            });
          // Calls per row of calls: one per tap (direct) or per call_cols columns.
          const int64_t col_calls = direct ? taps : (t.c_end - t.c_begin + call_cols - 1) / call_cols;
          // Direct: the task's channels, and its first input panel in a group's.
          const int64_t channels = direct ? (t.c_end - t.c_begin) / taps : 0;
          const int64_t first_panel = direct ? t.c_begin / taps / shape.lanes - cb0 * shape.vecs : 0;
          // The next task's W lines, spread evenly over this task's calls.
          const bool prefetch_next = use_blocks && grad_attn != nullptr && l + 1 < end;
          const GradTask next = prefetch_next ? grad_task(p, wb, slab_task(l + 1)) : t;
          const int64_t next_lines = K * (next.r_end - next.r_begin) * ((next.c_end - next.c_begin + 15) / 16);
          const int64_t task_calls = (n + kFoldSamples - 1) / kFoldSamples *
                                     ((t.r_end - t.r_begin + shape.rows - 1) / shape.rows) * col_calls;
          const int64_t lines_per_call = (next_lines + task_calls - 1) / task_calls;
          int64_t call_index = 0;
          for (int64_t i = 0, ns; i < n; i += ns) {
            ns = std::min(kFoldSamples, n - i);
            const float* dy_group = go + (i * g.out_channels + group * p.rows) * p.pixels;
            const float* cols_group = cols_chunk + i * slab_sample +
                                      group * slab_panels * (direct ? in_plane : p.pixels) * shape.lanes;
            std::fill(lanes.begin(), lanes.end(), 0.f);
            const WeightGradFold fold = weight_grad_fold(isa, ns);
            for (int64_t r0 = t.r_begin; r0 < t.r_end; r0 += shape.rows) {
              const int64_t rows = std::min(shape.rows, t.r_end - r0);
              const float* dy_rows = dy_group + r0 * p.pixels;
              for (int64_t ci = 0; ci < col_calls; ++ci) {
                const int64_t c0 = t.c_begin + ci * call_cols;
                // The call's W_k and dW_k tiles: in the block, or in place.
                const int64_t at = use_blocks ? layout.tile((r0 - t.r_begin) / shape.rows, ci, 0)
                                              : t.origin + r0 * p.cols + c0;
                const float* w_tiles = use_blocks ? w_block : w;
                float* dw_tiles = use_blocks ? dw_block : grad_w;
                WeightGradCall call{p.pixels,
                                    dy_rows,
                                    p.pixels,
                                    g.out_channels * p.pixels,
                                    cols_group + (c0 / shape.lanes) * p.pixels * shape.lanes,
                                    p.pixels * shape.lanes,
                                    slab_sample,
                                    std::min(call_cols, p.cols - c0),
                                    grad_attn != nullptr ? w_tiles + at : nullptr,
                                    grad_w != nullptr ? dw_tiles + at : nullptr,
                                    use_blocks ? call_cols : p.cols,
                                    use_blocks ? kFoldTileFloats : p.kernel_size,
                                    /*store=*/b0 == 0 && i == 0};
                if (direct) {
                  // Tap ci's rectangle of output pixels, and the input pixels it reads.
                  const TapRectangle& rc = rects[ci];
                  const int64_t width = rc.x1 - rc.x0;
                  call.pixels = width;
                  call.pixel_rows = width > 0 ? rc.y1 - rc.y0 : 0;
                  call.dy = dy_rows + rc.y0 * g.out_w + rc.x0;
                  call.dy_row_skip = g.out_w - width;
                  call.cols = cols_group + (first_panel * in_plane + rc.in_y0 * g.width + rc.in_x0) * shape.lanes;
                  call.cols_panel_stride = in_plane * shape.lanes;
                  call.cols_step = g.stride[1] * shape.lanes;
                  call.cols_row_skip = (g.stride[0] * g.width - width * g.stride[1]) * shape.lanes;
                  call.columns = channels;
                }
                prefetch_fold_rows(call, rows, K);
                if (prefetch_next) prefetch_grad_block(w, p, next, K, call_index++ * lines_per_call, lines_per_call);
                for (int64_t s0 = 0, together; s0 < ns; s0 += together) {
                  together = std::min(shape.samples, ns - s0);
                  weight_grad_accumulate(isa, together, rows)(call, s0, g_tiles + s0 * kFoldTileFloats);
                }
                fold(call, rows, g_tiles, attn + (b0 + i) * K, K, lanes.data());
              }
            }
            // The block's share of dattn[b0 + i + s, k], lanes summed in double.
            for (int64_t sk = 0; sk < ns * K && grad_attn != nullptr; ++sk) {
              double sum = 0;
              for (int64_t l = 0; l < shape.lanes; ++l) sum += lanes[sk * shape.lanes + l];
              attn_partial[(task * chunk + i) * K + sk] = sum;
            }
          }
          if (direct && grad_w != nullptr)
            direct_block_out(isa, dw_block, p, t, layout, shape.rows, last_chunk, dw_block + layout.floats(), grad_w);
          if (!direct && use_blocks && grad_w != nullptr)
            block_runs([&](int64_t at, int64_t in_block, int64_t len) {
              if (last_chunk)
                copy_streaming(grad_w + t.origin + at, dw_block + in_block, len, isa);
              else
                std::memcpy(grad_w + t.origin + at, dw_block + in_block, len * sizeof(float));
            });
        }
        _mm_sfence();
      });
    }
    if (grad_attn != nullptr) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < K; ++k) {
          double s = 0;
          for (int64_t t = 0; t < wb.tasks; ++t) s += attn_partial[(t * chunk + i) * K + k];
          grad_attn[(b0 + i) * K + k] = static_cast<float>(s);
        }
    }
  }
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
    for_each_range(tile_tasks * slices, [&](int64_t begin, int64_t end) {
      // A column tile of a row-major kernel is rows x nc elements with stride
      // cols; the thread copies its K kernel tiles into one contiguous block
      // and accumulates dW there, so the per-sample passes stream contiguous
      // memory instead of touching a page per row.
      const int64_t block = kSampleBlock;
      const bool reads_w = need_x || grad_attn != nullptr;  // else w is not passed
      std::vector<T> w_pack(reads_w ? K * max_tile : 0);
      std::vector<T> dw_pack(grad_w != nullptr ? K * max_tile : 0);
      std::vector<T> w_mixed(need_x ? block * max_tile : 0);
      std::vector<T> g_tile(need_g ? block * max_tile : 0);
      std::vector<T> dcols_tile(fold_in_tile ? tiles.size * p.pixels : 0);
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
  const at::Tensor empty = at::empty({0}, x.options());

  at::Tensor grad_x = need_x ? at::empty(x.sizes(), opts) : empty;
  // grad_w is zeroed by the paths that accumulate into it; the packed weight
  // gradient writes it, which saves a pass over K |W|.
  at::Tensor grad_w = need_w ? empty_weight_grad(weight.sizes(), opts) : empty;
  at::Tensor grad_attn = need_attn ? at::empty(attn.sizes(), opts) : empty;
  at::Tensor grad_bias = empty;

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
  // Large planes: grad_x and the weight side each through the library's
  // convolution backward where it wins (see use_library), the rest below.
  const Plan p = make_plan(g);
  const PackedIsa isa = packed_isa();
  WinogradConv winograd_c = winograd_grad_x_conv(p);
  const bool winograd_x = need_x && plan_winograd(p, dtype, isa, winograd_c);
  const bool stride_one = g.stride[0] == 1 && g.stride[1] == 1;
  const bool library_x = g.batch > 0 && need_x && !winograd_x && stride_one &&
                         use_library(g, library_min_pixels(kLibraryGradXMinPixels, dtype));
  const bool library_g = g.batch > 0 && (need_w || need_attn) && use_library(g, kLibraryWeightGradMinPixels);
  if (library_x || library_g) {
    if (need_w && library_g) grad_w.zero_();
    backward_library(g, grad_out, x, weight, attn_c, stride, padding, dilation, groups, dtype, library_x,
                     library_g && need_w, library_g && need_attn, grad_x, grad_w, grad_attn);
  }
  if (winograd_x) {
    winograd_conv(isa, winograd_c, grad_out.to(dtype).contiguous().const_data_ptr<float>(),
                  weight.to(dtype).contiguous().const_data_ptr<float>(), p.kernel_size,
                  attn_c.const_data_ptr<float>(), g.num_kernels, grad_x.data_ptr<float>());
  }
  const bool kernel_x = g.batch > 0 && need_x && !library_x && !winograd_x;
  const bool kernel_w = g.batch > 0 && need_w && !library_g;
  const bool kernel_attn = g.batch > 0 && need_attn && !library_g;
  if (kernel_x || kernel_w || kernel_attn) {
    const at::Tensor go = grad_out.to(dtype).contiguous();
    const at::Tensor w_c = (kernel_x || kernel_attn) ? weight.to(dtype).contiguous() : at::Tensor();
    const at::Tensor x_c = (kernel_w || kernel_attn) ? x.to(dtype).contiguous() : at::Tensor();
    // Few output pixels: the packed paths (grad_x, and the weight side when
    // it has blocks for every thread); the rest through BLAS.
    const bool packed_x = kernel_x && use_packed(p, dtype, isa);
    const bool packed_g = (kernel_w || kernel_attn) && use_packed_weight_grad(p, dtype, isa);
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
    if (packed_g) {
      weight_grad_packed(isa, p, go, x_c, kernel_attn ? w_c.const_data_ptr<float>() : nullptr,
                         attn_c.const_data_ptr<float>(), kernel_w ? grad_w.data_ptr<float>() : nullptr,
                         kernel_attn ? grad_attn.data_ptr<float>() : nullptr);
    }
    const bool blas_x = kernel_x && !packed_x;
    const bool blas_g = (kernel_w || kernel_attn) && !packed_g;
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
