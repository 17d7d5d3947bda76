// Op schemas of imc_kernels and the Python module stub `imc_kernels._C`.
//
// The ops are registered with the dispatcher (TORCH_LIBRARY), not bound with pybind11: that
// keeps the extension free of the CPython ABI beyond one module-creation call (so it can be
// built against the limited API), and `torch.library.opcheck` / torch.compile see real ops.
// Implementations live in one folder per op family: csrc/<family>/<op>_cpu.cpp registers the
// CPU kernel, csrc/<family>/<op>_cuda.cu the CUDA kernel (pytorch/extension-cpp, torchao).

#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

extern "C" {
// `import imc_kernels._C` loads this shared library, which runs the static TORCH_LIBRARY
// initialisers below; the module itself is empty. The JIT build (imc_kernels/_ext.py) loads
// the library with torch.ops.load_library instead and never calls this.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Compiled kernels of imc_kernels; the ops live in torch.ops.imc_kernels.",
      -1,       // no per-interpreter state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
}

namespace imc_kernels {

// The largest column count of either operand of tsmm_xty. The output is at most 512 x 512
// doubles (2 MiB), so every per-chunk partial stays cache- and workspace-friendly; a caller
// with wider blocks splits them (Lanczos blocks are 1..64 columns wide).
constexpr int64_t kTsmmMaxColumns = 512;

// Entry checks shared by the CPU and CUDA kernels of tsmm_xty (declared again in
// csrc/lanczos/tsmm_{cpu.cpp,cuda.cu}). Python's imc_kernels.ops.tsmm_xty checks the same
// conditions first and raises ValueError/TypeError; these guard direct torch.ops calls.
void tsmm_check_inputs(const at::Tensor& x, const at::Tensor& y, c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2,
              "imc_kernels::tsmm_xty needs 2-D x (n, m) and y (n, b), got ", x.dim(), "-D and ",
              y.dim(), "-D tensors; reshape a vector v to v.reshape(-1, 1)");
  TORCH_CHECK(x.size(0) == y.size(0),
              "imc_kernels::tsmm_xty needs x and y with the same number of rows, got x ", x.sizes(),
              " and y ", y.sizes());
  TORCH_CHECK(x.size(1) <= kTsmmMaxColumns && y.size(1) <= kTsmmMaxColumns,
              "imc_kernels::tsmm_xty supports at most ", kTsmmMaxColumns,
              " columns per operand, got x ", x.sizes(), " and y ", y.sizes(),
              "; split the wider operand into column blocks of at most ", kTsmmMaxColumns);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "imc_kernels::tsmm_xty takes float32 or float64 inputs, got ", x.scalar_type(),
              "; convert with .float() or .double()");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(),
              "imc_kernels::tsmm_xty needs x and y of the same dtype, got ", x.scalar_type(),
              " and ", y.scalar_type(), "; cast one of them");
  TORCH_CHECK(x.device() == y.device(),
              "imc_kernels::tsmm_xty needs x and y on the same device, got ", x.device(), " and ",
              y.device());
  TORCH_CHECK(x.device().type() == device_type, "imc_kernels::tsmm_xty: the ",
              c10::DeviceTypeName(device_type), " kernel got tensors on ", x.device());
}

// The widest block block_orth_step takes: its b x b Cholesky factors and their inverses run in
// one thread block on the GPU, from global memory scratch of a few b x b doubles. Lanczos blocks
// are 1..64 columns; the basis width (`filled`) has no limit.
constexpr int64_t kBlockOrthMaxBlock = 512;

// True when element (r, c) of `t` sits at r * stride(0) + c: the layout the kernels and the
// BLAS calls of block_orth_step read and write without copies (any row stride, unit column
// stride), and that the CPU tsmm_xty reads in place. Views of leading or middle columns of a
// row-major buffer qualify.
bool rows_addressable(const at::Tensor& t) {
  return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) &&
         (t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(t.size(1), 1));
}

namespace {

void check_rows_addressable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(rows_addressable(t), "imc_kernels::block_orth_step needs `", name,
              "` with unit column stride and a row stride of at least its width (a row-major "
              "matrix or a column slice of one), got sizes ",
              t.sizes(), " and strides ", t.strides(), "; pass a .contiguous() copy");
}

void check_disjoint(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                    const char* b_name) {
  // TooHard (strided views of one buffer) is accepted: the Lanczos driver passes disjoint
  // column slices of its basis buffer.
  const auto status = at::get_overlap_status(a, b);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
              "imc_kernels::", op, ": `", a_name, "` and `", b_name,
              "` share memory; they must be separate buffers");
}

}  // namespace

// Entry checks shared by the CPU and CUDA kernels of block_orth_step (declared again in
// csrc/lanczos/block_orth_{cpu.cpp,cuda.cu}). imc_kernels.ops.block_orth_step checks the same
// conditions in Python first and raises ValueError/TypeError.
void block_orth_check_inputs(const at::Tensor& basis, int64_t filled, const at::Tensor& block,
                             const at::Tensor& work, const at::Tensor& q,
                             const at::Tensor& coeffs, const at::Tensor& coeffs_first,
                             const at::Tensor& coupling,
                             const std::optional<at::Tensor>& prior_norms_sq, double tau,
                             c10::DeviceType device_type) {
  TORCH_CHECK(block.dim() == 2, "imc_kernels::block_orth_step needs a 2-D block (n, b), got a ",
              block.dim(), "-D tensor");
  const int64_t n = block.size(0);
  const int64_t b = block.size(1);
  TORCH_CHECK(n >= 1 && b >= 1 && b <= kBlockOrthMaxBlock,
              "imc_kernels::block_orth_step needs a block with at least one row and 1 to ",
              kBlockOrthMaxBlock, " columns, got ", block.sizes(),
              "; orthonormalize a wider block in column blocks");
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == n,
              "imc_kernels::block_orth_step needs a 2-D basis with as many rows as the block (",
              n, "), got ", basis.sizes());
  TORCH_CHECK(filled >= 0 && filled <= basis.size(1),
              "imc_kernels::block_orth_step: filled = ", filled,
              " must be between 0 and the basis's column count ", basis.size(1));
  TORCH_CHECK(work.sizes() == block.sizes() && q.sizes() == block.sizes(),
              "imc_kernels::block_orth_step needs work and q shaped like the block ", block.sizes(),
              ", got ", work.sizes(), " and ", q.sizes());
  TORCH_CHECK(block.scalar_type() == at::kFloat || block.scalar_type() == at::kDouble,
              "imc_kernels::block_orth_step takes a float32 or float64 block, got ",
              block.scalar_type(), "; convert with .float() or .double()");
  TORCH_CHECK(basis.scalar_type() == block.scalar_type() &&
                  work.scalar_type() == block.scalar_type() &&
                  q.scalar_type() == block.scalar_type(),
              "imc_kernels::block_orth_step needs basis, block, work and q of one dtype, got ",
              basis.scalar_type(), ", ", block.scalar_type(), ", ", work.scalar_type(), " and ",
              q.scalar_type());
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == filled && coeffs.size(1) == b &&
                  coeffs_first.sizes() == coeffs.sizes(),
              "imc_kernels::block_orth_step needs coeffs and coeffs_first of shape (filled, b) = (",
              filled, ", ", b, "), got ", coeffs.sizes(), " and ", coeffs_first.sizes());
  TORCH_CHECK(coupling.dim() == 2 && coupling.size(0) == b && coupling.size(1) == b,
              "imc_kernels::block_orth_step needs coupling of shape (b, b) = (", b, ", ", b,
              "), got ", coupling.sizes());
  TORCH_CHECK(coeffs.scalar_type() == at::kDouble && coeffs_first.scalar_type() == at::kDouble &&
                  coupling.scalar_type() == at::kDouble,
              "imc_kernels::block_orth_step needs float64 coeffs, coeffs_first and coupling, got ",
              coeffs.scalar_type(), ", ", coeffs_first.scalar_type(), " and ",
              coupling.scalar_type());
  if (prior_norms_sq.has_value()) {
    const at::Tensor& prior = *prior_norms_sq;
    TORCH_CHECK(prior.dim() == 1 && prior.size(0) == b && prior.scalar_type() == at::kDouble,
                "imc_kernels::block_orth_step needs prior_norms_sq as a (b,) = (", b,
                ",) float64 tensor, got ", prior.sizes(), " ", prior.scalar_type());
    TORCH_CHECK(prior.device() == block.device(),
                "imc_kernels::block_orth_step: prior_norms_sq is on ", prior.device(),
                ", the block on ", block.device());
  }
  TORCH_CHECK(std::isfinite(tau) && tau >= 0.0,
              "imc_kernels::block_orth_step needs a finite rank tolerance tau >= 0, got ", tau);
  for (const at::Tensor* t : {&basis, &work, &q, &coeffs, &coeffs_first, &coupling}) {
    TORCH_CHECK(t->device() == block.device(),
                "imc_kernels::block_orth_step needs every tensor on the block's device ",
                block.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(block.device().type() == device_type, "imc_kernels::block_orth_step: the ",
              c10::DeviceTypeName(device_type), " kernel got tensors on ", block.device());
  check_rows_addressable(basis, "basis");
  check_rows_addressable(block, "block");
  check_rows_addressable(work, "work");
  check_rows_addressable(q, "q");
  check_rows_addressable(coeffs, "coeffs");
  check_rows_addressable(coeffs_first, "coeffs_first");
  check_rows_addressable(coupling, "coupling");
  check_disjoint("block_orth_step", block, "block", work, "work");
  check_disjoint("block_orth_step", block, "block", q, "q");
  check_disjoint("block_orth_step", work, "work", q, "q");
  check_disjoint("block_orth_step", basis, "basis", block, "block");
  check_disjoint("block_orth_step", basis, "basis", work, "work");
  check_disjoint("block_orth_step", coeffs, "coeffs", coeffs_first, "coeffs_first");
}

// Entry checks of lanczos_vector_step (its CPU kernel is csrc/lanczos/lanczos_vector_cpu.cpp).
// imc_kernels.ops.lanczos_vector_step checks the same conditions in Python first and raises
// ValueError/TypeError.
void lanczos_vector_check_inputs(const at::Tensor& rows, int64_t filled, int64_t local,
                                 const at::Tensor& w,
                                 const std::optional<at::Tensor>& product_out, double tau) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) >= 1 && w.stride(0) == 1,
              "imc_kernels::lanczos_vector_step needs a contiguous 1-D vector w, got sizes ",
              w.sizes(), " and strides ", w.strides());
  const int64_t n = w.size(0);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == n && rows.stride(1) == 1 &&
                  (rows.size(0) <= 1 || rows.stride(0) >= n),
              "imc_kernels::lanczos_vector_step needs rows (R, n) = (R, ", n,
              ") with contiguous rows (the basis stored one vector per row), got sizes ",
              rows.sizes(), " and strides ", rows.strides());
  TORCH_CHECK(filled >= 0 && filled < rows.size(0),
              "imc_kernels::lanczos_vector_step: filled = ", filled,
              " must be at least 0 and below the row count ", rows.size(0),
              " (row `filled` receives the next vector)");
  TORCH_CHECK(local >= 0 && local <= filled, "imc_kernels::lanczos_vector_step: local = ", local,
              " must be between 0 and filled = ", filled);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "imc_kernels::lanczos_vector_step takes float32 or float64, got ", w.scalar_type());
  TORCH_CHECK(rows.scalar_type() == w.scalar_type(),
              "imc_kernels::lanczos_vector_step needs rows and w of one dtype, got ",
              rows.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(rows.device() == w.device() && w.device().is_cpu(),
              "imc_kernels::lanczos_vector_step runs on the CPU, got rows on ", rows.device(),
              " and w on ", w.device());
  TORCH_CHECK(std::isfinite(tau) && tau >= 0.0,
              "imc_kernels::lanczos_vector_step needs a finite rank tolerance tau >= 0, got ", tau);
  constexpr const char* kOp = "lanczos_vector_step";
  check_disjoint(kOp, rows, "rows", w, "w");
  if (product_out.has_value()) {
    const at::Tensor& out = *product_out;
    TORCH_CHECK(out.dim() == 1 && out.size(0) == n && out.stride(0) == 1 &&
                    out.scalar_type() == w.scalar_type() && out.device() == w.device(),
                "imc_kernels::lanczos_vector_step needs product_out like w (contiguous (", n,
                ",) ", w.scalar_type(), "), got sizes ", out.sizes(), " ", out.scalar_type());
    check_disjoint(kOp, rows, "rows", out, "product_out");
    check_disjoint(kOp, w, "w", out, "product_out");
  }
}

// Entry checks of ritz_vectors (its CPU kernel is csrc/lanczos/ritz_cpu.cpp). Python's
// imc_kernels.ops.ritz_vectors checks the same conditions first and raises ValueError/TypeError.
void ritz_vectors_check_inputs(const at::Tensor& basis, const std::optional<at::Tensor>& products,
                               const at::Tensor& s, const at::Tensor& theta) {
  TORCH_CHECK(basis.dim() == 2, "imc_kernels::ritz_vectors needs a 2-D basis (n, m), got ",
              basis.dim(), "-D");
  TORCH_CHECK(basis.scalar_type() == at::kFloat || basis.scalar_type() == at::kDouble,
              "imc_kernels::ritz_vectors takes a float32 or float64 basis, got ",
              basis.scalar_type());
  TORCH_CHECK(basis.device().is_cpu(), "imc_kernels::ritz_vectors runs on the CPU, got a basis on ",
              basis.device());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == basis.size(1) && s.scalar_type() == at::kDouble &&
                  s.device().is_cpu(),
              "imc_kernels::ritz_vectors needs s (m, k) = (", basis.size(1),
              ", k) float64 on the CPU, got sizes ", s.sizes(), " ", s.scalar_type(), " on ",
              s.device());
  TORCH_CHECK(theta.dim() == 1 && theta.size(0) == s.size(1) &&
                  theta.scalar_type() == at::kDouble && theta.device().is_cpu(),
              "imc_kernels::ritz_vectors needs theta (k,) = (", s.size(1),
              ",) float64 on the CPU, got sizes ", theta.sizes(), " ", theta.scalar_type());
  if (products.has_value()) {
    const at::Tensor& p = *products;
    TORCH_CHECK(p.dim() == 2 && p.sizes() == basis.sizes() &&
                    p.scalar_type() == basis.scalar_type() && p.device() == basis.device(),
                "imc_kernels::ritz_vectors needs products like the basis (", basis.sizes(), " ",
                basis.scalar_type(), "), got ", p.sizes(), " ", p.scalar_type(), " on ",
                p.device());
  }
}

// Entry checks of gemm_out (its CPU kernel is csrc/gemm/gemm_cpu.cpp). Python's
// imc_kernels.ops.gemm checks the same conditions first and raises ValueError/TypeError.
void gemm_check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out,
                       double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2,
              "imc_kernels::gemm_out needs 2-D a (m, k), b (k, n) and out (m, n), got ", a.dim(),
              "-D, ", b.dim(), "-D and ", out.dim(), "-D tensors");
  TORCH_CHECK(a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "imc_kernels::gemm_out: shapes do not chain, a ", a.sizes(), " @ b ", b.sizes(),
              " into out ", out.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == out.scalar_type(),
              "imc_kernels::gemm_out needs a, b and out of one dtype, got ", a.scalar_type(), ", ",
              b.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()),
              "imc_kernels::gemm_out takes floating-point tensors, got ", a.scalar_type());
  TORCH_CHECK(a.device() == b.device() && a.device() == out.device(),
              "imc_kernels::gemm_out needs a, b and out on one device, got ", a.device(), ", ",
              b.device(), " and ", out.device());
  TORCH_CHECK(std::isfinite(beta), "imc_kernels::gemm_out needs a finite beta, got ", beta);
  for (const at::Tensor* t : {&a, &b}) {
    // As torch's own out= GEMMs: strided views whose overlap is too hard to decide pass here
    // (gemm_out then leaves them to at::mm_out).
    const auto status = at::get_overlap_status(out, *t);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                "imc_kernels::gemm_out: out shares memory with an operand; pass a separate "
                "output buffer");
  }
}

// Whether gemm_out's CPU kernel found torch's oneDNN matmul (csrc/gemm/gemm_cpu.cpp).
bool gemm_uses_onednn_cpu();

}  // namespace imc_kernels

TORCH_LIBRARY(imc_kernels, m) {
  // x: (n, m), y: (n, b), float32 or float64, m, b <= 512. Returns x^T y as (m, b) float64,
  // every product accumulated in fp64, bitwise deterministic for a given device and shape.
  m.def("tsmm_xty(Tensor x, Tensor y) -> Tensor");
  // One block orthogonalization step of block Lanczos: BCGS2 with a Cholesky QR inside each
  // pass (imc_kernels/linalg/orthogonalize.py:block_orthonormalize), with V = basis[:, :filled]
  // (n rows, any row stride) and the block W (n, b), b <= 512:
  //   pass 1: C1 = V^T W (fp64);  W1 = W - V C1 (written to `block`);  W1 = Q1 R1 (Q1 to `work`)
  //   pass 2: C2 = V^T Q1;  W2 = Q1 - V C2 (`work`);  W2 = Q R2 (Q to `q`)
  // so W = V C + Q B with C = C1 + C2 R1 (`coeffs`), B = R2 R1 (`coupling`), C1 in
  // `coeffs_first`; every projection and Gram accumulated in fp64, the Cholesky factors fp64.
  // The rank check compares R1_ii with the reference norm sqrt(||w_i||^2 + prior_norms_sq_i)
  // (tau relative). On a deficient step `q` holds W1, `coeffs` C1 and `coupling` zeros (the
  // raw residual for the caller's repair). With auto_second_projection, pass 2 skips the
  // projection when every R1_ii / ||w_i|| > 1/sqrt(2) (DGKS; on CUDA one host sync).
  // Returns flags (5,) int32 [deficient, non_finite, cholesky info pass 1, pass 2, projections]
  // and norms (2, b) float64 [reference; R1_ii / reference], both on the device.
  m.def(
      "block_orth_step(Tensor basis, int filled, Tensor(a!) block, Tensor(b!) work, "
      "Tensor(c!) q, Tensor(d!) coeffs, Tensor(e!) coeffs_first, Tensor(f!) coupling, "
      "Tensor? prior_norms_sq, float tau, bool auto_second_projection) -> (Tensor, Tensor)");
  // One step of single-vector Lanczos against a basis stored one vector per row (CPU):
  // V = rows[:filled], w = H v_{filled-1}. With V_loc = rows[filled-local:filled]:
  //   product_out = w (when given);  l = V_loc^T w;  w -= V_loc l       (the local pass)
  //   C1 = V^T w;  W1 = w - V C1 (written to w);  r1 = ||W1||
  //   C2 = V^T W1 and q = W1 - V C2 when the DGKS test asks (or always without
  //   auto_second_projection), else q = W1;  rows[filled] = q / ||q||
  // every dot product accumulated in fp64. Rank check: deficient when r1 <= tau * reference,
  // reference = sqrt(||l||^2 + ||C1||^2 + r1^2) (the norm of w before the call); a deficient
  // step writes W1 to rows[filled], C1 + l to coeffs and 0 to the coupling. Returns coeffs
  // (filled,) float64 (= l + C1 + C2 at the rows of V), the coupling () float64 (||q||), flags
  // (5,) int32 [deficient, non_finite, info pass 1, pass 2, projections] and norms (2,)
  // float64 [reference, r1 / reference], as block_orth_step with b = 1.
  m.def(
      "lanczos_vector_step(Tensor(a!) rows, int filled, int local, Tensor(b!) w, "
      "Tensor(c!)? product_out, float tau, bool auto_second_projection) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // The Ritz vectors of a finished solve and their residuals from the stored products (CPU):
  // basis V (n, m) and products P = H V (n, m), any strides, s (m, k) and theta (k,) float64.
  // Returns X = V S (n, k) contiguous in the basis dtype and, with products, the squared norms
  // ||P s_i - theta_i x_i||^2 (k,) float64 (else an empty tensor). S and theta are rounded to
  // the working dtype once; X and P S accumulate in it, the squares in fp64, deterministically.
  m.def("ritz_vectors(Tensor basis, Tensor? products, Tensor s, Tensor theta) -> (Tensor, Tensor)");
  // out = a @ b + beta * out (beta = 0 ignores out's contents), a (m, k), b (k, n), 2-D. On
  // the CPU, float32 runs through torch's oneDNN matmul where libtorch exports it (faster than
  // MKL's sgemm on AMD processors), everything else through at::mm_out / addmm_out.
  m.def("gemm_out(Tensor a, Tensor b, float beta, Tensor(a!) out) -> ()");
  // True when gemm_out's CPU kernel runs float32 through oneDNN in this process.
  m.def("gemm_uses_onednn() -> bool", &imc_kernels::gemm_uses_onednn_cpu);
}
