// The CPU kernel of imc_kernels::tsmm_xty (csrc/lanczos/tsmm_cpu.cpp), shared with the block
// orthogonalization step (csrc/lanczos/block_orth_cpu.cpp), which applies it to strided views
// of the Lanczos basis without copying them.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// GCC function multiversioning: torch builds extensions for baseline x86-64 (SSE2, two doubles
// per instruction, no FMA); the clones let a CPU loop use AVX2+FMA or AVX-512 where the machine
// has them, picked once at load time. A given machine always runs the same clone, so results
// are reproducible there (clones may differ in the last bit through FMA contraction). Only the
// marked function is cloned: code it reaches through a call that is not inlined (a lambda run
// by at::parallel_for included) is built for the baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IMC_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMC_MULTIVERSION
#endif

// __builtin_shufflevector (GCC 12+, Clang): lane sums and partial loads in registers. Older
// compilers take scalar code for those few lines (same results: the sums keep their order);
// IMC_TEST_NO_SHUFFLE forces that path so a test can compile it here
// (tests/build/test_ext.py).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && !defined(IMC_TEST_NO_SHUFFLE)
#define IMC_HAS_SHUFFLEVECTOR 1
#endif
#endif

namespace imc_kernels::tsmm_cpu {

// One 512-bit register of scalar_t: its lane count, and (GCC/Clang) the vector type the
// hand-vectorized loops of the Lanczos kernels use. (A typedef in a class template: GCC drops
// the vector attribute on a dependent alias template.)
template <typename scalar_t>
struct Vec64 {
  static constexpr int64_t lanes = 64 / sizeof(scalar_t);
#if defined(__GNUC__)
  typedef scalar_t type __attribute__((vector_size(64)));
#endif
};

// Row chunks of the fp64-accumulating kernels: at least 4096 rows each (so zeroing and reducing
// a chunk's partial stays small next to reading its rows), at most 64 of them (enough to balance
// the thread counts of one socket).
constexpr int64_t kMinChunkRows = 4096;
constexpr int64_t kMaxChunks = 64;

// The row chunks of the narrow, skinny and column-major kernels (and of the single-vector
// Lanczos step, csrc/lanczos/lanczos_vector_cpu.cpp): at least kMinChunkRows rows,
// at most kMaxChunks chunks, fixed by n alone. Each chunk sums into its own zeroed partial of
// `partial_size` doubles (`chunk_fn(row_begin, row_end, partial)`, chunks run in parallel);
// the caller adds the partials in chunk order (chunk_sum), so the result is bitwise the same
// for any thread count.
struct RowChunks {
  int64_t rows;
  int64_t count;
  std::vector<double> partials;
  int64_t partial_size;

  // sum over chunks, in chunk order, of element `index` of each partial.
  double chunk_sum(int64_t index) const {
    double sum = 0.0;
    for (int64_t chunk = 0; chunk < count; ++chunk) {
      sum += partials[chunk * partial_size + index];
    }
    return sum;
  }
};

template <typename ChunkFn>
RowChunks run_row_chunks(int64_t n, int64_t partial_size, const ChunkFn& chunk_fn) {
  RowChunks chunks;
  chunks.rows = std::max(kMinChunkRows, (n + kMaxChunks - 1) / kMaxChunks);
  chunks.count = (n + chunks.rows - 1) / chunks.rows;
  chunks.partial_size = partial_size;
  chunks.partials.assign(static_cast<size_t>(chunks.count * partial_size), 0.0);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      chunk_fn(chunk * chunks.rows, std::min(n, (chunk + 1) * chunks.rows),
               chunks.partials.data() + chunk * partial_size);
    }
  });
  return chunks;
}

#if defined(__GNUC__)
// partial[i] += sum over rows [begin, end) of x_t[i * ldxt + r] y[r] for i < m, in fp64: the
// dots of m contiguous vectors (rows of x_t) with one contiguous vector y over a row range.
void column_dots_chunk(const float* x_t, int64_t ldxt, const float* y, int64_t m, int64_t begin,
                       int64_t end, double* partial);
void column_dots_chunk(const double* x_t, int64_t ldxt, const double* y, int64_t m,
                       int64_t begin, int64_t end, double* partial);
#endif

// out = x^T y for x (n, m) and y (n, b), every product accumulated in fp64, bitwise
// deterministic for any number of threads. Element (r, c) of x is x[r * ldx + c] (ldx >= m),
// likewise y with ldy; element (i, j) of the result is written to
// out[i * out_row_stride + j * out_col_stride], so a transposed or strided destination costs
// nothing. Defined for float and double; allocates its fp64 partials and tiles (std::vector).
template <typename scalar_t>
void tsmm_xty_kernel(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy, int64_t n,
                     int64_t m, int64_t b, double* out, int64_t out_row_stride,
                     int64_t out_col_stride);

// The same product, computed as (y^T x)^T when that is cheaper: the micro-kernel pads the
// columns of its first operand to 4 and of its second to 8, so a narrow y (b <= 4) goes first
// (measured, one thread, n = 266,610: 32 x 1 7.3 against 8.5 ms; 128 x 1 21 against 27 ms).
// A single column on either side (b = 1 or m = 1: single-vector Lanczos and its Grams) takes
// a kernel of its own without padding or fp64 tiles (m = 20, b = 1: 1.3 against 4.6 ms); 2-8
// columns on either side (a Lanczos block against the basis, the block's Gram) take the skinny
// kernel, which converts in registers and prefetches rows ahead (m = 128, b = 4: 6.6 against
// 15.6 ms, at the machine's fp64 multiply-add rate; m = 64: 3.4 against 8.4 ms).
template <typename scalar_t>
void tsmm_xty_best_order(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy,
                         int64_t n, int64_t m, int64_t b, double* out, int64_t ldo);

}  // namespace imc_kernels::tsmm_cpu
