// CPU kernel of imc_kernels::block_orth_step: one block orthogonalization step of block
// Lanczos, BCGS2 with a Cholesky QR inside each pass (schema and math in csrc/imc_ops.cpp; the
// pure-PyTorch twin is imc_kernels/reference/block_orth.py).
//
// What runs where:
// * V^T W and the Grams: the fp64-accumulating tall-skinny kernel of tsmm_xty
//   (csrc/lanczos/tsmm_cpu.cpp), reading the basis through its row stride. The Lanczos basis
//   is a column slice of a wider row-major buffer; the Python path first copied such a view
//   (83 of 145 ms per step measured at n = 266,610, m = 33) or read whole rows.
// * W -= V C and W R^{-1}: SGEMM through ATen (MKL/OpenBLAS), the fp64 coefficients rounded
//   to the working dtype once; an O(u) relative change of the small factors, removed by the
//   second pass like the rest of the first pass's error.
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
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "block_orth_factor.h"
#include "tsmm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
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

// `coefficients` as the right operand of W -= V C in the working dtype.
template <typename scalar_t>
at::Tensor gemm_operand(const at::Tensor& coefficients) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return coefficients;
  } else {
    return coefficients.to(at::kFloat);
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> block_orth_step_impl(
    const at::Tensor& basis, int64_t filled, at::Tensor& block, at::Tensor& work, at::Tensor& q,
    at::Tensor& coeffs, at::Tensor& coeffs_first, at::Tensor& coupling,
    const std::optional<at::Tensor>& prior_norms_sq, double tau, bool auto_second_projection) {
  const int64_t n = block.size(0);
  const int64_t b = block.size(1);
  const at::Tensor basis_used = basis.narrow(1, 0, filled);
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

  at::Tensor flags = at::empty({5}, block.options().dtype(at::kInt));
  at::Tensor norms = at::empty({2, b}, block.options().dtype(at::kDouble));
  double* reference = norms.mutable_data_ptr<double>();
  double* ratio = reference + b;

  // Pass 1: C1 = V^T W, W1 = W - V C1, G1 = W1^T W1.
  if (filled > 0) {
    tsmm_cpu::tsmm_xty_best_order(v, ldv, block.const_data_ptr<scalar_t>(), ldw, n, filled, b,
                                  c1, ldc1);
    block.addmm_(basis_used, gemm_operand<scalar_t>(coeffs_first), 1.0, -1.0);
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
  at::mm_out(work, block, inverse_rounded);  // Q1 = W1 R1^{-1}

  // Pass 2: C2 = V^T Q1 (in `coeffs`), W2 = Q1 - V C2, G2 = W2^T W2.
  const bool project_twice = filled > 0 && (!auto_second_projection || cancelled);
  if (project_twice) {
    tsmm_cpu::tsmm_xty_best_order(v, ldv, work.const_data_ptr<scalar_t>(), ldk, n, filled, b,
                                  c, ldc);
    work.addmm_(basis_used, gemm_operand<scalar_t>(coeffs), 1.0, -1.0);
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
    at::mm_out(q, work, inverse_rounded);  // Q = W2 R2^{-1}
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
