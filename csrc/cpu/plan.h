// The shapes of one call in the loops' terms, chunk budgets and tilings.
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "loops.h"

namespace chanflex {
namespace {

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

// How parallel_tasks hands out its tasks, from CHANFLEX_CPU_SCHEDULE:
// "balanced" (the default, unset or empty), "static" (at::parallel_for's
// even split, one range a thread) or "steal" (balanced, but every thread
// starts on the others' shares: the tests use it so that the stealing runs
// whatever the timing).
enum class Schedule { kBalanced, kStatic, kStealFirst };

Schedule task_schedule() {
  const char* env = std::getenv("CHANFLEX_CPU_SCHEDULE");
  if (env == nullptr || *env == '\0') return Schedule::kBalanced;
  const std::string value(env);
  if (value == "balanced") return Schedule::kBalanced;
  if (value == "static") return Schedule::kStatic;
  TORCH_CHECK(value == "steal", "CHANFLEX_CPU_SCHEDULE: expected 'balanced', 'static' or 'steal', got '", value, "'");
  return Schedule::kStealFirst;
}

// One thread's share of parallel_tasks' tasks: [front, back) of what is
// left unclaimed (front in the low 32 bits), on a cache line of its own.
struct alignas(64) TaskShare {
  std::atomic<uint64_t> left{0};
};

inline uint64_t task_range(int64_t front, int64_t back) {
  return static_cast<uint64_t>(front) | (static_cast<uint64_t>(back) << 32);
}

// Claims a run of `share` into [begin, end): from the front a quarter of
// what is left, from the back half of it (at least one task either way);
// false once nothing is left.
inline bool claim_run(TaskShare& share, bool from_back, int64_t& begin, int64_t& end) {
  uint64_t left = share.left.load(std::memory_order_relaxed);
  for (;;) {
    const int64_t front = static_cast<int64_t>(left & 0xffffffffu), back = static_cast<int64_t>(left >> 32);
    if (front >= back) return false;
    const int64_t run = std::max<int64_t>(1, (back - front) / (from_back ? 2 : 4));
    begin = from_back ? back - run : front;
    end = begin + run;
    const uint64_t rest = from_back ? task_range(front, begin) : task_range(end, back);
    if (share.left.compare_exchange_weak(left, rest, std::memory_order_relaxed)) return true;
  }
}

// Runs body(begin, end) over runs of [0, tasks) on up to every thread, each
// task once, in any order and on any thread (a body may be called several
// times a thread: buffers that cost to allocate go in PerThread). Each
// thread starts on its even share and claims it from the front in
// shrinking runs; a thread done with its share takes half of what is left
// of another's from the back, so that the owner's runs stay in order (its
// prefetches of the next task hit). Why:
// the development VM's two vCPUs often run at different speeds (a
// single-thread FMA loop on each, 0.2 s apart, 90 s: the slower one 6%
// slower in the median, 16% at the 90th percentile, up to 75%), and with
// one range a thread every parallel phase waits for the slower one.
// In-process on AMD Zen 4, batch 32, K = 4, paired medians of balanced /
// static split (one range a thread): forward 256@14 0.98, 512@7 1.00,
// 256@21 0.99; fwd+bwd 256@14 0.94, 512@7 0.99, 512@5 0.99, 128@28 0.98,
// 256->512@10 0.97. With a busy process sharing the second vCPU: forward
// 256@14 0.86; fwd+bwd 256@14 0.89, 512@7 0.80, 512@5 0.67, 128@28 0.91
// (the static conv took 1.8-2.5x its unloaded time there). Paths that run
// the library's conv keep its split.
template <typename F>
void parallel_tasks(int64_t tasks, const F& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    if (tasks > 0) body(0, tasks);
    return;
  }
  const Schedule schedule = task_schedule();
  if (schedule == Schedule::kStatic) {
    at::parallel_for(0, tasks, 1, body);
    return;
  }
  TORCH_CHECK(tasks < INT32_MAX, "parallel_tasks: expected fewer than 2^31 tasks, got ", tasks);
  std::vector<TaskShare> shares(threads);
  for (int64_t t = 0; t < threads; ++t)
    shares[t].left.store(task_range(t * tasks / threads, (t + 1) * tasks / threads), std::memory_order_relaxed);
  const int64_t first = schedule == Schedule::kStealFirst ? 1 : 0;
  at::parallel_for(0, threads, 1, [&](int64_t home, int64_t) {
    int64_t begin, end;
    for (int64_t i = first; i < first + threads; ++i) {
      const int64_t owner = (home + i) % threads;
      while (claim_run(shares[owner], /*from_back=*/owner != home, begin, end)) body(begin, end);
    }
  });
}

// Scratch that a parallel_tasks body keeps across the runs it is called
// with: one S per thread, made by `make` on the thread's first run, not
// allocated again on every run.
template <typename S>
class PerThread {
 public:
  PerThread() : slots_(std::max(1, at::get_num_threads())) {}
  template <typename Make>
  S& get(const Make& make) {
    const size_t thread = static_cast<size_t>(at::get_thread_num());
    TORCH_CHECK(thread < slots_.size(), "PerThread: expected a thread number below ", slots_.size(), ", got ", thread);
    std::optional<S>& slot = slots_[thread];
    if (!slot) slot.emplace(make());
    return *slot;
  }

 private:
  std::vector<std::optional<S>> slots_;
};

// parallel_tasks, but serially when there are fewer tasks than threads, so
// that each GEMM can use every thread.
template <typename F>
void for_each_range(int64_t tasks, const F& body) {
  if (tasks >= at::get_num_threads()) {
    parallel_tasks(tasks, body);
  } else {
    body(0, tasks);
  }
}

}  // namespace
}  // namespace chanflex
