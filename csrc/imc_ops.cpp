// Op schemas of imc_kernels and the Python module stub `imc_kernels._C`.
//
// The ops are registered with the dispatcher (TORCH_LIBRARY), not bound with pybind11: that
// keeps the extension free of the CPython ABI beyond one module-creation call (so it can be
// built against the limited API), and `torch.library.opcheck` / torch.compile see real ops.
// Implementations live in one folder per op family: csrc/<family>/<op>_cpu.cpp registers the
// CPU kernel, csrc/<family>/<op>_cuda.cu the CUDA kernel (pytorch/extension-cpp, torchao).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

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

}  // namespace imc_kernels

TORCH_LIBRARY(imc_kernels, m) {
  // x: (n, m), y: (n, b), float32 or float64, m, b <= 512. Returns x^T y as (m, b) float64,
  // every product accumulated in fp64, bitwise deterministic for a given device and shape.
  m.def("tsmm_xty(Tensor x, Tensor y) -> Tensor");
}
