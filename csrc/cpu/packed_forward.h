// The packed mixed GEMM driver: kernel packing and mixing, packed unfolds, the packed forward and grad_x as the transposed conv's forward.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "plane_kernels.h"

namespace chanflex {
namespace {

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
        // The next 8 rows' runs (this kernel's, else the next kernel's first
        // rows) are requested while these are copied: runs of kc floats
        // rows apart are too short for the hardware prefetchers. AMD Zen 4,
        // in-process A/B, forward with / without: batch 1 512@7 0.97, 512@5
        // 0.93, 256->512 14->7 0.95, 128->256 28->14 0.94; batch 32 512@7
        // 0.96, 512@5 0.98, 256@14 0.98.
        const bool next_here = row0 + 8 < nr;
        const float* next = next_here ? src0 + 8 * cols
                                      : (k + 1 < num_kernels ? w_group + (k + 1) * kernel_stride + r0 * cols + q0 : nullptr);
        const int64_t next_rows = next_here ? std::min<int64_t>(8, nr - row0 - 8) : std::min<int64_t>(8, nr);
        for (int64_t q = 0; q < kc8; q += 8) {
          if (next != nullptr && q % 16 == 0)
            for (int64_t i = 0; i < next_rows; ++i) __builtin_prefetch(next + i * cols + q, 0, 3);
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
  parallel_tasks(s.groups * tiles.count, [&](int64_t begin, int64_t end) {
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
  const std::vector<PlaneBand> bands = plane >= 0 ? plane_bands(plane_width, s.isa) : std::vector<PlaneBand>{};
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
      const bool l2_next_tile = prepacked != nullptr && !split_samples && tile_task + 1 < tile_tasks &&
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
                const int64_t first = bands[band].first;
                MicroOut out{c_tile + panel * kMR * s.pixels + first,
                             s.pixels,
                             std::min(kMR, nr - panel * kMR),
                             partial + first * q.partial_ld + panel * kMR,
                             q.partial_ld,
                             /*load_partial=*/q0 > 0,
                             /*store_partial=*/q0 + kc < s.depth};
                if (pivot) out.scale = &pivoted.scales[i0 + si];
                const bool mixes = fused_mix && band == 0 && !pair_second;
                plane_kernel(s.isa, plane, band, mixes ? K : 0, mixes && pair_first, pivot)(
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

// Output planes below this many pixels take unfold_channels_packed's direct
// 1x1 pack.
constexpr int64_t kDirectPackMaxPixels = 196;

// Unfolds channels [c0, c1) of one sample into packed B panels: their rows
// are unfolded into `rows` (unfold_channel_block), then each
// pixel panel receives the block's rows as one contiguous run (channels of a
// block that share a conv group are adjacent rows). Pixels past the last full
// panel are zero.
void unfold_channels_packed(const float* x, float* packed, const Plan& p, const PackedGemm& s,
                            int64_t c0, int64_t c1, float* rows) {
  const ConvGeometry& g = p.g;
  const int64_t taps = g.kernel_h * g.kernel_w;
  if (taps == 1 && g.padding[0] == 0 && g.padding[1] == 0 && p.pixels < kDirectPackMaxPixels) {
    // A 1x1 conv without padding on a small output plane: each panel entry
    // straight from the input, no rows in between. Intel Xeon (AVX-512, 2
    // threads), batch 32, K = 4, stride 2, forward, in-process medians, over
    // the rows' two passes: 256->512 14->7 0.93-0.95, 512->1024 14->7 0.97;
    // but 128->256 28->14 1.00-1.01 and 64->128 56->28 1.05 (not profiled).
    const int64_t plane = g.height * g.width;
    std::array<int64_t, kDirectPackMaxPixels> at;  // each pixel's input offset; on the stack: called per task
    for (int64_t q = 0; q < p.pixels; ++q) at[q] = q / g.out_w * g.stride[0] * g.width + q % g.out_w * g.stride[1];
    for (int64_t c = c0; c < c1; ++c) {
      const float* xc = x + c * plane;
      for (int64_t lp = 0; lp < s.pixel_panels; ++lp) {
        const int64_t pixel = lp * kNR;
        const int64_t valid = std::min(kNR, p.pixels - pixel);
        float* panel = packed + c / g.group_in_channels * s.group_b + packed_b_offset(s, lp, c % g.group_in_channels);
        for (int64_t j = 0; j < valid; ++j) panel[j] = xc[at[pixel + j]];
        for (int64_t j = valid; j < kNR; ++j) panel[j] = 0.f;
      }
    }
    return;
  }
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
    parallel_tasks(n * channel_blocks, [&](int64_t begin, int64_t end) {
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
          // (taps8), not 16 loads 9 floats apart per step. AMD Zen
          // 4, grad_x, interleaved, ms: 512@5 21.5 -> 20.7 and 25.9 ->
          // 24.8, 512@7 35.7 -> 35.1 and 43.9 -> 42.5 (bitwise equal).
          for (int64_t row_ahead = 1; row_ahead < 9 && row + kFlippedRowsAhead < row_end; ++row_ahead)
            if (row_ahead * kMR < valid * taps)
              __builtin_prefetch(w_rows + (row + kFlippedRowsAhead) * cols + row_ahead * kMR, 0, 3);
          const float* src = w_rows + row * cols;
          for (int64_t half = 0; half < 2; ++half) {
            __m256 steps[9];
            taps8<true>(src + half * 72, valid - half * 8, steps);
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
// AVX2 and AVX-512 where its padding classes skip at least
// kMinTransposedSkip of the products (with CHANFLEX_CPU_SKIP_PADDING=1:
// wherever they apply). AMD Zen 4, K = 4, interleaved, ms, grad_x through
// dcols and fold -> transposed: 512@7 (16% skipped) 43.8 -> 39.0, 512@5
// (21%) 28.5 -> 25.4; but 512@10 (12%) 87.4 -> 88.3 and 256->512@10 46.8 ->
// 62.2 (its transposed conv gathers 9 taps of 512 channels per pixel where
// the old path packs 512). With the AVX2 micro-kernels capped on Zen 4 it
// lost (512@7 47.2 -> 52.3, 512@5 27.7 -> 29.1), but on an AVX2-only AMD
// Zen 3 it wins (fwd+bwd, 10 interleaved rounds, twice: 512@7 210 -> 192
// and 223 -> 201 ms; 512@5 125 -> 118 and 104 -> 106).
constexpr double kMinTransposedSkip = 0.15;
bool use_transposed_grad_x(const Plan& t, at::ScalarType dtype, PackedIsa isa) {
  if (!use_packed(t, dtype, isa)) return false;
  const TapClasses classes = make_tap_classes(t);
  if (!use_tap_classes(classes, isa)) return false;
  const char* env = std::getenv("CHANFLEX_CPU_SKIP_PADDING");
  if (env != nullptr && std::string(env) == "1") return true;
  return 1.0 - classes.kept >= kMinTransposedSkip;
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

}  // namespace
}  // namespace chanflex
