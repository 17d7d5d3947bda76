// CUDA kernel of imc_kernels::tsmm_xty: x^T y for tall-skinny x (n, m) and y (n, b), every
// product accumulated in fp64, bitwise deterministic (no atomics).
//
// Why a kernel: cuBLAS has no fp32-in/fp64-accumulate GEMM, and upcasting the operands first
// writes and rereads twice the bytes of a pass that is memory-bound (notes/kernel_design.md 3.3).
// Here the fp32 values travel from global memory once, are staged in shared memory in their
// own dtype, and are widened to fp64 only in registers.
//
// Two stages, both in a fixed order:
//   1. tsmm_xty_partial_kernel: grid (b tiles, m tiles, row chunks). Each block owns one
//      32 x 32 output tile and one chunk of rows, and writes its fp64 partial to a workspace.
//   2. tsmm_xty_reduce_kernel: each output element sums its partials in chunk order.
// The chunk count depends only on the shape, never on the GPU, so the same inputs give the
// same bits on every run (and on every GPU of the same architecture and toolkit).

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void tsmm_check_inputs(const at::Tensor& x, const at::Tensor& y, c10::DeviceType device_type);

namespace tsmm_cuda {

// Output tile per block and rows staged per step: a 32-wide row slice is one 128-byte
// transaction for fp32, so the staging loads are fully coalesced.
constexpr int kTile = 32;
constexpr int kStageRows = 32;
// 16 x 16 threads, each holding a 2 x 2 block of fp64 accumulators (outputs ty + 16 a,
// tx + 16 c): the strided assignment makes a warp read 16 consecutive y values and 2 x values
// from shared memory per step, free of bank conflicts.
constexpr int kThreadsPerSide = 16;
constexpr int kThreads = kThreadsPerSide * kThreadsPerSide;
constexpr int kPerThread = kTile / kThreadsPerSide;

// Row chunks: at least 1024 rows each (32 staging steps, enough to hide the partial's write),
// at most 256 chunks (with m = 128, b = 16 that is 1024 blocks, ~8 per SM on an H100), and at
// most 64 MiB of fp64 partials (m = b = 512 gives 2 MiB per chunk, so 32 chunks).
constexpr int64_t kMinChunkRows = 1024;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kWorkspaceBudgetBytes = int64_t{64} << 20;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tsmm_xty_partial_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                            int64_t n, int64_t m, int64_t b, int64_t chunk_rows,
                            double* __restrict__ partials) {
  __shared__ scalar_t x_stage[kStageRows][kTile];
  __shared__ scalar_t y_stage[kStageRows][kTile];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int thread = ty * kThreadsPerSide + tx;
  const int64_t j_base = static_cast<int64_t>(blockIdx.x) * kTile;  // columns of y
  const int64_t i_base = static_cast<int64_t>(blockIdx.y) * kTile;  // columns of x
  const int64_t chunk = blockIdx.z;
  const int64_t row_begin = chunk * chunk_rows;
  const int64_t row_end = min(n, row_begin + chunk_rows);

  double acc[kPerThread][kPerThread] = {};
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kStageRows) {
    // Out-of-range rows and columns stage zeros, which add exact zeros to the sums.
#pragma unroll
    for (int e = thread; e < kStageRows * kTile; e += kThreads) {
      const int r = e / kTile;
      const int c = e % kTile;
      const int64_t row = row0 + r;
      const bool row_ok = row < row_end;
      x_stage[r][c] = (row_ok && i_base + c < m) ? x[row * m + i_base + c] : scalar_t(0);
      y_stage[r][c] = (row_ok && j_base + c < b) ? y[row * b + j_base + c] : scalar_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < kStageRows; ++r) {
      double x_values[kPerThread];
      double y_values[kPerThread];
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        x_values[k] = static_cast<double>(x_stage[r][ty + k * kThreadsPerSide]);
        y_values[k] = static_cast<double>(y_stage[r][tx + k * kThreadsPerSide]);
      }
#pragma unroll
      for (int a = 0; a < kPerThread; ++a) {
#pragma unroll
        for (int c = 0; c < kPerThread; ++c) {
          acc[a][c] = fma(x_values[a], y_values[c], acc[a][c]);
        }
      }
    }
    __syncthreads();
  }

  double* partial = partials + chunk * m * b;
#pragma unroll
  for (int a = 0; a < kPerThread; ++a) {
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t i = i_base + ty + a * kThreadsPerSide;
      const int64_t j = j_base + tx + c * kThreadsPerSide;
      if (i < m && j < b) {
        partial[i * b + j] = acc[a][c];
      }
    }
  }
}

// out[k] = sum over chunks, in chunk order, of partials[chunk][k]: consecutive threads read
// consecutive doubles of each partial, so every pass over a partial is coalesced.
__global__ void tsmm_xty_reduce_kernel(const double* __restrict__ partials, int64_t n_chunks,
                                       int64_t size, double* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= size) {
    return;
  }
  double sum = 0.0;
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    sum += partials[chunk * size + k];
  }
  out[k] = sum;
}

}  // namespace tsmm_cuda

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

  using namespace tsmm_cuda;
  const int64_t size = m * b;
  const int64_t max_chunks = std::clamp<int64_t>(
      kWorkspaceBudgetBytes / (size * static_cast<int64_t>(sizeof(double))), 1, kMaxChunks);
  const int64_t chunk_rows = std::max(kMinChunkRows, (n + max_chunks - 1) / max_chunks);
  const int64_t n_chunks = (n + chunk_rows - 1) / chunk_rows;

  at::Tensor out = at::empty({m, b}, out_options);
  // A single chunk writes the result directly; otherwise partials go to a workspace from the
  // caching allocator (no cudaMalloc per call).
  at::Tensor workspace = n_chunks == 1 ? out : at::empty({n_chunks, m, b}, out_options);

  // The current stream (at::cuda::getCurrentCUDAStream is this same function; its header,
  // ATen/cuda/CUDAContext.h, also pulls in cuBLAS and cuSPARSE headers this file does not need).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kThreadsPerSide, kThreadsPerSide);
  const dim3 grid(static_cast<unsigned>((b + kTile - 1) / kTile),
                  static_cast<unsigned>((m + kTile - 1) / kTile), static_cast<unsigned>(n_chunks));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "imc_kernels::tsmm_xty (CUDA)", [&] {
    tsmm_xty_partial_kernel<scalar_t><<<grid, block, 0, stream>>>(
        x_contiguous.const_data_ptr<scalar_t>(), y_contiguous.const_data_ptr<scalar_t>(), n, m, b,
        chunk_rows, workspace.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (n_chunks > 1) {
    constexpr int kReduceThreads = 256;
    const auto reduce_blocks = static_cast<unsigned>((size + kReduceThreads - 1) / kReduceThreads);
    tsmm_xty_reduce_kernel<<<reduce_blocks, kReduceThreads, 0, stream>>>(
        workspace.const_data_ptr<double>(), n_chunks, size, out.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CUDA, m) { m.impl("tsmm_xty", &imc_kernels::tsmm_xty_cuda); }
