// CPU kernel of imc_kernels::lanczos_vector_step: one step of single-vector Lanczos with full
// reorthogonalization against a basis stored one vector per row (schema and math in
// csrc/imc_ops.cpp; the pure-PyTorch twin is imc_kernels/reference/lanczos_vector.py).
//
// Why a kernel: on the CPU the single-vector solver stores its basis transposed, and its step
// was a chain of ~30 small ops: the local pass (two dots, two updates), the full projection,
// the Gram, a 1 x 1 Cholesky, two scalings by 1 x 1 matrices, a select for the deficient case,
// the copy into the basis slot and the copy of the product into the stored products. Each read
// and wrote the whole n-vector; at n = 266,610 (LeNet-300-100), one thread, the step took
// ~3.2 ms at 10-20 basis vectors where one read of those vectors takes about 0.5 ms. Here the
// same step is four passes over the vector and two over the basis:
//
//   1. product_out = w; the local coefficients l = V_loc^T w (fp64), one pass.
//   2. per row chunk: w -= V_loc l, then the chunk's dots C1 = V^T w over every basis row while
//      the chunk of w sits in L1 (fp64 accumulation, kernels of tsmm_cpu.cpp).
//   3. per row chunk: w -= V C1 and ||w||^2 (fp64): W1, the raw residual.
//   4. slot = W1 / ||W1||, unless the DGKS test asks for a second projection (then
//      C2 = V^T W1; slot = W1 - V C2 with its norm; slot /= its norm).
//
// Determinism: every fp64 sum runs over fixed row chunks, their partials added in chunk order
// (run_row_chunks), and every element update is independent of the others, so the result is
// bitwise the same for any thread count.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "block_orth_factor.h"
#include "tsmm_cpu.h"

// The 512-bit vector types below live in always-inline helpers, so no value of them crosses a
// call boundary of the baseline ABI; GCC warns about the ABI anyway.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void lanczos_vector_check_inputs(const at::Tensor& rows, int64_t filled, int64_t local,
                                 const at::Tensor& w,
                                 const std::optional<at::Tensor>& product_out, double tau);

namespace lanczos_vector_cpu {

using tsmm_cpu::RowChunks;
using tsmm_cpu::run_row_chunks;

// Rows of the basis combined per sweep over a chunk of the output: enough to amortize the
// load and store of the output (it stays in L1), few enough for the coefficients to stay in
// registers.
constexpr int64_t kCombineRows = 8;

#if defined(__GNUC__)
#define IMC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define IMC_ALWAYS_INLINE inline
#endif

// dst[r] = src[r] - sum_{q < kRows} coeffs[q] v[q * ldv + r] for r in [begin, end), in the
// working dtype. src may be dst. The scalar form: the tail of a row range, and the whole range
// without vector extensions.
template <typename scalar_t, int64_t kRows>
IMC_ALWAYS_INLINE void subtract_group_scalar(const scalar_t* v, int64_t ldv,
                                             const scalar_t* coeffs, const scalar_t* src,
                                             scalar_t* dst, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    scalar_t acc = src[r];
    for (int64_t q = 0; q < kRows; ++q) {
      acc -= coeffs[q] * v[q * ldv + r];
    }
    dst[r] = acc;
  }
}

#if defined(__GNUC__)
using tsmm_cpu::Vec64;

// The same with GCC/Clang vector types (64-byte vectors, one AVX-512 register): the scalar
// form with an array of row pointers was not vectorized and ran at half the speed of the dot
// pass over the same rows.
template <typename scalar_t, int64_t kRows>
IMC_ALWAYS_INLINE void subtract_group(const scalar_t* v, int64_t ldv, const scalar_t* coeffs,
                                      const scalar_t* src, scalar_t* dst, int64_t begin,
                                      int64_t end) {
  using vec_t = typename Vec64<scalar_t>::type;
  constexpr int64_t lanes = Vec64<scalar_t>::lanes;
  const int64_t vector_end = begin + (end - begin) / lanes * lanes;
  vec_t c[kRows];
  for (int64_t q = 0; q < kRows; ++q) {
    c[q] = vec_t{} + coeffs[q];
  }
  for (int64_t r = begin; r < vector_end; r += lanes) {
    vec_t acc;
    __builtin_memcpy(&acc, src + r, sizeof(vec_t));
    for (int64_t q = 0; q < kRows; ++q) {
      __builtin_prefetch(v + q * ldv + r + 1024 / sizeof(scalar_t));
      vec_t x;
      __builtin_memcpy(&x, v + q * ldv + r, sizeof(vec_t));
      acc -= c[q] * x;
    }
    __builtin_memcpy(dst + r, &acc, sizeof(vec_t));
  }
  subtract_group_scalar<scalar_t, kRows>(v, ldv, coeffs, src, dst, vector_end, end);
}
#else
template <typename scalar_t, int64_t kRows>
void subtract_group(const scalar_t* v, int64_t ldv, const scalar_t* coeffs, const scalar_t* src,
                    scalar_t* dst, int64_t begin, int64_t end) {
  subtract_group_scalar<scalar_t, kRows>(v, ldv, coeffs, src, dst, begin, end);
}
#endif

// dst = src - sum_i coeffs[i] v[i * ldv + .] over rows [begin, end), the rows of v taken in
// order in groups of kCombineRows (after the first group, dst is updated in place).
template <typename scalar_t>
IMC_ALWAYS_INLINE void subtract_rows_impl(
    const scalar_t* v, int64_t ldv, int64_t m, const scalar_t* coeffs, const scalar_t* src,
    scalar_t* dst, int64_t begin, int64_t end) {
  const scalar_t* from = src;
  int64_t i = 0;
  for (; i + kCombineRows <= m; i += kCombineRows) {
    subtract_group<scalar_t, kCombineRows>(v + i * ldv, ldv, coeffs + i, from, dst, begin, end);
    from = dst;
  }
  for (; i < m; ++i) {
    subtract_group<scalar_t, 1>(v + i * ldv, ldv, coeffs + i, from, dst, begin, end);
    from = dst;
  }
  if (from != dst) {  // m == 0
    std::copy(from + begin, from + end, dst + begin);
  }
}

IMC_MULTIVERSION
void subtract_rows(const float* v, int64_t ldv, int64_t m, const float* coeffs, const float* src,
                   float* dst, int64_t begin, int64_t end) {
  subtract_rows_impl(v, ldv, m, coeffs, src, dst, begin, end);
}

IMC_MULTIVERSION
void subtract_rows(const double* v, int64_t ldv, int64_t m, const double* coeffs,
                   const double* src, double* dst, int64_t begin, int64_t end) {
  subtract_rows_impl(v, ldv, m, coeffs, src, dst, begin, end);
}

// x^T y over a row range for m rows of x_t: the hand-vectorized kernel of tsmm_cpu.cpp where
// the compiler has vector extensions, else a scalar loop (same products, same order per dot).
template <typename scalar_t>
void dots_chunk(const scalar_t* x_t, int64_t ldxt, const scalar_t* y, int64_t m, int64_t begin,
                int64_t end, double* partial) {
#if defined(__GNUC__)
  tsmm_cpu::column_dots_chunk(x_t, ldxt, y, m, begin, end, partial);
#else
  for (int64_t i = 0; i < m; ++i) {
    double sum = 0.0;
    for (int64_t r = begin; r < end; ++r) {
      sum += static_cast<double>(x_t[i * ldxt + r]) * static_cast<double>(y[r]);
    }
    partial[i] += sum;
  }
#endif
}

// dst[r] = src[r] * factor for r in [begin, end); src may be dst.
IMC_MULTIVERSION
void scale(const float* src, float* dst, float factor, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    dst[r] = src[r] * factor;
  }
}

IMC_MULTIVERSION
void scale(const double* src, double* dst, double factor, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    dst[r] = src[r] * factor;
  }
}

// The first `count` chunk sums of `chunks` into `values` (fp64) and `cast` (rounded to the
// working dtype once, for the updates); returns the sum of their squares.
template <typename scalar_t>
double collect(const RowChunks& chunks, int64_t count, std::vector<double>& values,
               std::vector<scalar_t>& cast) {
  values.resize(static_cast<size_t>(count));
  cast.resize(static_cast<size_t>(count));
  double squares = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    values[i] = chunks.chunk_sum(i);
    cast[i] = static_cast<scalar_t>(values[i]);
    squares += values[i] * values[i];
  }
  return squares;
}

struct StepResult {
  std::vector<double> coeffs;  // (filled,): local + C1 (+ C2)
  double coupling = 0.0;
  int32_t deficient = 0;
  int32_t non_finite = 0;
  int32_t info_first = 0;
  int32_t info_second = 0;
  int32_t projections = 0;
  double reference = 0.0;
  double ratio = 0.0;
};

template <typename scalar_t>
StepResult step(scalar_t* rows, int64_t ld, int64_t n, int64_t filled, int64_t local,
                scalar_t* w, scalar_t* product_out, double tau, bool auto_second) {
  StepResult result;
  const scalar_t* v = rows;
  const scalar_t* v_local = rows + (filled - local) * ld;
  scalar_t* slot = rows + filled * ld;

  // 1. product_out = w; l = V_loc^T w.
  const RowChunks first = run_row_chunks(n, local, [&](int64_t begin, int64_t end, double* part) {
    if (product_out != nullptr) {
      std::copy(w + begin, w + end, product_out + begin);
    }
    dots_chunk(v_local, ld, w, local, begin, end, part);
  });
  std::vector<double> local_coeffs;
  std::vector<scalar_t> local_cast;
  const double prior = collect(first, local, local_coeffs, local_cast);

  // 2. w -= V_loc l, then C1 = V^T w, chunk by chunk.
  const RowChunks second =
      run_row_chunks(n, filled, [&](int64_t begin, int64_t end, double* part) {
        if (local > 0) {
          subtract_rows(v_local, ld, local, local_cast.data(), w, w, begin, end);
        }
        dots_chunk(v, ld, w, filled, begin, end, part);
      });
  std::vector<double> c1;
  std::vector<scalar_t> c1_cast;
  const double c1_sq = collect(second, filled, c1, c1_cast);

  // 3. W1 = w - V C1 (into w) and ||W1||^2.
  const RowChunks third = run_row_chunks(n, 1, [&](int64_t begin, int64_t end, double* part) {
    subtract_rows(v, ld, filled, c1_cast.data(), w, w, begin, end);
    dots_chunk(w, n, w, 1, begin, end, part);  // ||W1||^2 while the chunk is in cache
  });
  const double g1 = third.chunk_sum(0);
  const double norms_sq = std::max(c1_sq + g1, 0.0);
  result.reference = std::sqrt(norms_sq + prior);
  // Every entry of w reaches the local coefficients, C1 or ||W1||^2.
  result.non_finite = std::isfinite(result.reference) ? 0 : 1;
  result.info_first = g1 > 0.0 ? 0 : 1;  // a 1 x 1 Cholesky fails on a non-positive pivot
  const double r1 = result.info_first == 0 ? std::sqrt(g1) : 0.0;
  result.ratio = r1 / result.reference;
  const bool deficient_first = result.info_first != 0 || !(r1 > tau * result.reference);

  bool project_twice = filled > 0;
  if (project_twice && auto_second) {
    project_twice = !(r1 / std::sqrt(norms_sq) > block_orth::kDgksEta);
  }
  result.projections = filled == 0 ? 0 : (project_twice ? 2 : 1);
  result.coeffs.assign(c1.begin(), c1.end());

  // 4. The slot: W1 / ||W1||, or after a second projection (W1 - V C2) / its norm.
  double coupling = r1;
  const scalar_t* normalized_source = w;
  if (project_twice) {
    const RowChunks dots = run_row_chunks(n, filled, [&](int64_t begin, int64_t end, double* p) {
      dots_chunk(v, ld, w, filled, begin, end, p);
    });
    std::vector<double> c2;
    std::vector<scalar_t> c2_cast;
    collect(dots, filled, c2, c2_cast);
    const RowChunks norm = run_row_chunks(n, 1, [&](int64_t begin, int64_t end, double* part) {
      subtract_rows(v, ld, filled, c2_cast.data(), w, slot, begin, end);
      dots_chunk(slot, n, slot, 1, begin, end, part);
    });
    const double g2 = norm.chunk_sum(0);
    result.info_second = g2 > 0.0 ? 0 : 1;
    coupling = result.info_second == 0 ? std::sqrt(g2) : 0.0;
    for (int64_t i = 0; i < filled; ++i) {
      result.coeffs[i] += c2[i];
    }
    normalized_source = slot;
  } else {
    result.info_second = result.info_first;  // the twin's 1 x 1 Cholesky of ||W1 / r1||^2
  }
  result.deficient = (deficient_first || result.info_second != 0) ? 1 : 0;
  if (result.deficient) {
    // The raw residual for the caller's repair: W1 in the slot, C1 (with l), no coupling.
    result.coeffs.assign(c1.begin(), c1.end());
    result.coupling = 0.0;
    at::parallel_for(0, n, tsmm_cpu::kMinChunkRows, [&](int64_t begin, int64_t end) {
      std::copy(w + begin, w + end, slot + begin);
    });
  } else {
    result.coupling = coupling;
    const scalar_t factor = static_cast<scalar_t>(1.0 / coupling);
    at::parallel_for(0, n, tsmm_cpu::kMinChunkRows, [&](int64_t begin, int64_t end) {
      scale(normalized_source, slot, factor, begin, end);
    });
  }
  for (int64_t i = 0; i < local; ++i) {
    result.coeffs[filled - local + i] += local_coeffs[i];
  }
  return result;
}

}  // namespace lanczos_vector_cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lanczos_vector_step_cpu(
    at::Tensor rows, int64_t filled, int64_t local, at::Tensor w,
    std::optional<at::Tensor> product_out, double tau, bool auto_second_projection) {
  lanczos_vector_check_inputs(rows, filled, local, w, product_out, tau);
  const int64_t n = w.size(0);
  lanczos_vector_cpu::StepResult result;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "imc_kernels::lanczos_vector_step (CPU)", [&] {
    scalar_t* out = product_out.has_value() ? product_out->mutable_data_ptr<scalar_t>() : nullptr;
    result = lanczos_vector_cpu::step<scalar_t>(rows.mutable_data_ptr<scalar_t>(), rows.stride(0),
                                                n, filled, local, w.mutable_data_ptr<scalar_t>(),
                                                out, tau, auto_second_projection);
  });
  const auto f64 = rows.options().dtype(at::kDouble);
  at::Tensor coeffs = at::empty({filled}, f64);
  std::copy(result.coeffs.begin(), result.coeffs.end(), coeffs.mutable_data_ptr<double>());
  at::Tensor coupling = at::empty({}, f64);
  *coupling.mutable_data_ptr<double>() = result.coupling;
  at::Tensor flags = at::empty({5}, rows.options().dtype(at::kInt));
  int32_t* f = flags.mutable_data_ptr<int32_t>();
  f[0] = result.deficient;
  f[1] = result.non_finite;
  f[2] = result.info_first;
  f[3] = result.info_second;
  f[4] = result.projections;
  at::Tensor norms = at::empty({2}, f64);
  norms.mutable_data_ptr<double>()[0] = result.reference;
  norms.mutable_data_ptr<double>()[1] = result.ratio;
  return {coeffs, coupling, flags, norms};
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CPU, m) {
  m.impl("lanczos_vector_step", &imc_kernels::lanczos_vector_step_cpu);
}
