// CPU kernel of imc_kernels::tsmm_xty: x^T y for tall-skinny x (n, m) and y (n, b), every
// product accumulated in fp64, bitwise deterministic for any number of threads.
//
// Why a kernel: block Lanczos orthogonalizes with CholeskyQR2, whose Gram W^T W must be
// accumulated in fp64 to stay orthogonal up to kappa(W) ~ 1e8 (notes/kernel_design.md 3.3).
// BLAS has no fp32-in/fp64-accumulate GEMM, and upcasting the whole operands first writes and
// rereads twice the bytes of a memory-bound pass. Here each thread converts one tile of a few
// hundred rows to fp64 in a buffer that stays in L2, and runs a register-blocked fp64 loop on it.
//
// Determinism: the rows are split into chunks whose count depends only on the shape, each chunk
// sums into its own partial in a fixed order, and the partials are added in chunk order. Which
// thread runs which chunk never changes a bit of the result.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "tsmm_cpu.h"

// The 512-bit vector types below live in always-inline helpers, so no value of them crosses a
// call boundary of the baseline ABI; GCC warns about the ABI anyway.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void tsmm_check_inputs(const at::Tensor& x, const at::Tensor& y, c10::DeviceType device_type);
bool rows_addressable(const at::Tensor& t);

namespace tsmm_cpu {

// Register block of the micro-kernel: kMR rows of the output (columns of x) by kNR columns
// (columns of y): 32 fp64 accumulators, 8 AVX2 registers or 4 AVX-512 registers, leaving room
// for the broadcast x values and the y row. Operands are zero-padded to these multiples, so
// the loop has no remainder code.
constexpr int64_t kMR = 4;
constexpr int64_t kNR = 8;

// Row chunks (kMinChunkRows, kMaxChunks in tsmm_cpu.h), and never more partials than 64 MiB
// of doubles (m = b = 512 gives 2 MiB per partial, so 32 chunks). All depend on the shape only,
// never on the thread count.
constexpr int64_t kPartialBudgetBytes = int64_t{64} << 20;

// fp64 copies of one x tile and one y tile share ~256 KiB, a quarter of a 1 MiB L2, so the
// kMR x kNR passes over the tile reread it from cache rather than memory.
constexpr int64_t kTileBudgetBytes = int64_t{256} << 10;

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

int64_t tile_rows_for(int64_t m_pad, int64_t b_pad) {
  const int64_t rows = kTileBudgetBytes / static_cast<int64_t>(sizeof(double)) / (m_pad + b_pad);
  return std::clamp<int64_t>(rows, 16, 512);
}

// partial (m_pad, b_pad) += x_tile^T y_tile, with x_tile (rows, m_pad) (row stride ldxt) and
// y_tile (rows, b_pad) row-major fp64. Each accumulator sums the tile's rows in order, then joins
// the partial. With `symmetric` (x_tile is y_tile) the register blocks below the diagonal are
// skipped. Both tiles are only read, so they may alias.
//
// Written with GCC/Clang vector types rather than a scalar loop: GCC vectorizes the scalar form
// by reversing the y row with lane-crossing shuffles (vpermpd), which made it 1.5x slower on
// Zen; here y is two plain loads and x one broadcast load per register row. On the 2-core EPYC
// dev VM this runs at ~1 FMA instruction per cycle, that VM's measured peak for 4-wide fp64;
// where the CPU has AVX-512, accumulate_tile_avx512 below runs instead.
#if defined(__GNUC__)
typedef double Vec4d __attribute__((vector_size(32)));
static_assert(kNR == 8, "the vector micro-kernel holds a y row in two 4-wide vectors");

// One kRows x kNR register block over the tile's rows, then into the partial.
template <int64_t kRows, typename acc_row_t, int kHalves>
inline __attribute__((always_inline)) void accumulate_block(
    const double* __restrict x_tile, int64_t ldxt, const double* __restrict y_tile, int64_t rows,
    int64_t b_pad, int64_t i0, int64_t j0, double* __restrict partial) {
  constexpr int64_t width = kNR / kHalves;
  acc_row_t acc[kRows][kHalves] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const double* x_row = x_tile + r * ldxt + i0;
    const double* y_row = y_tile + r * b_pad + j0;
    acc_row_t y_part[kHalves];
    __builtin_memcpy(y_part, y_row, sizeof(y_part));
    for (int64_t ii = 0; ii < kRows; ++ii) {
      const double x_value = x_row[ii];
      for (int h = 0; h < kHalves; ++h) {
        acc[ii][h] += x_value * y_part[h];
      }
    }
  }
  for (int64_t ii = 0; ii < kRows; ++ii) {
    for (int64_t jj = 0; jj < kNR; ++jj) {
      partial[(i0 + ii) * b_pad + j0 + jj] += acc[ii][jj / width][jj % width];
    }
  }
}

IMC_MULTIVERSION
void accumulate_tile(const double* __restrict x_tile, int64_t ldxt,
                     const double* __restrict y_tile, int64_t rows, int64_t m_pad, int64_t b_pad,
                     bool symmetric, double* __restrict partial) {
  for (int64_t i0 = 0; i0 < m_pad; i0 += kMR) {
    for (int64_t j0 = 0; j0 < b_pad; j0 += kNR) {
      if (symmetric && i0 >= j0 + kNR) {
        continue;  // entirely below the diagonal: mirrored from above at the end
      }
      accumulate_block<kMR, Vec4d, 2>(x_tile, ldxt, y_tile, rows, b_pad, i0, j0, partial);
    }
  }
}

#if defined(__x86_64__) && !defined(__clang__)
#define IMC_HAS_AVX512_TILE 1
// The same tile product with AVX-512: a y row is one 8-wide vector, and blocks of 2 kMR rows
// of the output take eight accumulators (two FMA pipes of latency 4 need eight independent
// chains; the 4 x 8 block above keeps eight only as 4-wide halves). Same register-block
// boundaries (blocks start at multiples of kMR; a trailing kMR block runs alone), and every
// element takes the same multiply-adds in the same order, so the result is bitwise that of
// accumulate_tile. Measured at n = 266,610, float32 input, one Zen 5 thread: the 64 x 64 Gram
// of the MLP's thick restart at k = 32 35 -> 22 ms, V^T W with 96 x 16 columns (a CPU block of
// 16 against the basis) 26 -> 20 ms. Not a clone of the function above: on AVX2 the 8 x 8
// block would need 16 registers for its accumulators alone.
typedef double Vec8dTile __attribute__((vector_size(64)));

__attribute__((target("arch=x86-64-v4"))) void accumulate_tile_avx512(
    const double* __restrict x_tile, int64_t ldxt, const double* __restrict y_tile, int64_t rows,
    int64_t m_pad, int64_t b_pad, bool symmetric, double* __restrict partial) {
  for (int64_t i0 = 0; i0 < m_pad; i0 += 2 * kMR) {
    const bool pair = i0 + 2 * kMR <= m_pad;
    for (int64_t j0 = 0; j0 < b_pad; j0 += kNR) {
      // i0 is a multiple of 2 kMR = kNR and j0 of kNR: the pair's second half is below the
      // diagonal exactly when its first half is.
      if (symmetric && i0 >= j0 + kNR) {
        continue;
      }
      if (pair) {
        accumulate_block<2 * kMR, Vec8dTile, 1>(x_tile, ldxt, y_tile, rows, b_pad, i0, j0, partial);
      } else {
        accumulate_block<kMR, Vec8dTile, 1>(x_tile, ldxt, y_tile, rows, b_pad, i0, j0, partial);
      }
    }
  }
}

// Read once per process. IMC_KERNELS_NO_AVX512 (set, not "0") keeps the portable tile
// kernel, so a test can compare the two paths' bits on an AVX-512 machine.
bool has_avx512_tile() {
  static const bool supported = [] {
    const char* off = std::getenv("IMC_KERNELS_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && std::string(off) != "0") {
      return false;
    }
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  }();
  return supported;
}
#endif
#else
void accumulate_tile(const double* x_tile, int64_t ldxt, const double* y_tile, int64_t rows,
                     int64_t m_pad, int64_t b_pad, bool symmetric, double* partial) {
  for (int64_t i0 = 0; i0 < m_pad; i0 += kMR) {
    for (int64_t j0 = 0; j0 < b_pad; j0 += kNR) {
      if (symmetric && i0 >= j0 + kNR) {
        continue;
      }
      double acc[kMR][kNR] = {};
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t ii = 0; ii < kMR; ++ii) {
          const double x_value = x_tile[r * ldxt + i0 + ii];
          for (int64_t jj = 0; jj < kNR; ++jj) {
            acc[ii][jj] += x_value * y_tile[r * b_pad + j0 + jj];
          }
        }
      }
      for (int64_t ii = 0; ii < kMR; ++ii) {
        for (int64_t jj = 0; jj < kNR; ++jj) {
          partial[(i0 + ii) * b_pad + j0 + jj] += acc[ii][jj];
        }
      }
    }
  }
}
#endif

// Copies `rows` rows of a row-major (*, cols) matrix with leading dimension ld into a
// (rows, cols_pad) fp64 tile, zero-filling the padding columns (they contribute exact zeros to
// the padded partial). Multiversioned too: AVX converts four floats per instruction, SSE2 two.
template <typename scalar_t>
void load_tile_impl(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols,
                    int64_t cols_pad, double* __restrict tile) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src_row = src + r * ld;
    double* tile_row = tile + r * cols_pad;
    for (int64_t c = 0; c < cols; ++c) {
      tile_row[c] = static_cast<double>(src_row[c]);
    }
    for (int64_t c = cols; c < cols_pad; ++c) {
      tile_row[c] = 0.0;
    }
  }
}

// GCC does not multiversion templates, hence one plain overload per input dtype.
IMC_MULTIVERSION
void load_tile(const float* src, int64_t ld, int64_t rows, int64_t cols, int64_t cols_pad,
               double* tile) {
  load_tile_impl(src, ld, rows, cols, cols_pad, tile);
}

IMC_MULTIVERSION
void load_tile(const double* src, int64_t ld, int64_t rows, int64_t cols, int64_t cols_pad,
               double* tile) {
  load_tile_impl(src, ld, rows, cols, cols_pad, tile);
}

template <typename scalar_t>
void tsmm_xty_kernel(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy, int64_t n,
                     int64_t m, int64_t b, double* out, int64_t out_row_stride,
                     int64_t out_col_stride) {
  if (n == 0 || m == 0 || b == 0) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        out[i * out_row_stride + j * out_col_stride] = 0.0;
      }
    }
    return;
  }
  const int64_t m_pad = round_up(m, kMR);
  const int64_t b_pad = round_up(b, kNR);
  // A Gram (x and y the same matrix): only the register blocks on or above the diagonal, from
  // one fp64 tile (strided like y's), the rest mirrored. Each computed element takes the same
  // products in the same order as the full kernel (x_i y_j = y_j x_i), and the tile height is
  // the full kernel's, so the result is bitwise the same, for about half the work (m = 64, the
  // thick-restart Gram of the MLP at k = 32: 72 of 128 blocks).
  const bool symmetric = x == y && ldx == ldy && m == b;
  const int64_t partial_size = m_pad * b_pad;
  const int64_t max_chunks = std::clamp<int64_t>(
      kPartialBudgetBytes / (partial_size * static_cast<int64_t>(sizeof(double))), 1, kMaxChunks);
  const int64_t chunk_rows = std::max(kMinChunkRows, (n + max_chunks - 1) / max_chunks);
  const int64_t n_chunks = (n + chunk_rows - 1) / chunk_rows;
  const int64_t tile_rows = tile_rows_for(m_pad, b_pad);
  const int64_t tile_size = tile_rows * (m_pad + b_pad);

  const int n_threads =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks)));
#if defined(IMC_HAS_AVX512_TILE)
  const bool avx512 = has_avx512_tile();
#endif
  // Allocated before the parallel region: nothing inside it may throw.
  std::vector<double> partials(static_cast<size_t>(n_chunks * partial_size), 0.0);
  std::vector<double> tiles(static_cast<size_t>(n_threads * tile_size));

#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
  {
#ifdef _OPENMP
    const int thread = omp_get_thread_num();
#else
    const int thread = 0;
#endif
    double* x_tile = tiles.data() + thread * tile_size;
    double* y_tile = x_tile + tile_rows * m_pad;
    // Dynamic scheduling only balances the load: chunk c always lands in partial c.
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t row_end = std::min(n, (chunk + 1) * chunk_rows);
      double* partial = partials.data() + chunk * partial_size;
      for (int64_t row = chunk * chunk_rows; row < row_end; row += tile_rows) {
        const int64_t rows = std::min(tile_rows, row_end - row);
        load_tile(y + row * ldy, ldy, rows, b, b_pad, y_tile);
        const double* x_source = y_tile;
        int64_t ldxt = b_pad;
        if (!symmetric) {
          load_tile(x + row * ldx, ldx, rows, m, m_pad, x_tile);
          x_source = x_tile;
          ldxt = m_pad;
        }
#if defined(IMC_HAS_AVX512_TILE)
        if (avx512) {
          accumulate_tile_avx512(x_source, ldxt, y_tile, rows, m_pad, b_pad, symmetric, partial);
          continue;
        }
#endif
        accumulate_tile(x_source, ldxt, y_tile, rows, m_pad, b_pad, symmetric, partial);
      }
    }
  }

  // Second stage: each output element sums its chunk partials in chunk order.
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = symmetric ? i : 0; j < b; ++j) {
        double sum = 0.0;
        for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
          sum += partials[chunk * partial_size + i * b_pad + j];
        }
        out[i * out_row_stride + j * out_col_stride] = sum;
        if (symmetric) {
          out[j * out_row_stride + i * out_col_stride] = sum;
        }
      }
    }
  });
}

// x^T y for a single column y (b = 1), the Gram of one column included (m = 1). The general
// kernel pads b to 4 and converts x through an fp64 tile: at n = 266,610, m = 20, one thread,
// 4.7 ms for V^T w and 1.7 ms for w^T w, where reading V takes 0.3 ms. Here each row of x is
// converted in registers and multiplied by the broadcast y[r], 16 columns at a time (four
// 4-wide fp64 accumulators), the remaining columns in scalar fp64. Row chunks fixed by the
// shape and partials summed in chunk order, as in the general kernel, so the result is bitwise
// the same for any thread count.
constexpr int64_t kNarrowGroup = 16;

// Rows of x per tile: the column groups each reread the tile, so it should stay in L2
// (128 KiB of x rows). At m = 70 a 4,096-row chunk (1.1 MiB) made the five passes read memory.
constexpr int64_t kNarrowTileBytes = int64_t{128} << 10;

// acc[c] = sum over rows [row_begin, row_end) of x[r, i0 + c] y[r], c < width. With
// kFullGroup the width is the constant kNarrowGroup, so the compiler unrolls the column loop
// into vector FMAs.
template <typename scalar_t, bool kFullGroup>
inline __attribute__((always_inline)) void narrow_group(
    const scalar_t* __restrict x, int64_t ldx, const scalar_t* __restrict y, int64_t ldy,
    int64_t row_begin, int64_t row_end, int64_t i0, int64_t width, double* __restrict acc) {
  const int64_t columns = kFullGroup ? kNarrowGroup : width;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const double y_value = static_cast<double>(y[r * ldy]);
    const scalar_t* x_row = x + r * ldx + i0;
    for (int64_t c = 0; c < columns; ++c) {
      acc[c] += static_cast<double>(x_row[c]) * y_value;
    }
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void narrow_chunk_impl(
    const scalar_t* __restrict x, int64_t ldx, const scalar_t* __restrict y, int64_t ldy,
    int64_t row_begin, int64_t row_end, int64_t m, double* __restrict partial) {
  const int64_t tile_rows = std::clamp<int64_t>(
      kNarrowTileBytes / (static_cast<int64_t>(sizeof(scalar_t)) * std::max<int64_t>(ldx, 1)), 64,
      kMinChunkRows);
  for (int64_t tile = row_begin; tile < row_end; tile += tile_rows) {
    const int64_t tile_end = std::min(row_end, tile + tile_rows);
    for (int64_t i0 = 0; i0 < m; i0 += kNarrowGroup) {
      const int64_t width = std::min(kNarrowGroup, m - i0);
      double acc[kNarrowGroup] = {};
      if (width == kNarrowGroup) {
        narrow_group<scalar_t, true>(x, ldx, y, ldy, tile, tile_end, i0, width, acc);
      } else {
        narrow_group<scalar_t, false>(x, ldx, y, ldy, tile, tile_end, i0, width, acc);
      }
      for (int64_t c = 0; c < width; ++c) {
        partial[i0 + c] += acc[c];
      }
    }
  }
}

IMC_MULTIVERSION
void narrow_chunk(const float* x, int64_t ldx, const float* y, int64_t ldy, int64_t row_begin,
                  int64_t row_end, int64_t m, double* partial) {
  narrow_chunk_impl(x, ldx, y, ldy, row_begin, row_end, m, partial);
}

IMC_MULTIVERSION
void narrow_chunk(const double* x, int64_t ldx, const double* y, int64_t ldy, int64_t row_begin,
                  int64_t row_end, int64_t m, double* partial) {
  narrow_chunk_impl(x, ldx, y, ldy, row_begin, row_end, m, partial);
}

// out[i * out_stride] = sum_r x[r, i] y[r] for i < m, in fp64; n > 0.
template <typename scalar_t>
void tsmm_narrow_kernel(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy,
                        int64_t n, int64_t m, double* out, int64_t out_stride) {
  const RowChunks chunks =
      run_row_chunks(n, m, [&](int64_t row_begin, int64_t row_end, double* partial) {
        narrow_chunk(x, ldx, y, ldy, row_begin, row_end, m, partial);
      });
  for (int64_t i = 0; i < m; ++i) {
    out[i * out_stride] = chunks.chunk_sum(i);
  }
}

// x^T y for a narrow y (2 <= b <= 8 columns) against any m: the orthogonalization of a block
// of 2-8 vectors against the Lanczos basis, and the block's own Gram. The general kernel pads
// to its register block and converts both operands through fp64 tiles; at n = 266,610, b = 4,
// one Zen 5 thread that took 15.6 ms for m = 128, where one read of x takes 4.2 ms. Here each
// row of x is converted in registers, 8 values at a time, and multiplied by the row of y
// broadcast (padded to kB = 2, 4 or 8 columns with zeros): kB x kVecs 8-wide fp64
// accumulators, 64 doubles (8 AVX-512 registers), per group of 8 kVecs columns of x. Row
// chunks, tiles and the chunk-order sum of the partials as in the narrow kernel above, so the
// result is bitwise the same for any thread count.
#if defined(__GNUC__)
typedef double Vec8d __attribute__((vector_size(64)));
typedef double Vec2d __attribute__((vector_size(16)));
typedef float Vec8f __attribute__((vector_size(32)));

inline __attribute__((always_inline)) Vec8d load8(const float* p) {
  Vec8f v;
  __builtin_memcpy(&v, p, sizeof(Vec8f));
  return __builtin_convertvector(v, Vec8d);
}

inline __attribute__((always_inline)) Vec8d load8(const double* p) {
  Vec8d v;
  __builtin_memcpy(&v, p, sizeof(Vec8d));
  return v;
}

// The first `count` (< 8) values of p, zeros after: the last, partial vector of a row. With
// kTail = 2 or 4 (blocks of two or four columns, the common cases) one short vector load;
// otherwise kTail = 0 and a scalar loop over the runtime count (n = 266,610, one thread:
// m = 10, b = 2 0.6 ms with the 2-wide load, 2.5 ms without; m = b = 4 0.7 ms, where the
// general kernel took 1.6 ms).
template <int kTail, typename scalar_t>
inline __attribute__((always_inline)) Vec8d load_partial8(const scalar_t* p, int64_t count) {
#if defined(IMC_HAS_SHUFFLEVECTOR)
  if constexpr (kTail == 2 || kTail == 4) {
    Vec4d low;
    if constexpr (kTail == 2) {
      typedef scalar_t Vec2 __attribute__((vector_size(2 * sizeof(scalar_t))));
      Vec2 raw;
      __builtin_memcpy(&raw, p, sizeof(raw));
      const Vec2d pair = __builtin_convertvector(raw, Vec2d);
      const Vec2d zeros = {};
      low = __builtin_shufflevector(pair, zeros, 0, 1, 2, 2);
    } else {
      typedef scalar_t Vec4 __attribute__((vector_size(4 * sizeof(scalar_t))));
      Vec4 raw;
      __builtin_memcpy(&raw, p, sizeof(raw));
      low = __builtin_convertvector(raw, Vec4d);
    }
    const Vec4d zero = {};
    return __builtin_shufflevector(low, zero, 0, 1, 2, 3, 4, 4, 4, 4);
  }
#endif
  Vec8d v = {};
  for (int64_t c = 0; c < count; ++c) {
    v[c] = static_cast<double>(p[c]);
  }
  return v;
}

// Rows of x combined together: each accumulator is loaded from and stored to L1 once per
// kSkinnyRows rows (measured at m = 64-128, b = 4: 8 rows 3.3 / 6.9 ms, 4 rows 3.8 / 7.8 ms,
// 2 rows 4.8 / 10.7 ms).
constexpr int64_t kSkinnyRows = 8;
// Rows prefetched ahead by software. x is often a column slice of a wider buffer, or rows of a
// few hundred bytes read a vector at a time across several rows: the hardware prefetchers did
// not follow either pattern (m = 128, b = 4, contiguous: 27 ms without, 6.9 ms with; 4 to 32
// rows ahead all within 10 percent).
constexpr int64_t kSkinnyPrefetch = 16;

// acc[(v * kB + j) * 8 + l] += sum over rows [row_begin, row_end) of
// x[r, 8 v + l] * y[r, j], kRows rows per sweep over the columns.
template <typename scalar_t, int kB, int kRows, int kTail>
inline __attribute__((always_inline)) void skinny_rows(
    const scalar_t* __restrict x, int64_t ldx, const scalar_t* __restrict y, int64_t ldy,
    int64_t b, int64_t row_begin, int64_t row_end, int64_t m, double* __restrict acc) {
  const int64_t full = m / 8;
  const int64_t tail = m - 8 * full;
  for (int64_t r = row_begin; r + kRows <= row_end; r += kRows) {
    double y_rows[kRows][kB];
    const scalar_t* x_rows[kRows];
    for (int rr = 0; rr < kRows; ++rr) {
      for (int j = 0; j < kB; ++j) {
        y_rows[rr][j] = j < b ? static_cast<double>(y[(r + rr) * ldy + j]) : 0.0;
      }
      x_rows[rr] = x + (r + rr) * ldx;
    }
    int64_t v = 0;
    if constexpr (kRows > 1 && kB <= 4) {
      // Two vectors of columns per sweep: 2 kB independent accumulator chains, enough to keep
      // both FMA pipes busy (kB = 4 alone left them half idle, waiting on FMA latency). Each
      // lane still sums its rows in order, so the bits are those of one vector per sweep.
      // n = 266,610, b = 4, float32, one Zen 5 thread: m = 128 6.5 -> 5.2 ms, m = 32
      // 3.2 -> 2.7 ms (a read of the 132-wide basis rows: ~4 ms).
      for (; v + 1 < full; v += 2) {
        for (int rr = 0; rr < kRows; ++rr) {
          __builtin_prefetch(x_rows[rr] + 8 * v + kSkinnyPrefetch * ldx);
          __builtin_prefetch(x_rows[rr] + 8 * v + 15 + kSkinnyPrefetch * ldx);
        }
        double* a_ptr = acc + v * kB * 8;
        Vec8d a[2][kB];
        __builtin_memcpy(a, a_ptr, sizeof(a));
        for (int rr = 0; rr < kRows; ++rr) {
          const Vec8d x0 = load8(x_rows[rr] + 8 * v);
          const Vec8d x1 = load8(x_rows[rr] + 8 * v + 8);
          for (int j = 0; j < kB; ++j) {
            a[0][j] += y_rows[rr][j] * x0;
            a[1][j] += y_rows[rr][j] * x1;
          }
        }
        __builtin_memcpy(a_ptr, a, sizeof(a));
      }
    }
    for (; v <= full; ++v) {
      if (v == full && tail == 0) {
        break;
      }
      if (kRows > 1) {
        for (int rr = 0; rr < kRows; ++rr) {
          // First and last value of the vector: it may straddle two cache lines.
          __builtin_prefetch(x_rows[rr] + 8 * v + kSkinnyPrefetch * ldx);
          __builtin_prefetch(x_rows[rr] + 8 * v + 7 + kSkinnyPrefetch * ldx);
        }
      }
      double* a_ptr = acc + v * kB * 8;
      Vec8d a[kB];
      __builtin_memcpy(a, a_ptr, sizeof(a));
      for (int rr = 0; rr < kRows; ++rr) {
        const Vec8d x_vec =
            v < full ? load8(x_rows[rr] + 8 * v) : load_partial8<kTail>(x_rows[rr] + 8 * v, tail);
        for (int j = 0; j < kB; ++j) {
          a[j] += y_rows[rr][j] * x_vec;
        }
      }
      __builtin_memcpy(a_ptr, a, sizeof(a));
    }
  }
}

template <typename scalar_t, int kB>
inline __attribute__((always_inline)) void skinny_chunk_impl(
    const scalar_t* __restrict x, int64_t ldx, const scalar_t* __restrict y, int64_t ldy,
    int64_t b, int64_t row_begin, int64_t row_end, int64_t m, double* __restrict acc) {
  const int64_t rows = row_end - row_begin;
  const int64_t blocked_end = row_begin + rows / kSkinnyRows * kSkinnyRows;
  if (m % 8 == 4) {
    skinny_rows<scalar_t, kB, kSkinnyRows, 4>(x, ldx, y, ldy, b, row_begin, blocked_end, m, acc);
    skinny_rows<scalar_t, kB, 1, 4>(x, ldx, y, ldy, b, blocked_end, row_end, m, acc);
  } else if (m % 8 == 2) {
    skinny_rows<scalar_t, kB, kSkinnyRows, 2>(x, ldx, y, ldy, b, row_begin, blocked_end, m, acc);
    skinny_rows<scalar_t, kB, 1, 2>(x, ldx, y, ldy, b, blocked_end, row_end, m, acc);
  } else {
    skinny_rows<scalar_t, kB, kSkinnyRows, 0>(x, ldx, y, ldy, b, row_begin, blocked_end, m, acc);
    skinny_rows<scalar_t, kB, 1, 0>(x, ldx, y, ldy, b, blocked_end, row_end, m, acc);
  }
}

// GCC does not multiversion templates: one plain function per dtype and padded width.
#define IMC_SKINNY_CHUNK(NAME, SCALAR, KB)                                                      \
  IMC_MULTIVERSION                                                                              \
  void NAME(const SCALAR* x, int64_t ldx, const SCALAR* y, int64_t ldy, int64_t b,              \
            int64_t row_begin, int64_t row_end, int64_t m, double* partial) {                   \
    skinny_chunk_impl<SCALAR, KB>(x, ldx, y, ldy, b, row_begin, row_end, m, partial);           \
  }
IMC_SKINNY_CHUNK(skinny_chunk_2, float, 2)
IMC_SKINNY_CHUNK(skinny_chunk_4, float, 4)
IMC_SKINNY_CHUNK(skinny_chunk_8, float, 8)
IMC_SKINNY_CHUNK(skinny_chunk_2, double, 2)
IMC_SKINNY_CHUNK(skinny_chunk_4, double, 4)
IMC_SKINNY_CHUNK(skinny_chunk_8, double, 8)
#undef IMC_SKINNY_CHUNK

constexpr int64_t kSkinnyMaxColumns = 8;

// out[i * out_row_stride + j * out_col_stride] = sum_r x[r, i] y[r, j], for 2 <= b <= 8, n > 0.
template <typename scalar_t>
void tsmm_skinny_kernel(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy,
                        int64_t n, int64_t m, int64_t b, double* out, int64_t out_row_stride,
                        int64_t out_col_stride) {
  const int64_t width = b <= 2 ? 2 : (b <= 4 ? 4 : 8);
  // Each chunk's accumulators: (ceil(m / 8), width, 8) doubles, lane l of vector (v, j)
  // holding column 8 v + l of x against column j of y.
  const int64_t partial_size = (m + 7) / 8 * width * 8;
  const RowChunks chunks =
      run_row_chunks(n, partial_size, [&](int64_t row_begin, int64_t row_end, double* partial) {
        if (width == 2) {
          skinny_chunk_2(x, ldx, y, ldy, b, row_begin, row_end, m, partial);
        } else if (width == 4) {
          skinny_chunk_4(x, ldx, y, ldy, b, row_begin, row_end, m, partial);
        } else {
          skinny_chunk_8(x, ldx, y, ldy, b, row_begin, row_end, m, partial);
        }
      });
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < b; ++j) {
      out[i * out_row_stride + j * out_col_stride] =
          chunks.chunk_sum((i / 8 * width + j) * 8 + i % 8);
    }
  }
}
#endif

#if defined(__GNUC__)
// x^T y for a column-major x (each column contiguous: rows of x_t, the transposed storage of
// single-vector Lanczos on the CPU) and one column y. Each column of x is dotted with y,
// kDotRows columns at a time so that a vector of y, converted once, serves all of them; the
// dots run in 8-wide fp64 accumulators, their lanes summed in a fixed order. Row chunks and
// partials as the other kernels: bitwise the same for any thread count. The general path
// copied x to row-major first (a transpose of the whole basis); the Python path upcast it in
// 16,384-row chunks (m = 20, n = 266,610, one thread: ~4 ms per projection).
constexpr int64_t kDotRows = 8;

// Pairwise lane sum in a fixed order.
inline __attribute__((always_inline)) double lane_sum8(const Vec8d& v) {
#if defined(IMC_HAS_SHUFFLEVECTOR)
  const Vec4d half = __builtin_shufflevector(v, v, 0, 1, 2, 3) +
                     __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const Vec2d quarter = __builtin_shufflevector(half, half, 0, 1) +
                        __builtin_shufflevector(half, half, 2, 3);
  return quarter[0] + quarter[1];
#else
  double lanes[8];
  __builtin_memcpy(lanes, &v, sizeof(lanes));
  for (int width = 4; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  return lanes[0];
#endif
}

// Bytes ahead prefetched in each column the dots stream: kDotRows columns at once are more
// streams than the hardware prefetchers keep up with.
constexpr int64_t kColumnPrefetchBytes = 1024;

template <typename scalar_t, int kRows>
inline __attribute__((always_inline)) void column_dots(const scalar_t* __restrict x_t,
                                                       int64_t ldxt, const scalar_t* __restrict y,
                                                       int64_t begin, int64_t end,
                                                       double* __restrict out) {
  Vec8d acc[kRows] = {};
  const int64_t vector_end = begin + (end - begin) / 8 * 8;
  for (int64_t r = begin; r < vector_end; r += 8) {
    const Vec8d y_vec = load8(y + r);
    for (int q = 0; q < kRows; ++q) {
      __builtin_prefetch(x_t + q * ldxt + r + kColumnPrefetchBytes / sizeof(scalar_t));
      acc[q] += load8(x_t + q * ldxt + r) * y_vec;
    }
  }
  for (int q = 0; q < kRows; ++q) {
    double sum = lane_sum8(acc[q]);
    for (int64_t r = vector_end; r < end; ++r) {
      sum += static_cast<double>(x_t[q * ldxt + r]) * static_cast<double>(y[r]);
    }
    out[q] += sum;
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void column_dots_chunk_impl(
    const scalar_t* x_t, int64_t ldxt, const scalar_t* y, int64_t m, int64_t begin, int64_t end,
    double* partial) {
  int64_t i = 0;
  for (; i + kDotRows <= m; i += kDotRows) {
    column_dots<scalar_t, kDotRows>(x_t + i * ldxt, ldxt, y, begin, end, partial + i);
  }
  for (; i < m; ++i) {
    column_dots<scalar_t, 1>(x_t + i * ldxt, ldxt, y, begin, end, partial + i);
  }
}

IMC_MULTIVERSION
void column_dots_chunk(const float* x_t, int64_t ldxt, const float* y, int64_t m, int64_t begin,
                       int64_t end, double* partial) {
  column_dots_chunk_impl(x_t, ldxt, y, m, begin, end, partial);
}

IMC_MULTIVERSION
void column_dots_chunk(const double* x_t, int64_t ldxt, const double* y, int64_t m,
                       int64_t begin, int64_t end, double* partial) {
  column_dots_chunk_impl(x_t, ldxt, y, m, begin, end, partial);
}

// out[i] = sum_r x_t[i * ldxt + r] y[r] for i < m; y contiguous; n > 0.
template <typename scalar_t>
void tsmm_column_major_kernel(const scalar_t* x_t, int64_t ldxt, const scalar_t* y, int64_t n,
                              int64_t m, double* out) {
  const RowChunks chunks =
      run_row_chunks(n, m, [&](int64_t row_begin, int64_t row_end, double* partial) {
        column_dots_chunk(x_t, ldxt, y, m, row_begin, row_end, partial);
      });
  for (int64_t i = 0; i < m; ++i) {
    out[i] = chunks.chunk_sum(i);
  }
}
#endif

template <typename scalar_t>
void tsmm_xty_best_order(const scalar_t* x, int64_t ldx, const scalar_t* y, int64_t ldy,
                         int64_t n, int64_t m, int64_t b, double* out, int64_t ldo) {
  // Work of the register blocks either way round; the transposed order writes (y^T x)^T
  // straight into `out` through the output strides.
  if (n > 0 && b == 1) {
    tsmm_narrow_kernel(x, ldx, y, ldy, n, m, out, ldo);
    return;
  }
  if (n > 0 && m == 1) {
    tsmm_narrow_kernel(y, ldy, x, ldx, n, b, out, 1);
    return;
  }
#if defined(__GNUC__)
  // The skinny kernel: the narrow side padded to 2, 4 or 8 columns, the other read 8 values
  // at a time; with both sides narrow, the order with fewer vector multiply-adds per row.
  if (n > 0 && std::min(m, b) <= kSkinnyMaxColumns && std::max(m, b) >= 4) {
    const auto work = [](int64_t wide, int64_t narrow) {
      if (narrow > kSkinnyMaxColumns) {
        return INT64_MAX;
      }
      return (wide + 7) / 8 * (narrow <= 2 ? 2 : (narrow <= 4 ? 4 : 8));
    };
    if (work(m, b) <= work(b, m)) {
      tsmm_skinny_kernel(x, ldx, y, ldy, n, m, b, out, ldo, 1);
    } else {
      tsmm_skinny_kernel(y, ldy, x, ldx, n, b, m, out, 1, ldo);
    }
    return;
  }
#endif
  const int64_t direct = round_up(m, kMR) * round_up(b, kNR);
  const int64_t swapped = round_up(b, kMR) * round_up(m, kNR);
  if (swapped < direct) {
    tsmm_xty_kernel(y, ldy, x, ldx, n, b, m, out, 1, ldo);
  } else {
    tsmm_xty_kernel(x, ldx, y, ldy, n, m, b, out, ldo, 1);
  }
}

template void tsmm_xty_kernel<float>(const float*, int64_t, const float*, int64_t, int64_t,
                                     int64_t, int64_t, double*, int64_t, int64_t);
template void tsmm_xty_kernel<double>(const double*, int64_t, const double*, int64_t, int64_t,
                                      int64_t, int64_t, double*, int64_t, int64_t);
template void tsmm_xty_best_order<float>(const float*, int64_t, const float*, int64_t, int64_t,
                                         int64_t, int64_t, double*, int64_t);
template void tsmm_xty_best_order<double>(const double*, int64_t, const double*, int64_t,
                                          int64_t, int64_t, int64_t, double*, int64_t);

}  // namespace tsmm_cpu

at::Tensor tsmm_xty_cpu(const at::Tensor& x, const at::Tensor& y) {
  tsmm_check_inputs(x, y, c10::DeviceType::CPU);
  const int64_t n = x.size(0);
  const int64_t m = x.size(1);
  const int64_t b = y.size(1);
  if (n == 0 || m == 0 || b == 0) {
    return at::zeros({m, b}, x.options().dtype(at::kDouble));
  }
#if defined(__GNUC__)
  // A column-major x against one contiguous column, or one contiguous column against another:
  // dotted column by column in place (no copies: the upcasts of the Python path allocated
  // fresh float64 vectors, whose page faults cost 0.7-0.9 ms each inside a solve).
  if (b == 1 && x.stride(0) == 1 && (m == 1 || x.stride(1) >= n) && y.stride(0) == 1) {
    at::Tensor out = at::empty({m, 1}, x.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "imc_kernels::tsmm_xty (CPU)", [&] {
      tsmm_cpu::tsmm_column_major_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), x.stride(1),
                                                   y.const_data_ptr<scalar_t>(), n, m,
                                                   out.mutable_data_ptr<double>());
    });
    return out;
  }
#endif
  // Column slices of a row-major buffer (the Lanczos basis) are read in place through their
  // row stride; other layouts are copied first.
  const at::Tensor x_rows = rows_addressable(x) ? x : x.contiguous();
  const at::Tensor y_rows = rows_addressable(y) ? y : y.contiguous();
  const int64_t ldx = n > 1 ? x_rows.stride(0) : m;
  const int64_t ldy = n > 1 ? y_rows.stride(0) : b;
  at::Tensor out = at::empty({m, b}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "imc_kernels::tsmm_xty (CPU)", [&] {
    tsmm_cpu::tsmm_xty_best_order<scalar_t>(x_rows.const_data_ptr<scalar_t>(), ldx,
                                            y_rows.const_data_ptr<scalar_t>(), ldy, n, m, b,
                                            out.mutable_data_ptr<double>(), b);
  });
  return out;
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CPU, m) { m.impl("tsmm_xty", &imc_kernels::tsmm_xty_cpu); }
