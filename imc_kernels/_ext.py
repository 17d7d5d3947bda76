"""Loads the compiled extension ``imc_kernels._C`` (DESIGN section 4).

Order: the ahead-of-time build installed with the package (``import imc_kernels._C``); else a
JIT build of the shipped ``csrc/`` sources with ninja, cached under
``${IMC_KERNELS_CACHE:-~/.cache/imc_kernels}/<torch version>-<hash of the sources>``
(``IMC_NO_JIT=1`` turns it off); else none, in which case every op runs its pure-PyTorch
reference and a one-time warning says so. :func:`load` does this once per process.

The same CUDA rule decides what ``setup.py`` builds and what the JIT build compiles
(:func:`cuda_build_decision`). ``setup.py`` loads this file by path, where neither
``imc_kernels`` nor maybe torch can be imported: keep module-level imports to the standard
library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

ENV_NO_JIT = "IMC_NO_JIT"
ENV_CACHE = "IMC_KERNELS_CACHE"
ENV_FORCE_CUDA = "IMC_FORCE_CUDA"
ENV_SKIP_CUDA = "IMC_SKIP_CUDA"

OP_NAMESPACE = "imc_kernels"
_PACKAGE_DIR = Path(__file__).resolve().parent
# The sources: shipped as package data by setup.py's build_py, or the repository's csrc/ in a
# source checkout (editable installs included).
SOURCE_DIRS = (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc")
# -O3: the CPU micro-kernel relies on full unrolling of its register block.
CXX_FLAGS = ("-O3",)
CUDA_FLAGS = ("-O3",)


@dataclasses.dataclass(frozen=True)
class ExtInfo:
    """What :func:`load` found."""

    module: object | None  # the loaded module, None when unavailable
    source: str  # "aot" | "jit" | "none"
    cuda: bool  # CUDA kernels compiled in
    reason: str  # why this source (human-readable)


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def openmp_flags() -> list[str]:
    """Compiler and linker flags that enable OpenMP on this platform ([] where unsupported).

    Apple clang has no ``-fopenmp``; the kernels then run single-threaded (their pragmas are
    ignored), with the same results.
    """
    if sys.platform == "darwin":
        return []
    if sys.platform == "win32":
        return ["/openmp"]
    return ["-fopenmp"]


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    """``(major, minor)`` of ``<cuda_home>/bin/nvcc``, None when it does not run."""
    nvcc = Path(cuda_home) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
    try:
        out = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_build_decision(torch) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (DESIGN section 4).

    CUDA is compiled when torch has CUDA, a CUDA toolkit is found (``CUDA_HOME``), nvcc's
    major version matches torch's CUDA major version, and a GPU is visible or
    ``TORCH_CUDA_ARCH_LIST`` says what to compile for. ``IMC_SKIP_CUDA=1`` and
    ``IMC_FORCE_CUDA=1`` override the rule.

    Args:
        torch: the imported ``torch`` module (passed in so that this file imports nothing
            outside the standard library at module level).

    Returns:
        ``(build_cuda, reason)``, the reason a short phrase for logs, e.g.
        ``"torch 2.13.0+cpu has no CUDA"``.
    """
    if env_flag(ENV_SKIP_CUDA):
        return False, f"{ENV_SKIP_CUDA}=1"
    if env_flag(ENV_FORCE_CUDA):
        return True, f"{ENV_FORCE_CUDA}=1"
    torch_cuda = torch.version.cuda
    if not torch_cuda:
        return False, f"torch {torch.__version__} has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to build the CUDA kernels)"
    nvcc = nvcc_version(CUDA_HOME)
    if nvcc is None:
        return False, f"nvcc under CUDA_HOME={CUDA_HOME} does not run"
    if nvcc[0] != int(torch_cuda.split(".")[0]):
        return False, (
            f"nvcc {nvcc[0]}.{nvcc[1]} does not match torch's CUDA {torch_cuda} "
            "(major versions differ)"
        )
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if torch.cuda.is_available():
        target = f"GPU {torch.cuda.get_device_name(0)}"
    elif arch_list:
        target = f"TORCH_CUDA_ARCH_LIST={arch_list}"
    else:
        return False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset"
    return True, f"torch CUDA {torch_cuda}, nvcc {nvcc[0]}.{nvcc[1]}, {target}"


def find_sources(root: Path) -> tuple[list[Path], list[Path]]:
    """The C++ and CUDA sources under ``root`` (``**/*.cpp`` and ``**/*.cu``), sorted."""
    return sorted(root.rglob("*.cpp")), sorted(root.rglob("*.cu"))


def source_dir() -> Path | None:
    """The directory holding the C++/CUDA sources, None when neither candidate has them."""
    for candidate in SOURCE_DIRS:
        if (candidate / "imc_ops.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    """Root of the JIT build cache: ``$IMC_KERNELS_CACHE`` or ``~/.cache/imc_kernels``."""
    root = os.environ.get(ENV_CACHE, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "imc_kernels"


def _sources_hash(root: Path, files: list[Path], extra: str) -> str:
    """Digest of every source and header under ``root`` plus the build configuration."""
    digest = hashlib.sha256(extra.encode())
    headers = [p for p in root.rglob("*") if p.suffix in (".h", ".cuh", ".hpp")]
    for path in sorted(set(files) | set(headers)):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cuda_compiled(torch) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{OP_NAMESPACE}::tsmm_xty", "CUDA"))


def has_op(name: str) -> bool:
    """True when the loaded extension registered ``imc_kernels::<name>`` (a stale build may not)."""
    import torch

    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{OP_NAMESPACE}::{name}", "CPU")
    except RuntimeError:  # "operator ... does not exist"
        return False


def _register_fakes(torch) -> None:
    """Fake (meta) kernels, so FakeTensor tracing, torch.compile and opcheck see our ops."""

    def tsmm_xty_fake(x, y):
        torch._check(x.dim() == 2 and y.dim() == 2, lambda: "tsmm_xty needs 2-D x and y")
        torch._check(x.shape[0] == y.shape[0], lambda: "x and y need the same number of rows")
        return x.new_empty((x.shape[1], y.shape[1]), dtype=torch.float64)

    def block_orth_step_fake(basis, filled, block, work, q, coeffs, coeffs_first, coupling, *_):
        torch._check(block.dim() == 2, lambda: "block_orth_step needs a 2-D block")
        flags = block.new_empty((5,), dtype=torch.int32)
        return flags, block.new_empty((2, block.shape[1]), dtype=torch.float64)

    def lanczos_vector_step_fake(rows, filled, local, w, product_out, tau, auto):
        torch._check(w.dim() == 1, lambda: "lanczos_vector_step needs a 1-D w")
        f64 = torch.float64
        return (
            w.new_empty((filled,), dtype=f64),
            w.new_empty((), dtype=f64),
            w.new_empty((5,), dtype=torch.int32),
            w.new_empty((2,), dtype=f64),
        )

    def ritz_vectors_fake(basis, products, s, theta):
        torch._check(basis.dim() == 2, lambda: "ritz_vectors needs a 2-D basis")
        width = s.shape[1] if products is not None else 0
        return (
            basis.new_empty((basis.shape[0], s.shape[1])),
            basis.new_empty((width,), dtype=torch.float64),
        )

    def gemm_out_fake(a, b, beta, out):
        torch._check(a.dim() == 2 and b.dim() == 2, lambda: "gemm_out needs 2-D a and b")
        torch._check(a.shape[1] == b.shape[0], lambda: "gemm_out: shapes do not chain")

    fakes = {
        "tsmm_xty": tsmm_xty_fake,
        "block_orth_step": block_orth_step_fake,
        "lanczos_vector_step": lanczos_vector_step_fake,
        "ritz_vectors": ritz_vectors_fake,
        "gemm_out": gemm_out_fake,
    }
    for name, fake in fakes.items():
        if not has_op(name):
            continue  # an extension built before this op existed
        try:
            torch.library.register_fake(f"{OP_NAMESPACE}::{name}")(fake)
        except RuntimeError as exc:  # registered already, e.g. by an earlier loader
            if "already" not in str(exc):
                raise


def _load_aot(torch) -> tuple[ExtInfo | None, str]:
    try:
        import imc_kernels._C as module
    except ImportError as exc:
        return None, f"no ahead-of-time build ({exc})"
    cuda = _cuda_compiled(torch)
    kernels = "CPU and CUDA kernels" if cuda else "CPU kernels only"
    where = getattr(module, "__file__", "imc_kernels._C")
    return ExtInfo(module, "aot", cuda, f"ahead-of-time build {where} ({kernels})"), ""


def _load_jit(torch) -> tuple[ExtInfo | None, str]:
    if env_flag(ENV_NO_JIT):
        return None, f"JIT build disabled by {ENV_NO_JIT}=1"
    root = source_dir()
    if root is None:
        return None, "no C++ sources to JIT-build (looked in " + ", ".join(
            str(p) for p in SOURCE_DIRS
        ) + ")"
    cpp, cu = find_sources(root)
    with_cuda, cuda_reason = cuda_build_decision(torch)
    files = cpp + (cu if with_cuda else [])
    flags = list(CXX_FLAGS) + openmp_flags()
    config = f"{torch.__version__}|{sys.version_info[:2]}|{with_cuda}|{flags}|{CUDA_FLAGS}"
    build_dir = cache_dir() / f"{torch.__version__}-{_sources_hash(root, files, config)}"
    try:
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        built = any(build_dir.glob("*.so")) or any(build_dir.glob("*.pyd"))
        if not built:
            kernels = "CPU+CUDA" if with_cuda else "CPU"
            print(
                f"imc_kernels: JIT-building the {kernels} extension ({cuda_reason}) from "
                f"{root} into {build_dir}; the first build takes a minute or two",
                file=sys.stderr,
            )
        cpp_extension.load(
            name="imc_kernels_C",
            sources=[str(p) for p in files],
            extra_cflags=flags,
            extra_cuda_cflags=list(CUDA_FLAGS) if with_cuda else None,
            extra_ldflags=openmp_flags() if sys.platform != "win32" else [],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=env_flag("IMC_KERNELS_VERBOSE"),
        )
    except Exception as exc:  # the compiler, ninja or the toolchain failed; fall back
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        return None, (
            f"JIT build in {build_dir} failed ({type(exc).__name__}: {first_line}; "
            "set IMC_KERNELS_VERBOSE=1 for the compiler output)"
        )
    cuda = _cuda_compiled(torch)
    kernels = "CPU and CUDA kernels" if cuda else f"CPU kernels only: {cuda_reason}"
    info = ExtInfo(
        getattr(torch.ops, OP_NAMESPACE), "jit", cuda, f"JIT build {build_dir} ({kernels})"
    )
    return info, ""


def _load_uncached() -> ExtInfo:
    import torch

    info, aot_reason = _load_aot(torch)
    if info is None:
        info, jit_reason = _load_jit(torch)
        if info is None:
            reason = f"{aot_reason}; {jit_reason}"
            warnings.warn(
                f"imc_kernels: the C++ extension is unavailable ({reason}); ops run their "
                "pure-PyTorch reference instead. imc_kernels.build_info() reports what is active.",
                RuntimeWarning,
                stacklevel=3,
            )
            return ExtInfo(None, "none", False, reason)
    _register_fakes(torch)
    return info


_lock = threading.Lock()
_info: ExtInfo | None = None


def load() -> ExtInfo:
    """Load the extension once per process and say what was found.

    Returns:
        An :class:`ExtInfo`: ``module`` is ``imc_kernels._C`` for the ahead-of-time build,
        ``torch.ops.imc_kernels`` for a JIT build, None when neither is available (``reason``
        says why; a one-time ``RuntimeWarning`` too).

    Example:
        >>> from imc_kernels import _ext
        >>> _ext.load().source in ("aot", "jit", "none")
        True
    """
    global _info
    if _info is None:
        with _lock:
            if _info is None:
                _info = _load_uncached()
    return _info
