// CUDA kernel of imc_kernels::block_orth_step: one block orthogonalization step of block
// Lanczos, BCGS2 with a Cholesky QR inside each pass (schema and math in csrc/imc_ops.cpp; the
// CPU kernel is block_orth_cpu.cpp, the pure-PyTorch twin imc_kernels/reference/block_orth.py).
//
// Everything runs on the current stream and nothing waits for the GPU (except with
// auto_second_projection, whose DGKS decision is read on the host: one synchronization):
// * V^T W and the Grams: the fp64-accumulating kernels of tsmm_xty (tsmm_cuda.cuh), reading
//   the basis through its row stride; the reduction also writes the coefficients rounded to
//   the working dtype for the GEMM that follows.
// * W -= V C and W R^{-1}: cuBLAS GEMMs through ATen, memory-bound tall-by-small products.
// * The b x b work (norms, Cholesky, inverses, rank and DGKS tests, C and B): two launches of
//   one thread block each (block_orth_{first,second}_factor_kernel) on fp64 scratch in global
//   memory, instead of ~30 small ATen/cuSOLVER calls; the flags stay on the device.
// * On a deficient step a last kernel copies W1 into q; it reads the flag and returns at once
//   otherwise.
//
// Allocation per call, all from the caching allocator (no cudaMalloc in steady state): the
// tsmm partials (at most 64 MiB, typically n / 1024 chunks of m x b doubles), 6 b x b + 2 b
// doubles of scratch, the rounded factors and coefficients, and the two small result tensors.
//
// Not run on a GPU in this repository's CI (compile-checked with nvcc for sm_90 by
// tests/build/test_nvcc.py); tests/linalg/test_block_orth_op.py runs it against the twin on a
// CUDA device when there is one.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "block_orth_factor.h"
#include "tsmm_cuda.cuh"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void block_orth_check_inputs(const at::Tensor& basis, int64_t filled, const at::Tensor& block,
                             const at::Tensor& work, const at::Tensor& q,
                             const at::Tensor& coeffs, const at::Tensor& coeffs_first,
                             const at::Tensor& coupling,
                             const std::optional<at::Tensor>& prior_norms_sq, double tau,
                             c10::DeviceType device_type);

namespace block_orth_cuda {

// One block for the b x b work: b <= 512 columns, so every row or column loop has at most two
// iterations per thread; the Cholesky's 2 b barriers cost ~1 us each at most.
constexpr int kFactorThreads = 256;
constexpr int kSelectThreads = 256;

// Flag slots of the returned (5,) int32 tensor.
constexpr int kFlagDeficient = 0;
constexpr int kFlagNonFinite = 1;
constexpr int kFlagInfoFirst = 2;
constexpr int kFlagInfoSecond = 3;
constexpr int kFlagProjections = 4;

int64_t row_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1);
}

// Cholesky G = R^T R by the threads of one block, with the failure convention of
// block_orth_factor.h: thread 0 takes each pivot, all threads the rest of its row. Writes the
// whole of `factor` and `diagonal`; returns 0 or the 1-based index of the failed pivot (the
// same value in every thread). Starts and ends with a barrier-separated phase.
__device__ int cholesky_upper_block(const double* __restrict__ gram, int64_t b,
                                    double* __restrict__ factor, double* __restrict__ diagonal,
                                    int* failed_shared, double* root_shared) {
  const int tid = threadIdx.x;
  for (int64_t k = tid; k < b * b; k += blockDim.x) {
    factor[k] = 0.0;
  }
  if (tid == 0) {
    *failed_shared = 0;
  }
  __syncthreads();
  for (int64_t j = 0; j < b; ++j) {
    if (tid == 0) {
      const double pivot = block_orth::cholesky_pivot(gram, factor, b, j);
      if (pivot > 0.0) {
        const double root = sqrt(pivot);
        factor[j * b + j] = root;
        *root_shared = root;
      } else {  // also NaN
        *failed_shared = static_cast<int>(j + 1);
      }
    }
    __syncthreads();
    if (*failed_shared != 0) {
      break;  // the same shared value in every thread: a uniform exit
    }
    const double root = *root_shared;
    for (int64_t l = j + 1 + tid; l < b; l += blockDim.x) {
      factor[j * b + l] = block_orth::cholesky_entry(gram, factor, b, j, l, root);
    }
    __syncthreads();
  }
  const int failed = *failed_shared;
  for (int64_t i = tid; i < b; i += blockDim.x) {
    if (failed != 0 && i >= failed - 1) {
      factor[i * b + i] = 1.0;  // identity rows: the rows below were never written
      diagonal[i] = 0.0;
    } else {
      diagonal[i] = factor[i * b + i];
    }
  }
  __syncthreads();
  return failed;
}

// R^{-1} column by column (one thread each), plus its copy in the working dtype.
template <typename scalar_t>
__device__ void invert_upper_block(const double* __restrict__ factor, int64_t b,
                                   double* __restrict__ inverse,
                                   scalar_t* __restrict__ rounded) {
  for (int64_t j = threadIdx.x; j < b; j += blockDim.x) {
    block_orth::invert_upper_column(factor, b, j, inverse);
    for (int64_t i = 0; i < b; ++i) {
      rounded[i * b + j] = static_cast<scalar_t>(inverse[i * b + j]);
    }
  }
  __syncthreads();
}

// After pass 1's Gram: column norms and the reference, R1 and R1^{-1}, the rank check and the
// DGKS decision. One block of kFactorThreads threads.
template <typename scalar_t>
__global__ void __launch_bounds__(kFactorThreads)
    block_orth_first_factor_kernel(const double* __restrict__ gram, int64_t b,
                                   const double* __restrict__ coeffs_first, int64_t ldc1,
                                   int64_t filled, const double* __restrict__ prior_norms_sq,
                                   double tau, bool auto_second_projection,
                                   double* __restrict__ factor, double* __restrict__ inverse,
                                   scalar_t* __restrict__ inverse_rounded,
                                   double* __restrict__ diagonal, double* __restrict__ norms_sq,
                                   double* __restrict__ norms, int* __restrict__ flags) {
  __shared__ int failed;
  __shared__ double root;
  __shared__ int non_finite;
  __shared__ int rank_lost;
  __shared__ int cancelled;
  const int tid = threadIdx.x;
  if (tid == 0) {
    non_finite = 0;
    rank_lost = 0;
    cancelled = 0;
  }
  __syncthreads();
  double* reference = norms;
  double* ratio = norms + b;
  for (int64_t i = tid; i < b; i += blockDim.x) {
    const double norm_sq = block_orth::column_norm_sq(coeffs_first, ldc1, filled, gram, b, i);
    norms_sq[i] = norm_sq;
    reference[i] = sqrt(prior_norms_sq == nullptr ? norm_sq : norm_sq + prior_norms_sq[i]);
    // Every entry of W reaches C1 or G1's diagonal, hence this sum (see column_norm_sq).
    if (!isfinite(reference[i])) {
      atomicOr(&non_finite, 1);
    }
  }
  const int info = cholesky_upper_block(gram, b, factor, diagonal, &failed, &root);
  invert_upper_block<scalar_t>(factor, b, inverse, inverse_rounded);
  for (int64_t i = tid; i < b; i += blockDim.x) {
    ratio[i] = diagonal[i] / reference[i];
    // `not (R_ii > tau * ref_i)`: also true for NaN and for an exactly zero column.
    if (!(diagonal[i] > tau * reference[i])) {
      atomicOr(&rank_lost, 1);
    }
    // R1_ii <= ||w1_i|| <= ||w_i||: cancellation in the projection or dependent columns.
    if (!(diagonal[i] / sqrt(norms_sq[i]) > block_orth::kDgksEta)) {
      atomicOr(&cancelled, 1);
    }
  }
  __syncthreads();
  if (tid == 0) {
    flags[kFlagDeficient] = (info != 0 || rank_lost != 0) ? 1 : 0;
    flags[kFlagNonFinite] = non_finite;
    flags[kFlagInfoFirst] = info;
    flags[kFlagInfoSecond] = 0;
    flags[kFlagProjections] =
        filled == 0 ? 0 : ((!auto_second_projection || cancelled != 0) ? 2 : 1);
  }
}

// After pass 2's Gram: R2 and R2^{-1}, then C = C1 + C2 R1 and B = R2 R1, or C1 and zeros on a
// deficient step. `coeffs` holds C2 on entry when two projections ran.
template <typename scalar_t>
__global__ void __launch_bounds__(kFactorThreads)
    block_orth_second_factor_kernel(const double* __restrict__ gram, int64_t b,
                                    const double* __restrict__ factor_first,
                                    const double* __restrict__ coeffs_first, int64_t ldc1,
                                    double* __restrict__ coeffs, int64_t ldc, int64_t filled,
                                    double* __restrict__ factor, double* __restrict__ inverse,
                                    scalar_t* __restrict__ inverse_rounded,
                                    double* __restrict__ diagonal,
                                    double* __restrict__ coupling, int64_t ldb,
                                    int* __restrict__ flags) {
  __shared__ int failed;
  __shared__ double root;
  __shared__ int deficient_first;
  __shared__ int projections;
  const int tid = threadIdx.x;
  if (tid == 0) {
    deficient_first = flags[kFlagDeficient];
    projections = flags[kFlagProjections];
  }
  const int info = cholesky_upper_block(gram, b, factor, diagonal, &failed, &root);
  invert_upper_block<scalar_t>(factor, b, inverse, inverse_rounded);
  const bool deficient = deficient_first != 0 || info != 0;
  for (int64_t r = tid; r < filled; r += blockDim.x) {
    if (deficient || projections < 2) {
      for (int64_t j = 0; j < b; ++j) {
        coeffs[r * ldc + j] = coeffs_first[r * ldc1 + j];
      }
    } else {
      block_orth::combine_coeffs_row(coeffs_first + r * ldc1, coeffs + r * ldc, factor_first,
                                     b);
    }
  }
  for (int64_t k = tid; k < b * b; k += blockDim.x) {
    const int64_t i = k / b;
    const int64_t j = k % b;
    coupling[i * ldb + j] =
        (deficient || j < i) ? 0.0
                             : block_orth::upper_product_entry(factor, factor_first, b, i, j);
  }
  if (tid == 0) {
    flags[kFlagDeficient] = deficient ? 1 : 0;
    flags[kFlagInfoSecond] = info;
  }
}

// q <- W1 on a deficient step (the raw residual for the caller's repair); else nothing.
template <typename scalar_t>
__global__ void block_orth_select_kernel(const int* __restrict__ flags,
                                         const scalar_t* __restrict__ block, int64_t ldw,
                                         scalar_t* __restrict__ q, int64_t ldq, int64_t n,
                                         int64_t b) {
  if (flags[kFlagDeficient] == 0) {
    return;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n * b;
       k += stride) {
    const int64_t r = k / b;
    const int64_t c = k % b;
    q[r * ldq + c] = block[r * ldw + c];
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> block_orth_step_impl(
    const at::Tensor& basis, int64_t filled, at::Tensor& block, at::Tensor& work, at::Tensor& q,
    at::Tensor& coeffs, at::Tensor& coeffs_first, at::Tensor& coupling, const double* prior,
    double tau, bool auto_second_projection) {
  const int64_t n = block.size(0);
  const int64_t b = block.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto double_options = block.options().dtype(at::kDouble);
  constexpr bool kRound = !std::is_same_v<scalar_t, double>;

  const at::Tensor basis_used = basis.narrow(1, 0, filled);
  const scalar_t* v = basis.const_data_ptr<scalar_t>();
  const int64_t ldv = row_stride(basis);
  const int64_t ldw = row_stride(block);
  const int64_t ldk = row_stride(work);
  double* c1 = coeffs_first.mutable_data_ptr<double>();
  const int64_t ldc1 = row_stride(coeffs_first);
  double* c = coeffs.mutable_data_ptr<double>();
  const int64_t ldc = row_stride(coeffs);

  // Scratch: G1, R1, R1^{-1}, G2, R2, R2^{-1} (b x b each), ||w||^2 and diag R (b each).
  at::Tensor scratch = at::empty({6 * b * b + 2 * b}, double_options);
  double* gram1 = scratch.mutable_data_ptr<double>();
  double* factor1 = gram1 + b * b;
  double* inverse1 = factor1 + b * b;
  double* gram2 = inverse1 + b * b;
  double* factor2 = gram2 + b * b;
  double* inverse2 = factor2 + b * b;
  double* norms_sq = inverse2 + b * b;
  double* diagonal = norms_sq + b;
  // R1^{-1} and R2^{-1} in the working dtype (separate: the first GEMM may still be queued).
  at::Tensor inverse_rounded = at::empty({2, b, b}, block.options());
  // C1 and C2 rounded for the GEMMs W -= V C (float32 data only).
  at::Tensor coeffs_rounded;
  if (kRound && filled > 0) {
    coeffs_rounded = at::empty({filled, b}, block.options());
  }
  at::Tensor flags = at::empty({5}, block.options().dtype(at::kInt));
  at::Tensor norms = at::empty({2, b}, double_options);
  int* flag_data = flags.mutable_data_ptr<int>();
  scalar_t* rounded = kRound && filled > 0 ? coeffs_rounded.mutable_data_ptr<scalar_t>() : nullptr;
  const at::Tensor& first_operand = kRound && filled > 0 ? coeffs_rounded : coeffs_first;
  const at::Tensor& second_operand = kRound && filled > 0 ? coeffs_rounded : coeffs;

  // Pass 1: C1 = V^T W, W1 = W - V C1, G1 = W1^T W1, then the small factor kernel.
  if (filled > 0) {
    tsmm_cuda::launch_tsmm_xty<scalar_t>(v, ldv, block.const_data_ptr<scalar_t>(), ldw, n, filled,
                                         b, c1, ldc1, rounded, b, double_options, stream);
    block.addmm_(basis_used, first_operand, 1.0, -1.0);
  }
  const scalar_t* w = block.const_data_ptr<scalar_t>();
  tsmm_cuda::launch_tsmm_xty<scalar_t>(w, ldw, w, ldw, n, b, b, gram1, b, nullptr, 0,
                                       double_options, stream);
  block_orth_first_factor_kernel<scalar_t><<<1, kFactorThreads, 0, stream>>>(
      gram1, b, c1, ldc1, filled, prior, tau, auto_second_projection, factor1, inverse1,
      inverse_rounded[0].mutable_data_ptr<scalar_t>(), diagonal, norms_sq,
      norms.mutable_data_ptr<double>(), flag_data);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::mm_out(work, block, inverse_rounded[0]);  // Q1 = W1 R1^{-1}

  // Pass 2: C2 = V^T Q1 (in `coeffs`), W2 = Q1 - V C2, G2 = W2^T W2.
  bool project_twice = filled > 0;
  if (project_twice && auto_second_projection) {
    // The one host synchronization of this op, documented for second_projection="auto".
    project_twice = flags[kFlagProjections].item<int>() == 2;
  }
  if (project_twice) {
    const scalar_t* q1 = work.const_data_ptr<scalar_t>();
    tsmm_cuda::launch_tsmm_xty<scalar_t>(v, ldv, q1, ldk, n, filled, b, c, ldc, rounded, b,
                                         double_options, stream);
    work.addmm_(basis_used, second_operand, 1.0, -1.0);
  }
  const scalar_t* w2 = work.const_data_ptr<scalar_t>();
  tsmm_cuda::launch_tsmm_xty<scalar_t>(w2, ldk, w2, ldk, n, b, b, gram2, b, nullptr, 0,
                                       double_options, stream);
  block_orth_second_factor_kernel<scalar_t><<<1, kFactorThreads, 0, stream>>>(
      gram2, b, factor1, c1, ldc1, c, ldc, filled, factor2, inverse2,
      inverse_rounded[1].mutable_data_ptr<scalar_t>(), diagonal,
      coupling.mutable_data_ptr<double>(), row_stride(coupling), flag_data);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::mm_out(q, work, inverse_rounded[1]);  // Q = W2 R2^{-1}

  const int64_t total = n * b;
  const auto select_blocks = static_cast<unsigned>(
      std::min<int64_t>((total + kSelectThreads - 1) / kSelectThreads, 1024));
  block_orth_select_kernel<scalar_t><<<select_blocks, kSelectThreads, 0, stream>>>(
      flag_data, block.const_data_ptr<scalar_t>(), ldw, q.mutable_data_ptr<scalar_t>(),
      row_stride(q), n, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {flags, norms};
}

}  // namespace block_orth_cuda

std::tuple<at::Tensor, at::Tensor> block_orth_step_cuda(
    const at::Tensor& basis, int64_t filled, at::Tensor& block, at::Tensor& work, at::Tensor& q,
    at::Tensor& coeffs, at::Tensor& coeffs_first, at::Tensor& coupling,
    const std::optional<at::Tensor>& prior_norms_sq, double tau, bool auto_second_projection) {
  block_orth_check_inputs(basis, filled, block, work, q, coeffs, coeffs_first, coupling,
                          prior_norms_sq, tau, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(block.device());
  at::Tensor prior;
  if (prior_norms_sq.has_value()) {
    prior = prior_norms_sq->contiguous();
  }
  const double* prior_data = prior.defined() ? prior.const_data_ptr<double>() : nullptr;
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "imc_kernels::block_orth_step (CUDA)", [&] {
    result = block_orth_cuda::block_orth_step_impl<scalar_t>(basis, filled, block, work, q,
                                                             coeffs, coeffs_first, coupling,
                                                             prior_data, tau,
                                                             auto_second_projection);
  });
  return result;
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CUDA, m) {
  m.impl("block_orth_step", &imc_kernels::block_orth_step_cuda);
}
