// CPU Walsh-Hadamard transform: each row is copied (converted to fp32 for 16-bit rows) into
// the output / a per-thread buffer and transformed there in place.
//
// Cache blocking: H_{2^k} factors into one radix-2 stage per index bit and the stages commute,
// so all stages with a butterfly span below kBlock run block by block while the block sits in
// L1; only the stages above kBlock stream the whole row. Each stage's inner loop runs over
// contiguous, non-aliasing runs, which the compiler vectorises; stages go two at a time (radix 4:
// half the loads and stores), and the first three, whose pairs lie inside 8 consecutive
// elements, run on 8 values in registers. Rows are split across threads by at::parallel_for
// (OpenMP in torch's builds: the extension is compiled with -fopenmp, or it would run serially).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fwht.h"

namespace kron_kernels {
namespace {

constexpr int64_t kBlock = int64_t{1} << 11;  // 8 KiB of fp32: the whole block stays in L1

template <typename A>
inline void stage(A* x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 2 * h) {
    A* __restrict__ u = x + i;
    A* __restrict__ w = x + i + h;
    for (int64_t j = 0; j < h; ++j) {
      const A a = u[j], b = w[j];
      u[j] = a + b;
      w[j] = a - b;
    }
  }
}

// two stages (spans h and 2h) per pass over the data: half the loads and stores of radix 2
template <typename A>
inline void stage4(A* x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 4 * h) {
    A* __restrict__ p0 = x + i;
    A* __restrict__ p1 = x + i + h;
    A* __restrict__ p2 = x + i + 2 * h;
    A* __restrict__ p3 = x + i + 3 * h;
    for (int64_t j = 0; j < h; ++j) {
      const A a = p0[j] + p1[j], b = p0[j] - p1[j];
      const A c = p2[j] + p3[j], d = p2[j] - p3[j];
      p0[j] = a + c;
      p1[j] = b + d;
      p2[j] = a - c;
      p3[j] = b - d;
    }
  }
}

// the three stages within each group of 8 consecutive elements, in registers
template <typename A>
inline void base8(A* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    A v[8];
    for (int k = 0; k < 8; ++k) v[k] = x[i + k];
    for (int s = 1; s < 8; s <<= 1) {
      for (int k = 0; k < 8; ++k) {
        if ((k & s) == 0) {
          const A a = v[k], b = v[k + s];
          v[k] = a + b;
          v[k + s] = a - b;
        }
      }
    }
    for (int k = 0; k < 8; ++k) x[i + k] = v[k];
  }
}

template <typename A>
void transform_inplace(A* x, int64_t n) {
  const int64_t block = std::min(n, kBlock);
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    A* xb = x + b0;
    int64_t h = 1;
    if (block >= 8) {
      base8(xb, block);
      h = 8;
    }
    for (; 4 * h <= block; h *= 4) stage4(xb, block, h);
    for (; h < block; h *= 2) stage(xb, block, h);
  }
  int64_t h = block;
  for (; 4 * h <= n; h *= 4) stage4(x, n, h);
  for (; h < n; h *= 2) stage(x, n, h);
}

// A: arithmetic type (float, or double for fp64 rows); T: storage type.
template <typename T, typename A>
void fwht_rows(const T* x, T* out, int64_t rows, int64_t n, A scale) {
  // a grain of ~64 Ki elements per task: parallel only when there is real work per thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buffer(std::is_same<T, A>::value ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * n;
      T* dst = out + r * n;
      if constexpr (std::is_same<T, A>::value) {
        std::memcpy(dst, src, n * sizeof(T));
        transform_inplace(dst, n);
        if (scale != A(1)) {
          for (int64_t j = 0; j < n; ++j) dst[j] *= scale;
        }
      } else {
        A* buf = buffer.data();
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(src[j]);
        transform_inplace(buf, n);
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(buf[j] * scale);
      }
    }
  });
}

}  // namespace

void fwht_cpu_inplace(float* x, int log_n) { transform_inplace(x, int64_t{1} << log_n); }

void fwht_cpu(const void* x, void* out, FwhtDtype dtype, int64_t rows, int log_n, double scale) {
  const int64_t n = int64_t{1} << log_n;
  switch (dtype) {
    case FwhtDtype::kFloat32:
      fwht_rows(static_cast<const float*>(x), static_cast<float*>(out), rows, n, static_cast<float>(scale));
      break;
    case FwhtDtype::kFloat64:
      fwht_rows(static_cast<const double*>(x), static_cast<double*>(out), rows, n, scale);
      break;
    case FwhtDtype::kFloat16:
      fwht_rows(static_cast<const c10::Half*>(x), static_cast<c10::Half*>(out), rows, n, static_cast<float>(scale));
      break;
    case FwhtDtype::kBFloat16:
      fwht_rows(static_cast<const c10::BFloat16*>(x), static_cast<c10::BFloat16*>(out), rows, n,
                static_cast<float>(scale));
      break;
  }
}

}  // namespace kron_kernels
