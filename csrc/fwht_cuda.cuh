// Device pieces of the one-pass Walsh-Hadamard transform shared by fwht_cuda.cu and
// fastfood_cuda.cu: storage conversions, vector loads/stores and the in-CTA transform of a row
// held in registers (the layout and the bit-by-bit scheme are described in fwht_cuda.cu).
// No torch header (see fwht.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace kron_kernels {
namespace device {

// ---------------------------------------------------------------------------- conversions
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  __device__ __forceinline__ static float load(float v) { return v; }
  __device__ __forceinline__ static float store(float v) { return v; }
};

template <>
struct Convert<__half> {
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};

// bf16 <-> fp32 by bit manipulation below sm_80, so that the file also builds for sm_75 (T4),
// which has no bf16 instructions; the results are identical (round to nearest even).
template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float load(__nv_bfloat16 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __bfloat162float(v);
#else
    unsigned short bits;
    memcpy(&bits, &v, sizeof(bits));
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);
#endif
  }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __float2bfloat16_rn(v);
#else
    const unsigned int u = __float_as_uint(v);
    const unsigned short bits = (u & 0x7fffffffu) > 0x7f800000u
                                    ? static_cast<unsigned short>(0x7fc0u)  // NaN stays NaN
                                    : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    __nv_bfloat16 out;
    memcpy(&out, &bits, sizeof(bits));
    return out;
#endif
  }
};

// kN consecutive elements <-> fp32 registers; 16-byte transactions whenever the vector spans
// whole 16-byte words (rows of 8+ elements: the bindings guarantee 16-byte aligned buffers).
template <typename T, int kN>
__device__ __forceinline__ void load_vec(const T* p, float* v) {
  constexpr int kBytes = kN * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPerWord = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerWord; ++k) v[w * kPerWord + k] = Convert<T>::load(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] = Convert<T>::load(p[k]);
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_vec(T* p, const float* v, float scale) {
  constexpr int kBytes = kN * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPerWord = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerWord; ++k) e[k] = Convert<T>::store(v[w * kPerWord + k] * scale);
      reinterpret_cast<uint4*>(p)[w] = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) p[k] = Convert<T>::store(v[k] * scale);
  }
}

// Butterflies over the index bits below kSpan of a kN-element register array (stride-s pairs).
template <int kN, int kSpan = kN>
__device__ __forceinline__ void butterfly_registers(float* v) {
#pragma unroll
  for (int s = 1; s < kSpan; s <<= 1) {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      if ((i & s) == 0) {
        const float a = v[i], b = v[i + s];
        v[i] = a + b;
        v[i + s] = a - b;
      }
    }
  }
}

// ---------------------------------------------------------------------------- one pass
template <int kLogN>
struct RowConfig {
  static constexpr int kN = 1 << kLogN;
  static constexpr int kNElts = kN < 8 ? kN : 8;  // 8 fp32 = two 16-byte loads, 8 fp16 = one
  // 256 threads per long row: a 2^15 row is then 128 values per thread (registers, no spill)
  static constexpr int kTPR = (kN / kNElts) < 256 ? kN / kNElts : 256;
  static constexpr int kNChunks = kN / (kNElts * kTPR);
  static constexpr int kThreads = kTPR < 128 ? 128 : kTPR;  // short rows: several per block
  static constexpr int kRowsPerBlock = kThreads / kTPR;
  static constexpr int kLanes = kTPR < 32 ? kTPR : 32;
  static constexpr int kWarps = kTPR / kLanes;  // warps sharing a row
  // the shared-memory exchange swaps the warp bits with the e bits: needs kWarps <= kNElts
  static_assert(kWarps <= kNElts, "more warps per row than elements per thread vector");
  static_assert(kNChunks * kNElts * kTPR == kN, "row split");
};

// The exchange's slot of element `col` of `row` (kE floats per row). Row-major, lanes l and l + 4
// of a warp would meet in one bank (rows 8 floats apart: 8-way conflicts on every store and
// load of the warp-bit exchange). Every access below has row % 32 == its lane, so XOR-ing the
// column with lane bits 2..4 (for kE = 8; generally the bits above log2(32 / kE)) spreads the 32
// lanes over 32 banks -- for the row-major stores and loads and the transposed ones alike --
// while each row keeps its kE slots: the same elements, the same sums, bank-conflict free.
template <int kE>
__device__ __forceinline__ int exchange_slot(int row, int col) {
  static_assert(kE >= 1 && kE <= 32 && (kE & (kE - 1)) == 0, "kE: a power of two <= 32");
  constexpr int kShift = kE >= 32 ? 0 : kE >= 16 ? 1 : kE >= 8 ? 2 : kE >= 4 ? 3 : kE >= 2 ? 4 : 5;
  return row * kE + (col ^ ((row >> kShift) & (kE - 1)));
}

// H of one row held in registers by the kTPR threads of a row group, in the RowConfig layout
//     i = chunk * (kTPR * kNElts) + t * kNElts + e,   t = this thread's place in the group.
// `exchange` is the group's own kTPR * kNElts floats of shared memory, used when the row spans
// several warps (kWarps > 1); every thread of the CTA must call this (it then synchronises the
// CTA), and the exchange may still be read by other threads on return: synchronise before
// writing it again.
template <int kLogN>
__device__ __forceinline__ void fwht_row_registers(float (&v)[RowConfig<kLogN>::kNChunks][RowConfig<kLogN>::kNElts],
                                                   int t, float* exchange) {
  using C = RowConfig<kLogN>;
  constexpr int kE = C::kNElts;
  // bits 0 .. log2(kNElts): inside the thread's vectors
#pragma unroll
  for (int c = 0; c < C::kNChunks; ++c) butterfly_registers<kE>(v[c]);

  // the next bits: lanes of the warp. The lane with the bit clear holds the pair's first
  // element a and receives b (a + b); the other holds b and receives a (a - b).
#pragma unroll
  for (int s = 1; s < C::kLanes; s <<= 1) {
    const bool upper = (t & s) != 0;
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const float other = __shfl_xor_sync(0xffffffffu, v[c][e], s);
        v[c][e] = upper ? other - v[c][e] : v[c][e] + other;
      }
    }
  }

  // the warp bits: through shared memory, one chunk at a time. Natural position of (warp w,
  // lane l, element e) is (w * 32 + l) * kE + e. Transposed, thread (w', l) takes into register
  // e' = (e_hi, e_lo) (e_lo: the low kLogWarps bits) the element of warp e_lo, lane l and
  // element (e_hi << kLogWarps) | w' -- a bijection that puts every warp bit into registers.
  if constexpr (C::kWarps > 1) {
    constexpr int kLogWarps = C::kWarps == 8 ? 3 : C::kWarps == 4 ? 2 : 1;
    const int w = t / 32, l = t % 32;
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
      __syncthreads();  // the previous chunk's last reads are done
#pragma unroll
      for (int e = 0; e < kE; ++e) exchange[exchange_slot<kE>(t, e)] = v[c][e];
      __syncthreads();
      float u[kE];
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const int e_lo = e & (C::kWarps - 1), e_hi = e >> kLogWarps;
        u[e] = exchange[exchange_slot<kE>(e_lo * 32 + l, (e_hi << kLogWarps) | w)];
      }
      butterfly_registers<kE, C::kWarps>(u);  // e_lo are the low bits of e': strides < kWarps
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const int e_lo = e & (C::kWarps - 1), e_hi = e >> kLogWarps;
        exchange[exchange_slot<kE>(e_lo * 32 + l, (e_hi << kLogWarps) | w)] = u[e];
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kE; ++e) v[c][e] = exchange[exchange_slot<kE>(t, e)];
    }
  }

  // the top bits: across the thread's chunks, in registers
#pragma unroll
  for (int s = 1; s < C::kNChunks; s <<= 1) {
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c) {
      if ((c & s) == 0) {
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const float a = v[c][e], b = v[c + s][e];
          v[c][e] = a + b;
          v[c + s][e] = a - b;
        }
      }
    }
  }
}

}  // namespace device
}  // namespace kron_kernels
