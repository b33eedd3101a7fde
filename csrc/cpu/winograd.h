// Winograd F(2x2, 3x3) forward and grad_x.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "streamed_forward.h"

namespace chanflex {
namespace {

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
      for (int64_t half = 0; half < 2; ++half) taps8<true>(src + half * 72, pn.valid - half * 8, halves[half]);
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
  parallel_tasks(c.groups * tiles.count * max_panels * K, [&](int64_t begin, int64_t end) {
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

// The zero-bordered plane that covers every tile's 4x4 patch of conv `c`,
// split into its even and odd columns for winograd_input_tiles: padded_h
// rows from -pad_h of `cols` floats each (a vector's loads past the last
// tile stay inside), columns [j0, j1) of the padded rows the plane's
// (negative pads crop it), the rest zero.
struct WinogradSplit {
  int64_t tiles_h, padded_h, cols, j0, j1;

  explicit WinogradSplit(const WinogradConv& c)
      : tiles_h(c.tiles / c.tiles_w), padded_h(2 * tiles_h + 2), cols(c.tiles_w + 1 + kMR) {
    const int64_t padded_w = 2 * c.tiles_w + 2;  // columns from -pad_w
    j0 = std::clamp<int64_t>(c.pad_w, 0, padded_w);
    j1 = std::clamp<int64_t>(c.in_w + c.pad_w, j0, padded_w);
  }
  int64_t floats() const { return 2 * padded_h * cols; }  // even columns' rows, then odd columns'
};

// Splits one input plane `src` (in_h x in_w) into `even` and `odd` (see WinogradSplit).
CHANFLEX_INLINE void winograd_split_plane(const WinogradConv& c, const WinogradSplit& sp, const float* src,
                                          float* even, float* odd) {
  for (int64_t r = 0; r < sp.padded_h; ++r) {
    const int64_t h = r - c.pad_h;
    float* e = even + r * sp.cols;
    float* o = odd + r * sp.cols;
    std::fill(e, e + c.tiles_w + 1, 0.f);
    std::fill(o, o + c.tiles_w + 1, 0.f);
    if (h < 0 || h >= c.in_h) continue;
    const float* row = src + h * c.in_w;  // padded column j is row[j - pad_w]
    int64_t j = sp.j0;
    if (j % 2 == 1 && j < sp.j1) o[j++ / 2] = row[sp.j0 - c.pad_w];
    for (; j + 1 < sp.j1; j += 2) {
      e[j / 2] = row[j - c.pad_w];
      o[j / 2] = row[j + 1 - c.pad_w];
    }
    if (j < sp.j1) e[j / 2] = row[j - c.pad_w];
  }
}

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
  const WinogradSplit sp(c);
  const int64_t v_ld = c.tiles + kMR;  // a vector's stores past the last tile stay inside
  const int64_t pos_stride = c.groups * s.group_b;
  const auto tiles_fn = s.isa == PackedIsa::kAvx512 ? winograd_input_tiles_avx512 : winograd_input_tiles_avx2;
  const int64_t block = kWinogradInputBlock;
  const int64_t q_blocks = (c.depth + block - 1) / block;
  // Per thread: the split plane (its zero border written once) and the
  // block's transformed tiles.
  PerThread<std::pair<std::vector<float>, std::vector<float>>> scratch;
  parallel_tasks(n * c.groups * q_blocks, [&](int64_t begin, int64_t end) {
    auto& [split, v] = scratch.get([&] {
      return std::make_pair(std::vector<float>(sp.floats(), 0.f), std::vector<float>(block * kWinogradPositions * v_ld));
    });
    float* const even = split.data();
    float* const odd = even + sp.padded_h * sp.cols;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / (c.groups * q_blocks), group = task / q_blocks % c.groups;
      const int64_t q0 = task % q_blocks * block, q1 = std::min(q0 + block, c.depth);
      for (int64_t q = q0; q < q1; ++q) {
        winograd_split_plane(c, sp, in + (i * channels + group * c.depth + q) * plane, even, odd);
        // Only the pass's positions: AMD Zen 4, 256@14 forward (2 passes),
        // perf: the transform 0.056 -> 0.042 of the micro-kernels' time.
        tiles_fn(even, odd, sp.cols, sp.tiles_h, c.tiles_w, c.first / 4, (c.first + c.positions + 3) / 4,
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
  parallel_tasks(n * channels, [&](int64_t begin, int64_t end) {
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
// range), by default those with 100 to 1764 output pixels (10x10 to 42x42)
// whose pass scratch fits in their activations plus the K kernels' size,
// in 1 or 2 passes. In-process A/B on AMD Zen 5, K =
// 4, ms, direct -> Winograd in one pass: forward 256@14 22.9 -> 14.4,
// 512@10 49.0 -> 32.1, 256@21 51.2 -> 36.4, 128@28 36.0 -> 21.3, 64->128@42
// 28.6 -> 24.1; fwd+bwd 256@21 162 -> 136, 128@21 50.9 -> 43.1, 256@28 321
// -> 240; but forward 512@7 25.9 vs 24.3, 512@5 20.4 vs 22.7, 64@56 21.6 vs
// 21.4 (too few tiles to pay for the transforms, or the library's conv as
// fast). AVX2 (the cap on the same machine): forward 256@21 107.9 -> 60.1,
// 512@10 92.5 -> 54.2, but 128@28 21.5 vs 23.1 and 64->128@42 25.9 vs 30.2
// against the library's conv, which the cap leaves on AVX-512. On an
// AVX2-only CPU (AMD Zen 3), where the library's conv runs AVX2 too,
// Winograd in one pass won there as well (in-process, ms, library ->
// Winograd: forward 128@28 59.5 -> 37.9, 128@42 112.2 -> 88.9, 64->128@42
// 77.6 -> 45.5; fwd+bwd 128@28 172 -> 139, 128@42 374 -> 321), so AVX2
// takes the same range (64@56: forward 58 -> 45 but fwd+bwd 187 -> 191,
// past the range on both ISAs). Memory: the
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
constexpr int64_t kWinogradMaxPixels = 1764;
// Transforming and packing the K kernels is a cost per call that the
// batch's samples must pay back: by default at least 4 samples and this
// many output pixels in the batch. Measured break-even (forward, against
// the direct paths, 2 threads): AVX-512 at 512@10 about 7 samples, 256@14
// and 256@21 3-4, 128@28 and 128@42 4-5; AVX2, whose transforms take
// twice the instructions, 256@14 8, 256@21 4-5, 512@10 12-16. Below them
// Winograd took up to 1.42x the direct forward's time (256->512@10, 2
// samples: 1.75x the static conv against 1.23x).
constexpr int64_t kWinogradMinBatchPixelsAvx512 = 768;
constexpr int64_t kWinogradMinBatchPixelsAvx2 = 1536;
constexpr int64_t kWinogradMinBatch = 4;

// 3x3, stride 1, undilated float32 on a packed ISA.
bool winograd_eligible(const Plan& p, at::ScalarType dtype, PackedIsa isa) {
  const ConvGeometry& g = p.g;
  return dtype == at::kFloat && isa != PackedIsa::kGeneric && g.kernel_h == 3 && g.kernel_w == 3 &&
         g.stride[0] == 1 && g.stride[1] == 1 && g.dilation[0] == 1 && g.dilation[1] == 1 && g.batch > 0;
}

// The default rule for an eligible conv (see plan_winograd), its passes and
// chunks set in `c`.
bool plan_winograd_default(const Plan& p, PackedIsa isa, WinogradConv& c) {
  const ConvGeometry& g = p.g;
  const bool avx512 = isa == PackedIsa::kAvx512;
  const int64_t min_batch_pixels = avx512 ? kWinogradMinBatchPixelsAvx512 : kWinogradMinBatchPixelsAvx2;
  if (p.pixels < kWinogradMinPixels || p.pixels > kWinogradMaxPixels || g.batch < kWinogradMinBatch ||
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

bool plan_winograd(const Plan& p, at::ScalarType dtype, PackedIsa isa, WinogradConv& c) {
  const ConvGeometry& g = p.g;
  const bool eligible = winograd_eligible(p, dtype, isa);
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
  return eligible && plan_winograd_default(p, isa, c);
}

}  // namespace
}  // namespace chanflex
