"""Build of imc_kernels and imc_prune (DESIGN section 4).

* ``pip install --no-build-isolation .`` (or ``-e .``) compiles ``imc_kernels._C`` against the
  installed torch: the C++ kernels always, the CUDA kernels when the rule in
  ``imc_kernels/_ext.py:cuda_build_decision`` holds (torch has CUDA, a toolkit whose nvcc
  matches torch's CUDA major version, and a visible GPU or ``TORCH_CUDA_ARCH_LIST``;
  ``IMC_FORCE_CUDA=1`` / ``IMC_SKIP_CUDA=1`` override). One line says what is built and why.
* An isolated ``pip install .`` has no torch at build time (torch is deliberately not a build
  requirement): it installs the pure-Python packages, and ``imc_kernels/_ext.py`` JIT-builds
  the shipped sources on first use.
* Either way the C++/CUDA sources ship as package data in ``imc_kernels/_csrc/``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh", ".hpp")
# setuptools runs this script once for metadata and once for the build; say the build
# decision in the run that builds.
METADATA_COMMANDS = ("egg_info", "dist_info")


def _load_ext_rules():
    """``imc_kernels/_ext.py`` loaded by path: one CUDA rule for the build and the JIT build."""
    spec = importlib.util.spec_from_file_location(
        "_imc_ext_rules", ROOT / "imc_kernels" / "_ext.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    if not any(command in sys.argv[1:] for command in METADATA_COMMANDS):
        print(f"imc_kernels: {message}", flush=True)


def get_extensions():
    """The extension modules and the build_ext command, or ``([], {})`` without torch."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _say(
            f"building no extension (torch is not importable at build time: {exc}); the "
            "sources ship as package data and build on first use "
            "(pip install --no-build-isolation . builds them now)"
        )
        return [], {}

    rules = _load_ext_rules()
    build_cuda, reason = rules.cuda_build_decision(torch)
    cpp_sources, cu_sources = rules.find_sources(ROOT / CSRC)
    sources = [p.relative_to(ROOT).as_posix() for p in cpp_sources]
    openmp = rules.openmp_flags()
    extra_compile_args = {"cxx": [*rules.CXX_FLAGS, *openmp]}
    extra_link_args = [] if sys.platform == "win32" else list(openmp)
    if build_cuda:
        sources += [p.relative_to(ROOT).as_posix() for p in cu_sources]
        extra_compile_args["nvcc"] = list(rules.CUDA_FLAGS)
        extension_class = CUDAExtension
        _say(f"building CPU+CUDA extension imc_kernels._C ({reason})")
    else:
        extension_class = CppExtension
        _say(f"building CPU extension only ({reason})")
    extension = extension_class(
        name="imc_kernels._C",
        sources=sources,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        # The limited C API (BuildExtension defines Py_LIMITED_API): one wheel runs on every
        # CPython >= 3.10, since the ops go through the dispatcher and the module stub only
        # needs PyModule_Create.
        py_limited_api=True,
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class build_py(_build_py):
    """Also copies ``csrc/`` into ``imc_kernels/_csrc/`` of the build tree (package data).

    An editable install skips the copy: there ``imc_kernels/_ext.py`` finds the repository's
    ``csrc/`` directly.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "imc_kernels" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        for path in sorted((ROOT / CSRC).rglob("*")):
            if path.is_file() and path.suffix in SOURCE_SUFFIXES:
                destination = target / path.relative_to(ROOT / CSRC)
                destination.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(path), str(destination), preserve_mode=False)


def get_entry_points():
    """``imc-prune`` once the CLI module exists (it is written after this build script)."""
    if (ROOT / "python" / "imc_prune" / "cli.py").is_file():
        return {"console_scripts": ["imc-prune = imc_prune.cli:main"]}
    return {}


ext_modules, ext_cmdclass = get_extensions()
packages = find_packages(include=["imc_kernels", "imc_kernels.*"])
packages += find_packages("python", include=["imc_prune", "imc_prune.*"])

setup(
    packages=packages,
    package_dir={"imc_prune": "python/imc_prune"},
    ext_modules=ext_modules,
    cmdclass={"build_py": build_py, **ext_cmdclass},
    entry_points=get_entry_points(),
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
