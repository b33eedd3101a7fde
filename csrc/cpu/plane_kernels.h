// Kernels of 3x3 pad-1 convs on small planes without an unfold: 5x5 and 7x7 (AVX-512 and AVX2), and on AVX-512 14x14 -> 7x7, 28x28 -> 14x14, 56x56 -> 28x28 at stride 2.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "micro_kernels.h"

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// Direct small planes (forward and transposed grad_x, AVX-512): 3x3, pad 1
// convs onto W x W output planes (kPlaneShapes: stride 1 on 5x5 and 7x7,
// stride 2 from 14x14 to 7x7, 28x28 to 14x14 and 56x56 to 28x28).
//
// The padding classes still multiply the corners of the edge rows (177
// products a channel pair at 5x5, where the direct conv does 169) and split
// the plane into calls of 3 to 9 pixels that stream A again each (at 512@5
// the 3- and 5-pixel calls took 10-40% more per product than the 9-pixel
// one). Here one call covers a
// band of whole rows (the whole plane at 5x5; rows 0-2 and 3-6 at 7x7; two
// rows at 14x14, one at 28x28) with one accumulator a pixel (16 rows of A):
// for each tap, one A vector times exactly the pixels whose input is inside
// the image, each input value broadcast from the sample's own plane by the
// FMA itself. No unfolded B is written, and the products are those of the
// direct conv. The stride-2 forwards onto 14x14 and 28x28 (ResNet18's
// layer3 and layer2.down3x3) were the last the unfold (and at 28x28 the
// library's grouped conv) took; Intel Xeon (AVX-512, 2 threads), batch 32,
// K = 4, forward ms, in-process medians, plane kernels off / on: 128->256
// 28->14 16.3-17.1 / 13.2-14.7 (the unfold was 11% of the time), 64->128
// 56->28 17.3-18.2 / 13.8-14.6.
struct PlaneShape {
  int64_t width, stride;  // output width (and height); input planes are stride x width square
};
constexpr PlaneShape kPlaneShapes[] = {{5, 1}, {7, 1}, {7, 2}, {14, 2}, {28, 2}};
constexpr int kPlaneTaps = 9;
constexpr int kMaxPlaneBandPixels = 28;
constexpr size_t kMaxPlaneBands = 28;  // 28x28: a band a row

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
  static_assert(NP <= kMaxPlaneBandPixels, "one register a pixel, beside A and the mixing's");
  __m512 acc[NP];
#pragma GCC unroll 28
  for (int j = 0; j < NP; ++j)
    acc[j] = out.load_partial ? _mm512_load_ps(out.partial + j * out.partial_ld) : _mm512_setzero_ps();
  const float* ap = MIX ? mix->kernels : a;
  float* mp = MIX ? mix->mixed : nullptr;
  float* np = PAIR ? mix->mixed_next : nullptr;
  const int64_t mix_stride = MIX ? mix->kernel_stride : 0;
  const int64_t channels = kc / kPlaneTaps;
  // The input rows the band reads, requested 4 channels ahead: the whole
  // plane up to 14x14 (at most 13 lines), the band's rows on larger ones
  // (a band of 14x14 outputs reads 5 of 28 input rows, of 28x28 3 of 56).
  constexpr bool kWholePlane = IW * IW <= 196;
  constexpr int kFirstRow = kWholePlane ? 0 : (S * ROW0 - 1 < 0 ? 0 : S * ROW0 - 1);
  constexpr int kLastRow = kWholePlane ? IW - 1 : (S * (ROW0 + ROWS - 1) + 1 > IW - 1 ? IW - 1 : S * (ROW0 + ROWS - 1) + 1);
  constexpr int kFirst = kFirstRow * IW, kEnd = (kLastRow + 1) * IW;
  for (int64_t c = 0; c < channels; ++c, b += b_plane) {
    for (int line = kFirst; line < kEnd; line += 16)
      _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane + kEnd - 1), _MM_HINT_T0);
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

// AVX2 (16 registers), stride 1 (5x5 and 7x7 planes): calls of 5 output
// pixels in raster order (NP, from pixel P0; 7x7's last has 4), 16 rows of
// A in two registers a pixel as in micro_kernel_avx2 (10 accumulators), A
// mixed already (AVX2 mixes in a pass of its own, mix_packed_tile). The
// padding classes split a 5x5 plane into calls of 3 to 7 pixels (the edge
// rows' with 6 of the 9 taps, the interior's remainders), each streaming A
// again, and unfold every sample's B first. Calls of 7 pixels (a 7x7 row,
// A's second half from L1 as in micro_kernel_avx2's) or 6 ran at about 60%
// of the 5-pixel calls' FMA rate: 7x7 planes on rows of 7 ran even with the
// classes. AMD Zen 3 (AVX2, 2 threads), batch 32, K = 4, in-process medians,
// classes / plane kernels: 512@5 forward 53.2 / 35.9 ms, fwd+bwd 178.9 /
// 134.2; 512@7 forward 76.2 / 60.1, fwd+bwd 329.8 / 268.7. The stride-2
// planes keep the classes: 14x14 -> 7x7 ran even (39.6 / 39.4 ms), 28x28
// -> 14x14 lost (34.1 / 37.5).
template <int W, int P0, int NP>
__attribute__((target("avx2,fma")))
void plane_kernel_avx2(int64_t kc, const float* a, int64_t /*a_panel_stride*/, const float* b, int64_t b_plane,
                       const MicroOut& out, const MicroMix* /*mix: mixed already*/) {
  static_assert(NP < kMaxCallPixelsAvx2, "two registers a pixel, two for A and one for B");
  __m256 lo[NP], hi[NP];
#pragma GCC unroll 6
  for (int j = 0; j < NP; ++j) {
    lo[j] = out.load_partial ? _mm256_load_ps(out.partial + j * out.partial_ld) : _mm256_setzero_ps();
    hi[j] = out.load_partial ? _mm256_load_ps(out.partial + j * out.partial_ld + 8) : _mm256_setzero_ps();
  }
  // The input rows the call reads, requested 4 channels ahead.
  constexpr int kRow = P0 / W, kLastRow = (P0 + NP - 1) / W;
  constexpr int kFirst = (kRow > 0 ? kRow - 1 : 0) * W, kEnd = (kLastRow + 2 < W ? kLastRow + 2 : W) * W;
  const int64_t channels = kc / kPlaneTaps;
  for (int64_t c = 0; c < channels; ++c, b += b_plane) {
    for (int line = kFirst; line < kEnd; line += 16)
      _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + 4 * b_plane + kEnd - 1), _MM_HINT_T0);
#pragma GCC unroll 9
    for (int t = 0; t < kPlaneTaps; ++t, a += kMR) {
      const int ki = t / 3, kj = t % 3;
      // A call within one row loads no A for the taps that read its padding rows.
      if (kRow == kLastRow && (kRow + ki - 1 < 0 || kRow + ki - 1 >= W)) continue;
      _mm_prefetch(reinterpret_cast<const char*>(a + kPrefetchSteps * kMR), _MM_HINT_T0);
      const __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
#pragma GCC unroll 6
      for (int j = 0; j < NP; ++j) {
        const int ih = (P0 + j) / W + ki - 1, iw = (P0 + j) % W + kj - 1;
        if (ih < 0 || ih >= W || iw < 0 || iw >= W) continue;
        const __m256 bj = _mm256_broadcast_ss(b + ih * W + iw);
        lo[j] = _mm256_fmadd_ps(a0, bj, lo[j]);
        hi[j] = _mm256_fmadd_ps(a1, bj, hi[j]);
      }
    }
  }
  if (out.store_partial) {
#pragma GCC unroll 6
    for (int j = 0; j < NP; ++j) {
      _mm256_store_ps(out.partial + j * out.partial_ld, lo[j]);
      _mm256_store_ps(out.partial + j * out.partial_ld + 8, hi[j]);
    }
    return;
  }
  alignas(32) float tile[NP][kMR];
#pragma GCC unroll 6
  for (int j = 0; j < NP; ++j) {
    _mm256_store_ps(tile[j], lo[j]);
    _mm256_store_ps(tile[j] + 8, hi[j]);
  }
  for (int64_t i = 0; i < out.mr; ++i) {
    float* row = out.c + i * out.ldc;
    for (int j = 0; j < NP; ++j) row[j] = tile[j][i];
  }
}
constexpr int64_t kPlaneCallPixelsAvx2 = 5;

// The bands of output pixels one call covers, in raster order: on AVX-512
// whole rows, at most 28 pixels (the first band takes the mixing calls, so
// it is the smaller); on AVX2 kPlaneCallPixelsAvx2 pixels.
struct PlaneBand {
  int64_t first, pixels;  // in raster order
};
inline std::vector<PlaneBand> plane_bands(int64_t width, PackedIsa isa) {
  std::vector<PlaneBand> bands;
  if (isa != PackedIsa::kAvx512) {
    // AVX2: see plane_kernel_avx2.
    for (int64_t first = 0; first < width * width; first += kPlaneCallPixelsAvx2)
      bands.push_back({first, std::min(kPlaneCallPixelsAvx2, width * width - first)});
    return bands;
  }
  if (width == 5) return {{0, 25}};
  if (width == 7) return {{0, 21}, {21, 28}};
  // 14 and 28 wide: bands of equal rows.
  const int64_t rows = kMaxPlaneBandPixels / width;
  for (int64_t row0 = 0; row0 < width; row0 += rows) bands.push_back({row0 * width, rows * width});
  return bands;
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
using PlaneKernels = std::array<PlaneBandKernels, kMaxPlaneBands>;  // a shape's, band by band
// A W-wide plane in W / ROWS bands of ROWS rows.
template <int W, int S, int ROWS, size_t... LATER>
constexpr PlaneKernels equal_band_kernels(std::index_sequence<LATER...>) {
  return {first_band_kernels<W, S, ROWS>(), later_band_kernels<W, S, static_cast<int>(LATER + 1) * ROWS, ROWS>()...};
}
const PlaneKernels kPlaneKernels[std::size(kPlaneShapes)] = {
    {first_band_kernels<5, 1, 5>()},
    {first_band_kernels<7, 1, 3>(), later_band_kernels<7, 1, 3, 4>()},
    {first_band_kernels<7, 2, 3>(), later_band_kernels<7, 2, 3, 4>()},
    equal_band_kernels<14, 2, 2>(std::make_index_sequence<6>{}),
    equal_band_kernels<28, 2, 1>(std::make_index_sequence<27>{})};

// AVX2's, for its stride-1 shapes (kPlaneShapes[0] and [1]): [shape][call].
template <int W, size_t... CALL>
constexpr std::array<MicroKernel, 10> call_kernels_avx2(std::index_sequence<CALL...>) {
  constexpr int kCall = static_cast<int>(kPlaneCallPixelsAvx2);
  return {plane_kernel_avx2<W, static_cast<int>(CALL) * kCall, std::min(kCall, W * W - static_cast<int>(CALL) * kCall)>...};
}
constexpr std::array<MicroKernel, 10> kPlaneKernelsAvx2[] = {call_kernels_avx2<5>(std::make_index_sequence<5>{}),
                                                             call_kernels_avx2<7>(std::make_index_sequence<10>{})};
static_assert(kPlaneShapes[0].width == 5 && kPlaneShapes[0].stride == 1 && kPlaneShapes[1].width == 7 &&
                  kPlaneShapes[1].stride == 1 && kPlaneShapes[2].stride == 2,
              "AVX2's plane kernels are the stride-1 shapes, listed first");

MicroKernel plane_kernel(PackedIsa isa, int shape, size_t band, int64_t mix_kernels, bool pair, bool unit) {
  if (isa != PackedIsa::kAvx512) {
    TORCH_CHECK(shape < static_cast<int>(std::size(kPlaneKernelsAvx2)) && mix_kernels == 0 && !pair && !unit,
                "plane_kernel: AVX2 has kernels of mixed A on 5x5 and 7x7 planes only, not shape ", shape,
                " mixing ", mix_kernels);
    return kPlaneKernelsAvx2[shape][band];
  }
  const MicroKernel kernel = kPlaneKernels[shape][band][unit][pair][mix_kernels];
  TORCH_CHECK(kernel != nullptr, "plane_kernel: no kernel for shape ", shape, ", band ", band, ", mixing ",
              mix_kernels, pair ? " (pair)" : "");
  return kernel;
}

// The kPlaneShapes index of a forward (or grad_x's transposed forward) of
// geometry g on the plane kernels, -1 where it does not take them: float32,
// 3x3, undilated, pad 1, one of kPlaneShapes; on AVX-512 the K kernels
// mixed in the micro-kernel (K <= kMaxMicroMixKernels), on AVX2 the
// stride-1 shapes (5x5 and 7x7, any K); CHANFLEX_CPU_DIRECT_PLANES=0
// switches them off (tests, A/Bs).
int plane_shape(const ConvGeometry& g, PackedIsa isa, int64_t num_kernels) {
  const char* env = std::getenv("CHANFLEX_CPU_DIRECT_PLANES");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1",
              "CHANFLEX_CPU_DIRECT_PLANES: expected '0' or '1', got '", value, "'");
  if (value == "0" || isa == PackedIsa::kGeneric || num_kernels < 1) return -1;
  // AVX-512's mix in the kernels (up to kMaxMicroMixKernels); AVX2's read
  // A mixed by its own pass, for any K.
  if (isa == PackedIsa::kAvx512 && num_kernels > kMaxMicroMixKernels) return -1;
  if (g.kernel_h != 3 || g.kernel_w != 3 || g.dilation[0] != 1 || g.dilation[1] != 1 || g.padding[0] != 1 ||
      g.padding[1] != 1 || g.stride[0] != g.stride[1])
    return -1;
  for (int shape = 0; shape < static_cast<int>(std::size(kPlaneShapes)); ++shape) {
    const PlaneShape& ps = kPlaneShapes[shape];
    if (isa != PackedIsa::kAvx512 && ps.stride != 1) continue;
    if (g.stride[0] == ps.stride && g.out_h == ps.width && g.out_w == ps.width && g.height == ps.stride * ps.width &&
        g.width == ps.stride * ps.width)
      return shape;
  }
  return -1;
}

}  // namespace
}  // namespace chanflex
