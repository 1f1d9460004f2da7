// CUDA Fastfood projection: the launchers of the kernels in fastfood_cuda.cuh (persistent grid,
// opt-in shared memory, the device's limit on Lb) behind the interface of fastfood.h.
//
// ptxas, sm_90 (CUDA 13.0, -O3 --use_fast_math; registers / stack / spills per kernel): see
// csrc/README.md.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fastfood.h"
#include "fastfood_cuda.cuh"

namespace kron_kernels {
namespace {

using namespace device;
using namespace fastfood;

// ---------------------------------------------------------------------------- launchers
// The persistent grid: as many CTAs as the device keeps resident (at least one per SM), never
// more than there are rounds of blocks.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int threads, int smem, int64_t rounds, int* grid) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<int>(rounds < resident ? rounds : resident);
  return cudaSuccess;
}

template <int kLogN>
struct Launch {
  using C = RowConfig<kLogN>;
  using F = FastfoodConfig<kLogN>;

  static int64_t rounds(int64_t D) {
    const int64_t nb = (D + C::kN - 1) / C::kN;
    return (nb + C::kRowsPerBlock - 1) / C::kRowsPerBlock;
  }

  template <int kGen>
  static cudaError_t forward_gen(const float* theta, int64_t d, float* out, int64_t D, uint64_t seed,
                                 float inv_sqrt_D, cudaStream_t stream) {
    int grid = 0;
    cudaError_t err =
        persistent_grid(fastfood_forward_kernel<kLogN, kGen>, C::kThreads, F::kSmemBytes, rounds(D), &grid);
    if (err != cudaSuccess) return err;
    fastfood_forward_kernel<kLogN, kGen><<<grid, C::kThreads, F::kSmemBytes, stream>>>(
        theta, d, out, D, (D + C::kN - 1) / C::kN, seed, inv_sqrt_D);
    return cudaGetLastError();
  }

  // generator: kGeneratorV1 or kGeneratorV2 (the bindings refuse anything else)
  static cudaError_t forward(const float* theta, int64_t d, float* out, int64_t D, uint64_t seed, int generator,
                             float inv_sqrt_D, cudaStream_t stream) {
    if (generator == kGeneratorV1) return forward_gen<kGeneratorV1>(theta, d, out, D, seed, inv_sqrt_D, stream);
    if (generator == kGeneratorV2) return forward_gen<kGeneratorV2>(theta, d, out, D, seed, inv_sqrt_D, stream);
    return cudaErrorInvalidValue;
  }

  template <int kGen>
  static int64_t backward_rows_gen(int64_t D) {
    int grid = 0;
    const cudaError_t err =
        persistent_grid(fastfood_backward_kernel<kLogN, kGen>, C::kThreads, F::kSmemBytes, rounds(D), &grid);
    return err == cudaSuccess ? static_cast<int64_t>(grid) * C::kRowsPerBlock : -1;
  }

  static int64_t backward_rows(int64_t D, int generator) {
    if (generator == kGeneratorV1) return backward_rows_gen<kGeneratorV1>(D);
    if (generator == kGeneratorV2) return backward_rows_gen<kGeneratorV2>(D);
    return -1;
  }

  template <int kGen>
  static cudaError_t backward_gen(const float* grad, int64_t D, float* partial, int64_t rows, uint64_t seed,
                                  float inv_sqrt_D, cudaStream_t stream) {
    if (rows <= 0 || rows % C::kRowsPerBlock != 0) return cudaErrorInvalidValue;
    const cudaError_t err =
        cudaFuncSetAttribute(fastfood_backward_kernel<kLogN, kGen>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             F::kSmemBytes);
    if (err != cudaSuccess) return err;
    fastfood_backward_kernel<kLogN, kGen><<<static_cast<unsigned int>(rows / C::kRowsPerBlock), C::kThreads,
                                            F::kSmemBytes, stream>>>(grad, D, partial, (D + C::kN - 1) / C::kN,
                                                                     seed, inv_sqrt_D);
    return cudaGetLastError();
  }

  static cudaError_t backward(const float* grad, int64_t D, float* partial, int64_t rows, uint64_t seed,
                              int generator, float inv_sqrt_D, cudaStream_t stream) {
    if (generator == kGeneratorV1)
      return backward_gen<kGeneratorV1>(grad, D, partial, rows, seed, inv_sqrt_D, stream);
    if (generator == kGeneratorV2)
      return backward_gen<kGeneratorV2>(grad, D, partial, rows, seed, inv_sqrt_D, stream);
    return cudaErrorInvalidValue;
  }
};

#define KK_FASTFOOD_DISPATCH(log_lb, EXPR, FALLBACK)                                                      \
  switch (log_lb) {                                                                                      \
    case 0: { using L = Launch<0>; return EXPR; }                                                        \
    case 1: { using L = Launch<1>; return EXPR; }                                                        \
    case 2: { using L = Launch<2>; return EXPR; }                                                        \
    case 3: { using L = Launch<3>; return EXPR; }                                                        \
    case 4: { using L = Launch<4>; return EXPR; }                                                        \
    case 5: { using L = Launch<5>; return EXPR; }                                                        \
    case 6: { using L = Launch<6>; return EXPR; }                                                        \
    case 7: { using L = Launch<7>; return EXPR; }                                                        \
    case 8: { using L = Launch<8>; return EXPR; }                                                        \
    case 9: { using L = Launch<9>; return EXPR; }                                                        \
    case 10: { using L = Launch<10>; return EXPR; }                                                      \
    case 11: { using L = Launch<11>; return EXPR; }                                                      \
    case 12: { using L = Launch<12>; return EXPR; }                                                      \
    case 13: { using L = Launch<13>; return EXPR; }                                                      \
    case 14: { using L = Launch<14>; return EXPR; }                                                      \
    case 15: { using L = Launch<15>; return EXPR; }                                                      \
    default: return FALLBACK;                                                                            \
  }

int smem_bytes(int log_lb) { KK_FASTFOOD_DISPATCH(log_lb, L::F::kSmemBytes, -1) }

float inv_sqrt(int64_t D) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))); }

}  // namespace

int fastfood_cuda_max_log_lb(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return -1;
  for (int log_lb = kFastfoodCudaMaxLog; log_lb >= 0; --log_lb) {
    if (smem_bytes(log_lb) <= optin) return log_lb;
  }
  return -1;
}

int fastfood_forward_cuda(const float* theta, int64_t d, float* out, int64_t D, int log_lb, uint64_t seed,
                          int generator, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  KK_FASTFOOD_DISPATCH(log_lb, L::forward(theta, d, out, D, seed, generator, inv_sqrt(D), s), cudaErrorInvalidValue)
}

int64_t fastfood_backward_cuda_rows(int64_t D, int log_lb, int device, int generator) {
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) return -1;  // the bindings guard the device
  KK_FASTFOOD_DISPATCH(log_lb, L::backward_rows(D, generator), int64_t{-1})
}

int fastfood_backward_cuda(const float* grad, int64_t D, float* partial, int64_t rows, int log_lb, uint64_t seed,
                           int generator, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  KK_FASTFOOD_DISPATCH(log_lb, L::backward(grad, D, partial, rows, seed, generator, inv_sqrt(D), s),
                       cudaErrorInvalidValue)
}

}  // namespace kron_kernels
