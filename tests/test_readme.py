"""The README's Python examples: the first two run as written (their eigenvalues checked with
another engine), and
every name and keyword the others use exists in the API (they need a data set, training or a
process group, so they are checked without running)."""

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

import imc_kernels
import imc_prune

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4
    assert "HessianOperator" in BLOCKS[0] and "top_eigvecs" in BLOCKS[1]


def _import_triton_kernel_modules() -> None:
    """Import every imc_kernels module that defines Triton kernels, now.

    ``@triton.jit`` decides when its module is imported whether it makes an interpreted
    function. The kernel modules are imported lazily, on first use: one first imported while
    the test below has the interpreter off would keep compiled kernels, which every later CPU
    test in the session then fails to call ("Cannot call @triton.jit'd outside of the scope
    of a kernel"; seen when this file ran before tests/hvp).
    """
    if importlib.util.find_spec("triton") is None:
        return
    package = Path(imc_kernels.__file__).parent
    for path in sorted(package.rglob("*.py")):
        if "triton.jit" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(package.parent).with_suffix("").parts
            importlib.import_module(".".join(parts))


def test_the_first_examples_run_and_match_an_independent_engine(monkeypatch):
    # As on a user's CPU: the elementwise ops on their C++/PyTorch paths, not in the Triton
    # interpreter the other tests use (minutes at 238,510 weights).
    _import_triton_kernel_modules()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md (Example)", "exec"), namespace)  # noqa: S102
    exec(compile(BLOCKS[1], "README.md (top eigenpairs)", "exec"), namespace)  # noqa: S102
    res, H, dens = namespace["res"], namespace["H"], namespace["dens"]
    assert bool(res.converged.all()) and res.eigenvectors.shape == (H.dim, 10)
    # A dense Hessian is out of reach at 238,510 weights: the Rayleigh quotients of the
    # returned vectors through PyHessian's reverse-over-reverse product instead.
    check = imc_kernels.HessianOperator(
        namespace["model"], None, namespace["batch"], engine="double_backward"
    )
    vectors = res.eigenvectors.double()
    rayleigh = torch.einsum("ij,ij->j", vectors, (check @ res.eigenvectors).double())
    torch.testing.assert_close(
        rayleigh, res.eigenvalues, rtol=1e-4, atol=1e-4 * float(res.eigenvalues[0])
    )
    assert dens.n_probes == 8
    torch.testing.assert_close(dens.weights.sum(1), torch.ones(8, dtype=torch.float64))
    # Every probe's nodes lie inside the spectrum, whose top the solve found.
    assert float(dens.nodes.max()) <= float(res.eigenvalues[0]) * (1 + 1e-4)
    grid, density, cdf = namespace["grid"], namespace["density"], namespace["cdf"]
    assert density.shape == grid.shape and float(cdf[-1]) == pytest.approx(1.0, abs=1e-3)


def _roots(tree: ast.Module) -> dict[str, object]:
    """Local names the snippet binds by import, to the objects they name."""
    roots: dict[str, object] = {"imc_kernels": imc_kernels, "imc_prune": imc_prune}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("imc_kernels", "imc_prune"):
                    obj = roots[alias.name.split(".")[0]]
                    for part in alias.name.split(".")[1:]:
                        obj = getattr(obj, part)
                    roots[alias.asname or alias.name.split(".")[0]] = obj
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in roots:
            module = __import__(node.module, fromlist=["_"])
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                roots[alias.asname or alias.name] = getattr(module, alias.name)
    return roots


def _resolve(node: ast.expr, roots: dict[str, object]):
    """The object a dotted name from a root stands for; None for anything else."""
    if isinstance(node, ast.Name):
        return roots.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, roots)
        if base is None or not (inspect.ismodule(base) or inspect.isclass(base)):
            return None
        assert hasattr(base, node.attr), f"README: {ast.unparse(node)} does not exist"
        return getattr(base, node.attr)
    return None


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_readme_name_and_keyword_exists(index):
    tree = ast.parse(BLOCKS[index])
    roots = {}  # names imported by earlier blocks too, as a reader runs them in order
    for earlier in BLOCKS[: index + 1]:
        roots.update(_roots(ast.parse(earlier)))
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func, roots)
        if target is None or not callable(target):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # builtins without a signature
            continue
        params = signature.parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            continue
        names = {p.name for p in params}
        for keyword in node.keywords:
            assert keyword.arg is None or keyword.arg in names, (
                f"README: {ast.unparse(node.func)} has no keyword {keyword.arg!r}"
            )
        checked += 1
    assert checked > 0
