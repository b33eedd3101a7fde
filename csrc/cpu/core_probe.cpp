// A probe of how far apart two CPUs of the process are, for benchmark
// reports: the round trip of a cache line between two threads pinned to the
// first two CPUs the process may run on.
//
// Why a benchmark needs it: on the 2-vCPU development VM the host moved the
// vCPUs between places where this round trip took 60-250 ns and places
// where it took 330-600 ns, for tens of seconds at a time. Far apart, a
// thread's stores to lines the other thread had last read waited on them,
// and the kernels that hand data between threads (the Winograd transforms'
// panels, read by the GEMM's threads) slowed by up to a quarter while the
// static convolution kept its time. A ratio measured in one mode differs
// from the same ratio in the other; the probe says which mode a row had.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace chanflex {
namespace {

#if defined(__linux__)
// The first two CPUs in the process's affinity mask, or fewer.
std::vector<int> first_two_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE && cpus.size() < 2; ++cpu)
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  return cpus;
}

bool pin_to(std::thread& t, int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(t.native_handle(), sizeof(set), &set) == 0;
}

// One measurement: `iterations` round trips, in nanoseconds each.
double round_trip_once(int cpu_a, int cpu_b, int64_t iterations) {
  alignas(64) std::atomic<int64_t> turn{-1};  // -1: not started; odd: b's turn; even: a's
  std::atomic<bool> ok{true};
  auto bounce = [&](int64_t parity) {
    while (turn.load(std::memory_order_acquire) < 0) {
    }
    for (int64_t i = 0; i < iterations; ++i) {
      const int64_t mine = 2 * i + parity;
      while (turn.load(std::memory_order_acquire) != mine) {
      }
      turn.store(mine + 1, std::memory_order_release);
    }
  };
  std::thread b([&] { bounce(1); });
  std::thread a([&] { bounce(0); });
  if (!pin_to(a, cpu_a) || !pin_to(b, cpu_b)) ok = false;
  const auto start = std::chrono::steady_clock::now();
  turn.store(0, std::memory_order_release);
  a.join();
  b.join();
  const auto stop = std::chrono::steady_clock::now();
  if (!ok) return std::numeric_limits<double>::quiet_NaN();
  return std::chrono::duration<double, std::nano>(stop - start).count() / static_cast<double>(iterations);
}
#endif

// The smallest of `repeats` measurements (the others include the threads'
// start and any preemption), NaN where the process has one CPU or the
// threads cannot be pinned.
double core_round_trip_ns(int64_t iterations, int64_t repeats) {
  TORCH_CHECK(iterations > 0, "cpu_core_round_trip_ns: iterations must be positive, got ", iterations);
  TORCH_CHECK(repeats > 0, "cpu_core_round_trip_ns: repeats must be positive, got ", repeats);
  double best = std::numeric_limits<double>::quiet_NaN();
#if defined(__linux__)
  const std::vector<int> cpus = first_two_cpus();
  if (cpus.size() < 2) return best;
  for (int64_t r = 0; r < repeats; ++r) {
    const double ns = round_trip_once(cpus[0], cpus[1], iterations);
    if (std::isnan(ns)) return ns;
    best = std::isnan(best) ? ns : std::min(best, ns);
  }
#endif
  return best;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chanflex, m) {
  // Round trip of a cache line between the process's first two CPUs, ns
  // (see above); NaN with one CPU.
  m.def("cpu_core_round_trip_ns(int iterations=20000, int repeats=3) -> float", &core_round_trip_ns);
}

}  // namespace chanflex
