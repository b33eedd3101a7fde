// Depthwise convs: one input channel per group (C_in == groups), each output
// channel o reading input channel o / m (m = C_out / groups, the channel
// multiplier), as in MobileNet's and DY-CNN's dynamic MobileNets.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header.
//
// The other paths treat each group as a GEMM of one row of taps: hundreds of
// groups of a few hundred products each, where the static depthwise conv is a
// pass over memory. Measured before this path (2-vCPU AMD Zen 3, batch 32,
// K = 4, 3x3 pad 1, fp32, ratio to nn.Conv2d with groups = C): 384@14 forward
// 15.6, fwd+bwd 8.9; 960@7 4.1 and 3.9. Here each task owns whole planes, with
// no unfold and no GEMM; at stride 1 a tap's products over a plane are one
// vector loop over the padded plane (PaddedPlane), else one a row:
//   forward, a task per (sample, output channel): the sample's kh x kw taps
//     mixed from the K kernels (K * taps reads, kept in registers and L1),
//     then for each tap an axpy of the input into the output;
//   grad_x, a task per (sample, input channel): the same products scattered back
//     through the mixed taps of the channel's m output channels;
//   weight side, a task per block of kDepthwiseChannels output channels, over
//     every sample: G_b[o, tap] = <grad_out[b, o], x[b, o / m] shifted by the
//     tap>, folded at once into dW_k[o, tap] += attn[b, k] G_b[o, tap] and
//     into the block's share of dattn[b, k] (sum of G_b[o, tap] W_k[o, tap]);
//     the blocks' shares are then added in block order (deterministic).
// Extra memory: the dattn shares, (C_out / kDepthwiseChannels, B, K) (B |W| /
// (kDepthwiseChannels taps) at most), and taps per thread; no per-sample kernel
// or kernel gradient. CHANFLEX_CPU_DEPTHWISE=0 sends depthwise convs to the
// other paths (tests, A/Bs).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace chanflex {
namespace {

constexpr int64_t kDepthwiseChannels = 4;  // output channels per weight-side task

bool use_depthwise(const ConvGeometry& g) {
  const char* env = std::getenv("CHANFLEX_CPU_DEPTHWISE");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_DEPTHWISE: expected '0' or '1', got '", value, "'");
  return value != "0" && g.group_in_channels == 1 && g.groups > 1;
}

// taps[t] = sum_k attn[b, k] W[k, o, 0, t]: sample b's kernel of output channel o.
template <typename T>
void mix_depthwise_taps(const ConvGeometry& g, const T* w, const T* attn, int64_t b, int64_t o, T* taps) {
  const int64_t n = g.kernel_h * g.kernel_w, k_stride = g.out_channels * n;
  std::fill(taps, taps + n, T(0));
  for (int64_t k = 0; k < g.num_kernels; ++k) {
    const T a = attn[b * g.num_kernels + k];
    const T* wk = w + k * k_stride + o * n;
    for (int64_t t = 0; t < n; ++t) taps[t] += a * wk[t];
  }
}

// The output columns [lo, hi) whose input column ow * stride + offset lies in [0, width).
struct ColumnRange {
  int64_t lo, hi;
};

inline ColumnRange valid_columns(int64_t offset, int64_t stride, int64_t width, int64_t out_w) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t hi = offset >= width ? 0 : std::min(out_w, (width - 1 - offset) / stride + 1);
  return {lo, std::max(lo, hi)};
}

// The taps' column ranges, which every row of a call shares.
inline std::vector<ColumnRange> tap_columns(const ConvGeometry& g) {
  std::vector<ColumnRange> ranges(g.kernel_w);
  for (int64_t j = 0; j < g.kernel_w; ++j) {
    ranges[j] = valid_columns(j * g.dilation[1] - g.padding[1], g.stride[1], g.width, g.out_w);
  }
  return ranges;
}

// Input row of output row oh under kernel row i, or -1 where it lies in the padding.
inline int64_t input_row(const ConvGeometry& g, int64_t oh, int64_t i) {
  const int64_t ih = oh * g.stride[0] - g.padding[0] + i * g.dilation[0];
  return ih >= 0 && ih < g.height ? ih : -1;
}

// Stride 1: a plane laid out with the padding around it (and zeros past its
// end), so that each tap is one offset into the flattened plane and its
// products over the whole plane are one axpy or dot of out_h x padded-width
// elements, where rows of a small plane (7x7: 7 elements) make calls too
// short to pay. The columns past out_w in each row of width wp are scratch.
struct PaddedPlane {
  int64_t wp, size;  // padded row width; elements, with the zeros past the end that the last taps reach

  explicit PaddedPlane(const ConvGeometry& g)
      : wp(g.width + 2 * g.padding[1]),
        size((g.height + 2 * g.padding[0]) * (g.width + 2 * g.padding[1]) + (g.kernel_w - 1) * g.dilation[1]) {}
  int64_t tap_offset(const ConvGeometry& g, int64_t i, int64_t j) const {
    return i * g.dilation[0] * wp + j * g.dilation[1];
  }
  int64_t span(const ConvGeometry& g) const { return g.out_h * wp; }  // elements an output plane covers
};

inline bool unit_stride(const ConvGeometry& g) { return g.stride[0] == 1 && g.stride[1] == 1; }

// All taps of one padded plane in one call (a call a tap cost more than the
// products on 7x7 planes), compiled for AVX2+FMA and the baseline as loops.h's rows:
//   gather:  out[q] += sum_t taps[t] src[q + offsets[t]]
//   scatter: out[q + offsets[t]] += taps[t] src[q], for every t
//   dots:    dots[t] = sum_q a[q] b[q + offsets[t]]
template <typename T>
CHANFLEX_INLINE void taps_gather_body(T* __restrict__ out, const T* __restrict__ src, const int64_t* offsets,
                                      const T* taps, int64_t n_taps, int64_t n) {
  for (int64_t t = 0; t < n_taps; ++t) axpy_row_body(out, src + offsets[t], taps[t], n);
}
template <typename T>
CHANFLEX_INLINE void taps_scatter_body(T* out, const T* __restrict__ src, const int64_t* offsets, const T* taps,
                                       int64_t n_taps, int64_t n) {
  for (int64_t t = 0; t < n_taps; ++t) axpy_row_body(out + offsets[t], src, taps[t], n);
}
template <typename T>
CHANFLEX_INLINE void taps_dots_body(const T* __restrict__ a, const T* __restrict__ b, const int64_t* offsets,
                                    int64_t n_taps, int64_t n, double* dots) {
  for (int64_t t = 0; t < n_taps; ++t) dots[t] = dot_row_body(a, b + offsets[t], n);
}

#define CHANFLEX_TAP_KERNELS(T)                                                                                  \
  CHANFLEX_CLONES void taps_gather(T* __restrict__ out, const T* __restrict__ src, const int64_t* offsets,       \
                                   const T* taps, int64_t n_taps, int64_t n) {                                   \
    taps_gather_body(out, src, offsets, taps, n_taps, n);                                                        \
  }                                                                                                              \
  CHANFLEX_CLONES void taps_scatter(T* out, const T* __restrict__ src, const int64_t* offsets, const T* taps,   \
                                    int64_t n_taps, int64_t n) {                                                 \
    taps_scatter_body(out, src, offsets, taps, n_taps, n);                                                       \
  }                                                                                                              \
  CHANFLEX_CLONES void taps_dots(const T* __restrict__ a, const T* __restrict__ b, const int64_t* offsets,      \
                                 int64_t n_taps, int64_t n, double* dots) {                                      \
    taps_dots_body(a, b, offsets, n_taps, n, dots);                                                              \
  }

CHANFLEX_TAP_KERNELS(float)
CHANFLEX_TAP_KERNELS(double)

// The taps' offsets into a padded plane, in the weight's (i, j) order.
inline std::vector<int64_t> tap_offsets(const ConvGeometry& g, const PaddedPlane& pp) {
  std::vector<int64_t> offsets;
  for (int64_t i = 0; i < g.kernel_h; ++i)
    for (int64_t j = 0; j < g.kernel_w; ++j) offsets.push_back(pp.tap_offset(g, i, j));
  return offsets;
}

// padded <- plane (height x width) inside its padding, zeros elsewhere.
template <typename T>
void pad_plane(const ConvGeometry& g, const PaddedPlane& pp, const T* plane, T* padded) {
  std::fill(padded, padded + pp.size, T(0));
  for (int64_t h = 0; h < g.height; ++h) {
    std::copy(plane + h * g.width, plane + (h + 1) * g.width, padded + (h + g.padding[0]) * pp.wp + g.padding[1]);
  }
}

// rows <- plane (out_h x out_w) in rows of width wp, zeros in the columns past out_w.
template <typename T>
void spread_rows(const ConvGeometry& g, const PaddedPlane& pp, const T* plane, T* rows) {
  std::fill(rows, rows + pp.span(g), T(0));
  for (int64_t h = 0; h < g.out_h; ++h) std::copy(plane + h * g.out_w, plane + (h + 1) * g.out_w, rows + h * pp.wp);
}

template <typename T>
void depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* attn, const T* bias_mixed, T* y) {
  const int64_t m = g.out_channels / g.groups, sw = g.stride[1];
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  const std::vector<ColumnRange> cols = tap_columns(g);
  const PaddedPlane pp(g);
  const std::vector<int64_t> offsets = tap_offsets(g, pp);
  const int64_t n_taps = g.kernel_h * g.kernel_w;
  parallel_tasks(g.batch * g.out_channels, [&](int64_t begin, int64_t end) {
    std::vector<T> taps(g.kernel_h * g.kernel_w);
    std::vector<T> padded(unit_stride(g) ? pp.size : 0), rows(unit_stride(g) ? pp.span(g) : 0);
    int64_t padded_plane = -1;  // the input plane in `padded`: it serves its m output channels
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.out_channels, o = task % g.out_channels;
      mix_depthwise_taps(g, w, attn, b, o, taps.data());
      const int64_t plane = b * g.in_channels + o / m;
      const T* xp = x + plane * in_plane;
      T* yp = y + task * out_plane;
      const T bias = bias_mixed != nullptr ? bias_mixed[task] : T(0);
      if (unit_stride(g)) {
        if (plane != padded_plane) pad_plane(g, pp, xp, padded.data());
        padded_plane = plane;
        std::fill(rows.begin(), rows.end(), bias);
        taps_gather(rows.data(), padded.data(), offsets.data(), taps.data(), n_taps, pp.span(g));
        for (int64_t oh = 0; oh < g.out_h; ++oh)
          std::copy(rows.data() + oh * pp.wp, rows.data() + oh * pp.wp + g.out_w, yp + oh * g.out_w);
        continue;
      }
      std::fill(yp, yp + out_plane, bias);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        T* out = yp + oh * g.out_w;
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          const int64_t ih = input_row(g, oh, i);
          if (ih < 0) continue;
          for (int64_t j = 0; j < g.kernel_w; ++j) {
            const ColumnRange c = cols[j];
            const T a = taps[i * g.kernel_w + j];
            const T* in = xp + ih * g.width + c.lo * sw + (j * g.dilation[1] - g.padding[1]);
            if (sw == 1) {
              axpy_row(out + c.lo, in, a, c.hi - c.lo);
            } else {
              for (int64_t ow = c.lo; ow < c.hi; ++ow) out[ow] += a * in[(ow - c.lo) * sw];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void depthwise_grad_x(const ConvGeometry& g, const T* grad_out, const T* w, const T* attn, T* grad_x) {
  const int64_t m = g.out_channels / g.groups, sw = g.stride[1];
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  const std::vector<ColumnRange> cols = tap_columns(g);
  const PaddedPlane pp(g);
  const std::vector<int64_t> offsets = tap_offsets(g, pp);
  const int64_t n_taps = g.kernel_h * g.kernel_w;
  parallel_tasks(g.batch * g.in_channels, [&](int64_t begin, int64_t end) {
    std::vector<T> taps(g.kernel_h * g.kernel_w);
    std::vector<T> padded(unit_stride(g) ? pp.size : 0), rows(unit_stride(g) ? pp.span(g) : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.in_channels, c_in = task % g.in_channels;
      T* gx = grad_x + task * in_plane;
      if (unit_stride(g)) {
        // The padded plane gathers every tap's products; its interior is grad_x.
        std::fill(padded.begin(), padded.end(), T(0));
        for (int64_t o = c_in * m; o < (c_in + 1) * m; ++o) {
          mix_depthwise_taps(g, w, attn, b, o, taps.data());
          spread_rows(g, pp, grad_out + (b * g.out_channels + o) * out_plane, rows.data());
          taps_scatter(padded.data(), rows.data(), offsets.data(), taps.data(), n_taps, pp.span(g));
        }
        for (int64_t h = 0; h < g.height; ++h) {
          const T* src = padded.data() + (h + g.padding[0]) * pp.wp + g.padding[1];
          std::copy(src, src + g.width, gx + h * g.width);
        }
        continue;
      }
      std::fill(gx, gx + in_plane, T(0));
      for (int64_t o = c_in * m; o < (c_in + 1) * m; ++o) {
        mix_depthwise_taps(g, w, attn, b, o, taps.data());
        const T* gy = grad_out + (b * g.out_channels + o) * out_plane;
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const T* dy = gy + oh * g.out_w;
          for (int64_t i = 0; i < g.kernel_h; ++i) {
            const int64_t ih = input_row(g, oh, i);
            if (ih < 0) continue;
            for (int64_t j = 0; j < g.kernel_w; ++j) {
              const ColumnRange c = cols[j];
              const T a = taps[i * g.kernel_w + j];
              T* dx = gx + ih * g.width + c.lo * sw + (j * g.dilation[1] - g.padding[1]);
              if (sw == 1) {
                axpy_row(dx, dy + c.lo, a, c.hi - c.lo);
              } else {
                for (int64_t ow = c.lo; ow < c.hi; ++ow) dx[(ow - c.lo) * sw] += a * dy[ow];
              }
            }
          }
        }
      }
    }
  });
}

// grad_w (K, C_out, 1, kh, kw) and grad_attn (B, K), each written whole where not null.
template <typename T>
void depthwise_weight_side(const ConvGeometry& g, const T* grad_out, const T* x, const T* w, const T* attn,
                           T* grad_w, T* grad_attn) {
  const int64_t m = g.out_channels / g.groups, sw = g.stride[1], K = g.num_kernels;
  const int64_t n_taps = g.kernel_h * g.kernel_w, k_stride = g.out_channels * n_taps;
  const int64_t in_plane = g.height * g.width, out_plane = g.out_h * g.out_w;
  const std::vector<ColumnRange> cols = tap_columns(g);
  const int64_t blocks = (g.out_channels + kDepthwiseChannels - 1) / kDepthwiseChannels;
  // Each block's share of dattn, added in block order below.
  std::vector<double> attn_shares(grad_attn != nullptr ? blocks * g.batch * K : 0, 0.0);
  const PaddedPlane pp(g);
  const std::vector<int64_t> offsets = tap_offsets(g, pp);
  parallel_tasks(blocks, [&](int64_t begin, int64_t end) {
    std::vector<double> tap_grad(n_taps), dw(kDepthwiseChannels * K * n_taps);
    std::vector<T> padded(unit_stride(g) ? pp.size : 0), rows(unit_stride(g) ? pp.span(g) : 0);
    int64_t padded_plane = -1;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o0 = block * kDepthwiseChannels;
      const int64_t o1 = std::min(g.out_channels, o0 + kDepthwiseChannels);
      std::fill(dw.begin(), dw.end(), 0.0);
      for (int64_t b = 0; b < g.batch; ++b) {
        for (int64_t o = o0; o < o1; ++o) {
          // G_b[o, :], one tap at a time over the rows.
          std::fill(tap_grad.begin(), tap_grad.end(), 0.0);
          const int64_t plane = b * g.in_channels + o / m;
          const T* xp = x + plane * in_plane;
          const T* gy = grad_out + (b * g.out_channels + o) * out_plane;
          if (unit_stride(g)) {
            // Zeros in the rows' scratch columns keep them out of the dots.
            if (plane != padded_plane) pad_plane(g, pp, xp, padded.data());
            padded_plane = plane;
            spread_rows(g, pp, gy, rows.data());
            taps_dots(rows.data(), padded.data(), offsets.data(), n_taps, pp.span(g), tap_grad.data());
          } else {
            for (int64_t oh = 0; oh < g.out_h; ++oh) {
              const T* dy = gy + oh * g.out_w;
              for (int64_t i = 0; i < g.kernel_h; ++i) {
                const int64_t ih = input_row(g, oh, i);
                if (ih < 0) continue;
                for (int64_t j = 0; j < g.kernel_w; ++j) {
                  const ColumnRange c = cols[j];
                  const T* in = xp + ih * g.width + c.lo * sw + (j * g.dilation[1] - g.padding[1]);
                  double s = 0;
                  if (sw == 1) {
                    s = dot_row(dy + c.lo, in, c.hi - c.lo);
                  } else {
                    for (int64_t ow = c.lo; ow < c.hi; ++ow) s += static_cast<double>(dy[ow]) * in[(ow - c.lo) * sw];
                  }
                  tap_grad[i * g.kernel_w + j] += s;
                }
              }
            }
          }
          for (int64_t k = 0; k < K; ++k) {
            const double a = attn[b * K + k];
            const T* wk = w != nullptr ? w + k * k_stride + o * n_taps : nullptr;
            double* dwk = dw.data() + ((o - o0) * K + k) * n_taps;
            double dot = 0;
            for (int64_t t = 0; t < n_taps; ++t) {
              dwk[t] += a * tap_grad[t];
              if (wk != nullptr) dot += tap_grad[t] * wk[t];
            }
            if (grad_attn != nullptr) attn_shares[(block * g.batch + b) * K + k] += dot;
          }
        }
      }
      if (grad_w != nullptr) {
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t k = 0; k < K; ++k)
            for (int64_t t = 0; t < n_taps; ++t)
              grad_w[k * k_stride + o * n_taps + t] = static_cast<T>(dw[((o - o0) * K + k) * n_taps + t]);
      }
    }
  });
  if (grad_attn != nullptr) {
    for (int64_t e = 0; e < g.batch * K; ++e) {
      double s = 0;
      for (int64_t block = 0; block < blocks; ++block) s += attn_shares[block * g.batch * K + e];
      grad_attn[e] = static_cast<T>(s);
    }
  }
}

}  // namespace
}  // namespace chanflex
