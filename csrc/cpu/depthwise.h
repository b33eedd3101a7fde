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
// no unfold and no GEMM, and a tap's products over a plane are one vector loop
// over the input plane laid out inside its padding and split by the stride
// into phases (PhasePlanes), all taps of a plane in one call:
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
// (kDepthwiseChannels taps) at most), and one plane's phases and output rows
// per thread; no per-sample kernel or kernel gradient. CHANFLEX_CPU_DEPTHWISE=0 sends depthwise convs to the
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

// The input plane inside its padding, split into stride_h x stride_w phase
// planes (phase (r, c) holds the padded rows r, r + stride_h, ... and columns
// c, c + stride_w, ...), each with rows of wq elements and zeros past its end
// that the last taps reach. Output pixel (oh, ow) under tap (i, j) reads
// padded (oh s_h + i d_h, ow s_w + j d_w), which is phase ((i d_h) % s_h,
// (j d_w) % s_w) at (oh + (i d_h) / s_h, ow + (j d_w) / s_w): one offset per
// tap into the flattened phases, the same for every output pixel. So with
// the output in rows of wq elements (columns past out_w are scratch), a
// tap's products over the plane are one loop of out_h x wq elements, where
// rows (7 elements on a 7x7 plane, strided at stride 2) made calls too short
// and loops that do not vectorise. Stride 1 has one phase: the padded plane.
struct PhasePlanes {
  int64_t wq;          // row width of a phase plane and of the output rows
  int64_t phase_size;  // elements of one phase plane, with the zeros past its end
  int64_t size;        // all phases
  int64_t span;        // elements of the output rows: out_h x wq

  explicit PhasePlanes(const ConvGeometry& g) {
    const int64_t sh = g.stride[0], sw = g.stride[1];
    const int64_t hq = (g.height + 2 * g.padding[0] + sh - 1) / sh;
    wq = (g.width + 2 * g.padding[1] + sw - 1) / sw;
    phase_size = hq * wq + (g.kernel_w - 1) * g.dilation[1] / sw;
    size = sh * sw * phase_size;
    span = g.out_h * wq;
  }
  int64_t tap_offset(const ConvGeometry& g, int64_t i, int64_t j) const {
    const int64_t di = i * g.dilation[0], dj = j * g.dilation[1];
    const int64_t phase = (di % g.stride[0]) * g.stride[1] + dj % g.stride[1];
    return phase * phase_size + (di / g.stride[0]) * wq + dj / g.stride[1];
  }
  // Calls f(w0, dst) for each phase column c of input row h: the row's pixels
  // w0, w0 + stride_w, ... lie at dst[0], dst[1], ... of that phase's row.
  template <typename T, typename F>
  void for_each_phase_column(const ConvGeometry& g, int64_t h, T* phases, const F& f) const {
    const int64_t sh = g.stride[0], sw = g.stride[1];
    const int64_t ph = h + g.padding[0];
    T* row = phases + (ph % sh) * sw * phase_size + (ph / sh) * wq;
    for (int64_t c = 0; c < sw; ++c) {
      const int64_t w0 = ((c - g.padding[1]) % sw + sw) % sw;  // first column with (w0 + pad_w) % sw == c
      if (w0 < g.width) f(w0, row + c * phase_size + (w0 + g.padding[1]) / sw);
    }
  }
};

// phases <- plane (height x width), zeros elsewhere.
template <typename T>
void to_phases(const ConvGeometry& g, const PhasePlanes& pp, const T* plane, T* phases) {
  std::fill(phases, phases + pp.size, T(0));
  const int64_t sw = g.stride[1];
  for (int64_t h = 0; h < g.height; ++h) {
    const T* row = plane + h * g.width;
    pp.for_each_phase_column(g, h, phases, [&](int64_t w0, T* dst) {
      for (int64_t w = w0, q = 0; w < g.width; w += sw, ++q) dst[q] = row[w];
    });
  }
}

// plane (height x width) <- the phases' pixels of the input plane.
template <typename T>
void from_phases(const ConvGeometry& g, const PhasePlanes& pp, T* phases, T* plane) {
  const int64_t sw = g.stride[1];
  for (int64_t h = 0; h < g.height; ++h) {
    T* row = plane + h * g.width;
    pp.for_each_phase_column(g, h, phases, [&](int64_t w0, T* src) {
      for (int64_t w = w0, q = 0; w < g.width; w += sw, ++q) row[w] = src[q];
    });
  }
}

// rows <- plane (out_h x out_w) in rows of wq elements, zeros in the columns past out_w.
template <typename T>
void to_rows(const ConvGeometry& g, const PhasePlanes& pp, const T* plane, T* rows) {
  std::fill(rows, rows + pp.span, T(0));
  for (int64_t h = 0; h < g.out_h; ++h) std::copy(plane + h * g.out_w, plane + (h + 1) * g.out_w, rows + h * pp.wq);
}

// plane (out_h x out_w) <- the first out_w columns of each row.
template <typename T>
void from_rows(const ConvGeometry& g, const PhasePlanes& pp, const T* rows, T* plane) {
  for (int64_t h = 0; h < g.out_h; ++h) std::copy(rows + h * pp.wq, rows + h * pp.wq + g.out_w, plane + h * g.out_w);
}

// All taps of one plane in one call (a call a tap cost more than the products
// on 7x7 planes), compiled for AVX2+FMA and the baseline as loops.h's rows:
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

// What the three passes share: the channel multiplier, the plane sizes, the
// phase layout and each tap's offset into it, in the weight's (i, j) order.
struct DepthwisePlan {
  int64_t m, in_plane, out_plane, n_taps;
  PhasePlanes pp;
  std::vector<int64_t> offsets;

  explicit DepthwisePlan(const ConvGeometry& g)
      : m(g.out_channels / g.groups), in_plane(g.height * g.width), out_plane(g.out_h * g.out_w),
        n_taps(g.kernel_h * g.kernel_w), pp(g) {
    for (int64_t i = 0; i < g.kernel_h; ++i)
      for (int64_t j = 0; j < g.kernel_w; ++j) offsets.push_back(pp.tap_offset(g, i, j));
  }
};

template <typename T>
void depthwise_forward(const ConvGeometry& g, const T* x, const T* w, const T* attn, const T* bias_mixed, T* y) {
  const DepthwisePlan d(g);
  parallel_tasks(g.batch * g.out_channels, [&](int64_t begin, int64_t end) {
    std::vector<T> taps(d.n_taps), phases(d.pp.size), rows(d.pp.span);
    int64_t phased = -1;  // the input plane in `phases`: it serves its m output channels
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.out_channels, o = task % g.out_channels;
      mix_depthwise_taps(g, w, attn, b, o, taps.data());
      const int64_t plane = b * g.in_channels + o / d.m;
      if (plane != phased) to_phases(g, d.pp, x + plane * d.in_plane, phases.data());
      phased = plane;
      std::fill(rows.begin(), rows.end(), bias_mixed != nullptr ? bias_mixed[task] : T(0));
      taps_gather(rows.data(), phases.data(), d.offsets.data(), taps.data(), d.n_taps, d.pp.span);
      from_rows(g, d.pp, rows.data(), y + task * d.out_plane);
    }
  });
}

template <typename T>
void depthwise_grad_x(const ConvGeometry& g, const T* grad_out, const T* w, const T* attn, T* grad_x) {
  const DepthwisePlan d(g);
  parallel_tasks(g.batch * g.in_channels, [&](int64_t begin, int64_t end) {
    std::vector<T> taps(d.n_taps), phases(d.pp.size), rows(d.pp.span);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.in_channels, c_in = task % g.in_channels;
      // The phases gather every tap's products; the input plane's pixels in them are grad_x.
      std::fill(phases.begin(), phases.end(), T(0));
      for (int64_t o = c_in * d.m; o < (c_in + 1) * d.m; ++o) {
        mix_depthwise_taps(g, w, attn, b, o, taps.data());
        to_rows(g, d.pp, grad_out + (b * g.out_channels + o) * d.out_plane, rows.data());
        taps_scatter(phases.data(), rows.data(), d.offsets.data(), taps.data(), d.n_taps, d.pp.span);
      }
      from_phases(g, d.pp, phases.data(), grad_x + task * d.in_plane);
    }
  });
}

// grad_w (K, C_out, 1, kh, kw) and grad_attn (B, K), each written whole where not null.
template <typename T>
void depthwise_weight_side(const ConvGeometry& g, const T* grad_out, const T* x, const T* w, const T* attn,
                           T* grad_w, T* grad_attn) {
  const DepthwisePlan d(g);
  const int64_t K = g.num_kernels, k_stride = g.out_channels * d.n_taps;
  const int64_t blocks = (g.out_channels + kDepthwiseChannels - 1) / kDepthwiseChannels;
  // Each block's share of dattn, added in block order below.
  std::vector<double> attn_shares(grad_attn != nullptr ? blocks * g.batch * K : 0, 0.0);
  parallel_tasks(blocks, [&](int64_t begin, int64_t end) {
    std::vector<double> tap_grad(d.n_taps), dw(kDepthwiseChannels * K * d.n_taps);
    std::vector<T> phases(d.pp.size), rows(d.pp.span);
    int64_t phased = -1;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o0 = block * kDepthwiseChannels;
      const int64_t o1 = std::min(g.out_channels, o0 + kDepthwiseChannels);
      std::fill(dw.begin(), dw.end(), 0.0);
      for (int64_t b = 0; b < g.batch; ++b) {
        for (int64_t o = o0; o < o1; ++o) {
          // G_b[o, :]; the zeros in the rows' scratch columns keep them out of the dots.
          const int64_t plane = b * g.in_channels + o / d.m;
          if (plane != phased) to_phases(g, d.pp, x + plane * d.in_plane, phases.data());
          phased = plane;
          to_rows(g, d.pp, grad_out + (b * g.out_channels + o) * d.out_plane, rows.data());
          taps_dots(rows.data(), phases.data(), d.offsets.data(), d.n_taps, d.pp.span, tap_grad.data());
          for (int64_t k = 0; k < K; ++k) {
            const double a = attn[b * K + k];
            const T* wk = w != nullptr ? w + k * k_stride + o * d.n_taps : nullptr;
            double* dwk = dw.data() + ((o - o0) * K + k) * d.n_taps;
            double dot = 0;
            for (int64_t t = 0; t < d.n_taps; ++t) {
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
            for (int64_t t = 0; t < d.n_taps; ++t)
              grad_w[k * k_stride + o * d.n_taps + t] = static_cast<T>(dw[((o - o0) * K + k) * d.n_taps + t]);
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
