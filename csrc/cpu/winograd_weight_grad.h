// Winograd F(2x2, 3x3) weight side: dW and dattn.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "weight_grad.h"

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// With Y = A^T [U .* V] A per 2x2 output tile (winograd.h; U = G g G^T the
// transformed kernel, V = B^T d B the tile's input patch), a sample's
// gradient of U is dU_b[pos] = sum_tiles M_b[pos] V_b[pos]^T per transform
// position, with M = A dY A^T the tile's 2x2 output gradient lifted to 4x4
// (zero past the plane), and its kernel gradient is G_b = G^T dU_b G. So
//   dW_k = G^T (sum_b attn[b,k] dU_b) G,  dattn[b,k] = <G_b, W_k> = <dU_b, U_k>,
// and per position dU_b is a GEMM (in x out channels) whose reduction is the
// tiles: 16 positions x 49 tiles a channel pair at 14x14 against the direct
// weight gradient's 9 taps x 196 pixels, 0.44 of its multiply-adds (0.50 at
// 10x10, 0.55 at 21x21). Each GEMM output tile (32 in x 12 out channels, the
// forward's micro-kernel with V's 16-channel panels as A and M's 6-channel
// panels as B) is folded, 4 samples' tiles at once, into the K accumulators
// of dW_k in the transformed domain and into the samples' K dattn dot
// products with U_k. The accumulators are the transformed gradient (16/9 K
// |W|, and U_k as much): a pass over the batch keeps those of some
// positions only and at its end adds their share G^T (.) G to dW. AVX-512,
// one group; off by default (see plan_winograd_weight_grad).

constexpr int64_t kWgCallChannels = 2 * kMR;  // in channels of a call: two 16-channel A panels
constexpr int64_t kWgCallOuts = 2 * kNR;      // out channels of a call: two 6-channel B panels
constexpr int64_t kWgTaskOuts = 2 * kWgCallOuts;

struct WinogradGradPlan {
  WinogradConv c;          // the forward's conv: its tiles and pads
  int64_t num_kernels = 0;
  int64_t c_pad = 0;       // in channels, to a multiple of kWgCallChannels
  int64_t o_pad = 0;       // out channels, to a multiple of kWgCallOuts
  int64_t positions = 0;   // per pass
  int64_t chunk = 0;       // samples per chunk

  int64_t c_panels() const { return c_pad / kMR; }
  int64_t o_panels() const { return o_pad / kNR; }
  int64_t c_tiles() const { return c_pad / kWgCallChannels; }
  int64_t o_tiles() const { return (o_pad + kWgTaskOuts - 1) / kWgTaskOuts; }
  // The pass's K accumulators in blocks, one per (task, position, call): a
  // call's fold reads and writes one block, K x 12 out x 32 in channels,
  // and the calls before it request it into L2 (see winograd_weight_grad).
  int64_t block_floats() const { return num_kernels * kWgCallOuts * kWgCallChannels; }
  int64_t acc_floats() const { return o_tiles() * c_tiles() * positions * (kWgTaskOuts / kWgCallOuts) * block_floats(); }
  // Where accumulator (k, pos, o, c) lies.
  int64_t acc_index(int64_t k, int64_t pos, int64_t o, int64_t c) const {
    const int64_t task = o / kWgTaskOuts * c_tiles() + c / kWgCallChannels;
    const int64_t block = (task * positions + pos) * (kWgTaskOuts / kWgCallOuts) + o % kWgTaskOuts / kWgCallOuts;
    return block * block_floats() + (k * kWgCallOuts + o % kWgCallOuts) * kWgCallChannels + c % kWgCallChannels;
  }
  // A chunk's V panels [pos][c panel][sample][tile][16] and M panels
  // [pos][o panel][sample][m_ld: tile][6].
  int64_t v_floats() const { return chunk * positions * c.tiles * c_pad; }
  // A sample's run in an M panel: its tiles' 6-channel vectors, padded to
  // whole lines (streamed out by winograd_grad_out_block).
  int64_t m_ld() const { return (c.tiles * kNR + kMR - 1) / kMR * kMR; }
  int64_t m_floats() const { return chunk * positions * o_panels() * m_ld(); }
};

WinogradGradPlan winograd_grad_plan(const Plan& p, int64_t passes, int64_t chunk) {
  WinogradGradPlan w;
  w.c = winograd_forward_conv(p);
  w.num_kernels = p.g.num_kernels;
  w.c_pad = (w.c.depth + kWgCallChannels - 1) / kWgCallChannels * kWgCallChannels;
  w.o_pad = (w.c.rows + kWgCallOuts - 1) / kWgCallOuts * kWgCallOuts;
  w.positions = kWinogradPositions / passes;
  w.chunk = std::min(chunk, p.g.batch);
  return w;
}

// Samples per chunk: a task reads its accumulators and U_k once a chunk (from
// L3 or memory), so a few samples, and at least one per thread.
int64_t winograd_grad_chunk() { return std::max<int64_t>(4, at::get_num_threads()); }

// Whether the weight side runs here, and how (in `w`): AVX-512, float32, one
// group, 3x3 stride 1 undilated, where CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD
// says ("1", "2", "4", "8" or "16": every such conv, in that many passes;
// "0": never), by default (unset) in 4 passes on output planes of 196 to
// 441 pixels (14x14 to 21x21) in batches of at least 16 samples. AMD Zen 4,
// 2 threads, batch 32, K = 4, the weight side alone over the direct side's
// (one process, 3-s blocks of paired calls, classed by the CPU round trip
// before each; medians, near / far apart): 256@14 0.919 / 0.925,
// 128->256@21 0.897 / 0.907, 256@21 0.810 / 0.817; but 256->512@10 1.23 /
// 1.16 and 512@10 1.40 / 1.40 (too few tiles a sample for the transforms
// and the accumulators' traffic), and from 28x28 the library takes the
// weight side (use_library). The step's fwd+bwd peak memory stays where it
// was (256@14 31.5 MB against 31.6, 256@21 51.3 against 51.2, 128->256@21
// 34.7 both). Batches below 16 samples are not measured. It was off by
// default until its writes were streamed (below). Before: alone, the
// weight side took 0.80-0.95 of the direct side's time in in-process
// A/Bs (0.77-0.86 at 256@14 since the transforms' tasks go by sample, see
// winograd_grad_transforms), but
// interleaved with it in one process for 6 minutes (256@14, 218 blocks of
// 6 paired calls) it took 1.21-1.45x (fwd+bwd 1.03-1.22x) in 137 blocks
// and 0.84-1.00 (fwd+bwd 0.89-1.04) in spells of 10-90 s, while the direct
// side's own time barely moved (36-47 ms). The slow mode comes with the
// VM's two vCPUs far apart: a cache-line round trip between two threads
// pinned to them (a ping-pong) took 330-600 ns in it against 60-250 ns
// outside it, in 100 blocks of 3 s. Phase timings placed most of the loss
// in writes to lines the other thread had last read (see
// winograd_grad_transforms), now streamed: far apart it takes 0.925 of
// the direct side's time, near 0.919. It still streams the
// accumulators and U_k through the last-level cache once per chunk, about
// 410 MB a call at 256@14 (4 passes, chunks of 4: some 4 multiply-adds a
// byte), where the direct side keeps its blocks in L2. Larger chunks and
// fewer passes stream less (slow mode, 256@14: chunks of 8 in 2 passes a
// median 1.03 of the direct side's time against 1.23, before the streamed
// writes) but take about 24 MB of scratch against 10 (in passes whose
// scratch plus the K-fold gradient fit in the Winograd grad_x pass's
// scratch, 4 at 256@14 and 21x21 in chunks of 4, the step's peak stays
// where it is). Also ruled out: page faults (2474 a step at 256@14 against
// the direct side's 4180), the scratch's tail released with madvise
// instead of the buffer freed, and ASLR (setarch -R).
constexpr int64_t kWinogradWeightGradMinPixels = 196;
constexpr int64_t kWinogradWeightGradMaxPixels = 441;
constexpr int64_t kWinogradWeightGradMinBatch = 16;
constexpr int64_t kWinogradWeightGradPasses = 4;

bool plan_winograd_weight_grad(const Plan& p, at::ScalarType dtype, PackedIsa isa, WinogradGradPlan& w) {
  const ConvGeometry& g = p.g;
  const char* env = std::getenv("CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD");
  const std::string value(env == nullptr ? "" : env);
  TORCH_CHECK(value.empty() || value == "0" || value == "1" || value == "2" || value == "4" || value == "8" ||
                  value == "16",
              "CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD: expected '0', '1', '2', '4', '8' or '16', got '", value, "'");
  const bool eligible = winograd_eligible(p, dtype, isa) && isa == PackedIsa::kAvx512 && g.groups == 1;
  if (!eligible || value == "0") return false;
  if (value.empty() && (p.pixels < kWinogradWeightGradMinPixels || p.pixels > kWinogradWeightGradMaxPixels ||
                        g.batch < kWinogradWeightGradMinBatch)) {
    return false;
  }
  w = winograd_grad_plan(p, value.empty() ? kWinogradWeightGradPasses : std::stoi(value), winograd_grad_chunk());
  return true;
}

// M = A dY A^T of every tile of samples [0, n) (dy: n x out channels planes
// of out_h x out_w) into the chunk's M panels, for the pass's positions
// [first, first + positions). Per (sample, block of kWgOutBlock out
// channels), one row of tiles at a time: the block's two pixel rows are
// transposed to pixel-major (`pixels`, 2 x out_w x kWgOutBlock floats), so
// that a tile's 4 pixels are 4 vectors over 12 out channels (two 6-channel
// panels), each position's vector then stored as two 6-float runs into
// `local` (the block's panels, m_ld floats each), streamed out at the end
// (see winograd_grad_transforms). Out
// channels past the last are zero. A = [1 0; 1 1; 1 -1; 0 -1]. A row of
// tiles at a time rather than the whole plane (37 KiB at 14x14, past L1),
// the weight side alone over the direct side's, interleaved in one
// process (medians of 3-s blocks): 256@14 1.25 -> 1.18 in the slow mode
// (above; 65 blocks), 0.89 -> 0.92 in the fast one (14); 512@10 1.52 ->
// 1.42 (slow); 256@21 within 2%.
constexpr int64_t kWgOutBlock = 4 * kWgCallOuts;

int64_t winograd_grad_pixels_floats(const WinogradConv& c) { return 2 * c.out_w * kWgOutBlock; }

__attribute__((target("avx512f,avx2,fma")))
void winograd_grad_out_block(const WinogradGradPlan& w, const float* dy, int64_t i, int64_t block, int64_t first,
                             float* pixels, float* local, float* m) {
  const WinogradConv& c = w.c;
  const int64_t plane = c.out_h * c.out_w;
  const int64_t o0 = block * kWgOutBlock, outs = std::min(kWgOutBlock, c.rows - o0);
  const int64_t panels = w.o_panels();
  const int64_t panel0 = o0 / kNR, m_ld = w.m_ld();
  constexpr int64_t kLocalPanels = kWgOutBlock / kNR;
  const __m512i upper6 = _mm512_setr_epi32(6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5);
  auto store6 = [](float* dst, __m256 lanes) __attribute__((target("avx512f,avx2,fma"))) {
    _mm_storeu_ps(dst, _mm256_castps256_ps128(lanes));
    _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4), _mm256_extractf128_ps(lanes, 1));
  };
  for (int64_t t0 = 0; t0 < c.tiles; t0 += c.tiles_w) {
    const int64_t y = t0 / c.tiles_w * 2, rows = std::min<int64_t>(2, c.out_h - y);
    transpose_strided(dy + (i * c.rows + o0) * plane + y * c.out_w, plane, outs, rows * c.out_w, pixels, kWgOutBlock);
    for (int64_t part = 0; part * kWgCallOuts < std::min(kWgOutBlock, w.o_pad - o0); ++part) {
      const int64_t valid = std::clamp<int64_t>(outs - part * kWgCallOuts, 0, kWgCallOuts);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      const int64_t panel = (o0 + part * kWgCallOuts) / kNR;
      for (int64_t t = t0; t < t0 + c.tiles_w; ++t) {
        const int64_t x = (t - t0) * 2;
        __m512 px[4];  // the tile's pixels (0, 0), (0, 1), (1, 0), (1, 1); zero past the plane
        for (int64_t e = 0; e < 4; ++e) {
          const int64_t row = e / 2, col = x + e % 2;
          px[e] = row < rows && col < c.out_w
                      ? _mm512_maskz_loadu_ps(mask, pixels + (row * c.out_w + col) * kWgOutBlock + part * kWgCallOuts)
                      : _mm512_setzero_ps();
        }
        const __m512 p = px[0], q = px[1], r = px[2], z = px[3];
        const __m512 tile_rows[4][2] = {{p, q},
                                        {_mm512_add_ps(p, r), _mm512_add_ps(q, z)},
                                        {_mm512_sub_ps(p, r), _mm512_sub_ps(q, z)},
                                        {_mm512_sub_ps(_mm512_setzero_ps(), r), _mm512_sub_ps(_mm512_setzero_ps(), z)}};
        for (int64_t pos = 0; pos < w.positions; ++pos) {
          const int64_t a = (first + pos) / 4, b = (first + pos) % 4;
          const __m512 u = tile_rows[a][0], v = tile_rows[a][1];
          const __m512 value = b == 0 ? u : b == 1 ? _mm512_add_ps(u, v) : b == 2 ? _mm512_sub_ps(u, v)
                                                                                 : _mm512_sub_ps(_mm512_setzero_ps(), v);
          // Channels 0-5 to this panel, 6-11 to the next, from registers
          // (masked stores, or a store and reloads of its parts, took most of
          // the transform's time on AMD Zen 4).
          float* dst = local + (pos * kLocalPanels + panel - panel0) * m_ld + t * kNR;
          store6(dst, _mm512_castps512_ps256(value));
          store6(dst + m_ld, _mm512_castps512_ps256(_mm512_permutexvar_ps(upper6, value)));
        }
      }
    }
  }
  const int64_t block_panels = std::min(kLocalPanels, panels - panel0);
  for (int64_t pos = 0; pos < w.positions; ++pos)
    for (int64_t lp = 0; lp < block_panels; ++lp)
      copy_streaming(m + ((pos * panels + panel0 + lp) * w.chunk + i) * m_ld, local + (pos * kLocalPanels + lp) * m_ld,
                     m_ld, PackedIsa::kAvx512);
}

// V = B^T d B of every tile of samples [0, n) (x: n x in channels planes)
// into the chunk's V panels, for the pass's positions: per (sample, panel
// of 16 channels) each channel's tiles as the forward's transform computes
// them (winograd_input_tiles, rows of tiles), then per position and tile
// the 16 channels' values by one gather. Channels past the last are zero.
struct WinogradGradInput {
  const WinogradGradPlan& w;
  WinogradSplit sp;
  int64_t v_ld;            // a vector's stores past the last tile stay inside
  int64_t channel_floats;  // one channel's rows of tiles, every position
  explicit WinogradGradInput(const WinogradGradPlan& plan)
      : w(plan), sp(plan.c), v_ld(plan.c.tiles + kMR), channel_floats(kWinogradPositions * v_ld) {}
};

// One (sample, channel panel) of winograd_grad_input_transform; `rows` holds
// 16 channels' rows of tiles, `even` and `odd` one split plane. The rows go
// to the panel's [tile][16 channels] layout through 8x8 register transposes
// (per-tile gathers across the 16 rows took a third more of the weight
// side's time).
void winograd_grad_input_panel(const WinogradGradInput& in, const float* x, int64_t i, int64_t panel, int64_t first,
                               float* rows, float* even, float* odd, float* run, float* v) {
  const WinogradGradPlan& w = in.w;
  const WinogradConv& c = w.c;
  const int64_t plane = c.in_h * c.in_w;
  const int64_t valid = std::clamp<int64_t>(c.depth - panel * kMR, 0, kMR);
  const int64_t a0 = first / 4, a1 = (first + w.positions + 3) / 4;  // rows of B^T d the pass needs
  for (int64_t l = 0; l < kMR; ++l) {
    float* channel = rows + l * in.channel_floats;
    if (l >= valid) {
      std::fill(channel + a0 * 4 * in.v_ld, channel + a1 * 4 * in.v_ld, 0.f);
      continue;
    }
    winograd_split_plane(c, in.sp, x + (i * c.depth + panel * kMR + l) * plane, even, odd);
    winograd_input_tiles_avx512(even, odd, in.sp.cols, in.sp.tiles_h, c.tiles_w, a0, a1, channel, in.v_ld);
  }
  for (int64_t pos = 0; pos < w.positions; ++pos) {
    transpose_strided(rows + (first + pos) * in.v_ld, in.channel_floats, kMR, c.tiles, run, kMR);
    copy_streaming(v + ((pos * w.c_panels() + panel) * w.chunk + i) * c.tiles * kMR, run, c.tiles * kMR,
                   PackedIsa::kAvx512);
  }
}

// A chunk's M and V panels for the pass's positions, in one parallel region
// whose tasks go sample by sample (its blocks of out channels, then its
// panels of in channels), so that each thread's contiguous share holds
// both kinds alike. With every sample's out blocks first (before), one
// thread took all of them: at 256@14 the weight side alone took 0.86-0.95
// of the direct side's time, now 0.77-0.86 (interleaved in one process; in
// the VM's slow mode 1.20-1.34 and 1.14-1.28).
//
// Both kinds are assembled in the thread's buffers and streamed out
// (copy_streaming), as U_k is (winograd_grad_kernel_row): the GEMM's tasks
// split the channels, not the samples, so half of what a thread writes was
// last read by the other thread, and with the VM's vCPUs far apart (see
// plan_winograd_weight_grad) plain stores waited on those lines. There,
// at 256@14, the transforms took 17-21 ms a call against 9-10 near, U_k
// 4-5 against 1.7-2. Streamed, the weight side alone over the direct
// side's (one process, blocks of 3 s of paired calls, one variant a block,
// classed by the round trip before each; medians): far apart 1.181 ->
// 0.925 (19 and 18 blocks), near 0.921 -> 0.919 (41 each). The GEMM then
// reads the panels from memory rather than the last-level cache (+1-2 ms
// in the phase timings), which the totals absorb.
void winograd_grad_transforms(const WinogradGradPlan& w, const float* dy, const float* x, int64_t n, int64_t first,
                              float* m, float* v) {
  const WinogradGradInput in(w);
  const int64_t out_blocks = (w.o_pad + kWgOutBlock - 1) / kWgOutBlock, panels = w.c_panels();
  const int64_t per_sample = out_blocks + panels;
  struct TransformScratch {
    std::vector<float> pixels, local, split, rows, run;  // each task kind's buffers, on its first task
  };
  PerThread<TransformScratch> scratch;
  parallel_tasks(n * per_sample, [&](int64_t begin, int64_t end) {
    TransformScratch& buffers = scratch.get([] { return TransformScratch{}; });
    std::vector<float>& pixels = buffers.pixels;
    std::vector<float>& local = buffers.local;
    std::vector<float>& split = buffers.split;
    std::vector<float>& rows = buffers.rows;
    std::vector<float>& run = buffers.run;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per_sample, j = task % per_sample;
      if (j < out_blocks) {
        if (pixels.empty()) {
          pixels.assign(winograd_grad_pixels_floats(w.c), 0.f);
          local.assign(w.positions * (kWgOutBlock / kNR) * w.m_ld(), 0.f);
        }
        winograd_grad_out_block(w, dy, i, j, first, pixels.data(), local.data(), m);
        continue;
      }
      if (split.empty()) {
        split.assign(in.sp.floats(), 0.f);
        rows.resize(kMR * in.channel_floats);
        run.resize(w.c.tiles * kMR);
      }
      winograd_grad_input_panel(in, x, i, j - out_blocks, first, rows.data(), split.data(),
                                split.data() + in.sp.padded_h * in.sp.cols, run.data(), v);
    }
    _mm_sfence();  // the streamed panels, before the GEMM's threads read them
  });
}

// The pass's U_k = G W_k G^T, [k][pos][o_pad][c_pad] as the accumulators;
// zero past the last in or out channel. One (kernel, out channel) row.
__attribute__((target("avx512f,avx2,fma")))
void winograd_grad_kernel_row(const WinogradGradPlan& w, const float* weight, int64_t k, int64_t o, int64_t first,
                              float* u) {
  const WinogradConv& c = w.c;
  for (int64_t cb = 0; cb < w.c_pad; cb += kMR) {
    const int64_t valid = o < c.rows ? std::clamp<int64_t>(c.depth - cb, 0, kMR) : 0;
    // W's row of out channel o: a 9-tap run per in channel.
    const float* src = weight + (k * c.rows + std::min(o, c.rows - 1)) * c.depth * 9 + cb * 9;
    __m256 halves[2][9];
    for (int64_t half = 0; half < 2; ++half) taps8<false>(src + half * 72, valid - half * 8, halves[half]);
    WinogradVec g[9];
    for (int t = 0; t < 9; ++t)
      g[t] = reinterpret_cast<WinogradVec>(_mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(_mm512_castps256_ps512(halves[0][t])), _mm256_castps_pd(halves[1][t]), 1)));
    WinogradVec transformed[kWinogradPositions];
    winograd_kernel_transform(g, transformed);
    for (int64_t pos = 0; pos < w.positions; ++pos)  // streamed: see winograd_grad_transforms
      _mm512_stream_ps(u + w.acc_index(k, pos, o, cb), reinterpret_cast<__m512>(transformed[first + pos]));
  }
}

void winograd_grad_pass_kernels(const WinogradGradPlan& w, const float* weight, int64_t first, float* u) {
  parallel_tasks(w.num_kernels * w.o_pad, [&](int64_t begin, int64_t end) {
    for (int64_t ko = begin; ko < end; ++ko) winograd_grad_kernel_row(w, weight, ko / w.o_pad, ko % w.o_pad, first, u);
    _mm_sfence();  // the streamed U_k, before the GEMM's threads read them
  });
}

// NS samples' G of one call (partials: NS x `outs` rows of 32 in channels)
// folded into the K accumulators (acc_k rows acc_ld apart, kernels
// acc_stride apart) as acc_k += sum_s attn[s][k] G_s, and into each
// sample's K dattn lanes as dots[s][k] += G_s .* U_k (U_k laid out as the
// accumulators; none if u is null): each accumulator and U_k vector moves
// through L2 once for the NS samples.
constexpr int64_t kWgFoldSamples = 4;
constexpr int64_t kWgPartialFloats = kWgCallOuts * kWgCallChannels;

template <int NS>
__attribute__((target("avx512f,avx2,fma")))
void winograd_grad_fold(const float* partials, int64_t outs, const float* attn, int64_t num_kernels, float* acc,
                        const float* u, int64_t acc_ld, int64_t acc_stride, float* dots) {
  for (int64_t k = 0; k < num_kernels; ++k) {
    __m512 a[NS], d[NS];
    for (int s = 0; s < NS; ++s) {
      a[s] = _mm512_set1_ps(attn[s * num_kernels + k]);
      d[s] = _mm512_setzero_ps();
    }
    float* ak = acc + k * acc_stride;
    const float* uk = u != nullptr ? u + k * acc_stride : nullptr;
    for (int64_t j = 0; j < outs; ++j) {
      for (int64_t h = 0; h < kWgCallChannels; h += kMR) {
        __m512 g[NS];
        for (int s = 0; s < NS; ++s) g[s] = _mm512_load_ps(partials + s * kWgPartialFloats + j * kWgCallChannels + h);
        float* row = ak + j * acc_ld + h;
        __m512 sum = _mm512_loadu_ps(row);
        for (int s = 0; s < NS; ++s) sum = _mm512_fmadd_ps(a[s], g[s], sum);
        _mm512_storeu_ps(row, sum);
        if (uk == nullptr) continue;
        const __m512 uv = _mm512_loadu_ps(uk + j * acc_ld + h);
        for (int s = 0; s < NS; ++s) d[s] = _mm512_fmadd_ps(g[s], uv, d[s]);
      }
    }
    if (uk == nullptr) continue;
    for (int s = 0; s < NS; ++s) {
      float* out = dots + (s * num_kernels + k) * kMR;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), d[s]));
    }
  }
}

using WinogradGradFold = void (*)(const float*, int64_t, const float*, int64_t, float*, const float*, int64_t, int64_t,
                                  float*);
constexpr WinogradGradFold kWinogradGradFolds[kWgFoldSamples + 1] = {
    nullptr, winograd_grad_fold<1>, winograd_grad_fold<2>, winograd_grad_fold<3>, winograd_grad_fold<4>};

// G's rows (4 x 3): dW = G^T dU G, so tap (i, j) of kernel gradient takes
// G[a][i] G[b][j] of position (a, b).
constexpr float kWinogradG[4][3] = {{1.f, 0.f, 0.f}, {.5f, .5f, .5f}, {.5f, -.5f, .5f}, {0.f, 0.f, 1.f}};

// dW_k (=, or += with `add`) the pass's share G^T acc_k G, for one kernel
// and out channel, 16 in channels a step.
__attribute__((target("avx512f,avx2,fma")))
void winograd_grad_store_row(const WinogradGradPlan& w, const float* acc, int64_t k, int64_t o, int64_t first,
                             bool add, float* grad_w) {
  const WinogradConv& c = w.c;
  for (int64_t cb = 0; cb < c.depth; cb += kMR) {
    __m512 taps[9];
    for (int t = 0; t < 9; ++t) taps[t] = _mm512_setzero_ps();
    for (int64_t pos = 0; pos < w.positions; ++pos) {
      const __m512 x = _mm512_loadu_ps(acc + w.acc_index(k, pos, o, cb));
      const int64_t a = (first + pos) / 4, b = (first + pos) % 4;
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) {
          const float coef = kWinogradG[a][i] * kWinogradG[b][j];
          if (coef != 0.f) taps[i * 3 + j] = _mm512_fmadd_ps(_mm512_set1_ps(coef), x, taps[i * 3 + j]);
        }
    }
    // The 9 tap vectors to 16 in channels' 9-tap runs: per 8 channels one
    // 8x8 register transpose (taps 0-7), the 9th tap element by element.
    alignas(64) float by_tap[9][kMR];
    for (int t = 0; t < 9; ++t) _mm512_store_ps(by_tap[t], taps[t]);
    float* dst = grad_w + ((k * c.rows + o) * c.depth + cb) * 9;
    const int64_t valid = std::min<int64_t>(kMR, c.depth - cb);
    for (int64_t half = 0; half * 8 < valid; ++half) {
      float* runs = dst + half * 72;
      const int64_t channels = std::min<int64_t>(8, valid - half * 8);
      __m256 rows[8];
      for (int t = 0; t < 8; ++t) rows[t] = _mm256_load_ps(by_tap[t] + half * 8);
      transpose8x8(rows);  // rows[l]: taps 0-7 of channel l
      for (int64_t l = 0; l < channels; ++l) {
        __m256 run = rows[l];
        float last = by_tap[8][half * 8 + l];
        if (add) {
          run = _mm256_add_ps(run, _mm256_loadu_ps(runs + l * 9));
          last += runs[l * 9 + 8];
        }
        _mm256_storeu_ps(runs + l * 9, run);
        runs[l * 9 + 8] = last;
      }
    }
  }
}

void winograd_grad_store(const WinogradGradPlan& w, const float* acc, int64_t first, bool add, float* grad_w) {
  parallel_tasks(w.num_kernels * w.c.rows, [&](int64_t begin, int64_t end) {
    for (int64_t ko = begin; ko < end; ++ko)
      winograd_grad_store_row(w, acc, ko / w.c.rows, ko % w.c.rows, first, add, grad_w);
  });
}

// grad_w (K x out x in x 3 x 3, written) and grad_attn (batch x K, written)
// of the conv `p` from grad_out and x (both contiguous float32); either may
// be null (weight is read only for grad_attn).
void winograd_weight_grad(const WinogradGradPlan& w, const Plan& p, const float* grad_out, const float* x,
                          const float* weight, const float* attn, float* grad_w, float* grad_attn) {
  const WinogradConv& c = w.c;
  const int64_t K = w.num_kernels, tiles = c.tiles;
  // The accumulators, the pass's U_k (laid out alike), a chunk's panels.
  const auto buffers = pass_scratch<4>({w.acc_floats(), w.acc_floats(), w.v_floats(), w.m_floats()}, /*fit=*/true);
  float* const acc = buffers[0];
  float* const u = buffers[1];
  float* const v = buffers[2];
  float* const m = buffers[3];
  const int64_t tasks = w.o_tiles() * w.c_tiles();
  std::vector<double> dattn(grad_attn != nullptr ? p.g.batch * K : 0, 0.0);
  std::vector<double> partial_dattn(grad_attn != nullptr ? tasks * w.chunk * K : 0);
  const MicroKernel micro = micro_kernel(PackedIsa::kAvx512, 2, kWgCallOuts);
  for (int64_t first = 0; first < kWinogradPositions; first += w.positions) {
    if (grad_attn != nullptr) winograd_grad_pass_kernels(w, weight, first, u);
    for (int64_t b0 = 0; b0 < p.g.batch; b0 += w.chunk) {
      const int64_t n = std::min(w.chunk, p.g.batch - b0);
      winograd_grad_transforms(w, grad_out + b0 * c.rows * c.out_h * c.out_w, x + b0 * c.depth * c.in_h * c.in_w, n,
                               first, m, v);
      parallel_tasks(tasks, [&](int64_t begin, int64_t end) {
        alignas(64) float partials[kWgFoldSamples * kWgPartialFloats];
        std::vector<float> dots(w.chunk * K * kMR);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t o0 = task / w.c_tiles() * kWgTaskOuts, c0 = task % w.c_tiles() * kWgCallChannels;
          const int64_t calls = std::min(kWgTaskOuts, w.o_pad - o0) / kWgCallOuts;
          constexpr int64_t kCallsPerTask = kWgTaskOuts / kWgCallOuts;
          const int64_t task_blocks = w.positions * kCallsPerTask;
          float* const task_acc = acc + task * task_blocks * w.block_floats();
          if (b0 == 0) std::fill_n(task_acc, task_blocks * w.block_floats(), 0.f);
          std::fill(dots.begin(), dots.end(), 0.f);
          for (int64_t pos = 0; pos < w.positions; ++pos) {
            const float* a = v + (pos * w.c_panels() + c0 / kMR) * w.chunk * tiles * kMR;
            for (int64_t call = 0; call < calls; ++call) {
              const int64_t oc = o0 + call * kWgCallOuts;
              const int64_t outs = std::clamp<int64_t>(c.rows - oc, 0, kWgCallOuts);
              if (outs == 0) continue;
              const float* b = m + (pos * w.o_panels() + oc / kNR) * w.chunk * w.m_ld();
              const int64_t at = w.acc_index(0, pos, oc, c0);
              // The next block's accumulators and U_k requested into L2 by
              // the first group's calls, a line a step, half a block a call
              // (acc from memory or L3 otherwise stalled the folds).
              const bool has_next = pos * kCallsPerTask + call + 1 < task_blocks;
              const char* next[2] = {reinterpret_cast<const char*>(acc + at + w.block_floats()),
                                     reinterpret_cast<const char*>(u + at + w.block_floats())};
              const int64_t half_block = w.block_floats() * static_cast<int64_t>(sizeof(float)) / 2;
              // Samples in groups: their G tiles, then one fold.
              for (int64_t i0 = 0; i0 < n; i0 += kWgFoldSamples) {
                const int64_t ns = std::min(kWgFoldSamples, n - i0);
                for (int64_t s = 0; s < ns; ++s) {
                  MicroOut out{nullptr, 0, kMR, partials + s * kWgPartialFloats, kWgCallChannels,
                               /*load_partial=*/false, /*store_partial=*/true};
                  if (has_next && i0 == 0 && (s < 2 || grad_attn != nullptr))
                    out.l2_prefetch = next[s / 2] + s % 2 * half_block;
                  micro(tiles, a + (i0 + s) * tiles * kMR, w.chunk * tiles * kMR, b + (i0 + s) * w.m_ld(),
                        w.chunk * w.m_ld(), out, nullptr);
                }
                kWinogradGradFolds[ns](partials, outs, attn + (b0 + i0) * K, K, acc + at,
                                       grad_attn != nullptr ? u + at : nullptr, kWgCallChannels,
                                       kWgCallOuts * kWgCallChannels, dots.data() + i0 * K * kMR);
              }
            }
          }
          for (int64_t ik = 0; ik < n * K && grad_attn != nullptr; ++ik) {
            double sum = 0;
            for (int64_t l = 0; l < kMR; ++l) sum += dots[ik * kMR + l];
            partial_dattn[task * w.chunk * K + ik] = sum;
          }
        }
      });
      for (int64_t i = 0; i < n && grad_attn != nullptr; ++i)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t t = 0; t < tasks; ++t) dattn[(b0 + i) * K + k] += partial_dattn[(t * w.chunk + i) * K + k];
    }
    if (grad_w != nullptr) winograd_grad_store(w, acc, first, /*add=*/first > 0, grad_w);
  }
  for (int64_t i = 0; i < static_cast<int64_t>(dattn.size()); ++i) grad_attn[i] = static_cast<float>(dattn[i]);
}

}  // namespace
}  // namespace chanflex
