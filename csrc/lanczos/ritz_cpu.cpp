// CPU kernel of imc_kernels::ritz_vectors: the Ritz vectors X = V S of a finished Lanczos solve
// and, from the stored products P = H V, the squared residual norms ||P s_i - theta_i x_i||^2,
// in one pass over V and P (schema and math in csrc/imc_ops.cpp; the pure-PyTorch twin is
// imc_kernels/reference/ritz.py).
//
// Why a kernel: the solver formed X with one GEMM (a fresh (n, k) result) and the residuals
// with a GEMM per 8192-row chunk of P followed by a subtraction through X's transposed (strided)
// rows and a norm: at n = 266,610, m = 21, k = 10 (LeNet-300-100, one thread) ~10 ms of a
// 0.23 s solve. Here each row of V and P is read once, X written once, and the residual never
// leaves registers.
//
// Layout: the columns of X sit in vector lanes (S is copied to an (m, lanes) buffer per group
// of `lanes` columns, padded with zeros), four rows at a time, so each basis entry is one
// broadcast multiply-add into a row's accumulator; X's rows are then contiguous stores. V and
// P are read through arbitrary strides: the CPU solver's basis is column-major for b = 1 (one
// vector per row) and row-major otherwise; the products are stored one vector per row.
//
// Arithmetic: S and theta are rounded to the working dtype once; x = sum_q V[r, q] S[q, :] and
// p = sum_q P[r, q] S[q, :] accumulate in the working dtype in q order; the residual
// p - theta x is squared and summed in fp64 over fixed row chunks whose partials are added in
// chunk order, so the result is bitwise the same for any thread count.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "tsmm_cpu.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void ritz_vectors_check_inputs(const at::Tensor& basis, const std::optional<at::Tensor>& products,
                               const at::Tensor& s, const at::Tensor& theta);

namespace ritz_cpu {

using tsmm_cpu::RowChunks;
using tsmm_cpu::run_row_chunks;
using tsmm_cpu::Vec64;

// Rows per register tile: four independent accumulator chains per operand hide the latency of
// the multiply-adds, and each padded row of S, loaded once, serves all four.
constexpr int64_t kTileRows = 4;

struct Strided {
  int64_t row;     // stride between rows r (n of them)
  int64_t column;  // stride between basis columns q (m of them)
};

// One group of columns [c0, c0 + width) of X over rows [begin, end): x rows stored into
// `out` (row stride k), residual squares added to `squares` (width entries, fp64).
// `s_group` is (m, lanes) in the working dtype, zero past `width`; `theta_group` (lanes,).
template <typename scalar_t>
inline __attribute__((always_inline)) void group_rows(
    const scalar_t* v, Strided vs, const scalar_t* p, Strided ps, int64_t m,
    const scalar_t* s_group, const scalar_t* theta_group, int64_t width, scalar_t* out,
    int64_t k, int64_t begin, int64_t end, double* squares) {
  constexpr int64_t lanes = Vec64<scalar_t>::lanes;
  double sq[lanes] = {};
#if defined(__GNUC__)
  using V = typename Vec64<scalar_t>::type;
  V theta_vec;
  std::memcpy(&theta_vec, theta_group, sizeof(V));
  int64_t r = begin;
  for (; r + kTileRows <= end; r += kTileRows) {
    V x[kTileRows] = {};
    V y[kTileRows] = {};
    for (int64_t q = 0; q < m; ++q) {
      V sv;
      std::memcpy(&sv, s_group + q * lanes, sizeof(V));
      const scalar_t* vq = v + q * vs.column + r * vs.row;
      for (int64_t t = 0; t < kTileRows; ++t) {
        x[t] += sv * vq[t * vs.row];
      }
      if (p != nullptr) {
        const scalar_t* pq = p + q * ps.column + r * ps.row;
        for (int64_t t = 0; t < kTileRows; ++t) {
          y[t] += sv * pq[t * ps.row];
        }
      }
    }
    for (int64_t t = 0; t < kTileRows; ++t) {
      std::memcpy(out + (r + t) * k, &x[t], static_cast<size_t>(width) * sizeof(scalar_t));
      if (p != nullptr) {
        scalar_t res[lanes];
        const V residual = y[t] - theta_vec * x[t];
        std::memcpy(res, &residual, sizeof(V));
        for (int64_t l = 0; l < lanes; ++l) {
          sq[l] += static_cast<double>(res[l]) * static_cast<double>(res[l]);
        }
      }
    }
  }
#else
  int64_t r = begin;
#endif
  for (; r < end; ++r) {  // the last rows (and every row without vector extensions)
    scalar_t x[lanes] = {};
    scalar_t y[lanes] = {};
    for (int64_t q = 0; q < m; ++q) {
      const scalar_t vq = v[q * vs.column + r * vs.row];
      const scalar_t pq = p != nullptr ? p[q * ps.column + r * ps.row] : scalar_t(0);
      for (int64_t l = 0; l < lanes; ++l) {
        x[l] += s_group[q * lanes + l] * vq;
        y[l] += s_group[q * lanes + l] * pq;
      }
    }
    std::memcpy(out + r * k, x, static_cast<size_t>(width) * sizeof(scalar_t));
    if (p != nullptr) {
      for (int64_t l = 0; l < lanes; ++l) {
        const scalar_t res = y[l] - theta_group[l] * x[l];
        sq[l] += static_cast<double>(res) * static_cast<double>(res);
      }
    }
  }
  for (int64_t l = 0; l < width; ++l) {
    squares[l] += sq[l];
  }
}

#if defined(__GNUC__)
// Rows of V and P contiguous (column-major (n, m) views: the single-vector solver's basis and
// the stored products, one vector per row of memory): the rows of X sit in vector lanes
// instead, each basis entry a full vector load, kWidth columns of X per sweep in registers
// (S broadcast from memory), then written through a small tile into X's rows. Each sweep
// reads one cache line of each of the 2m basis and product vectors; a software prefetch runs
// kAheadLines lines ahead in each of them (2m streams are more than the hardware prefetchers
// follow: without it the same loop ran at half the speed out of cache).
constexpr int64_t kAheadLines = 8;

template <typename scalar_t, int kWidth, bool kHasP>
inline __attribute__((always_inline)) void lane_rows(
    const scalar_t* v, int64_t ldv, const scalar_t* p, int64_t ldp, int64_t m,
    const scalar_t* s_cols, int64_t lds, const scalar_t* theta_cols, int64_t width,
    scalar_t* out, int64_t k, int64_t begin, int64_t end, double* squares) {
  using V = typename Vec64<scalar_t>::type;
  constexpr int64_t lanes = Vec64<scalar_t>::lanes;
  constexpr int64_t ahead = kAheadLines * lanes;
  double sq[kWidth][lanes] = {};
  int64_t r = begin;
  for (; r + lanes <= end; r += lanes) {
    V x[kWidth] = {};
    V y[kWidth] = {};
    for (int64_t q = 0; q < m; ++q) {
      const scalar_t* vq = v + q * ldv + r;
      V vv;
      std::memcpy(&vv, vq, sizeof(V));
      __builtin_prefetch(vq + ahead);
      V pv = {};
      if (kHasP) {
        const scalar_t* pq = p + q * ldp + r;
        std::memcpy(&pv, pq, sizeof(V));
        __builtin_prefetch(pq + ahead);
      }
      const scalar_t* sq_row = s_cols + q * lds;
      for (int c = 0; c < kWidth; ++c) {
        x[c] += vv * sq_row[c];
        if (kHasP) {
          y[c] += pv * sq_row[c];
        }
      }
    }
    scalar_t tile[kWidth][lanes];
    for (int c = 0; c < kWidth; ++c) {
      std::memcpy(tile[c], &x[c], sizeof(V));
    }
    for (int64_t l = 0; l < lanes; ++l) {
      for (int64_t c = 0; c < width; ++c) {
        out[(r + l) * k + c] = tile[c][l];
      }
    }
    if (kHasP) {
      for (int c = 0; c < kWidth; ++c) {
        const V residual = y[c] - theta_cols[c] * x[c];
        scalar_t res[lanes];
        std::memcpy(res, &residual, sizeof(V));
        for (int64_t l = 0; l < lanes; ++l) {
          sq[c][l] += static_cast<double>(res[l]) * static_cast<double>(res[l]);
        }
      }
    }
  }
  for (; r < end; ++r) {  // the last rows
    for (int64_t c = 0; c < width; ++c) {
      scalar_t x = 0;
      scalar_t y = 0;
      for (int64_t q = 0; q < m; ++q) {
        x += v[q * ldv + r] * s_cols[q * lds + c];
        if (kHasP) {
          y += p[q * ldp + r] * s_cols[q * lds + c];
        }
      }
      out[r * k + c] = x;
      if (kHasP) {
        const scalar_t res = y - theta_cols[c] * x;
        sq[c][0] += static_cast<double>(res) * static_cast<double>(res);
      }
    }
  }
  if (kHasP) {
    for (int64_t c = 0; c < width; ++c) {
      double sum = 0.0;
      for (int64_t l = 0; l < lanes; ++l) {
        sum += sq[c][l];
      }
      squares[c] += sum;
    }
  }
}

// The columns of X in sweeps of 12, 8 or 4 (S padded with zeros to the sweep's width).
template <typename scalar_t, bool kHasP>
inline __attribute__((always_inline)) void lane_sweeps(
    const scalar_t* v, int64_t ldv, const scalar_t* p, int64_t ldp, int64_t m, int64_t k,
    const scalar_t* s_cols, int64_t lds, const scalar_t* theta_cols, scalar_t* out,
    int64_t begin, int64_t end, double* squares) {
  for (int64_t c0 = 0; c0 < k;) {
    const int64_t left = k - c0;
    if (left > 8) {
      lane_rows<scalar_t, 12, kHasP>(v, ldv, p, ldp, m, s_cols + c0, lds, theta_cols + c0,
                                     std::min<int64_t>(left, 12), out + c0, k, begin, end,
                                     squares + c0);
      c0 += 12;
    } else if (left > 4) {
      lane_rows<scalar_t, 8, kHasP>(v, ldv, p, ldp, m, s_cols + c0, lds, theta_cols + c0,
                                    left, out + c0, k, begin, end, squares + c0);
      c0 += 8;
    } else {
      lane_rows<scalar_t, 4, kHasP>(v, ldv, p, ldp, m, s_cols + c0, lds, theta_cols + c0,
                                    left, out + c0, k, begin, end, squares + c0);
      c0 += 4;
    }
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void lane_chunk_impl(
    const scalar_t* v, int64_t ldv, const scalar_t* p, int64_t ldp, int64_t m, int64_t k,
    const scalar_t* s_cols, int64_t lds, const scalar_t* theta_cols, scalar_t* out,
    int64_t begin, int64_t end, double* squares) {
  if (p != nullptr) {
    lane_sweeps<scalar_t, true>(v, ldv, p, ldp, m, k, s_cols, lds, theta_cols, out, begin, end,
                                squares);
  } else {
    lane_sweeps<scalar_t, false>(v, ldv, p, ldp, m, k, s_cols, lds, theta_cols, out, begin,
                                 end, squares);
  }
}

IMC_MULTIVERSION
void lane_chunk(const float* v, int64_t ldv, const float* p, int64_t ldp, int64_t m, int64_t k,
                const float* s_cols, int64_t lds, const float* theta_cols, float* out,
                int64_t begin, int64_t end, double* squares) {
  lane_chunk_impl(v, ldv, p, ldp, m, k, s_cols, lds, theta_cols, out, begin, end, squares);
}

IMC_MULTIVERSION
void lane_chunk(const double* v, int64_t ldv, const double* p, int64_t ldp, int64_t m,
                int64_t k, const double* s_cols, int64_t lds, const double* theta_cols,
                double* out, int64_t begin, int64_t end, double* squares) {
  lane_chunk_impl(v, ldv, p, ldp, m, k, s_cols, lds, theta_cols, out, begin, end, squares);
}
#endif

template <typename scalar_t>
inline __attribute__((always_inline)) void chunk_impl(
    const scalar_t* v, Strided vs, const scalar_t* p, Strided ps, int64_t m, int64_t k,
    const scalar_t* s_padded, const scalar_t* theta_padded, scalar_t* out, int64_t begin,
    int64_t end, double* squares) {
  constexpr int64_t lanes = Vec64<scalar_t>::lanes;
  for (int64_t c0 = 0; c0 < k; c0 += lanes) {
    const int64_t group = c0 / lanes;
    group_rows(v, vs, p, ps, m, s_padded + group * m * lanes, theta_padded + c0,
               std::min(lanes, k - c0), out + c0, k, begin, end, squares + c0);
  }
}

IMC_MULTIVERSION
void chunk(const float* v, Strided vs, const float* p, Strided ps, int64_t m, int64_t k,
           const float* s_padded, const float* theta_padded, float* out, int64_t begin,
           int64_t end, double* squares) {
  chunk_impl(v, vs, p, ps, m, k, s_padded, theta_padded, out, begin, end, squares);
}

IMC_MULTIVERSION
void chunk(const double* v, Strided vs, const double* p, Strided ps, int64_t m, int64_t k,
           const double* s_padded, const double* theta_padded, double* out, int64_t begin,
           int64_t end, double* squares) {
  chunk_impl(v, vs, p, ps, m, k, s_padded, theta_padded, out, begin, end, squares);
}

template <typename scalar_t>
void ritz(const at::Tensor& basis, const std::optional<at::Tensor>& products, const at::Tensor& s,
          const at::Tensor& theta, at::Tensor& out, std::vector<double>& squares) {
  constexpr int64_t lanes = Vec64<scalar_t>::lanes;
  const int64_t n = basis.size(0);
  const int64_t m = basis.size(1);
  const int64_t k = s.size(1);
  const scalar_t* v = basis.const_data_ptr<scalar_t>();
  const Strided vs{basis.stride(0), basis.stride(1)};
  const scalar_t* p = products.has_value() ? products->const_data_ptr<scalar_t>() : nullptr;
  const Strided ps = products.has_value() ? Strided{products->stride(0), products->stride(1)}
                                          : Strided{0, 0};
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
#if defined(__GNUC__)
  // Column-major V and P (unit row stride): rows in lanes (lane_chunk), S as (m, lds) rows
  // padded to a multiple of 12 columns, the widest sweep. Otherwise columns in lanes (chunk),
  // S as one (m, lanes) block per group of `lanes` columns.
  const bool rows_in_lanes = vs.row == 1 && (p == nullptr || ps.row == 1);
#else
  const bool rows_in_lanes = false;
#endif
  const int64_t groups = (k + lanes - 1) / lanes;
  const int64_t lds = rows_in_lanes ? (k + 11) / 12 * 12 : lanes;
  const int64_t padded = rows_in_lanes ? lds : groups * lanes;
  // S and theta rounded to the working dtype once.
  std::vector<scalar_t> s_work(static_cast<size_t>(m * padded), scalar_t(0));
  std::vector<scalar_t> theta_work(static_cast<size_t>(padded), scalar_t(0));
  const double* s_data = s.const_data_ptr<double>();
  const double* theta_data = theta.const_data_ptr<double>();
  for (int64_t c = 0; c < k; ++c) {
    theta_work[c] = static_cast<scalar_t>(theta_data[c * theta.stride(0)]);
    for (int64_t q = 0; q < m; ++q) {
      const int64_t at = rows_in_lanes ? q * lds + c : (c / lanes * m + q) * lanes + c % lanes;
      s_work[at] = static_cast<scalar_t>(s_data[q * s.stride(0) + c * s.stride(1)]);
    }
  }
  const RowChunks chunks = run_row_chunks(n, k, [&](int64_t begin, int64_t end, double* part) {
#if defined(__GNUC__)
    if (rows_in_lanes) {
      lane_chunk(v, vs.column, p, ps.column, m, k, s_work.data(), lds, theta_work.data(), o,
                 begin, end, part);
      return;
    }
#endif
    chunk(v, vs, p, ps, m, k, s_work.data(), theta_work.data(), o, begin, end, part);
  });
  squares.resize(static_cast<size_t>(k));
  for (int64_t c = 0; c < k; ++c) {
    squares[c] = chunks.chunk_sum(c);
  }
}

}  // namespace ritz_cpu

std::tuple<at::Tensor, at::Tensor> ritz_vectors_cpu(const at::Tensor& basis,
                                                    const std::optional<at::Tensor>& products,
                                                    const at::Tensor& s,
                                                    const at::Tensor& theta) {
  ritz_vectors_check_inputs(basis, products, s, theta);
  const int64_t n = basis.size(0);
  const int64_t k = s.size(1);
  at::Tensor out = at::empty({n, k}, basis.options());
  const auto f64 = basis.options().dtype(at::kDouble);
  if (n == 0 || k == 0) {
    return {out.zero_(), products.has_value() ? at::zeros({k}, f64) : at::empty({0}, f64)};
  }
  std::vector<double> squares;
  AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "imc_kernels::ritz_vectors (CPU)", [&] {
    ritz_cpu::ritz<scalar_t>(basis, products, s, theta, out, squares);
  });
  if (!products.has_value()) {
    return {out, at::empty({0}, f64)};
  }
  at::Tensor result = at::empty({k}, f64);
  std::copy(squares.begin(), squares.end(), result.mutable_data_ptr<double>());
  return {out, result};
}

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CPU, m) {
  m.impl("ritz_vectors", &imc_kernels::ritz_vectors_cpu);
}
