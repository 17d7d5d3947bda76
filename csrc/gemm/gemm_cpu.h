// CPU float32 GEMM through the oneDNN matmul inside libtorch (csrc/gemm/gemm_cpu.cpp), shared
// by the imc_kernels::gemm_out op and the block orthogonalization step.

#pragma once

#include <ATen/core/Tensor.h>

namespace imc_kernels::gemm_cpu {

// True when the loaded libtorch exports its oneDNN matmul (at::native::mkldnn_matmul): torch
// built with MKLDNN, as the x86-64 and aarch64 wheels are. Resolved once, at first call.
bool onednn_available();

// out = a @ b + beta * out (beta == 0 ignores out's contents, NaN included), for 2-D CPU
// tensors a (m, k), b (k, n), out (m, n). float32 operands with a contiguous `out` that shares
// no memory with a or b go through oneDNN when it is available; every other case, and k == 0,
// through at::mm_out / at::addmm_out. Returns true when oneDNN ran.
bool gemm_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, double beta);

}  // namespace imc_kernels::gemm_cpu
