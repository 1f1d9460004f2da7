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
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fwht.h"
#include "fwht_cuda.cuh"

namespace kron_kernels {
namespace {

using namespace device;

template <int kLogN, typename Tin, typename Tout>
__global__ void __launch_bounds__(RowConfig<kLogN>::kThreads)
    fwht_rows_kernel(const Tin* __restrict__ x, Tout* __restrict__ out, int64_t rows, float scale) {
  using C = RowConfig<kLogN>;
  constexpr int kE = C::kNElts;
  // one exchange region per row of the block (rows of 2^9 are two per block, each over 2 warps)
  constexpr int kExchange = C::kWarps > 1 ? C::kTPR * kE : 0;
  __shared__ float exchange[C::kWarps > 1 ? C::kRowsPerBlock * kExchange : 1];

  const int t = threadIdx.x % C::kTPR;  // this thread's place in its row
  const int group = threadIdx.x / C::kTPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * C::kRowsPerBlock + group;
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

  fwht_row_registers<kLogN>(v, t, exchange + group * kExchange);

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
