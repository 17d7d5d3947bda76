// The CUDA kernels of imc_kernels::tsmm_xty: x^T y for tall-skinny x (n, m) and y (n, b), every
// product accumulated in fp64, bitwise deterministic (no atomics). Used by tsmm_xty
// (csrc/lanczos/tsmm_cuda.cu) and by the block orthogonalization step
// (csrc/lanczos/block_orth_cuda.cu), which reads column slices of the Lanczos basis through
// their row stride and wants the result both in fp64 and rounded to the working dtype.
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

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace imc_kernels::tsmm_cuda {

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
constexpr int kReduceThreads = 256;

// Element (r, c) of x is x[r * ldx + c], of y y[r * ldy + c]. Chunk `blockIdx.z` writes its
// partial element (i, j) to partials[chunk * partial_stride + i * ldp + j].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tsmm_xty_partial_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                            const scalar_t* __restrict__ y, int64_t ldy, int64_t n, int64_t m,
                            int64_t b, int64_t chunk_rows, double* __restrict__ partials,
                            int64_t partial_stride, int64_t ldp) {
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
      x_stage[r][c] = (row_ok && i_base + c < m) ? x[row * ldx + i_base + c] : scalar_t(0);
      y_stage[r][c] = (row_ok && j_base + c < b) ? y[row * ldy + j_base + c] : scalar_t(0);
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

  double* partial = partials + chunk * partial_stride;
#pragma unroll
  for (int a = 0; a < kPerThread; ++a) {
#pragma unroll
    for (int c = 0; c < kPerThread; ++c) {
      const int64_t i = i_base + ty + a * kThreadsPerSide;
      const int64_t j = j_base + tx + c * kThreadsPerSide;
      if (i < m && j < b) {
        partial[i * ldp + j] = acc[a][c];
      }
    }
  }
}

// out[i * ldo + j] = sum over chunks, in chunk order, of the (m, b) partials (contiguous, one
// after the other); also rounded to `rounded[i * ldr + j]` when given. Consecutive threads read
// consecutive doubles of each partial, so every pass over a partial is coalesced.
template <typename rounded_t>
__global__ void tsmm_xty_reduce_kernel(const double* __restrict__ partials, int64_t n_chunks,
                                       int64_t m, int64_t b, double* __restrict__ out,
                                       int64_t ldo, rounded_t* __restrict__ rounded,
                                       int64_t ldr) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t size = m * b;
  if (k >= size) {
    return;
  }
  double sum = 0.0;
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    sum += partials[chunk * size + k];
  }
  const int64_t i = k / b;
  const int64_t j = k % b;
  out[i * ldo + j] = sum;
  if (rounded != nullptr) {
    rounded[i * ldr + j] = static_cast<rounded_t>(sum);
  }
}

// Rows per chunk for an (n, m) by (n, b) product: a function of the shape only.
inline int64_t chunk_rows_for(int64_t n, int64_t m, int64_t b) {
  const int64_t max_chunks = std::clamp<int64_t>(
      kWorkspaceBudgetBytes / (m * b * static_cast<int64_t>(sizeof(double))), 1, kMaxChunks);
  return std::max(kMinChunkRows, (n + max_chunks - 1) / max_chunks);
}

// x^T y into out (row stride ldo) and, when `rounded` is not null, rounded to scalar_t into
// `rounded` (row stride ldr); n, m, b >= 1. The partials come from the caching allocator (no
// cudaMalloc in steady state, and capturable in a CUDA graph); a single chunk without rounding
// writes `out` directly.
template <typename scalar_t>
void launch_tsmm_xty(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy, int64_t n,
                     int64_t m, int64_t b, double* out, int64_t ldo, scalar_t* rounded,
                     int64_t ldr, const at::TensorOptions& double_options, cudaStream_t stream) {
  const int64_t chunk_rows = chunk_rows_for(n, m, b);
  const int64_t n_chunks = (n + chunk_rows - 1) / chunk_rows;
  const bool direct = n_chunks == 1 && rounded == nullptr;
  at::Tensor workspace;
  double* partials = out;
  if (!direct) {
    workspace = at::empty({n_chunks * m * b}, double_options);
    partials = workspace.mutable_data_ptr<double>();
  }
  const dim3 block(kThreadsPerSide, kThreadsPerSide);
  const dim3 grid(static_cast<unsigned>((b + kTile - 1) / kTile),
                  static_cast<unsigned>((m + kTile - 1) / kTile), static_cast<unsigned>(n_chunks));
  tsmm_xty_partial_kernel<scalar_t><<<grid, block, 0, stream>>>(
      x, ldx, y, ldy, n, m, b, chunk_rows, partials, m * b, direct ? ldo : b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!direct) {
    const auto reduce_blocks =
        static_cast<unsigned>((m * b + kReduceThreads - 1) / kReduceThreads);
    tsmm_xty_reduce_kernel<scalar_t><<<reduce_blocks, kReduceThreads, 0, stream>>>(
        partials, n_chunks, m, b, out, ldo, rounded, ldr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace imc_kernels::tsmm_cuda
