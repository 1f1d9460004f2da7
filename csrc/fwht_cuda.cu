// CUDA Walsh-Hadamard transform (unnormalised Sylvester ordering, as scipy.linalg.hadamard).
//
// H_{2^k} = H_2 (x) ... (x) H_2, so the transform is one radix-2 butterfly per index bit, and
// the butterflies of different bits commute: each bit can be processed wherever it is cheapest.
// One pass (rows up to 2^15): a row is split over kTPR threads, each holding kNChunks vectors of
// kNElts = 8 consecutive elements (one or two 16-byte loads); element index
//     i = chunk * (kTPR * kNElts) + thread * kNElts + e
// so the low 3 bits (e) and the top bits (chunk) live in one thread's registers, the next 5
// bits in the lanes of a warp (shuffles), and the bits above those in the warps of the block:
// those are exchanged through shared memory with a transposition that swaps them with the
// (already transformed) e bits. Arithmetic is fp32 whatever the storage type.
// Longer rows: H_{ab} = (H_a (x) I_b)(I_a (x) H_b) -- the one-pass kernel on the row seen as
// a rows of length b = 2^15, then strided passes of up to 32 points over the remaining bits.
//
// No torch header here (see fwht.h): the file compiles in seconds per architecture.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fwht.h"

namespace kron_kernels {
namespace {

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

template <int kLogN, typename Tin, typename Tout>
__global__ void __launch_bounds__(RowConfig<kLogN>::kThreads)
    fwht_rows_kernel(const Tin* __restrict__ x, Tout* __restrict__ out, int64_t rows, float scale) {
  using C = RowConfig<kLogN>;
  constexpr int kE = C::kNElts;
  __shared__ float exchange[C::kWarps > 1 ? C::kTPR * kE : 1];

  const int t = threadIdx.x % C::kTPR;  // this thread's place in its row
  const int64_t row = static_cast<int64_t>(blockIdx.x) * C::kRowsPerBlock + threadIdx.x / C::kTPR;
  // threads of a row past the end still take part in the shuffles (full-warp masks), on zeros
  const bool valid = row < rows;
  const int64_t row_offset = row * C::kN;

  float v[C::kNChunks][kE];
#pragma unroll
  for (int c = 0; c < C::kNChunks; ++c) {
    if (valid) {
      load_vec<Tin, kE>(x + row_offset + c * (C::kTPR * kE) + t * kE, v[c]);
    } else {
#pragma unroll
      for (int e = 0; e < kE; ++e) v[c][e] = 0.f;
    }
  }

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
      for (int e = 0; e < kE; ++e) exchange[t * kE + e] = v[c][e];
      __syncthreads();
      float u[kE];
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const int e_lo = e & (C::kWarps - 1), e_hi = e >> kLogWarps;
        u[e] = exchange[(e_lo * 32 + l) * kE + ((e_hi << kLogWarps) | w)];
      }
      butterfly_registers<kE, C::kWarps>(u);  // e_lo are the low bits of e': strides < kWarps
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const int e_lo = e & (C::kWarps - 1), e_hi = e >> kLogWarps;
        exchange[(e_lo * 32 + l) * kE + ((e_hi << kLogWarps) | w)] = u[e];
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < kE; ++e) v[c][e] = exchange[t * kE + e];
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

  if (valid) {
#pragma unroll
    for (int c = 0; c < C::kNChunks; ++c)
      store_vec<Tout, kE>(out + row_offset + c * (C::kTPR * kE) + t * kE, v[c], scale);
  }
}

// ---------------------------------------------------------------------------- strided pass
// (H_R (x) I_stride) on consecutive blocks of R * stride elements: vector g = (o, j) is
// { o * R * stride + k * stride + j : k < R }. Threads take consecutive j, so every load and
// store of a warp is coalesced (stride >= 2^15). May run in place (x == out): each thread reads
// and writes only its own vector.
template <int kLogR, typename Tin, typename Tout>
__global__ void __launch_bounds__(256)
    fwht_strided_kernel(const Tin* x, Tout* out, int64_t n_vectors, int64_t stride, float scale) {
  constexpr int kR = 1 << kLogR;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n_vectors) return;
  const int64_t o = g / stride;
  const int64_t base = o * kR * stride + (g - o * stride);
  float v[kR];
#pragma unroll
  for (int k = 0; k < kR; ++k) v[k] = Convert<Tin>::load(x[base + k * stride]);
  butterfly_registers<kR>(v);
#pragma unroll
  for (int k = 0; k < kR; ++k) out[base + k * stride] = Convert<Tout>::store(v[k] * scale);
}

// ---------------------------------------------------------------------------- launchers
template <int kLogN, typename Tin, typename Tout>
cudaError_t launch_rows(const Tin* x, Tout* out, int64_t rows, float scale, cudaStream_t stream) {
  using C = RowConfig<kLogN>;
  const int64_t blocks = (rows + C::kRowsPerBlock - 1) / C::kRowsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  fwht_rows_kernel<kLogN, Tin, Tout><<<static_cast<unsigned int>(blocks), C::kThreads, 0, stream>>>(x, out, rows, scale);
  return cudaGetLastError();
}

template <typename Tin, typename Tout>
cudaError_t dispatch_rows(int log_n, const Tin* x, Tout* out, int64_t rows, float scale, cudaStream_t stream) {
  switch (log_n) {
#define KK_FWHT_CASE(K) \
  case K:               \
    return launch_rows<K, Tin, Tout>(x, out, rows, scale, stream);
    KK_FWHT_CASE(0) KK_FWHT_CASE(1) KK_FWHT_CASE(2) KK_FWHT_CASE(3) KK_FWHT_CASE(4) KK_FWHT_CASE(5)
    KK_FWHT_CASE(6) KK_FWHT_CASE(7) KK_FWHT_CASE(8) KK_FWHT_CASE(9) KK_FWHT_CASE(10) KK_FWHT_CASE(11)
    KK_FWHT_CASE(12) KK_FWHT_CASE(13) KK_FWHT_CASE(14) KK_FWHT_CASE(15)
#undef KK_FWHT_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename Tout>
cudaError_t launch_strided(int log_r, const float* x, Tout* out, int64_t n_vectors, int64_t stride, float scale,
                           cudaStream_t stream) {
  const int64_t blocks = (n_vectors + 255) / 256;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned int grid = static_cast<unsigned int>(blocks);
  switch (log_r) {
    case 1: fwht_strided_kernel<1, float, Tout><<<grid, 256, 0, stream>>>(x, out, n_vectors, stride, scale); break;
    case 2: fwht_strided_kernel<2, float, Tout><<<grid, 256, 0, stream>>>(x, out, n_vectors, stride, scale); break;
    case 3: fwht_strided_kernel<3, float, Tout><<<grid, 256, 0, stream>>>(x, out, n_vectors, stride, scale); break;
    case 4: fwht_strided_kernel<4, float, Tout><<<grid, 256, 0, stream>>>(x, out, n_vectors, stride, scale); break;
    case 5: fwht_strided_kernel<5, float, Tout><<<grid, 256, 0, stream>>>(x, out, n_vectors, stride, scale); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

constexpr int kMaxStridedLog = 5;  // 32 points per strided vector: 32 registers per thread

template <typename T>
cudaError_t fwht_typed(const T* x, T* out, float* workspace, int64_t rows, int log_n, float scale,
                       cudaStream_t stream) {
  if (log_n <= kFwhtMaxOnePassLog) return dispatch_rows<T, T>(log_n, x, out, rows, scale, stream);
  // two-pass split: first H_b on every length-2^15 piece (into fp32: 16-bit storage would add
  // a rounding between the passes), then the remaining bits by strided passes, scale at the end
  float* buffer = std::is_same<T, float>::value ? reinterpret_cast<float*>(out) : workspace;
  if (buffer == nullptr) return cudaErrorInvalidValue;
  const int64_t pieces = rows << (log_n - kFwhtMaxOnePassLog);
  cudaError_t err = dispatch_rows<T, float>(kFwhtMaxOnePassLog, x, buffer, pieces, 1.f, stream);
  const int64_t total = rows << log_n;
  for (int lo = kFwhtMaxOnePassLog; err == cudaSuccess && lo < log_n;) {
    const int log_r = (log_n - lo) < kMaxStridedLog ? (log_n - lo) : kMaxStridedLog;
    const int64_t n_vectors = total >> log_r, stride = int64_t{1} << lo;
    lo += log_r;
    if (lo == log_n) {
      err = launch_strided<T>(log_r, buffer, out, n_vectors, stride, scale, stream);
    } else {
      err = launch_strided<float>(log_r, buffer, buffer, n_vectors, stride, 1.f, stream);
    }
  }
  return err;
}

}  // namespace

int64_t fwht_cuda_workspace_floats(FwhtDtype dtype, int64_t rows, int log_n) {
  if (log_n <= kFwhtMaxOnePassLog || dtype == FwhtDtype::kFloat32) return 0;
  return rows << log_n;
}

int fwht_cuda(const void* x, void* out, float* workspace, FwhtDtype dtype, int64_t rows, int log_n, float scale,
              void* stream) {
  if (rows == 0) return cudaSuccess;
  if (log_n < 0 || log_n > kFwhtMaxLog) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FwhtDtype::kFloat32:
      return fwht_typed(static_cast<const float*>(x), static_cast<float*>(out), workspace, rows, log_n, scale, s);
    case FwhtDtype::kFloat16:
      return fwht_typed(static_cast<const __half*>(x), static_cast<__half*>(out), workspace, rows, log_n, scale, s);
    case FwhtDtype::kBFloat16:
      return fwht_typed(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(out), workspace, rows,
                        log_n, scale, s);
    default:
      return cudaErrorInvalidValue;
  }
}

const char* fwht_cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

#define KK_STRINGIFY_(...) #__VA_ARGS__
#define KK_STRINGIFY(...) KK_STRINGIFY_(__VA_ARGS__)
const char* fwht_cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return KK_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace kron_kernels
