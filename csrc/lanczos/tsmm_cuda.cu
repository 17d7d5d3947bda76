// CUDA kernel of imc_kernels::tsmm_xty: x^T y for tall-skinny x (n, m) and y (n, b), every
// product accumulated in fp64, bitwise deterministic (no atomics). The kernels, and why they
// look the way they do, are in csrc/lanczos/tsmm_cuda.cuh (shared with block_orth_step).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "tsmm_cuda.cuh"

#include <cstdint>

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void tsmm_check_inputs(const at::Tensor& x, const at::Tensor& y, c10::DeviceType device_type);

at::Tensor tsmm_xty_cuda(const at::Tensor& x, const at::Tensor& y) {
  tsmm_check_inputs(x, y, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = x.size(0);
  const int64_t m = x.size(1);
  const int64_t b = y.size(1);
  const auto out_options = x.options().dtype(at::kDouble);
  if (n == 0 || m == 0 || b == 0) {
    return at::zeros({m, b}, out_options);
  }
  const at::Tensor x_contiguous = x.contiguous();
  const at::Tensor y_contiguous = y.contiguous();

  at::Tensor out = at::empty({m, b}, out_options);
  // The current stream (at::cuda::getCurrentCUDAStream is this same function; its header,
  // ATen/cuda/CUDAContext.h, also pulls in cuBLAS and cuSPARSE headers this file does not need).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "imc_kernels::tsmm_xty (CUDA)", [&] {
    tsmm_cuda::launch_tsmm_xty<scalar_t>(x_contiguous.const_data_ptr<scalar_t>(), m,
                                         y_contiguous.const_data_ptr<scalar_t>(), b, n, m, b,
                                         out.mutable_data_ptr<double>(), b, nullptr, 0,
                                         out_options, stream);
  });
  return out;
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CUDA, m) { m.impl("tsmm_xty", &imc_kernels::tsmm_xty_cuda); }
