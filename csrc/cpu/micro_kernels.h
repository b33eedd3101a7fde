// Padding-tap classes and the packed micro-kernels (AVX2, AVX-512).
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "packed_gemm.h"

namespace chanflex {
namespace {

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

// The taps of 8 adjacent 9-tap runs (run i at src + 9 i; runs from `valid`
// on read as zeros): taps[t] lane i = src[9 i + t], or src[9 i + 8 - t]
// when FLIPPED. The first 8 taps through one 8x8 register transpose, the
// 9th element by element (grad_x's A: W's 9-tap runs of 16 input channels
// are adjacent; so are the weight side's).
template <bool FLIPPED>
__attribute__((target("avx2,fma")))
inline void taps8(const float* src, int64_t valid, __m256 taps[9]) {
  __m256 m[8];
  alignas(32) float last[8];
  for (int64_t i = 0; i < 8; ++i) {
    m[i] = i < valid ? _mm256_loadu_ps(src + i * 9) : _mm256_setzero_ps();
    last[i] = i < valid ? src[i * 9 + 8] : 0.f;
  }
  transpose8x8(m);
  for (int t = 0; t < 8; ++t) taps[FLIPPED ? 8 - t : t] = m[t];
  taps[FLIPPED ? 0 : 8] = _mm256_load_ps(last);
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

}  // namespace
}  // namespace chanflex
