// BLAS on row-major matrices and the vector loops (AVX2+FMA and baseline clones).
//
// Part of the CPU kernel (dynamic_conv2d_kernel.cpp, which includes these
// headers in order; each builds on the ones before it). Not a public header:
// everything here has internal linkage, in the kernel's anonymous namespace.
#pragma once

#include "../dynamic_conv2d.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// Fortran BLAS exported by libtorch_cpu (MKL); called on raw tile pointers
// because thousands of small GEMMs per layer make per-call tensor overhead show.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace chanflex {
namespace {

// ---------------------------------------------------------------------------
// BLAS on row-major matrices: C (m x n) = alpha op(A) op(B) + beta C.

void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const float* alpha, const float* a, const int* lda, const float* b,
               const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const double* alpha, const double* a, const int* lda, const double* b,
               const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
void gemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                    const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const T one = 1;
  blas_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &mi, &ni, &ki, &one, b, &la, a,
            &lb, &beta, c, &lc);
}

// ---------------------------------------------------------------------------
// Vector loops, compiled for AVX2+FMA (haswell and later, zen) and for the
// baseline ISA, picked at load time. Rows never overlap (__restrict__), which
// the vectoriser needs to know. The bodies are templates inlined into thin
// per-dtype functions, because target_clones applies only to non-templates.

#define CHANFLEX_INLINE __attribute__((always_inline)) inline
#define CHANFLEX_CLONES __attribute__((target_clones("arch=haswell", "default")))

template <typename T>
CHANFLEX_INLINE void scale_row_body(T* __restrict__ out, const T* __restrict__ src, T a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = a * src[j];
}
template <typename T>
CHANFLEX_INLINE void axpy_row_body(T* __restrict__ out, const T* __restrict__ src, T a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += a * src[j];
}
template <typename T>
CHANFLEX_INLINE void add_row_body(T* __restrict__ out, const T* __restrict__ src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += src[j];
}

// Independent partial sums (two vectors' worth) let the reductions vectorise.
template <typename T>
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
CHANFLEX_INLINE double dot_row_body(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T acc[kLanes<T>] = {0};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>)
    for (int u = 0; u < kLanes<T>; ++u) acc[u] += a[j + u] * b[j + u];
  double total = 0;
  for (int u = 0; u < kLanes<T>; ++u) total += acc[u];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// out += a * g and returns <g, w>, in one pass over the three rows.
template <typename T>
CHANFLEX_INLINE double axpy_dot_row_body(T* __restrict__ out, const T* __restrict__ w,
                                         const T* __restrict__ g, T a, int64_t n) {
  T acc[kLanes<T>] = {0};
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>)
    for (int u = 0; u < kLanes<T>; ++u) {
      out[j + u] += a * g[j + u];
      acc[u] += g[j + u] * w[j + u];
    }
  double total = 0;
  for (int u = 0; u < kLanes<T>; ++u) total += acc[u];
  for (; j < n; ++j) {
    out[j] += a * g[j];
    total += g[j] * w[j];
  }
  return total;
}

#define CHANFLEX_ROW_KERNELS(T)                                                            \
  CHANFLEX_CLONES void scale_row(T* __restrict__ out, const T* __restrict__ src, T a,      \
                                 int64_t n) {                                             \
    scale_row_body(out, src, a, n);                                                       \
  }                                                                                       \
  CHANFLEX_CLONES void axpy_row(T* __restrict__ out, const T* __restrict__ src, T a,       \
                                int64_t n) {                                              \
    axpy_row_body(out, src, a, n);                                                        \
  }                                                                                       \
  CHANFLEX_CLONES void add_row(T* __restrict__ out, const T* __restrict__ src, int64_t n) { \
    add_row_body(out, src, n);                                                            \
  }                                                                                       \
  CHANFLEX_CLONES double dot_row(const T* __restrict__ a, const T* __restrict__ b,         \
                                 int64_t n) {                                             \
    return dot_row_body(a, b, n);                                                         \
  }                                                                                       \
  CHANFLEX_CLONES double axpy_dot_row(T* __restrict__ out, const T* __restrict__ w,        \
                                      const T* __restrict__ g, T a, int64_t n) {          \
    return axpy_dot_row_body(out, w, g, a, n);                                            \
  }

CHANFLEX_ROW_KERNELS(float)
CHANFLEX_ROW_KERNELS(double)

}  // namespace
}  // namespace chanflex
