// im2col / col2im of one sample (and the AVX2 gather and scatter-add runs).
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "plan.h"

namespace chanflex {
namespace {

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
  parallel_tasks(n * channels, [&](int64_t begin, int64_t end) {
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

}  // namespace
}  // namespace chanflex
