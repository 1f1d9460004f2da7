// CUDA Fastfood kernels (the launchers are in fastfood_cuda.cu), fused: B_j, the first
// transform, Pi_j, G_j, the second transform and the normalisation of block j in one CTA, from
// (seed, j, index) alone (fastfood.h: the same generator functions as the CPU kernel, which the
// tests check against kk.fastfood_params).
//
// Forward: a persistent grid; a CTA holds kRowsPerBlock row groups of RowConfig<log2 Lb>
// (fwht_cuda.cuh), group g of CTA b takes blocks j = b * R + g, += gridDim.x * R. Per block:
//   registers  v = pad(theta) * B_j          (theta: d <= Lb floats, L1/L2-resident)
//   registers  v = H v                        (fwht_row_registers: shuffles + shared exchange)
//   shared     xs = v                         (Lb fp32 per group)
//   registers  v[k] = xs[Pi_j(k)] * G_j(k)    (Pi_j by its Feistel table, G_j generated here;
//                                              ||G_j||^2 summed over the group)
//   registers  v = H v, times 1 / (||G_j|| sqrt(D)), stored to out[j * Lb + k] (int64 offsets,
//              16-byte stores, the last block cut at D).
// The output is the only traffic to memory. kGen is the generator version (fastfood.h): with
// kGeneratorV2 a thread's kE = 8 consecutive elements (i = c * kTPR * 8 + t * 8 + e: they start at a
// multiple of 8, so they lie in one 32-element group and form 4 pairs) take their signs from one B
// word, loaded once per chunk, and their G from 4 Box--Muller evaluations (one log, one sincos, one
// sqrt per pair) instead of 8. Backward (P^T g): the same chain transposed,
// block j's g_j -> H -> * G_j -> gather by Pi_j^-1 -> H -> * B_j / (||G_j|| sqrt(D)), summed by
// each row group over its blocks into its own row of a (rows, Lb) partial buffer that the caller
// sums with torch (deterministic, no atomics).
//
// Safety: every index a thread touches is i = c * kTPR * kNElts + t * kNElts + e < Lb (the
// RowConfig split is exact); Pi_j and Pi_j^-1 are bijections of [0, Lb), so gathers stay
// inside the group's xs; global offsets are (int64_t)j * Lb + i, compared with D before every
// store/load; shared memory is R * (Lb fp32 + the Feistel tables), opted in above 48 KiB, and
// the bindings refuse Lb beyond the device's opt-in limit (fastfood_cuda_max_log_lb). Every
// thread runs the same number of rounds (groups past the last block work on zeros and store
// nothing), so the block-wide barriers are uniform.
//
// A header so that tests can also compile these kernels for the host against a small emulation of
// the CUDA built-ins (csrc/emulation/): the code below must only use threadIdx, blockIdx,
// gridDim, __syncthreads, __shfl_xor_sync, __ldg and what fwht_cuda.cuh and fastfood.h use.
#pragma once

#include <cstdint>

#include "fastfood.h"
#include "fwht_cuda.cuh"

namespace kron_kernels {
namespace device {

using namespace fastfood;

template <int kLogN>
struct FastfoodConfig {
  using C = RowConfig<kLogN>;
  static constexpr int kTableSize = kPiRounds << (kLogN - kLogN / 2);  // feistel_table_size
  // per group: Lb fp32, then the table (uint16), rounded up to 16 bytes
  static constexpr int kTableBytes = ((kTableSize * 2 + 15) / 16) * 16;
  static constexpr int kSmemBytes = C::kRowsPerBlock * (C::kN * 4 + kTableBytes);
  // the backward's per-thread accumulator: registers up to 64 values (Lb <= 2^14), else the
  // group's own partial row in global memory (read-modify-write by the thread owning it)
  static constexpr bool kAccInRegisters = C::kNChunks * C::kNElts <= 64;
};

// ||G_j||^2 of a row group: a butterfly over the group's lanes (every lane gets the same sum:
// each step adds a pair of equal operands in either order), then, for groups of several warps,
// the warp sums through `scratch` in a fixed order. The caller's gathers from scratch must be
// done: the first barrier waits for them.
template <int kLogN>
__device__ __forceinline__ float group_sum(float x, float* scratch, int t) {
  using C = RowConfig<kLogN>;
#pragma unroll
  for (int s = C::kLanes / 2; s >= 1; s >>= 1) x += __shfl_xor_sync(0xffffffffu, x, s);
  if constexpr (C::kWarps > 1) {
    __syncthreads();
    if (t % 32 == 0) scratch[t / 32] = x;
    __syncthreads();
    x = 0.f;
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) x += scratch[w];
  }
  return x;
}

// xs[i] = v for this thread's elements (natural order)
template <int kLogN>
__device__ __forceinline__ void spill_row(float* xs,
                                          const float (&v)[RowConfig<kLogN>::kNChunks][RowConfig<kLogN>::kNElts],
                                          int t) {
  using C = RowConfig<kLogN>;
#pragma unroll
  for (int c = 0; c < C::kNChunks; ++c) {
#pragma unroll
    for (int e = 0; e < C::kNElts; ++e) xs[c * (C::kTPR * C::kNElts) + t * C::kNElts + e] = v[c][e];
  }
}

template <int kLogN>
__device__ __forceinline__ void fill_table(uint16_t* table, uint32_t key_pi, const FeistelShape& shape, int t) {
  for (int idx = t; idx < FastfoodConfig<kLogN>::kTableSize; idx += RowConfig<kLogN>::kTPR)
    table[idx] = feistel_table_entry(key_pi, shape, idx);
}

template <int kLogN, int kGen>
__global__ void __launch_bounds__(RowConfig<kLogN>::kThreads)
    fastfood_forward_kernel(const float* __restrict__ theta, int64_t d, float* __restrict__ out, int64_t D,
                            int64_t nb, uint64_t seed, float inv_sqrt_D) {
  using C = RowConfig<kLogN>;
  using F = FastfoodConfig<kLogN>;
  constexpr int kE = C::kNElts, kStride = C::kTPR * C::kNElts;
  static_assert(kGen == kGeneratorV1 || kGen == kGeneratorV2, "generator version");
  static_assert(32 % kE == 0, "a thread's kE elements share one B word of generator 2");
  extern __shared__ float4 smem_words[];  // float4: 16-byte aligned
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_words);
  const int t = threadIdx.x % C::kTPR, group = threadIdx.x / C::kTPR;
  float* xs = reinterpret_cast<float*>(smem) + group * C::kN;
  uint16_t* table = reinterpret_cast<uint16_t*>(smem + C::kRowsPerBlock * C::kN * 4 + group * F::kTableBytes);
  const FeistelShape shape = feistel_shape(kLogN);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * C::kRowsPerBlock; base < nb;
       base += static_cast<int64_t>(gridDim.x) * C::kRowsPerBlock) {
    const int64_t j = base + group;
    const bool valid = j < nb;
    const BlockKeys keys = block_keys(seed, static_cast<uint32_t>(j));
    __syncthreads();  // the previous round's gathers are done: xs and the table are free
    fill_table<kLogN>(table, keys.pi, shape, t);

    float v[C::kNChunks][kE];
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
      if constexpr (kGen == kGeneratorV1) {
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const int i = c * kStride + t * kE + e;
          v[c][e] = (i < d ? __ldg(theta + i) : 0.f) * sign(keys.b, static_cast<uint32_t>(i));
        }
      } else {
        const int i0 = c * kStride + t * kE;  // a multiple of kE: one B word for the kE elements
        const uint32_t w = sign_word_v2(keys.b, static_cast<uint32_t>(i0)) >> (i0 & 31);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const int i = i0 + e;
          v[c][e] = (i < d ? __ldg(theta + i) : 0.f) * sign_bit(w, static_cast<uint32_t>(e));
        }
      }
    }
    fwht_row_registers<kLogN>(v, t, xs);
    __syncthreads();  // the exchange's last reads (xs) are done
    spill_row<kLogN>(xs, v, t);
    __syncthreads();  // xs and the table are complete

    float norm2 = 0.f;
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
      if constexpr (kGen == kGeneratorV1) {
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const uint32_t k = static_cast<uint32_t>(c * kStride + t * kE + e);
          const float g = gaussian(keys.radius, keys.angle, k);
          norm2 += g * g;
          v[c][e] = xs[feistel_forward(k, keys.pi, shape, table)] * g;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kE; e += 2) {  // the pair (k, k + 1), k even (kE = 1: k alone, Lb = 1)
          const uint32_t k = static_cast<uint32_t>(c * kStride + t * kE + e);
          float g0, g1;
          gaussian_pair_v2(keys.radius, keys.angle, k >> 1, &g0, &g1);
          norm2 += g0 * g0;
          v[c][e] = xs[feistel_forward(k, keys.pi, shape, table)] * g0;
          if constexpr (kE > 1) {
            norm2 += g1 * g1;
            v[c][e + 1] = xs[feistel_forward(k + 1, keys.pi, shape, table)] * g1;
          }
        }
      }
    }
    norm2 = group_sum<kLogN>(norm2, xs, t);
    fwht_row_registers<kLogN>(v, t, xs);  // its first barrier protects group_sum's reads
    const float scale = inv_sqrt_D / sqrtf(norm2);

    if (valid) {
      const int64_t row0 = j * C::kN;
#pragma unroll
      for (int c = 0; c < C::kNChunks; ++c) {
        const int64_t off = row0 + c * kStride + t * kE;
        if (off + kE <= D) {
          store_vec<float, kE>(out + off, v[c], scale);  // 16-byte aligned: off is a multiple of kE
        } else {
#pragma unroll
          for (int e = 0; e < kE; ++e) {
            if (off + e < D) out[off + e] = v[c][e] * scale;
          }
        }
      }
    }
  }
}

template <int kLogN, int kGen>
__global__ void __launch_bounds__(RowConfig<kLogN>::kThreads)
    fastfood_backward_kernel(const float* __restrict__ grad, int64_t D, float* __restrict__ partial, int64_t nb,
                             uint64_t seed, float inv_sqrt_D) {
  using C = RowConfig<kLogN>;
  using F = FastfoodConfig<kLogN>;
  constexpr int kE = C::kNElts, kStride = C::kTPR * C::kNElts;
  static_assert(kGen == kGeneratorV1 || kGen == kGeneratorV2, "generator version");
  static_assert(32 % kE == 0, "a thread's kE elements share one B word of generator 2");
  extern __shared__ float4 smem_words[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem_words);
  const int t = threadIdx.x % C::kTPR, group = threadIdx.x / C::kTPR;
  float* xs = reinterpret_cast<float*>(smem) + group * C::kN;
  uint16_t* table = reinterpret_cast<uint16_t*>(smem + C::kRowsPerBlock * C::kN * 4 + group * F::kTableBytes);
  const FeistelShape shape = feistel_shape(kLogN);
  // this group's partial row: one per (CTA, group), rows = gridDim.x * R
  float* row = partial + (static_cast<int64_t>(blockIdx.x) * C::kRowsPerBlock + group) * C::kN;

  float acc[F::kAccInRegisters ? C::kNChunks : 1][kE];
#pragma unroll
  for (int c = 0; c < (F::kAccInRegisters ? C::kNChunks : 1); ++c) {
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[c][e] = 0.f;
  }
  if constexpr (!F::kAccInRegisters) {
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) store_vec<float, kE>(row + c * kStride + t * kE, acc[0], 1.f);
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * C::kRowsPerBlock; base < nb;
       base += static_cast<int64_t>(gridDim.x) * C::kRowsPerBlock) {
    const int64_t j = base + group;
    const bool valid = j < nb;
    const BlockKeys keys = block_keys(seed, static_cast<uint32_t>(j));
    __syncthreads();  // the previous round's gathers are done: xs and the table are free
    fill_table<kLogN>(table, keys.pi, shape, t);

    float w[C::kNChunks][kE];
    const int64_t row0 = j * C::kN;
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
      const int64_t off = row0 + c * kStride + t * kE;
      if (valid && off + kE <= D) {
        load_vec<float, kE>(grad + off, w[c]);  // 16-byte aligned: off is a multiple of kE
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) w[c][e] = valid && off + e < D ? grad[off + e] : 0.f;
      }
    }
    fwht_row_registers<kLogN>(w, t, xs);
    float norm2 = 0.f;
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
      if constexpr (kGen == kGeneratorV1) {
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const float g = gaussian(keys.radius, keys.angle, static_cast<uint32_t>(c * kStride + t * kE + e));
          norm2 += g * g;
          w[c][e] *= g;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kE; e += 2) {  // one evaluation per pair (kE = 1: the cosine alone)
          float g0, g1;
          gaussian_pair_v2(keys.radius, keys.angle, static_cast<uint32_t>(c * kStride + t * kE + e) >> 1, &g0, &g1);
          norm2 += g0 * g0;
          w[c][e] *= g0;
          if constexpr (kE > 1) {
            norm2 += g1 * g1;
            w[c][e + 1] *= g1;
          }
        }
      }
    }
    __syncthreads();  // the exchange's last reads (xs) are done
    spill_row<kLogN>(xs, w, t);
    __syncthreads();  // xs and the table are complete
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const uint32_t m = static_cast<uint32_t>(c * kStride + t * kE + e);
        w[c][e] = xs[feistel_inverse(m, keys.pi, shape, table)];  // (Pi^T w)[m] = w[Pi^-1[m]]
      }
    }
    norm2 = group_sum<kLogN>(norm2, xs, t);
    fwht_row_registers<kLogN>(w, t, xs);
    const float scale = inv_sqrt_D / sqrtf(norm2);

    if (valid) {
#pragma unroll
      for (int c = 0; c < C::kNChunks; ++c) {
        float* a = acc[F::kAccInRegisters ? c : 0];
        if constexpr (!F::kAccInRegisters) load_vec<float, kE>(row + c * kStride + t * kE, a);
        if constexpr (kGen == kGeneratorV1) {
#pragma unroll
          for (int e = 0; e < kE; ++e)
            a[e] += w[c][e] * (sign(keys.b, static_cast<uint32_t>(c * kStride + t * kE + e)) * scale);
        } else {
          const int i0 = c * kStride + t * kE;  // one B word for the thread's kE elements
          const uint32_t bw = sign_word_v2(keys.b, static_cast<uint32_t>(i0)) >> (i0 & 31);
#pragma unroll
          for (int e = 0; e < kE; ++e) a[e] += w[c][e] * (sign_bit(bw, static_cast<uint32_t>(e)) * scale);
        }
        if constexpr (!F::kAccInRegisters) store_vec<float, kE>(row + c * kStride + t * kE, a, 1.f);
      }
    }
  }
  if constexpr (F::kAccInRegisters) {
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) store_vec<float, kE>(row + c * kStride + t * kE, acc[c], 1.f);
  }
}

}  // namespace device
}  // namespace kron_kernels
