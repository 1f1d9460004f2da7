// Python bindings of kron_kernels._C. Every argument is checked here, with one macro per
// property, so that bad input is a Python TypeError/ValueError naming the argument and never
// reaches a kernel; CUDA work runs on the tensor's device (guarded) and the current stream,
// and every launch is checked.
#include <torch/extension.h>

#ifdef KRON_KERNELS_WITH_CUDA
// c10 only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a bare toolkit lacks
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>
#include <string>
#include <vector>

#include "fwht.h"

#define KK_CHECK_DEVICE(x)                                                                      \
  TORCH_CHECK_VALUE((x).device().is_cpu() || (x).device().is_cuda(), #x " must be a CPU or CUDA " \
                    "tensor, got one on ", (x).device())
#define KK_CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK_VALUE((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " is on ", (y).device())
#define KK_CHECK_DTYPE(x)                                                                                   \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                    \
                       (x).scalar_type() == at::kBFloat16 ||                                                \
                       ((x).scalar_type() == at::kDouble && (x).device().is_cpu()),                         \
                   #x " must be float32, float16 or bfloat16 (or float64 on the CPU), got ", (x).scalar_type(), \
                   " on ", (x).device())
#define KK_CHECK_POW2_LAST_DIM(x)                                                                              \
  TORCH_CHECK_VALUE((x).dim() >= 1 && (x).size(-1) >= 1 && ((x).size(-1) & ((x).size(-1) - 1)) == 0 &&     \
                        (x).size(-1) <= (int64_t{1} << kron_kernels::kFwhtMaxLog),                           \
                    #x "'s last dim must be a power of two <= 2^", kron_kernels::kFwhtMaxLog, ", got shape ", \
                    (x).sizes())
#define KK_CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
#define KK_CHECK_SAME_LAYOUT(x, y)                                                                       \
  TORCH_CHECK_VALUE((x).sizes() == (y).sizes() && (x).scalar_type() == (y).scalar_type(), #x " must have " \
                    #y "'s shape and dtype: ", (x).sizes(), " ", (x).scalar_type(), " vs ", (y).sizes(), " ", \
                    (y).scalar_type())

namespace {

kron_kernels::FwhtDtype fwht_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kron_kernels::FwhtDtype::kFloat32;
    case at::kHalf: return kron_kernels::FwhtDtype::kFloat16;
    case at::kBFloat16: return kron_kernels::FwhtDtype::kBFloat16;
    case at::kDouble: return kron_kernels::FwhtDtype::kFloat64;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
}

int log2_exact(int64_t n) {
  int k = 0;
  while ((int64_t{1} << k) < n) ++k;
  return k;
}

// out = scale * H x along the last dim. `out` is allocated by the caller (so that the tests'
// NaN-poisoned allocations cover it): same shape and dtype as x, contiguous.
void fwht_out(const at::Tensor& x, at::Tensor& out, double scale) {
  KK_CHECK_DEVICE(x);
  KK_CHECK_DTYPE(x);
  KK_CHECK_POW2_LAST_DIM(x);
  KK_CHECK_CONTIGUOUS(x);
  KK_CHECK_SAME_DEVICE(out, x);
  KK_CHECK_SAME_LAYOUT(out, x);
  KK_CHECK_CONTIGUOUS(out);
  TORCH_CHECK_VALUE(!x.is_same(out), "out must not be x (the transform is not in place)");
  const int64_t n = x.size(-1);
  const int log_n = log2_exact(n);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  if (rows == 0) return;
  if (x.device().is_cpu()) {
    kron_kernels::fwht_cpu(x.data_ptr(), out.data_ptr(), fwht_dtype(x), rows, log_n, scale);
    return;
  }
#ifdef KRON_KERNELS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(x.device());
  // the kernels use 16-byte vector loads: a view with an odd storage offset gets an aligned copy
  at::Tensor src = reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0 ? x : x.clone();
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(out.data_ptr()) % 16 == 0, "out must be 16-byte aligned");
  const auto dtype = fwht_dtype(x);
  const int64_t ws_floats = kron_kernels::fwht_cuda_workspace_floats(dtype, rows, log_n);
  at::Tensor workspace;
  if (ws_floats > 0) workspace = at::empty({ws_floats}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int err = kron_kernels::fwht_cuda(src.data_ptr(), out.data_ptr(),
                                          ws_floats > 0 ? workspace.data_ptr<float>() : nullptr, dtype, rows, log_n,
                                          static_cast<float>(scale), stream);
  TORCH_CHECK(err == 0, "kron_kernels fwht CUDA launch failed: ", kron_kernels::fwht_cuda_error_string(err));
#else
  TORCH_CHECK_VALUE(false, "kron_kernels._C was built without CUDA (no CUDA toolkit or a CPU-only torch at build "
                    "time): it cannot take x on ", x.device());
#endif
}

// What this build contains, answered without touching CUDA.
py::dict kernels() {
  py::dict info;
  py::list fwht_devices;
  fwht_devices.append("cpu");
#ifdef KRON_KERNELS_WITH_CUDA
  fwht_devices.append("cuda");
  info["cuda_archs"] = std::string(kron_kernels::fwht_cuda_arch_list());
#else
  info["cuda_archs"] = std::string();
#endif
  info["fwht"] = fwht_devices;
  info["fwht_max_one_pass_log2"] = kron_kernels::kFwhtMaxOnePassLog;
  info["fwht_max_log2"] = kron_kernels::kFwhtMaxLog;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kron_kernels compiled kernels (CUDA C++ and C++ CPU)";
  m.def("fwht_out", &fwht_out, "out = scale * H x along the last dim (Sylvester Walsh-Hadamard)", py::arg("x"),
        py::arg("out"), py::arg("scale") = 1.0);
  m.def("kernels", &kernels, "the kernels and CUDA architectures of this build (never touches CUDA)");
}
