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

#include "fastfood.h"
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
#define KK_CHECK_FLOAT32(x) \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat, #x " must be float32, got ", (x).scalar_type())
#define KK_CHECK_1D(x)                                                                               \
  TORCH_CHECK_VALUE((x).dim() == 1 && (x).size(0) >= 1, #x " must be 1-D with at least one element, got shape ", \
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

uint64_t fastfood_seed(const py::object& seed) {
  TORCH_CHECK_TYPE(py::isinstance<py::int_>(seed) && !py::isinstance<py::bool_>(seed), "seed must be an int, got ",
                   std::string(py::str(py::type::handle_of(seed).attr("__name__"))));
  const unsigned long long value = PyLong_AsUnsignedLongLong(seed.ptr());
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, "seed must be in [0, 2^64), got ", std::string(py::str(seed)));
  }
  return static_cast<uint64_t>(value);
}

// the generator version (kron_kernels/ops/_fastfood_generator.py GENERATORS): an int, 1 or 2
int fastfood_generator(const py::object& generator) {
  TORCH_CHECK_TYPE(py::isinstance<py::int_>(generator) && !py::isinstance<py::bool_>(generator),
                   "generator must be one of (1, 2), got ",
                   std::string(py::str(py::type::handle_of(generator).attr("__name__"))));
  const long long value = PyLong_AsLongLong(generator.ptr());
  if (value == -1 && PyErr_Occurred()) PyErr_Clear();
  TORCH_CHECK_VALUE(value == kron_kernels::fastfood::kGeneratorV1 || value == kron_kernels::fastfood::kGeneratorV2,
                    "generator must be one of (1, 2), got ", std::string(py::str(generator)));
  return static_cast<int>(value);
}

// Lb a power of two >= d, nb = ceil(D / Lb) <= 2^32 (32-bit block counters); returns log2(Lb)
int fastfood_log_lb(int64_t Lb, int64_t d, int64_t D, int max_log) {
  TORCH_CHECK_VALUE(Lb >= 1 && (Lb & (Lb - 1)) == 0 && Lb <= (int64_t{1} << max_log),
                    "Lb must be a power of two <= 2^", max_log, ", got ", Lb);
  TORCH_CHECK_VALUE(d <= Lb, "theta's length d = ", d, " exceeds the block size Lb = ", Lb);
  TORCH_CHECK_VALUE((D + Lb - 1) / Lb <= (int64_t{1} << 32), "D = ", D, " needs more than 2^32 blocks of Lb = ", Lb);
  return log2_exact(Lb);
}

#ifdef KRON_KERNELS_WITH_CUDA
// after the generic checks: the CUDA kernels' own limit (<= kFastfoodCudaMaxLog) on this device
void check_fastfood_cuda_lb(int log_lb, const at::Tensor& t) {
  const int max_log = kron_kernels::fastfood_cuda_max_log_lb(t.get_device());
  TORCH_CHECK_VALUE(log_lb <= max_log, "Lb = 2^", log_lb, " does not fit the CUDA kernel on ", t.device(),
                    " (one block in shared memory: Lb <= 2^", max_log, " there)");
}
#endif

// out (D,) = P theta, the Fastfood projection regenerated from seed (kron_kernels/ops/fastfood.py)
void fastfood_forward(const at::Tensor& theta, at::Tensor& out, const py::object& seed, int64_t Lb,
                      const py::object& generator_arg) {
  KK_CHECK_DEVICE(theta);
  KK_CHECK_FLOAT32(theta);
  KK_CHECK_1D(theta);
  KK_CHECK_CONTIGUOUS(theta);
  KK_CHECK_SAME_DEVICE(out, theta);
  KK_CHECK_FLOAT32(out);
  KK_CHECK_1D(out);
  KK_CHECK_CONTIGUOUS(out);
  const uint64_t s = fastfood_seed(seed);
  const int generator = fastfood_generator(generator_arg);
  const int64_t d = theta.size(0), D = out.size(0);
  if (theta.device().is_cpu()) {
    const int log_lb = fastfood_log_lb(Lb, d, D, kron_kernels::kFastfoodCpuMaxLog);
    kron_kernels::fastfood_forward_cpu(theta.data_ptr<float>(), d, out.data_ptr<float>(), D, log_lb, s, generator);
    return;
  }
#ifdef KRON_KERNELS_WITH_CUDA
  const int log_lb = fastfood_log_lb(Lb, d, D, kron_kernels::kFastfoodCpuMaxLog);
  const c10::cuda::CUDAGuard guard(theta.device());
  check_fastfood_cuda_lb(log_lb, theta);
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(out.data_ptr()) % 16 == 0, "out must be 16-byte aligned");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int err = kron_kernels::fastfood_forward_cuda(theta.data_ptr<float>(), d, out.data_ptr<float>(), D, log_lb, s,
                                                      generator, stream);
  TORCH_CHECK(err == 0, "kron_kernels fastfood CUDA launch failed: ", kron_kernels::fwht_cuda_error_string(err));
#else
  TORCH_CHECK_VALUE(false, "kron_kernels._C was built without CUDA: it cannot take theta on ", theta.device());
#endif
}

// out (d,) = P^T grad for grad (D,): the backward of fastfood_forward
void fastfood_backward(const at::Tensor& grad, at::Tensor& out, const py::object& seed, int64_t Lb,
                       const py::object& generator_arg) {
  KK_CHECK_DEVICE(grad);
  KK_CHECK_FLOAT32(grad);
  KK_CHECK_1D(grad);
  KK_CHECK_CONTIGUOUS(grad);
  KK_CHECK_SAME_DEVICE(out, grad);
  KK_CHECK_FLOAT32(out);
  KK_CHECK_1D(out);
  KK_CHECK_CONTIGUOUS(out);
  const uint64_t s = fastfood_seed(seed);
  const int generator = fastfood_generator(generator_arg);
  const int64_t D = grad.size(0), d = out.size(0);
  if (grad.device().is_cpu()) {
    const int log_lb = fastfood_log_lb(Lb, d, D, kron_kernels::kFastfoodCpuMaxLog);
    kron_kernels::fastfood_backward_cpu(grad.data_ptr<float>(), D, out.data_ptr<float>(), d, log_lb, s, generator);
    return;
  }
#ifdef KRON_KERNELS_WITH_CUDA
  const int log_lb = fastfood_log_lb(Lb, d, D, kron_kernels::kFastfoodCpuMaxLog);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_fastfood_cuda_lb(log_lb, grad);
  // 16-byte vector loads: a view with an odd storage offset gets an aligned copy
  const at::Tensor src = reinterpret_cast<std::uintptr_t>(grad.data_ptr()) % 16 == 0 ? grad : grad.clone();
  const int64_t rows = kron_kernels::fastfood_backward_cuda_rows(D, log_lb, grad.get_device(), generator);
  TORCH_CHECK(rows > 0, "kron_kernels fastfood: CUDA occupancy query failed on ", grad.device());
  at::Tensor partial = at::empty({rows, Lb}, grad.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int err = kron_kernels::fastfood_backward_cuda(src.data_ptr<float>(), D, partial.data_ptr<float>(), rows,
                                                       log_lb, s, generator, stream);
  TORCH_CHECK(err == 0, "kron_kernels fastfood CUDA launch failed: ", kron_kernels::fwht_cuda_error_string(err));
  // the rows summed by torch's reduction (a fixed order: deterministic, no atomics)
  out.copy_(partial.sum(0).narrow(0, 0, d));
#else
  TORCH_CHECK_VALUE(false, "kron_kernels._C was built without CUDA: it cannot take grad on ", grad.device());
#endif
}

// The largest log2(Lb) of the CUDA kernel on a device (its opt-in shared memory), -1 without CUDA.
int fastfood_cuda_max_log_lb(int device) {
#ifdef KRON_KERNELS_WITH_CUDA
  return kron_kernels::fastfood_cuda_max_log_lb(device);
#else
  (void)device;
  return -1;
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
  info["fastfood"] = fwht_devices;  // the same devices: a CPU kernel always, a CUDA kernel in CUDA builds
  info["fwht_max_one_pass_log2"] = kron_kernels::kFwhtMaxOnePassLog;
  info["fwht_max_log2"] = kron_kernels::kFwhtMaxLog;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kron_kernels compiled kernels (CUDA C++ and C++ CPU)";
  m.def("fwht_out", &fwht_out, "out = scale * H x along the last dim (Sylvester Walsh-Hadamard)", py::arg("x"),
        py::arg("out"), py::arg("scale") = 1.0);
  m.def("fastfood_forward", &fastfood_forward,
        "out (D,) = P theta: the Fastfood projection of seed with block size Lb and generator version "
        "generator (1 or 2), fp32 (in place on out)",
        py::arg("theta"), py::arg("out"), py::arg("seed"), py::arg("Lb"),
        py::arg("generator") = py::int_(kron_kernels::fastfood::kDefaultGenerator));
  m.def("fastfood_backward", &fastfood_backward, "out (d,) = P^T grad (in place on out)", py::arg("grad"),
        py::arg("out"), py::arg("seed"), py::arg("Lb"),
        py::arg("generator") = py::int_(kron_kernels::fastfood::kDefaultGenerator));
  m.def("fastfood_cuda_max_log_lb", &fastfood_cuda_max_log_lb,
        "log2 of the largest block the CUDA Fastfood kernel takes on a device (-1 without CUDA)", py::arg("device"));
  m.def("kernels", &kernels, "the kernels and CUDA architectures of this build (never touches CUDA)");
}
