// Walsh-Hadamard transform kernels of kron_kernels._C: the interface between the bindings
// (bindings.cpp, which include torch) and the kernels. The CUDA kernels (fwht_cuda.cu) see no
// torch header at all: nvcc then compiles a small translation unit per architecture instead
// of the whole ATen header tree, which is what made a .cu file cost about a minute per arch.
#pragma once

#include <cstdint>

namespace kron_kernels {

// Element types of the input/output rows (arithmetic is always fp32, fp64 on the CPU for fp64).
enum class FwhtDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Rows longer than 2^kFwhtMaxOnePassLog take the two-pass split H_ab = (H_a (x) I)(I (x) H_b).
constexpr int kFwhtMaxOnePassLog = 15;
constexpr int kFwhtMaxLog = 30;

#ifdef KRON_KERNELS_WITH_CUDA
// out[r] = scale * H_{2^log_n} x[r] for `rows` contiguous rows. `workspace` holds rows * 2^log_n
// floats when fwht_cuda_workspace_floats says so (16-bit rows longer than one pass keep their
// intermediate in fp32), else may be null. x and out must be 16-byte aligned. Returns the
// cudaError_t of the launches (as an int, so that this header needs no CUDA header).
int fwht_cuda(const void* x, void* out, float* workspace, FwhtDtype dtype, int64_t rows, int log_n,
              float scale, void* stream);
int64_t fwht_cuda_workspace_floats(FwhtDtype dtype, int64_t rows, int log_n);
const char* fwht_cuda_error_string(int error);
// The architectures this file was compiled for (nvcc's __CUDA_ARCH_LIST__), e.g. "750,800,900".
const char* fwht_cuda_arch_list();
#endif

// The CPU kernel: same contract, rows split across at::parallel_for's threads.
void fwht_cpu(const void* x, void* out, FwhtDtype dtype, int64_t rows, int log_n, double scale);
// x = H x in place for one fp32 row of 2^log_n elements, on the calling thread (the Fastfood
// CPU kernel's transforms).
void fwht_cpu_inplace(float* x, int log_n);

}  // namespace kron_kernels
