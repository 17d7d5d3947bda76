// CPU kernel of imc_kernels::gemm_out: float32 matrix products through oneDNN.
//
// Why: torch's CPU `mm` for float32 calls MKL's sgemm, which on AMD processors takes its AVX2
// code path even where the CPU has AVX-512. oneDNN, which torch links for its convolutions,
// picks its kernels from the CPU's feature flags. On the Zen 5 machines we develop on, oneDNN
// ran the fused HVP engine's and the solver's GEMM shapes at 2.15x MKL's rate (median of 24
// shapes, 1.3-3.5x; benchmarks/gemm.py, benchmarks/results/cpu-amd-epyc-2c-gemm*.md). On Intel
// CPUs MKL takes its AVX-512 path too (not measured here).
//
// How: torch does not route float32 `mm` to oneDNN (only reduced-precision modes), and does not
// ship the oneDNN headers' symbols for extensions, but libtorch exports the ATen function it
// uses for those modes, at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha). Its header
// is not installed, so we look the symbol up at run time in the library that defines
// at::_ops::mm (dladdr, then dlsym): a torch built without MKLDNN, or a future torch that drops
// the function, leaves the symbol unresolved, and a found symbol must pass a self-test on its
// first use (passes_self_test); otherwise every call takes at::mm_out.
// The signature is pinned by the mangled name (two Tensor const& are S3_ back-references).

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "gemm_cpu.h"

#include <cstdint>
#include <exception>
#include <utility>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define IMC_HAVE_DLFCN 1
#endif

namespace imc_kernels::gemm_cpu {

namespace {

using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float,
                              float);

constexpr const char* kMkldnnMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

MkldnnMatmul resolve_mkldnn_matmul() {
#ifndef IMC_HAVE_DLFCN
  return nullptr;  // no dladdr/dlsym: torch's GEMM everywhere
#else
  Dl_info info{};
  // Any function defined in libtorch_cpu names the library (its file name varies by build).
  if (dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) == 0 ||
      info.dli_fname == nullptr) {
    return nullptr;
  }
  void* library = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (library == nullptr) {
    return nullptr;
  }
  // The handle stays open: libtorch is loaded for the life of the process anyway.
  return reinterpret_cast<MkldnnMatmul>(dlsym(library, kMkldnnMatmulSymbol));
#endif
}

// The symbol's presence does not prove its behaviour: torch releases before float32 support
// in this function rejected float32 with an error, and a future one may change what beta
// means. One small product with beta = 1 (3 x 5 times 5 x 2, a transposed operand) is checked
// against a plain loop when the symbol is found; any exception or mismatch disables it.
bool passes_self_test(MkldnnMatmul fn) {
  try {
    const auto options = at::TensorOptions().dtype(at::kFloat);
    at::Tensor a = at::empty({3, 5}, options);
    at::Tensor b_t = at::empty({2, 5}, options);  // b = b_t^T, a column-major operand
    at::Tensor out = at::empty({3, 2}, options);
    float* pa = a.mutable_data_ptr<float>();
    float* pb = b_t.mutable_data_ptr<float>();
    float* po = out.mutable_data_ptr<float>();
    for (int i = 0; i < 15; ++i) pa[i] = static_cast<float>(i % 7) - 3.0f;
    for (int i = 0; i < 10; ++i) pb[i] = 0.5f * static_cast<float>(i % 5) - 1.0f;
    for (int i = 0; i < 6; ++i) po[i] = static_cast<float>(i);
    fn(a, b_t.t(), out, 1.0f, 1.0f);
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 2; ++c) {
        float expected = static_cast<float>(r * 2 + c);
        for (int t = 0; t < 5; ++t) expected += pa[r * 5 + t] * pb[c * 5 + t];
        // Small integers and halves: every product and sum is exact in float32.
        if (out.const_data_ptr<float>()[r * 2 + c] != expected) return false;
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

MkldnnMatmul mkldnn_matmul() {
  static const MkldnnMatmul fn = [] {
    const MkldnnMatmul found = resolve_mkldnn_matmul();
    return found != nullptr && passes_self_test(found) ? found : nullptr;
  }();
  return fn;
}

// True when `a` and `b` may share an element: a partial or full overlap, or strided views of
// one storage whose address ranges intersect (get_overlap_status calls those TooHard).
bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  const auto status = at::get_overlap_status(a, b);
  if (status != at::MemOverlapStatus::TooHard) {
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  }
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) {
      last += (t.size(d) - 1) * t.stride(d);
    }
    const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::make_pair(start, start + static_cast<uintptr_t>(last + 1) * t.element_size());
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// Below 1 MFLOP oneDNN's per-call setup (descriptors, primitive cache lookup: ~12 us) costs
// more than its faster kernels save (one Zen 5 core: 64x32x16 12.8 against 1.8 us for MKL,
// 256x64x32 16.5 against 11.6 us). From about 1 MFLOP on it is even or ahead (1024x50x10
// 53 against 55 us, 256x128x64 30 against 43 us), far ahead on the narrow shapes MKL handles
// badly (1024x100x10 28 against 101 us).
constexpr double kOneDnnMinFlops = 1024.0 * 1024;

// oneDNN reads row-major or transposed (column-major) operands in place; other strides make
// mkldnn_matmul copy them first, which still beats MKL for the shapes we call it with.
bool onednn_eligible(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat ||
      out.scalar_type() != at::kFloat) {
    return false;
  }
  if (a.size(0) == 0 || a.size(1) == 0 || b.size(1) == 0) {
    return false;  // nothing to multiply: at::mm_out / addmm_out handle the empty cases
  }
  if (2.0 * static_cast<double>(a.size(0)) * static_cast<double>(a.size(1)) *
          static_cast<double>(b.size(1)) <
      kOneDnnMinFlops) {
    return false;
  }
  if (!out.is_contiguous()) {
    return false;  // mkldnn_matmul writes out as a dense row-major buffer
  }
  return !may_share_memory(out, a) && !may_share_memory(out, b);
}

}  // namespace

bool onednn_available() { return mkldnn_matmul() != nullptr; }

bool gemm_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, double beta) {
  const MkldnnMatmul fn = mkldnn_matmul();
  if (fn != nullptr && onednn_eligible(a, b, out)) {
    fn(a, b, out, static_cast<float>(beta), 1.0f);
    return true;
  }
  if (beta == 0.0) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  } else {
    at::addmm_out(const_cast<at::Tensor&>(out), out, a, b, beta, 1.0);
  }
  return false;
}

}  // namespace imc_kernels::gemm_cpu

namespace imc_kernels {

// Defined in csrc/imc_ops.cpp beside the schema.
void gemm_check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                       double beta);

void gemm_out_cpu(const at::Tensor& a, const at::Tensor& b, double beta, const at::Tensor& out) {
  gemm_check_inputs(a, b, out, beta);
  gemm_cpu::gemm_out(a, b, out, beta);
}

bool gemm_uses_onednn_cpu() { return gemm_cpu::onednn_available(); }

}  // namespace imc_kernels

TORCH_LIBRARY_IMPL(imc_kernels, CPU, m) { m.impl("gemm_out", &imc_kernels::gemm_out_cpu); }
