// The b x b arithmetic of imc_kernels::block_orth_step, shared by the CPU kernel (serial loops,
// csrc/lanczos/block_orth_cpu.cpp) and the CUDA kernel (the same functions spread over the
// threads of one block, csrc/lanczos/block_orth_cuda.cu), so both factor in the same order.
//
// All matrices are fp64 and row-major: the Gram G and the factors R, R^{-1} with leading
// dimension b, the coefficient matrices with their own leading dimension. Only the tall
// products are in the working dtype (float32 by default), outside this file.
//
// Cholesky failure: the row-oriented factorization stops at the first pivot that is not
// positive (or NaN) and reports its 1-based index, like LAPACK's info. The rows from the failed
// one on are then set to identity rows, so R stays upper triangular and invertible and the
// step's later products stay finite (the step is reported deficient and its Q is not used).
// Their diagonal counts as 0 in the rank check.

#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace imc_kernels::block_orth {

// DGKS threshold (Daniel, Gragg, Kaufman and Stewart 1976; ARPACK and SLEPc use it too): a
// second projection is needed only when the first removed more than 1 - 1/sqrt(2) of a column.
constexpr double kDgksEta = 0.7071067811865476;

// ||w_i||^2 before the first projection, without another pass over the block:
// ||V^T w_i||^2 + ||w_i - V V^T w_i||^2 for orthonormal V. The clamp keeps NaN (a block with
// NaN or inf must come out non-finite here: every entry of W reaches either C1 or G1).
C10_HOST_DEVICE inline double column_norm_sq(const double* coeffs_first, int64_t ldc,
                                             int64_t filled, const double* gram, int64_t b,
                                             int64_t i) {
  double sum = 0.0;
  for (int64_t r = 0; r < filled; ++r) {
    const double c = coeffs_first[r * ldc + i];
    sum += c * c;
  }
  sum += gram[i * b + i];
  return sum < 0.0 ? 0.0 : sum;
}

// Row-oriented Cholesky G = R^T R: row j of R needs rows 0..j-1 only, so a GPU block computes
// the entries of one row in parallel.
C10_HOST_DEVICE inline double cholesky_pivot(const double* gram, const double* factor, int64_t b,
                                             int64_t j) {
  double pivot = gram[j * b + j];
  for (int64_t k = 0; k < j; ++k) {
    pivot -= factor[k * b + j] * factor[k * b + j];
  }
  return pivot;
}

C10_HOST_DEVICE inline double cholesky_entry(const double* gram, const double* factor, int64_t b,
                                             int64_t j, int64_t l, double diagonal) {
  double sum = gram[j * b + l];
  for (int64_t k = 0; k < j; ++k) {
    sum -= factor[k * b + j] * factor[k * b + l];
  }
  return sum / diagonal;
}

// Column j of R^{-1} (R upper triangular, nonzero diagonal) by back substitution; writes the
// whole column, zeros below the diagonal. Columns are independent: one GPU thread each.
C10_HOST_DEVICE inline void invert_upper_column(const double* factor, int64_t b, int64_t j,
                                                double* inverse) {
  for (int64_t i = j + 1; i < b; ++i) {
    inverse[i * b + j] = 0.0;
  }
  inverse[j * b + j] = 1.0 / factor[j * b + j];
  for (int64_t i = j - 1; i >= 0; --i) {
    double sum = 0.0;
    for (int64_t k = i + 1; k <= j; ++k) {
      sum += factor[i * b + k] * inverse[k * b + j];
    }
    inverse[i * b + j] = -sum / factor[i * b + i];
  }
}

// (R2 R1)_ij for upper triangular R2, R1: the coupling B of the step.
C10_HOST_DEVICE inline double upper_product_entry(const double* left, const double* right,
                                                  int64_t b, int64_t i, int64_t j) {
  double sum = 0.0;
  for (int64_t k = i; k <= j; ++k) {
    sum += left[i * b + k] * right[k * b + j];
  }
  return sum;
}

// One row of C = C1 + C2 R1, in place over the row of C2 (`row` holds C2 on entry). Columns
// run from the last: column j reads C2 entries 0..j, which are still unchanged.
C10_HOST_DEVICE inline void combine_coeffs_row(const double* first_row, double* row,
                                               const double* factor, int64_t b) {
  for (int64_t j = b - 1; j >= 0; --j) {
    double sum = 0.0;
    for (int64_t k = 0; k <= j; ++k) {
      sum += row[k] * factor[k * b + j];
    }
    row[j] = first_row[j] + sum;
  }
}

}  // namespace imc_kernels::block_orth
