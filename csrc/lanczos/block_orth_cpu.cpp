// CPU kernel of imc_kernels::block_orth_step: one block orthogonalization step of block
// Lanczos, BCGS2 with a Cholesky QR inside each pass (schema and math in csrc/imc_ops.cpp; the
// pure-PyTorch twin is imc_kernels/reference/block_orth.py).
//
// What runs where:
// * V^T W and the Grams: the fp64-accumulating tall-skinny kernel of tsmm_xty
//   (csrc/lanczos/tsmm_cpu.cpp), reading the basis through its row stride. The Lanczos basis
//   is a column slice of a wider row-major buffer; the Python path first copied such a view
//   (83 of 145 ms per step measured at n = 266,610, m = 33) or read whole rows.
// * W -= V C: a row-streaming loop (subtract_combination below; MKL's SGEMM reached a fraction
//   of the bandwidth on this shape), the fp64 coefficients rounded to the working dtype once;
//   an O(u) relative change of the small factors, removed by the second pass like the rest of
//   the first pass's error; rows of V prefetched ahead in software (the basis slice is a short
//   run of bytes at a long stride, which the hardware prefetchers do not follow). W R^{-1}
//   (b x b): a row loop in b-wide vectors for b = 2, 4, 8, scalar for other b <= 16, oneDNN
//   or ATen beyond (apply_inverse_factor). Together, one step at n = 266,610, b = 4, one Zen 5
//   thread, one projection: 12 against 31 ms at filled = 124, 5 against 16 ms at filled = 4.
// * The b x b work (norms, Cholesky, inverses, rank and DGKS tests, C and B): serial fp64
//   loops from block_orth_factor.h, shared with the CUDA kernel. For b <= 64 it costs a few
//   microseconds, against the milliseconds of the tall passes.
//
// Allocation per call: the tsmm partials and tiles (std::vector, as tsmm_xty), a few b x b
// doubles of scratch, the (filled, b) and (b, b) factors rounded to float32 for the GEMMs
// (not for float64 data), and the two small result tensors. Nothing of size n.
//
// Determinism: the tsmm kernel is bitwise deterministic for any thread count, the small loops
// are serial, and the GEMMs are those of the Python path.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../gemm/gemm_cpu.h"
#include "block_orth_factor.h"
#include "tsmm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void block_orth_check_inputs(const at::Tensor& basis, int64_t filled, const at::Tensor& block,
                             const at::Tensor& work, const at::Tensor& q,
                             const at::Tensor& coeffs, const at::Tensor& coeffs_first,
                             const at::Tensor& coupling,
                             const std::optional<at::Tensor>& prior_norms_sq, double tau,
                             c10::DeviceType device_type);

namespace block_orth_cpu {

// Row stride of a rows-addressable 2-D tensor (see rows_addressable in imc_ops.cpp); with one
// row it is never used to step, so any value >= the width will do.
int64_t row_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1);
}

// Serial Cholesky G = R^T R (upper, fp64) with the failure convention of
// block_orth_factor.h. `diagonal` receives R_ii, or 0 from the failed pivot on. Returns 0 or
// the 1-based index of the failed pivot.
int32_t cholesky_upper(const double* gram, int64_t b, double* factor, double* diagonal) {
  std::fill(factor, factor + b * b, 0.0);
  int64_t failed = 0;
  for (int64_t j = 0; j < b; ++j) {
    const double pivot = block_orth::cholesky_pivot(gram, factor, b, j);
    if (!(pivot > 0.0)) {  // also NaN
      failed = j + 1;
      break;
    }
    const double root = std::sqrt(pivot);
    factor[j * b + j] = root;
    for (int64_t l = j + 1; l < b; ++l) {
      factor[j * b + l] = block_orth::cholesky_entry(gram, factor, b, j, l, root);
    }
  }
  for (int64_t i = 0; i < b; ++i) {
    if (failed != 0 && i >= failed - 1) {
      factor[i * b + i] = 1.0;  // identity rows: the rows below were never written
      diagonal[i] = 0.0;
    } else {
      diagonal[i] = factor[i * b + i];
    }
  }
  return static_cast<int32_t>(failed);
}

// R^{-1} in fp64 and rounded to the working dtype in `rounded` (a (b, b) tensor).
template <typename scalar_t>
void invert_upper(const double* factor, int64_t b, double* inverse, at::Tensor& rounded) {
  for (int64_t j = 0; j < b; ++j) {
    block_orth::invert_upper_column(factor, b, j, inverse);
  }
  scalar_t* out = rounded.mutable_data_ptr<scalar_t>();
  for (int64_t k = 0; k < b * b; ++k) {
    out[k] = static_cast<scalar_t>(inverse[k]);
  }
}

// W -= V C, streamed row by row. MKL's SGEMM runs this tall-skinny shape (V: n x filled with
// filled <= ~500, C: filled x b with b <= 64) at a fraction of the memory bandwidth: at
// n = 266,610, filled = 124, b = 4, one thread, 27-37 ms against 5-11 ms for one read of V
// (the update is memory-bound: filled * b flops per filled values read). Here each row of V is
// read once and dotted with the b columns of C (kept transposed, rounded to the working dtype
// once, as the GEMM did), four columns at a time in vector registers. Fixed order, so the
// result is bitwise the same for any thread count.

// Columns of C handled together: four accumulators, the row's vector loaded once for them.
constexpr int64_t kCombineColumns = 4;

#if defined(__GNUC__)
typedef float Vec8f __attribute__((vector_size(32)));
typedef double Vec4d __attribute__((vector_size(32)));

// The four lane sums of acc[0..3], in a fixed order (the same bits on every call): halves
// added, then two transposing shuffle-add steps; the scalar fallback adds in the same order.
#if defined(IMC_HAS_SHUFFLEVECTOR)
typedef float Vec4f __attribute__((vector_size(16)));
typedef double Vec2d __attribute__((vector_size(16)));

inline __attribute__((always_inline)) void sum_lanes4(const Vec8f* acc, float* out) {
  Vec4f u[4];
  for (int q = 0; q < 4; ++q) {
    u[q] = __builtin_shufflevector(acc[q], acc[q], 0, 1, 2, 3) +
           __builtin_shufflevector(acc[q], acc[q], 4, 5, 6, 7);
  }
  const Vec4f p = __builtin_shufflevector(u[0], u[1], 0, 4, 1, 5) +
                  __builtin_shufflevector(u[0], u[1], 2, 6, 3, 7);
  const Vec4f q = __builtin_shufflevector(u[2], u[3], 0, 4, 1, 5) +
                  __builtin_shufflevector(u[2], u[3], 2, 6, 3, 7);
  const Vec4f r = __builtin_shufflevector(p, q, 0, 1, 4, 5) +
                  __builtin_shufflevector(p, q, 2, 3, 6, 7);
  __builtin_memcpy(out, &r, sizeof(r));
}

inline __attribute__((always_inline)) void sum_lanes4(const Vec4d* acc, double* out) {
  Vec2d u[4];
  for (int q = 0; q < 4; ++q) {
    u[q] = __builtin_shufflevector(acc[q], acc[q], 0, 1) +
           __builtin_shufflevector(acc[q], acc[q], 2, 3);
  }
  const Vec2d p = __builtin_shufflevector(u[0], u[1], 0, 2) +
                  __builtin_shufflevector(u[0], u[1], 1, 3);
  const Vec2d q = __builtin_shufflevector(u[2], u[3], 0, 2) +
                  __builtin_shufflevector(u[2], u[3], 1, 3);
  __builtin_memcpy(out, &p, sizeof(p));
  __builtin_memcpy(out + 2, &q, sizeof(q));
}
#else
// Lane l of the half-sum is acc[l] + acc[l + half]; then pairs (0, 2) and (1, 3): the order of
// the shuffle version above.
template <typename scalar_t, typename vec_t>
inline __attribute__((always_inline)) void sum_lanes4(const vec_t* acc, scalar_t* out) {
  constexpr int lanes = sizeof(vec_t) / sizeof(scalar_t);
  for (int q = 0; q < 4; ++q) {
    scalar_t v[lanes];
    __builtin_memcpy(v, &acc[q], sizeof(v));
    scalar_t half[lanes / 2];
    for (int l = 0; l < lanes / 2; ++l) {
      half[l] = v[l] + v[l + lanes / 2];
    }
    if constexpr (lanes == 8) {
      out[q] = (half[0] + half[2]) + (half[1] + half[3]);
    } else {
      out[q] = half[0] + half[1];
    }
  }
}
#endif

// Rows of V prefetched ahead of the one being combined. The basis is a column slice of a
// wider buffer: each row is a short run of cache lines at a long stride, which the hardware
// prefetchers do not follow (at n = 266,610, filled = 32 of 136 columns, one Zen 5 thread,
// this loop ran at a fifth of the memory bandwidth without it).
constexpr int64_t kPrefetchRows = 16;

template <typename scalar_t, typename vec_t>
inline __attribute__((always_inline)) void subtract_combination_rows_impl(
    const scalar_t* __restrict v, int64_t ldv, int64_t filled,
    const scalar_t* __restrict coeffs_t, int64_t b_pad, scalar_t* __restrict w, int64_t ldw,
    int64_t b, int64_t row_begin, int64_t row_end) {
  constexpr int64_t lanes = sizeof(vec_t) / sizeof(scalar_t);
  const int64_t vector_end = filled / lanes * lanes;
  const int64_t row_bytes = filled * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (r + kPrefetchRows < row_end) {
      // Every cache line the row touches: it need not start on a line boundary.
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(v + (r + kPrefetchRows) * ldv);
      for (uintptr_t line = ahead & ~uintptr_t{63}; line < ahead + row_bytes; line += 64) {
        __builtin_prefetch(reinterpret_cast<const void*>(line));
      }
    }
    const scalar_t* row = v + r * ldv;
    scalar_t* out = w + r * ldw;
    for (int64_t j0 = 0; j0 < b_pad; j0 += kCombineColumns) {
      const scalar_t* c0 = coeffs_t + j0 * filled;
      vec_t acc[kCombineColumns] = {};
      for (int64_t i = 0; i < vector_end; i += lanes) {
        vec_t x;
        __builtin_memcpy(&x, row + i, sizeof(vec_t));
        for (int64_t q = 0; q < kCombineColumns; ++q) {
          vec_t c;
          __builtin_memcpy(&c, c0 + q * filled + i, sizeof(vec_t));
          acc[q] += x * c;
        }
      }
      scalar_t sums[kCombineColumns];
      sum_lanes4(acc, sums);
      for (int64_t q = 0; q < kCombineColumns && j0 + q < b; ++q) {
        scalar_t sum = sums[q];
        for (int64_t i = vector_end; i < filled; ++i) {
          sum += row[i] * c0[q * filled + i];
        }
        out[j0 + q] -= sum;
      }
    }
  }
}

IMC_MULTIVERSION
void subtract_combination_rows(const float* v, int64_t ldv, int64_t filled,
                               const float* coeffs_t, int64_t b_pad, float* w, int64_t ldw,
                               int64_t b, int64_t row_begin, int64_t row_end) {
  subtract_combination_rows_impl<float, Vec8f>(v, ldv, filled, coeffs_t, b_pad, w, ldw, b,
                                               row_begin, row_end);
}

IMC_MULTIVERSION
void subtract_combination_rows(const double* v, int64_t ldv, int64_t filled,
                               const double* coeffs_t, int64_t b_pad, double* w, int64_t ldw,
                               int64_t b, int64_t row_begin, int64_t row_end) {
  subtract_combination_rows_impl<double, Vec4d>(v, ldv, filled, coeffs_t, b_pad, w, ldw, b,
                                                row_begin, row_end);
}
#else
template <typename scalar_t>
void subtract_combination_rows(const scalar_t* v, int64_t ldv, int64_t filled,
                               const scalar_t* coeffs_t, int64_t b_pad, scalar_t* w,
                               int64_t ldw, int64_t b, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t j = 0; j < b; ++j) {
      scalar_t sum = 0;
      for (int64_t i = 0; i < filled; ++i) {
        sum += v[r * ldv + i] * coeffs_t[j * filled + i];
      }
      w[r * ldw + j] -= sum;
    }
  }
}
#endif

// W (n x b, row stride ldw) -= V[:, :filled] C with C (filled x b, fp64, row stride ldc)
// rounded to scalar_t. `coeffs_t` is caller scratch of round_up(b, 4) * filled values.
template <typename scalar_t>
void subtract_combination(const scalar_t* v, int64_t ldv, int64_t n, int64_t filled,
                          const double* coefficients, int64_t ldc, scalar_t* w, int64_t ldw,
                          int64_t b, std::vector<scalar_t>& coeffs_t) {
  const int64_t b_pad = (b + kCombineColumns - 1) / kCombineColumns * kCombineColumns;
  coeffs_t.assign(static_cast<size_t>(b_pad * filled), scalar_t(0));
  for (int64_t i = 0; i < filled; ++i) {
    for (int64_t j = 0; j < b; ++j) {
      coeffs_t[j * filled + i] = static_cast<scalar_t>(coefficients[i * ldc + j]);
    }
  }
  // Rows per task: enough that a task reads ~1 MiB of V, so scheduling costs nothing.
  const int64_t grain = std::max<int64_t>(
      256, (int64_t{1} << 20) / static_cast<int64_t>(sizeof(scalar_t)) / std::max<int64_t>(ldv, 1));
  const scalar_t* coeffs_data = coeffs_t.data();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    subtract_combination_rows(v, ldv, filled, coeffs_data, b_pad, w, ldw, b, begin, end);
  });
}

// out = in R^{-1} for the n x b block `in` (contiguous) and the b x b inverse factor; `out` is
// the contiguous `work` buffer or the basis slot (a column slice of the row-major basis).
// Measured at n = 266,610, b = 4, one Zen 5 core: MKL's sgemm takes 1.35 ms into a contiguous
// buffer and 7.5 ms into the basis slot (row stride 132), oneDNN 0.30 ms (contiguous only).
// Narrow blocks go row by row here instead: b^2 multiply-adds per row, as fast as the memory
// traffic, for either destination, in a fixed order (bitwise the same for any thread count).
// Wider blocks: oneDNN (float32, csrc/gemm) or at::mm.
constexpr int64_t kRowLoopMaxColumns = 16;

#if defined(__GNUC__)
// Rows [begin, end) of y = x R^{-1} for a block of exactly kB columns: R^{-1}'s rows held in
// kB-wide vectors, each output row the sum over t of x[i, t] times row t, in the order of the
// scalar loop below.
template <typename scalar_t, int kB>
inline __attribute__((always_inline)) void apply_inverse_rows_impl(
    const scalar_t* __restrict x, int64_t ldx, const scalar_t* __restrict r,
    scalar_t* __restrict y, int64_t ldy, int64_t begin, int64_t end) {
  typedef scalar_t VecB __attribute__((vector_size(kB * sizeof(scalar_t))));
  VecB rows[kB];
  for (int t = 0; t < kB; ++t) {
    __builtin_memcpy(&rows[t], r + t * kB, sizeof(VecB));
  }
  for (int64_t i = begin; i < end; ++i) {
    VecB sum = {};
    for (int t = 0; t < kB; ++t) {
      sum += x[i * ldx + t] * rows[t];
    }
    __builtin_memcpy(y + i * ldy, &sum, sizeof(VecB));
  }
}

#define IMC_APPLY_INVERSE_ROWS(SCALAR, KB)                                                    \
  IMC_MULTIVERSION                                                                            \
  void apply_inverse_rows_##KB(const SCALAR* x, int64_t ldx, const SCALAR* r, SCALAR* y,      \
                               int64_t ldy, int64_t begin, int64_t end) {                     \
    apply_inverse_rows_impl<SCALAR, KB>(x, ldx, r, y, ldy, begin, end);                      \
  }
IMC_APPLY_INVERSE_ROWS(float, 2)
IMC_APPLY_INVERSE_ROWS(float, 4)
IMC_APPLY_INVERSE_ROWS(float, 8)
IMC_APPLY_INVERSE_ROWS(double, 2)
IMC_APPLY_INVERSE_ROWS(double, 4)
IMC_APPLY_INVERSE_ROWS(double, 8)
#undef IMC_APPLY_INVERSE_ROWS
#endif

template <typename scalar_t>
void apply_inverse_factor(const at::Tensor& out, const at::Tensor& in, const at::Tensor& inverse) {
  const int64_t n = in.size(0);
  const int64_t b = in.size(1);
  if (b > kRowLoopMaxColumns) {
    gemm_cpu::gemm_out(in, inverse, out, 0.0);  // at::mm_out where oneDNN cannot run it
    return;
  }
  const scalar_t* x = in.const_data_ptr<scalar_t>();
  const int64_t ldx = in.stride(0);
  const scalar_t* r = inverse.const_data_ptr<scalar_t>();  // (b, b) row-major
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t ldy = out.stride(0);
#if defined(__GNUC__)
  if (b == 2 || b == 4 || b == 8) {
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      if (b == 2) {
        apply_inverse_rows_2(x, ldx, r, y, ldy, begin, end);
      } else if (b == 4) {
        apply_inverse_rows_4(x, ldx, r, y, ldy, begin, end);
      } else {
        apply_inverse_rows_8(x, ldx, r, y, ldy, begin, end);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    scalar_t row[kRowLoopMaxColumns];
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t c = 0; c < b; ++c) {
        row[c] = x[i * ldx + c];
      }
      for (int64_t c = 0; c < b; ++c) {
        scalar_t sum = 0;
        for (int64_t t = 0; t < b; ++t) {
          sum += row[t] * r[t * b + c];
        }
        y[i * ldy + c] = sum;
      }
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> block_orth_step_impl(
    const at::Tensor& basis, int64_t filled, at::Tensor& block, at::Tensor& work, at::Tensor& q,
    at::Tensor& coeffs, at::Tensor& coeffs_first, at::Tensor& coupling,
    const std::optional<at::Tensor>& prior_norms_sq, double tau, bool auto_second_projection) {
  const int64_t n = block.size(0);
  const int64_t b = block.size(1);
  const scalar_t* v = basis.const_data_ptr<scalar_t>();
  const int64_t ldv = row_stride(basis);
  const int64_t ldw = row_stride(block);
  const int64_t ldk = row_stride(work);
  double* c1 = coeffs_first.mutable_data_ptr<double>();
  const int64_t ldc1 = row_stride(coeffs_first);
  double* c = coeffs.mutable_data_ptr<double>();
  const int64_t ldc = row_stride(coeffs);

  // b x b scratch: G1, R1, R1^{-1}, G2, R2, R2^{-1}; then per column ||w||^2, diag R1, diag R2.
  std::vector<double> scratch(static_cast<size_t>(6 * b * b + 3 * b));
  double* gram1 = scratch.data();
  double* factor1 = gram1 + b * b;
  double* inverse1 = factor1 + b * b;
  double* gram2 = inverse1 + b * b;
  double* factor2 = gram2 + b * b;
  double* inverse2 = factor2 + b * b;
  double* norms_sq = inverse2 + b * b;
  double* diagonal1 = norms_sq + b;
  double* diagonal2 = diagonal1 + b;
  at::Tensor inverse_rounded = at::empty({b, b}, block.options());
  std::vector<scalar_t> coeffs_rounded;  // C^T in the working dtype for W -= V C

  at::Tensor flags = at::empty({5}, block.options().dtype(at::kInt));
  at::Tensor norms = at::empty({2, b}, block.options().dtype(at::kDouble));
  double* reference = norms.mutable_data_ptr<double>();
  double* ratio = reference + b;

  // Pass 1: C1 = V^T W, W1 = W - V C1, G1 = W1^T W1.
  if (filled > 0) {
    tsmm_cpu::tsmm_xty_best_order(v, ldv, block.const_data_ptr<scalar_t>(), ldw, n, filled, b,
                                  c1, ldc1);
    subtract_combination(v, ldv, n, filled, c1, ldc1, block.mutable_data_ptr<scalar_t>(), ldw, b,
                         coeffs_rounded);
  }
  const scalar_t* w = block.const_data_ptr<scalar_t>();
  tsmm_cpu::tsmm_xty_best_order(w, ldw, w, ldw, n, b, b, gram1, b);

  const double* prior = prior_norms_sq.has_value() ? prior_norms_sq->const_data_ptr<double>()
                                                   : nullptr;
  bool non_finite = false;
  for (int64_t i = 0; i < b; ++i) {
    norms_sq[i] = block_orth::column_norm_sq(c1, ldc1, filled, gram1, b, i);
    reference[i] = std::sqrt(prior == nullptr ? norms_sq[i] : norms_sq[i] + prior[i]);
    // Every entry of W reaches C1 or G1's diagonal, hence this sum (see column_norm_sq).
    non_finite = non_finite || !std::isfinite(reference[i]);
  }
  const int32_t info1 = cholesky_upper(gram1, b, factor1, diagonal1);
  bool deficient = info1 != 0;
  bool cancelled = false;
  for (int64_t i = 0; i < b; ++i) {
    ratio[i] = diagonal1[i] / reference[i];
    // `not (R_ii > tau * ref_i)`: also true for NaN and for an exactly zero column.
    deficient = deficient || !(diagonal1[i] > tau * reference[i]);
    // R1_ii <= ||w1_i|| <= ||w_i||: one ratio covers cancellation in the projection and
    // dependence among the block's own columns.
    cancelled = cancelled || !(diagonal1[i] / std::sqrt(norms_sq[i]) > block_orth::kDgksEta);
  }
  invert_upper<scalar_t>(factor1, b, inverse1, inverse_rounded);
  apply_inverse_factor<scalar_t>(work, block, inverse_rounded);  // Q1 = W1 R1^{-1}

  // Pass 2: C2 = V^T Q1 (in `coeffs`), W2 = Q1 - V C2, G2 = W2^T W2.
  const bool project_twice = filled > 0 && (!auto_second_projection || cancelled);
  if (project_twice) {
    tsmm_cpu::tsmm_xty_best_order(v, ldv, work.const_data_ptr<scalar_t>(), ldk, n, filled, b,
                                  c, ldc);
    subtract_combination(v, ldv, n, filled, c, ldc, work.mutable_data_ptr<scalar_t>(), ldk, b,
                         coeffs_rounded);
  }
  const scalar_t* w2 = work.const_data_ptr<scalar_t>();
  tsmm_cpu::tsmm_xty_best_order(w2, ldk, w2, ldk, n, b, b, gram2, b);
  const int32_t info2 = cholesky_upper(gram2, b, factor2, diagonal2);
  deficient = deficient || info2 != 0;
  invert_upper<scalar_t>(factor2, b, inverse2, inverse_rounded);

  double* coupling_data = coupling.mutable_data_ptr<double>();
  const int64_t ldb = row_stride(coupling);
  if (deficient) {
    // The raw residual W1 and its coefficients C1 for the caller's repair; no coupling.
    q.copy_(block);
    for (int64_t r = 0; r < filled; ++r) {
      std::copy(c1 + r * ldc1, c1 + r * ldc1 + b, c + r * ldc);
    }
    for (int64_t i = 0; i < b; ++i) {
      std::fill(coupling_data + i * ldb, coupling_data + i * ldb + b, 0.0);
    }
  } else {
    apply_inverse_factor<scalar_t>(q, work, inverse_rounded);  // Q = W2 R2^{-1}
    // W = V C1 + W1 = V C1 + (V C2 + Q R2) R1 = V (C1 + C2 R1) + Q (R2 R1).
    at::parallel_for(0, filled, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (project_twice) {
          block_orth::combine_coeffs_row(c1 + r * ldc1, c + r * ldc, factor1, b);
        } else {
          std::copy(c1 + r * ldc1, c1 + r * ldc1 + b, c + r * ldc);
        }
      }
    });
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        coupling_data[i * ldb + j] =
            j < i ? 0.0 : block_orth::upper_product_entry(factor2, factor1, b, i, j);
      }
    }
  }

  int32_t* flag_data = flags.mutable_data_ptr<int32_t>();
  flag_data[0] = deficient ? 1 : 0;
  flag_data[1] = non_finite ? 1 : 0;
  flag_data[2] = info1;
  flag_data[3] = info2;
  flag_data[4] = filled == 0 ? 0 : (project_twice ? 2 : 1);
  return {flags, norms};
}

}  // namespace block_orth_cpu

std::tuple<at::Tensor, at::Tensor> block_orth_step_cpu(
    const at::Tensor& basis, int64_t filled, at::Tensor& block, at::Tensor& work, at::Tensor& q,
    at::Tensor& coeffs, at::Tensor& coeffs_first, at::Tensor& coupling,
    const std::optional<at::Tensor>& prior_norms_sq, double tau, bool auto_second_projection) {
  block_orth_check_inputs(basis, filled, block, work, q, coeffs, coeffs_first, coupling,
                          prior_norms_sq, tau, c10::DeviceType::CPU);
  // A non-contiguous prior (b values) is copied; everything else is used in place.
  std::optional<at::Tensor> prior;
  if (prior_norms_sq.has_value()) {
    prior = prior_norms_sq->contiguous();
  }
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "imc_kernels::block_orth_step (CPU)", [&] {
    result = block_orth_cpu::block_orth_step_impl<scalar_t>(basis, filled, block, work, q, coeffs,
                                                            coeffs_first, coupling, prior, tau,
                                                            auto_second_projection);
  });
  return result;
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CPU, m) {
  m.impl("block_orth_step", &imc_kernels::block_orth_step_cpu);
}
