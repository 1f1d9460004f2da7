// A host emulation of the few CUDA built-ins that the Fastfood kernels use (fastfood_cuda.cuh,
// fwht_cuda.cuh), so that CI machines without a GPU run the kernels' own code: every CUDA
// thread of a CTA is a std::thread, __syncthreads a barrier of the CTA, __shfl_xor_sync an
// exchange through a per-warp buffer between two barriers of the warp. Slow and only for tests
// (fastfood_emulate.cpp, driven by tests/ops/test_fastfood.py); never part of the extension
// (setup.py compiles csrc/*.cpp, not this folder).
//
// Include it before any CUDA header; compile with g++ -std=c++20 -I<toolkit>/include.
#pragma once

#include <cuda_runtime.h>  // with a host compiler: vector types, empty __device__/__global__

#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace kk_emulation {

struct Cta {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;  // 32 per warp
};

inline thread_local uint3 thread_index;
inline thread_local Cta* cta = nullptr;
inline uint3 block_index, grid_dim;

// run kernel() as `threads` threads of CTA b, for b = 0 .. grid - 1 (one CTA at a time, as a
// GPU with one SM would: the kernels must not depend on CTAs running concurrently)
template <typename Kernel>
void launch(unsigned grid, unsigned threads, const Kernel& kernel) {
  grid_dim = make_uint3(grid, 1, 1);
  for (unsigned b = 0; b < grid; ++b) {
    block_index = make_uint3(b, 0, 0);
    Cta state;
    state.block = std::make_unique<std::barrier<>>(threads);
    const unsigned warps = (threads + 31) / 32;
    for (unsigned w = 0; w < warps; ++w)
      state.warps.push_back(std::make_unique<std::barrier<>>(w + 1 < warps || threads % 32 == 0 ? 32 : threads % 32));
    state.lanes.assign(32 * warps, 0.f);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_index = make_uint3(t, 0, 0);
        cta = &state;
        kernel();
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace kk_emulation

#define threadIdx (kk_emulation::thread_index)
#define blockIdx (kk_emulation::block_index)
#define gridDim (kk_emulation::grid_dim)

inline void __syncthreads() { kk_emulation::cta->block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = kk_emulation::thread_index.x, w = t / 32, lane = t % 32;
  auto& cta = *kk_emulation::cta;
  cta.lanes[w * 32 + lane] = v;
  cta.warps[w]->arrive_and_wait();
  const float other = cta.lanes[w * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  cta.warps[w]->arrive_and_wait();
  return other;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
