"""Top-k Hessian eigenpairs: ``imc_kernels.top_eigvecs`` against the peers, same run.

For each model (trained briefly on Fashion-MNIST so the Hessian is not that of an init) and
each ``k`` it runs, on the same batch and machine:

* ``ours``: ``imc_kernels.top_eigvecs(model, batch, k)`` at its defaults (tol 1e-4);
* ``pyhessian``: ``hessian(model, criterion, data=batch).eigenvalues(top_n=k)`` (power
  iteration with deflation, reverse-over-reverse products with the gradient graph reused);
* ``eigenthings_lanczos`` / ``eigenthings_power``: hessian-eigenthings ``lanczos`` and
  ``deflated_power_iteration`` over its ``HessianOperator``;
* ``curvlinops_eigsh``: curvlinops ``HessianLinearOperator(...).to_scipy()`` + SciPy ``eigsh``;
* ``scipy_eigsh_func``: SciPy ``eigsh`` over a ``torch.func`` product
  (``jvp(grad(loss))``, NumPy float64 in and out);
* ``torch_lobpcg``: ``torch.lobpcg`` over our ``HessianOperator``, passed as a data-less
  ``torch.Tensor`` subclass whose ``matmul`` is the block product (lobpcg wants a tensor).

Each peer runs at its defaults, then along its own accuracy knob (tolerance, or Krylov size
for hessian-eigenthings' single-cycle Lanczos), cheapest first, until it reaches the residual
ours reached: the ``matched`` row. Between the last grid point that missed that residual and
the first that reached it, the knob is then bisected (``--max-refine`` runs, 4 in full runs):
a coarse grid would otherwise charge the peer for more products than it needs. Every run is
scored the same way, against a float64 copy of the model: ``res`` = max_i ||H v_i - theta_i
v_i|| / |lambda_1| (v_i normalized) and
``err`` = max_i |theta_i - lambda_i| / |lambda_1| against a tight reference (ours at tol
1e-10 on the float64 model, cross-checked with SciPy ``eigsh`` in full runs). ``right``:
``err <= 1e-4`` (the tolerance asked of every solver here). HVPs are counted at each
method's own product (columns of block products counted one by one). A run is stopped
(and reported as such) past ``--max-hvps`` products or ``--max-run-s`` seconds.

    python benchmarks/eig.py --quick --no-save     # smoke run, < 2 min on 2 CPU cores
    python benchmarks/eig.py                       # MLP and CNN, k = 1, 10, 32
    python benchmarks/eig.py --models mlp_lenet --ks 10 --methods ours,curvlinops_eigsh

A peer that is not installed or fails is listed as unavailable with the reason. Results
append to ``benchmarks/results/<device>.csv``; the summary goes to
``benchmarks/results/<device>-eig.md`` with the command at the top, and a figure of time
against residual per model and k (every scored run a point, right runs filled) to
``<device>-eig.png`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `imc_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as harness  # noqa: E402
from benchmarks import data as fmnist  # noqa: E402
from benchmarks import models  # noqa: E402

PEERS = (
    "pyhessian",
    "eigenthings_lanczos",
    "eigenthings_power",
    "curvlinops_eigsh",
    "scipy_eigsh_func",
    "torch_lobpcg",
)
METHODS = ("ours", *PEERS)
DEFAULT_MODELS = ("mlp_lenet", "cnn_small")
QUICK_MODELS = ("mlp_lenet",)
DEFAULT_KS = (1, 10, 32)
# "right": every eigenvalue within this of the reference, relative to |lambda_1|: the
# tolerance asked of every solver here (ours: tol = 1e-4 on the residual, which bounds the
# eigenvalue error by the same amount). A missed or duplicated eigenvalue among well
# separated ones is off by a gap, far more.
RIGHT_RTOL = 1e-4
# The reference: ours on the float64 model at this residual tolerance.
REFERENCE_TOL = 1e-10
REFERENCE_EXTRA = 8  # reference pairs beyond the largest k (so the k-th is well resolved)


class Stopped(RuntimeError):
    """A run went past its HVP or time cap."""


class Counter:
    """Counts products; raises :class:`Stopped` past the caps."""

    def __init__(self, max_hvps: int, max_seconds: float):
        self.count = 0
        self.max_hvps, self.max_seconds = max_hvps, max_seconds
        self.start = time.perf_counter()

    def add(self, n: int) -> None:
        self.count += n
        if self.count > self.max_hvps:
            raise Stopped(f"stopped after {self.count} HVPs (--max-hvps {self.max_hvps})")
        if time.perf_counter() - self.start > self.max_seconds:
            raise Stopped(
                f"stopped after {time.perf_counter() - self.start:.0f} s "
                f"(--max-run-s {self.max_seconds:g}), {self.count} HVPs"
            )


# --------------------------------------------------------------------------------------
# The problem


@dataclasses.dataclass
class Problem:
    name: str
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    model64: nn.Module
    batch64: tuple[torch.Tensor, torch.Tensor]
    reference: torch.Tensor  # (K,) float64, descending
    train_loss: float
    data_source: str
    seed: int

    def __post_init__(self):
        self.criterion = nn.CrossEntropyLoss()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        import imc_kernels

        self.h64 = imc_kernels.HessianOperator(self.model64, None, self.batch64)

    @property
    def lambda_1(self) -> float:
        return float(self.reference[0])

    def flat(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def score(self, values, vectors: torch.Tensor) -> dict:
        """Residuals and eigenvalue errors against the float64 model (see module doc)."""
        values = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self.device)
        order = torch.argsort(values, descending=True)
        values, vectors = values[order], vectors[:, order.to(vectors.device)]
        k = values.numel()
        vectors = vectors.to(device=self.device, dtype=torch.float64)
        vectors = vectors / torch.linalg.vector_norm(vectors, dim=0)
        residuals = []
        for start in range(0, k, 16):
            block = vectors[:, start : start + 16].contiguous()
            product = self.h64.matmat(block)
            residuals.append(
                torch.linalg.vector_norm(product - block * values[start : start + 16], dim=0)
            )
        res = float(torch.cat(residuals).max()) / abs(self.lambda_1)
        err = float((values.cpu() - self.reference[:k]).abs().max()) / abs(self.lambda_1)
        return {"res": res, "err": err, "right": err <= RIGHT_RTOL}


def train(model: nn.Module, dataset, steps: int, seed: int, device) -> float:
    """``steps`` Adam steps (lr 1e-3, batch 128) on the training images; returns the last
    loss. Leaves the model in eval mode."""
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(0, len(dataset.labels), (128,), generator=generator)
        inputs, targets = dataset.images[index].to(device), dataset.labels[index].to(device)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def reference_values(problem_args, k_ref: int, cross_check: bool) -> tuple[torch.Tensor, str]:
    """Top ``k_ref`` eigenvalues of the float64 model: ours at tol 1e-10 (blocks of 16),
    optionally cross-checked with SciPy eigsh (tol 1e-10) on the same operator."""
    import imc_kernels

    model64, batch64 = problem_args
    operator = imc_kernels.HessianOperator(model64, None, batch64)
    tol = REFERENCE_TOL if cross_check else 1e-8
    res = imc_kernels.top_eigvecs(operator, None, k_ref, tol=tol, block_size=16)
    note = (
        f"ours fp64, tol {tol:g}: {res.n_hvps} HVPs, max residual {float(res.residuals.max()):.1e}"
    )
    values = res.eigenvalues.cpu()
    if cross_check:
        import scipy.sparse.linalg as sla

        rng = np.random.default_rng(12345)
        w = sla.eigsh(
            operator.to_scipy(),
            k=k_ref,
            which="LA",
            tol=REFERENCE_TOL,
            v0=rng.standard_normal(operator.dim),
            return_eigenvectors=False,
        )
        w = torch.from_numpy(np.sort(w)[::-1].copy())
        diff = float((w - values).abs().max()) / abs(float(values[0]))
        note += f"; SciPy eigsh (tol {REFERENCE_TOL:g}) agrees to {diff:.1e} relative"
        if diff > 1e-6:
            print(f"  WARNING: the two references differ by {diff:.1e} relative", flush=True)
    return values, note


def prepare(name: str, args, settings, dataset) -> tuple[Problem, str]:
    device = torch.device(args.device)
    batch_size = args.batch or (
        models.batch_size(name, quick=False) if not settings.quick else settings.batch[name]
    )
    model = models.build_model(name, seed=args.seed, device=device)
    steps = settings.train_steps if args.train_steps is None else args.train_steps
    start = time.perf_counter()
    loss = train(model, dataset, steps, args.seed, device)
    generator = torch.Generator().manual_seed(args.seed + 2)
    index = torch.randperm(len(dataset.labels), generator=generator)[:batch_size]
    batch = (dataset.images[index].to(device), dataset.labels[index].to(device))
    model64 = copy.deepcopy(model).double()
    batch64 = (batch[0].double(), batch[1])
    k_ref = max(args.ks) + REFERENCE_EXTRA
    values, note = reference_values((model64, batch64), k_ref, cross_check=not settings.quick)
    print(
        f"[{name}] trained {steps} steps (loss {loss:.3f}), batch {batch_size}, reference in "
        f"{time.perf_counter() - start:.1f} s: {note}",
        flush=True,
    )
    problem = Problem(name, model, batch, model64, batch64, values, loss, dataset.source, args.seed)
    return problem, note


# --------------------------------------------------------------------------------------
# The methods. Each runner takes (problem, k, setting, counter) and returns
# (values, vectors (dim, k)); the counter sees every product.


def run_ours(problem: Problem, k: int, setting: dict, counter: Counter):
    import imc_kernels

    res = imc_kernels.top_eigvecs(problem.model, problem.batch, k, seed=problem.seed, **setting)
    counter.add(res.n_hvps)
    return res.eigenvalues.cpu().numpy(), res.eigenvectors


def time_split(problem: Problem, k: int, sync) -> dict:
    """One more run of ours with the operator's setup and every product timed, each
    synchronized on both sides: where the wall time goes. ``solver_share`` is the part spent
    neither making the operator nor in its products (orthogonalization, Rayleigh-Ritz,
    restarts, the final residuals): the GPU target of the Lanczos issue puts the
    orthogonalization share under 15 percent, and this share bounds it from above. The
    synchronizations add a little to the products on a GPU; the timed rows do not have them.
    """
    from imc_kernels.hvp import operator as operator_module

    cls = operator_module.HessianOperator
    original_init, original_matmat = cls.__init__, cls.matmat
    spent = {"setup": 0.0, "products": 0.0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - start

        return wrapper

    cls.__init__, cls.matmat = timed("setup", original_init), timed("products", original_matmat)
    try:
        sync()
        start = time.perf_counter()
        run_ours(problem, k, {}, Counter(10**9, 1e9))
        sync()
        total = time.perf_counter() - start
    finally:
        cls.__init__, cls.matmat = original_init, original_matmat
    rest = max(total - spent["setup"] - spent["products"], 0.0)
    return {
        "split_total_s": total,
        "setup_s": spent["setup"],
        "products_s": spent["products"],
        "solver_s": rest,
        "solver_share": rest / total if total > 0 else float("nan"),
    }


def run_pyhessian(problem: Problem, k: int, setting: dict, counter: Counter):
    import importlib

    # `pyhessian.hessian` the attribute is the class (re-exported by the package); the module
    # holds the product function it calls.
    ph = importlib.import_module("pyhessian.hessian")
    original = ph.hessian_vector_product

    def counted(grads, params, v):
        counter.add(1)
        return original(grads, params, v)

    model = problem.model
    model.zero_grad(set_to_none=True)
    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(problem.seed)  # PyHessian draws its start vectors from the global RNG
        computer = ph.hessian(
            model, problem.criterion, data=problem.batch, cuda=problem.device.type == "cuda"
        )
        values, vectors = computer.eigenvalues(top_n=k, **setting)
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)
    flat = torch.stack([problem.flat(v).detach() for v in vectors], dim=1)
    return np.array(values, dtype=np.float64), flat


def _eigenthings_operator(problem: Problem, counter: Counter):
    from hessian_eigenthings import HessianOperator, supervised_loss

    operator = HessianOperator(
        problem.model, [problem.batch], supervised_loss(problem.criterion), full_dataset=True
    )
    matvec = operator.matvec

    def counted(v):
        counter.add(1)
        return matvec(v)

    operator.matvec = counted
    return operator


def run_eigenthings_lanczos(problem: Problem, k: int, setting: dict, counter: Counter):
    from hessian_eigenthings import lanczos

    operator = _eigenthings_operator(problem, counter)
    res = lanczos(operator, k=k, which="LA", seed=problem.seed, **setting)
    return res.eigenvalues.double().cpu().numpy(), res.eigenvectors.T.detach()


def run_eigenthings_power(problem: Problem, k: int, setting: dict, counter: Counter):
    from hessian_eigenthings import deflated_power_iteration

    operator = _eigenthings_operator(problem, counter)
    res = deflated_power_iteration(operator, k=k, seed=problem.seed, **setting)
    return res.eigenvalues.double().cpu().numpy(), res.eigenvectors.T.detach()


def _counted_scipy(apply: Callable, dim: int, counter: Counter):
    from scipy.sparse.linalg import LinearOperator

    def matmat(x):
        x = np.asarray(x)
        counter.add(1 if x.ndim == 1 else x.shape[1])
        return apply(x)

    return LinearOperator((dim, dim), matvec=matmat, matmat=matmat, dtype=np.float64)


def _eigsh(operator, problem: Problem, k: int, setting: dict):
    import scipy.sparse.linalg as sla

    # A seeded start vector (eigsh's default draws from ARPACK's own unseeded generator).
    v0 = np.random.default_rng(problem.seed).standard_normal(problem.dim)
    values, vectors = sla.eigsh(operator, k=k, which="LA", v0=v0, **setting)
    return values, torch.from_numpy(vectors.copy())


def run_curvlinops_eigsh(problem: Problem, k: int, setting: dict, counter: Counter):
    from curvlinops import HessianLinearOperator

    # check_deterministic=False: the default probes the data loader with extra passes, a
    # one-time safety check unrelated to the eigensolve.
    linear_operator = HessianLinearOperator(
        problem.model,
        problem.criterion,
        problem.params,
        [problem.batch],
        check_deterministic=False,
    ).to_scipy()
    operator = _counted_scipy(linear_operator.dot, problem.dim, counter)
    return _eigsh(operator, problem, k, setting)


def run_scipy_eigsh_func(problem: Problem, k: int, setting: dict, counter: Counter):
    names, model, (inputs, targets) = problem.names, problem.model, problem.batch
    criterion = problem.criterion
    params = tuple(p.detach() for p in problem.params)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(ps):
        output = torch.func.functional_call(model, dict(zip(names, ps)), (inputs,))
        return criterion(output, targets)

    grad_fn = torch.func.grad(loss_of)

    def hvp(vector: torch.Tensor) -> torch.Tensor:
        pieces = tuple(t.view(s) for t, s in zip(vector.split(sizes), shapes))
        _, product = torch.func.jvp(grad_fn, (params,), (pieces,))
        return torch.cat([t.reshape(-1) for t in product])

    def apply(x: np.ndarray) -> np.ndarray:
        block = torch.from_numpy(x.reshape(problem.dim, -1)).to(problem.device, torch.float32)
        out = torch.stack([hvp(block[:, j].contiguous()) for j in range(block.shape[1])], 1)
        return out.double().cpu().numpy().reshape(x.shape)

    operator = _counted_scipy(apply, problem.dim, counter)
    return _eigsh(operator, problem, k, setting)


class OperatorTensor(torch.Tensor):
    """A data-less ``(dim, dim)`` tensor whose ``matmul`` is a block operator product.

    ``torch.lobpcg`` takes ``A`` as a tensor and only ever multiplies it onto blocks (and reads
    its shape, dtype and device), so a wrapper subclass that intercepts ``matmul`` in
    ``__torch_function__`` passes any operator. ``torch.lobpcg`` itself is routed to its
    implementation (the public function would otherwise dispatch back here).
    """

    @staticmethod
    def __new__(cls, matmat: Callable, dim: int, dtype, device):
        tensor = torch.Tensor._make_wrapper_subclass(cls, (dim, dim), dtype=dtype, device=device)
        tensor.matmat = matmat
        return tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.lobpcg:
            from torch import _lobpcg

            return _lobpcg._lobpcg(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and isinstance(
            args[0], OperatorTensor
        ):
            return args[0].matmat(args[1].contiguous())
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"OperatorTensor holds no data; {func} is not supported")


def run_torch_lobpcg(problem: Problem, k: int, setting: dict, counter: Counter):
    import imc_kernels

    operator = imc_kernels.HessianOperator(problem.model, None, problem.batch)

    def matmat(block):
        counter.add(block.shape[1])
        return operator.matmat(block)

    tensor = OperatorTensor(matmat, problem.dim, operator.dtype, operator.device)
    generator = torch.Generator().manual_seed(problem.seed)
    start = torch.randn(problem.dim, k, generator=generator).to(problem.device)
    values, vectors = torch.lobpcg(tensor, X=start, largest=True, **setting)
    return values.double().cpu().numpy(), vectors


RUNNERS = {
    "ours": run_ours,
    "pyhessian": run_pyhessian,
    "eigenthings_lanczos": run_eigenthings_lanczos,
    "eigenthings_power": run_eigenthings_power,
    "curvlinops_eigsh": run_curvlinops_eigsh,
    "scipy_eigsh_func": run_scipy_eigsh_func,
    "torch_lobpcg": run_torch_lobpcg,
}
IMPORTS = {
    "pyhessian": "pyhessian",
    "eigenthings_lanczos": "hessian_eigenthings",
    "eigenthings_power": "hessian_eigenthings",
    "curvlinops_eigsh": "curvlinops",
    "scipy_eigsh_func": "scipy",
}


def settings_for(method: str, k: int) -> list[tuple[str, dict, float]]:
    """``[(label, kwargs, cost rank)]``, the defaults first.

    The rank orders the settings by cost (HVPs), the default included: a default that
    reaches ours' residual is then undercut by any cheaper setting that also does, and one
    that does not is followed by the costlier ones, cheapest first (see :func:`run_model`).
    """
    if method == "ours":
        return [("default", {}, 0.0)]
    if method == "pyhessian":
        # Its tol is on the relative change of the eigenvalue estimate, which stalls at
        # float32 rounding (~1e-7) while the residual is still ~sqrt of that: past tol 1e-6
        # only a fixed number of iterations (tol 0) goes further.
        tols = [
            (f"tol {tol:g}, maxIter 1000", {"tol": tol, "maxIter": 1000}, float(rank))
            for rank, tol in enumerate((1e-4, 1e-5, 1e-6), start=1)
        ]
        fixed = [
            (f"tol 0, maxIter {n}", {"tol": 0.0, "maxIter": n}, float(rank))
            for rank, n in enumerate((50, 100, 200, 400), start=4)
        ]
        return [("default (tol 1e-3, maxIter 100)", {}, 0.0), *tols, *fixed]
    if method == "eigenthings_lanczos":
        # One Lanczos run of max_iter products (no restart): the Krylov size is the knob, on
        # a grid of 1 to 4 products around its default 2k, then coarser.
        step = max(1, min(4, k // 5))
        sizes = list(range(k + 1, 3 * k + 13, step)) + [4 * k + 12, 6 * k + 12, 8 * k + 12]
        scan = [
            (f"max_iter {m}, reorth", {"max_iter": m, "reorthogonalize": True}, float(m))
            for m in sizes
            if m != 2 * k
        ]
        return [(f"default (max_iter {2 * k})", {}, float(2 * k)), *scan]
    if method == "eigenthings_power":
        scan = [
            (f"tol {tol:g}, max_iter 1000", {"tol": tol, "max_iter": 1000}, float(rank))
            for rank, tol in enumerate((1e-5, 1e-6, 1e-7, 1e-8), start=1)
        ]
        return [("default (tol 1e-4, max_iter 100)", {}, 0.0), *scan]
    if method in ("curvlinops_eigsh", "scipy_eigsh_func"):
        scan = [
            (f"tol {tol:g}", {"tol": tol}, float(rank))
            for rank, tol in enumerate((1e-1, 1e-2, 1e-3, 1e-4, 1e-5), start=1)
        ]
        return [("default (tol 0)", {}, math.inf), *scan]
    if method == "torch_lobpcg":
        scan = [
            (f"tol {tol:g}", {"tol": tol}, -math.log10(tol))
            for tol in (1e-3, 1e-4, 3e-5, 1e-5, 3e-6)
        ]
        return [("default (tol 3.5e-4)", {}, -math.log10(3.5e-4)), *scan]
    raise KeyError(method)


def between(method: str, low: tuple, high: tuple) -> tuple | None:
    """A setting of ``method`` halfway between two of its entries, in the form of
    :func:`settings_for`: ``low`` did not reach ours' residual, the costlier ``high`` did.
    None when the knob cannot be split any finer (or has no continuous form).

    The grids step by up to 64 products (hessian-eigenthings at k = 32: 105, 140, 204) or a
    decade of tol (SciPy eigsh), so the first grid point that reaches ours' residual can cost
    up to a third more than the peer needs; bisecting between it and the last one that does
    not reach keeps the peer's time honest.
    """
    _, low_kwargs, low_rank = low
    _, high_kwargs, high_rank = high
    if method == "eigenthings_lanczos":
        # Rank = the Krylov size (max_iter) of every entry, the default's 2k included.
        lo, hi = int(low_rank), int(high_rank)
        if hi - lo <= 2:
            return None
        mid = (lo + hi) // 2
        return f"max_iter {mid}, reorth", {"max_iter": mid, "reorthogonalize": True}, float(mid)
    if method in ("curvlinops_eigsh", "scipy_eigsh_func", "torch_lobpcg"):
        lo_tol, hi_tol = low_kwargs.get("tol"), high_kwargs.get("tol")
        if not lo_tol or not hi_tol or lo_tol / hi_tol < 1.5:
            return None  # a default without a tol (or tol 0), or already within a factor 1.5
        tol = math.sqrt(lo_tol * hi_tol)
        return f"tol {tol:.2g}", {"tol": float(f"{tol:.2g}")}, (low_rank + high_rank) / 2
    return None


def availability(method: str) -> str | None:
    """None, or why the method cannot run here."""
    module = IMPORTS.get(method)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # a half-installed peer fails in many ways: report, go on
        return f"import {module} failed: {_reason(error)}"
    return None


def _reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Settings:
    quick: bool
    train_steps: int
    batch: dict
    max_hvps: int
    max_run_s: float
    repeat_below_s: float  # runs faster than this are timed again (median of 3)
    max_scan: int  # settings tried beyond the defaults, per method and k
    h2h_rounds: int  # interleaved rounds of ours against the fastest right peer (0: none)
    max_refine: int  # bisection steps of a peer's knob between its grid points (0: none)


FULL = Settings(
    quick=False,
    train_steps=200,
    batch={},
    max_hvps=6000,
    max_run_s=100.0,
    repeat_below_s=10.0,
    max_scan=40,
    h2h_rounds=5,
    max_refine=4,
)
QUICK = Settings(
    quick=True,
    train_steps=50,
    batch={"mlp_lenet": 256, "cnn_small": 128, "mlp_wide": 64, "cnn_deep": 16},
    max_hvps=300,
    max_run_s=3.0,
    repeat_below_s=0.0,
    max_scan=3,
    h2h_rounds=0,
    max_refine=0,
)


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.models: list[dict] = []
        self.notes: list[str] = []
        self.failures: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)


def timed_run(method, problem, k, setting, settings: Settings, sync):
    """One scored run (plus two timed repeats when it is quick): the row's numbers."""
    counter = Counter(settings.max_hvps, settings.max_run_s)
    sync()
    start = time.perf_counter()
    values, vectors = RUNNERS[method](problem, k, setting, counter)
    sync()
    elapsed = time.perf_counter() - start
    times = [elapsed]
    if elapsed < settings.repeat_below_s:
        for _ in range(2):
            again = Counter(settings.max_hvps, settings.max_run_s)
            sync()
            start = time.perf_counter()
            RUNNERS[method](problem, k, setting, again)
            sync()
            times.append(time.perf_counter() - start)
    scores = problem.score(values, vectors)
    return harness.Measurement.of(times), counter.count, scores


def reference_value(reference: torch.Tensor, i: int) -> float | None:
    """``lambda_i`` (1-based) of the reference, or None (an empty cell) when the run's largest
    k did not ask for that many: a run with ``--ks 1`` printed its last value as lambda_10 and
    lambda_32."""
    return float(reference[i - 1]) if len(reference) >= i else None


def run_model(name: str, args, settings: Settings, dataset, report: Report) -> None:
    device = torch.device(args.device)
    sync = harness.synchronizer(device)
    problem, ref_note = prepare(name, args, settings, dataset)
    report.models.append(
        {
            "model": name,
            "params": problem.dim,
            "batch": problem.batch[0].shape[0],
            "train_steps": settings.train_steps if args.train_steps is None else args.train_steps,
            "train_loss": problem.train_loss,
            "lambda_1": problem.lambda_1,
            "lambda_10": reference_value(problem.reference, 10),
            "lambda_32": reference_value(problem.reference, 32),
            "reference": ref_note,
        }
    )
    # Warm-up (lazy initialisations, allocator): one cheap solve, untimed.
    run_ours(problem, 1, {}, Counter(10**6, 1e9))
    for k in args.ks:
        if k >= problem.dim:
            report.note(f"{name} k={k}: skipped, k >= dim")
            continue
        common = {"benchmark": "eig", "model": name, "params": problem.dim, "k": k}
        target_res = None

        def run_setting(method, entry, target, k=k, common=common):
            """One scored, timed run of ``entry`` (a :func:`settings_for` entry) as a report
            row (also on failure or a cap); the entry stays on the row (``_entry``)."""
            label, setting, _ = entry
            row = {**common, "method": method, "setting": label, "_entry": entry}
            try:
                time_m, hvps, scores = timed_run(method, problem, k, setting, settings, sync)
            except Stopped as stop:
                report.note(f"{name} k={k} {method} [{label}]: {stop}")
                row.update(status="stopped", note=str(stop))
                report.rows.append(row)
                return row
            except Exception as error:
                report.note(f"{name} k={k} {method} [{label}]: failed -- {_reason(error)}")
                row.update(status="failed", note=_reason(error))
                report.rows.append(row)
                return row
            row.update(
                status="ok",
                time_s=time_m.median,
                time_p20_s=time_m.p20,
                time_p80_s=time_m.p80,
                repeats=time_m.n,
                hvps=hvps,
                res=scores["res"],
                err=scores["err"],
                right=scores["right"],
                reaches=True if target is None else scores["res"] <= target,
                _time=time_m,
            )
            report.rows.append(row)
            print(
                f"  {name} k={k} {method:<20} {label:<34} {time_m.median:8.2f} s "
                f"{hvps:6d} HVPs  res {scores['res']:.1e}  err {scores['err']:.1e}",
                flush=True,
            )
            return row

        for method in args.methods:
            why = availability(method)
            if why is not None:
                report.note(f"{name} k={k} {method}: unavailable -- {why}")
                continue
            entries = settings_for(method, k)
            default_rank = entries[0][2]
            row = run_setting(method, entries[0], target_res)
            if method == "ours":
                target_res = row.get("res") if row["status"] == "ok" else None
                if row["status"] == "ok":
                    row.update(time_split(problem, k, sync))
                    print(
                        f"  {name} k={k} ours time split: setup {row['setup_s']:.3f} s, "
                        f"products {row['products_s']:.3f} s, solver {row['solver_s']:.3f} s "
                        f"({100 * row['solver_share']:.0f} % of {row['split_total_s']:.3f} s)",
                        flush=True,
                    )
                if row["status"] == "ok" and not row["right"]:
                    report.failures.append(
                        f"{name} k={k} ours: eigenvalue error {row['err']:.2e} > "
                        f"{RIGHT_RTOL:g} (wrong result)"
                    )
                continue
            if target_res is None:
                continue
            # Default reached ours' residual: look for a cheaper setting that also does.
            # It did not: costlier settings, cheapest first, until one does.
            reached = bool(row.get("reaches"))
            candidates = sorted(
                (entry for entry in entries[1:] if (entry[2] < default_rank) == reached),
                key=lambda entry: entry[2],
            )
            for index, entry in enumerate(candidates):
                if index >= settings.max_scan:
                    report.note(f"{name} k={k} {method}: scan cut after {index} settings")
                    break
                row = run_setting(method, entry, target_res)
                if row["status"] != "ok" and not reached:
                    break  # the later settings cost more
                if row.get("reaches"):
                    break
            refine_setting(method, k, name, report, settings, run_setting, target_res)
        head_to_head(problem, k, report, settings, sync)


def refine_setting(method, k, model, report: Report, settings: Settings, run_setting, target):
    """Bisect ``method``'s knob between the costliest setting run that missed ours' residual
    and the cheapest that reached it (see :func:`between`), up to ``settings.max_refine``
    runs; each run is a scored row like the grid's."""
    tried = [
        r
        for r in report.rows
        if r["model"] == model and r["k"] == k and r["method"] == method and r["status"] == "ok"
    ]
    reaching = [r["_entry"] for r in tried if r.get("reaches")]
    if not reaching:
        return
    high_entry = min(reaching, key=lambda entry: entry[2])
    missing = [
        r["_entry"] for r in tried if not r.get("reaches") and r["_entry"][2] < high_entry[2]
    ]
    if not missing:
        return
    low_entry = max(missing, key=lambda entry: entry[2])
    for _ in range(settings.max_refine):
        mid = between(method, low_entry, high_entry)
        if mid is None:
            return
        row = run_setting(method, mid, target)
        if row["status"] != "ok":
            return
        if row.get("reaches"):
            high_entry = mid
        else:
            low_entry = mid


def fastest_right_peer(rows: list[dict]) -> dict | None:
    """The quickest peer row that reached ours' residual with right eigenvalues, or None."""
    right = [r for r in rows if r["method"] != "ours" and r.get("reaches") and r.get("right")]
    return min(right, key=lambda r: r["time_s"]) if right else None


def head_to_head(problem: Problem, k: int, report: Report, settings: Settings, sync) -> None:
    """Ours against the fastest right peer, interleaved: ``h2h_rounds`` rounds of one run
    each, the order alternating from round to round, the ratio peer / ours taken per round.
    The rows above time each method in a block of its own; on a shared machine whose speed
    drifts by ~10 % over a minute, that block timing moves their ratio by as much, while
    neighbouring runs see the same machine. Recorded on ours' row (``h2h_*``)."""
    rows = [r for r in report.rows if r["model"] == problem.name and r["k"] == k]
    ours = next((r for r in rows if r["method"] == "ours" and r["status"] == "ok"), None)
    peer = fastest_right_peer(rows)
    rounds = settings.h2h_rounds
    if ours is None or peer is None or rounds <= 0:
        return
    if rounds * (ours["time_s"] + peer["time_s"]) > 4 * settings.max_run_s:
        cap = 4 * settings.max_run_s
        report.note(f"{problem.name} k={k}: head-to-head skipped (over {cap:g} s)")
        return
    setting = peer["_entry"][1]  # a grid point, or one refine_setting found between two

    def once(method, chosen):
        counter = Counter(settings.max_hvps, settings.max_run_s)
        sync()
        start = time.perf_counter()
        RUNNERS[method](problem, k, chosen, counter)
        sync()
        return time.perf_counter() - start

    ratios, ours_times, peer_times = [], [], []
    for index in range(rounds):
        if index % 2 == 0:
            ours_s = once("ours", {})
            peer_s = once(peer["method"], setting)
        else:
            peer_s = once(peer["method"], setting)
            ours_s = once("ours", {})
        ratios.append(peer_s / ours_s)
        ours_times.append(ours_s)
        peer_times.append(peer_s)
    ratios.sort()
    ours.update(
        h2h_peer=f"{peer['method']} ({peer['setting']})",
        h2h_rounds=rounds,
        h2h_ratio=ratios[len(ratios) // 2],
        h2h_ratio_min=ratios[0],
        h2h_ratio_max=ratios[-1],
        # What moved the ratio against the blocks above: ours, the peer, or both.
        h2h_ours_s=statistics.median(ours_times),
        h2h_peer_s=statistics.median(peer_times),
    )
    print(
        f"  {problem.name} k={k} head-to-head with {ours['h2h_peer']}, {rounds} interleaved "
        f"rounds: peer / ours median {ours['h2h_ratio']:.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]"
        f" (median times: ours {ours['h2h_ours_s']:.2f} s, peer {ours['h2h_peer_s']:.2f} s)",
        flush=True,
    )


TABLE_COLUMNS = [
    ("model", "model"),
    ("k", "k"),
    ("method", "method"),
    ("setting", "setting"),
    ("time_s", "time s"),
    ("hvps", "HVPs"),
    ("res", "max res"),
    ("err", "max err"),
    ("right", "right"),
    ("reaches", "reaches ours"),
    ("status", "status"),
]

SPLIT_COLUMNS = [
    ("model", "model"),
    ("k", "k"),
    ("split_total_s", "total s"),
    ("setup_s", "setup s"),
    ("products_s", "products s"),
    ("solver_s", "solver s"),
    ("solver_share", "solver share"),
]

MODEL_COLUMNS = [
    ("model", "model"),
    ("params", "params"),
    ("batch", "batch"),
    ("train_steps", "train steps"),
    ("train_loss", "loss"),
    ("lambda_1", "lambda_1"),
    ("lambda_10", "lambda_10"),
    ("lambda_32", "lambda_32"),
]


def target_lines(report: Report) -> list[str]:
    """The issue's CPU targets, per model and k, from this run's rows."""
    lines = []
    keys = sorted({(r["model"], r["k"]) for r in report.rows}, key=lambda t: (t[0], t[1]))
    for model, k in keys:
        rows = [r for r in report.rows if r["model"] == model and r["k"] == k]
        ours = next((r for r in rows if r["method"] == "ours" and r["status"] == "ok"), None)
        if ours is None:
            continue
        reached = [r for r in rows if r["method"] != "ours" and r.get("reaches")]
        fastest = fastest_right_peer(rows)
        text = (
            f"{model} k={k}: ours {ours['time_s']:.2f} s, {ours['hvps']} HVPs, res "
            f"{ours['res']:.1e}, err {ours['err']:.1e}."
        )
        if reached:
            fewest = min(reached, key=lambda r: r["hvps"])
            text += (
                f" Fewest HVPs of a peer reaching that residual: {fewest['hvps']} "
                f"({fewest['method']}, {fewest['setting']})"
                f" -> ours {'<=' if ours['hvps'] <= fewest['hvps'] else '>'} peers."
            )
        if fastest is not None:
            text += (
                f" Fastest right peer reaching it: {fastest['method']} ({fastest['setting']}) "
                f"{fastest['time_s']:.2f} s = {fastest['time_s'] / ours['time_s']:.1f}x ours."
            )
            if "h2h_ratio" in ours:
                text += (
                    f" Interleaved head-to-head ({ours['h2h_rounds']} rounds, alternating "
                    f"order): {ours['h2h_ratio']:.2f}x ours (per-round range "
                    f"{ours['h2h_ratio_min']:.2f}-{ours['h2h_ratio_max']:.2f})"
                )
                if "h2h_ours_s" in ours:
                    text += (
                        f", median times ours {ours['h2h_ours_s']:.2f} s, "
                        f"peer {ours['h2h_peer_s']:.2f} s"
                    )
                text += "."
        if not reached:
            text += " No peer reached that residual within the caps."
        lines.append(text)
    return lines


# Marker per peer (ours is a star); colours from matplotlib's tab10 in method order.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def _plottable(row: dict) -> bool:
    if row.get("status") != "ok":
        return False
    try:
        res, time_s = float(row["res"]), float(row["time_s"])
    except (KeyError, TypeError, ValueError):
        return False
    return math.isfinite(res) and res > 0 and math.isfinite(time_s) and time_s > 0


def eig_figure(rows: list[dict]):
    """Time against residual, one panel per (model, k): every scored run as a point (ours a
    star), filled when its eigenvalues are right and hollow when not, labelled with its HVPs;
    dotted lines through ours. Where ours sits left of (faster than) and on or below (as
    accurate as) every filled point is what the targets say in numbers. Returns a matplotlib
    figure, or None when no row has a time and a residual."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the benchmark machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [
        {**r, "res": float(r["res"]), "time_s": float(r["time_s"])} for r in rows if _plottable(r)
    ]
    keys = sorted({(r["model"], r["k"]) for r in rows})
    if not keys:
        return None
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "ours", m))
    colours = plt.get_cmap("tab10").colors
    style = {
        method: ("*" if method == "ours" else _MARKERS[i % len(_MARKERS)], colours[i % 10])
        for i, method in enumerate(methods)
    }
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.6 * n_cols, 3.8 * n_rows + 0.6), squeeze=False
    )
    for ax, (model, k) in zip(axes.flat, keys, strict=False):
        panel = [r for r in rows if r["model"] == model and r["k"] == k]
        # A single point (or one time / residual) spans nothing: give it a decade around it
        # (set before anything is drawn, which would autoscale to an empty range).
        for values, set_limits in (
            ([r["res"] for r in panel], ax.set_ylim),
            ([r["time_s"] for r in panel], ax.set_xlim),
        ):
            if min(values) == max(values):
                set_limits(values[0] / 3, values[0] * 3)
        for method in methods:
            marker, colour = style[method]
            size = 150 if method == "ours" else 45
            for right in (True, False):
                chosen = [
                    r for r in panel if r["method"] == method and bool(r.get("right")) == right
                ]
                if not chosen:
                    continue
                ax.scatter(
                    [r["time_s"] for r in chosen],
                    [r["res"] for r in chosen],
                    marker=marker,
                    s=size,
                    facecolors=colour if right else "none",
                    edgecolors=colour,
                    linewidths=1.2,
                    zorder=3 if method == "ours" else 2,
                    label=method,
                )
            for r in panel:
                if r["method"] == method:
                    ax.annotate(
                        str(r.get("hvps", "")),
                        (r["time_s"], r["res"]),
                        textcoords="offset points",
                        xytext=(5, 3),
                        fontsize=7,
                        color=colour,
                    )
        ours = next((r for r in panel if r["method"] == "ours"), None)
        title = f"{model}, k = {k}"
        if ours is not None:
            ax.axhline(ours["res"], ls=":", lw=0.8, color="0.4", zorder=1)
            ax.axvline(ours["time_s"], ls=":", lw=0.8, color="0.4", zorder=1)
            if "h2h_ratio" in ours:
                title += f"\nours {float(ours['h2h_ratio']):.2f}x faster than {ours['h2h_peer']}"
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Within a decade or two matplotlib labels the minor ticks too, and they overlap.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("max ||Hv - theta v|| / |lambda_1|")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.margins(0.12)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.03),
        ncol=min(len(labels), 4),
        fontsize=8,
    )
    fig.text(
        0.5,
        0.005,
        f"filled: right (max err <= {RIGHT_RTOL:g}); hollow: wrong; numbers: HVPs",
        ha="center",
        va="bottom",
        fontsize=7,
        color="0.35",
    )
    fig.tight_layout(rect=(0, 0.12 / n_rows, 1, 1))
    return fig


def save_eig_figure(rows: list[dict], path: Path) -> Path | None:
    """Write :func:`eig_figure` to ``path`` (PNG); None when there is nothing to plot or
    matplotlib is not installed (the GPU machines have no package registry): the tables and
    the CSV carry the same numbers."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("  no figure: matplotlib is not installed", flush=True)
        return None
    fig = eig_figure(rows)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def markdown_summary(
    report: Report, metadata: dict, settings: Settings, source: str, figure: str | None = None
) -> str:
    lines = [
        "# Eigensolver benchmark: top-k Hessian eigenpairs",
        "",
        "```",
        metadata["command"],
        "```",
        "",
        f"- device: `{metadata['device']}` ({metadata['threads']} torch threads, 1-minute "
        f"load average {metadata['load']} before the run)",
        f"- date: {metadata['timestamp']}, commit `{metadata['commit'] or 'unknown'}`",
        f"- torch {metadata['torch']}, python {metadata['python']}",
        f"- mode: {'quick (smoke numbers)' if settings.quick else 'full'}; data: {source}",
        "",
        "Each model is trained briefly (Adam, lr 1e-3, batch 128) on Fashion-MNIST, then the "
        "Hessian of the mean cross-entropy on a fixed batch is solved for its top k "
        "eigenpairs. `time` = wall time of the whole call (operator setup included; median of "
        "3 for runs under "
        f"{settings.repeat_below_s:g} s). `HVPs` = Hessian-vector products, every column of a "
        "block product counted. `max res` = max_i ||H v_i - theta_i v_i|| / |lambda_1| "
        "against the float64 model; `max err` = max_i |theta_i - lambda_i| / |lambda_1| "
        f"against the reference; `right` = max err <= {RIGHT_RTOL:g}. Each peer runs at its "
        "defaults, then along its accuracy knob until it reaches ours' residual "
        f"(`reaches ours`), then bisects the knob (up to {settings.max_refine} more runs) "
        "between the last grid point that missed and the first that reached it; a run past "
        f"{settings.max_hvps} HVPs or {settings.max_run_s:g} s is stopped (`stopped`) and the "
        "costlier settings after it are skipped.",
        "",
        harness.markdown_table(report.models, MODEL_COLUMNS),
        "",
    ]
    lines += [f"- reference, {m['model']}: {m['reference']}" for m in report.models]
    lines += ["", harness.markdown_table(report.rows, TABLE_COLUMNS), ""]
    if figure is not None:
        lines += [f"![time against residual, per model and k]({figure})", ""]
    lines += ["## Targets", ""]
    lines += [f"- {line}" for line in target_lines(report)]
    splits = [r for r in report.rows if r["method"] == "ours" and "solver_share" in r]
    if splits:
        lines += [
            "",
            "## Where ours' time goes",
            "",
            "One more run of ours per row, with the operator's setup and every product timed "
            "(each synchronized on both sides). `solver` = the rest: orthogonalization, "
            "Rayleigh-Ritz, restarts and the final residuals; its share bounds the "
            "orthogonalization share from above.",
            "",
            harness.markdown_table(splits, SPLIT_COLUMNS),
        ]
    if report.notes or report.failures:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes + report.failures]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    parser.add_argument(
        "--models", help=f"comma list of {', '.join(models.MODELS)} (default mlp_lenet,cnn_small)"
    )
    parser.add_argument("--ks", help="comma list of k (default 1,10,32; --quick 1,10)")
    parser.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default all)")
    parser.add_argument("--batch", type=int, help="batch size for every model")
    parser.add_argument("--train-steps", type=int, help="Adam steps before the solve")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--max-hvps", type=int, help="stop a run past this many HVPs")
    parser.add_argument("--max-run-s", type=float, help="stop a run past this many seconds")
    parser.add_argument(
        "--h2h-rounds",
        type=int,
        help="interleaved rounds of ours against the fastest right peer (default 5; --quick 0)",
    )
    parser.add_argument(
        "--max-refine",
        type=int,
        help="bisection runs of a peer's knob between its grid points (default 4; --quick 0)",
    )
    args = parser.parse_args(argv)
    if args.h2h_rounds is not None and args.h2h_rounds < 0:
        parser.error(f"--h2h-rounds must be >= 0, got {args.h2h_rounds}")
    if args.max_refine is not None and args.max_refine < 0:
        parser.error(f"--max-refine must be >= 0, got {args.max_refine}")
    chosen = args.models or ",".join(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    args.models = harness.parse_list(chosen, list(models.MODELS), "model")
    args.methods = harness.parse_list(args.methods, METHODS, "method")
    if "ours" not in args.methods:
        args.methods.insert(0, "ours")  # the residual every peer is matched to
    args.ks = harness.parse_ints(args.ks or ("1,10" if args.quick else "1,10,32"), "--ks")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(
        settings,
        max_hvps=args.max_hvps or settings.max_hvps,
        max_run_s=args.max_run_s or settings.max_run_s,
        h2h_rounds=settings.h2h_rounds if args.h2h_rounds is None else args.h2h_rounds,
        max_refine=settings.max_refine if args.max_refine is None else args.max_refine,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    load_before = harness.load_average()
    warning = harness.busy_machine_warning(device)
    if warning:
        print(warning, flush=True)
    dataset = fmnist.load_fashion_mnist("train", limit=20_000 if args.quick else None)
    if dataset.is_random:
        print(f"WARNING: {dataset.source}; spectra will not look trained", flush=True)
    report = Report()
    for name in args.models:
        run_model(name, args, settings, dataset, report)

    argv_for_record = sys.argv if argv is None else [__file__, *argv]
    metadata = {**harness.run_metadata(device, argv_for_record), "load": load_before}
    if not args.no_save and report.rows:
        extra = {"quick": settings.quick, "seed": args.seed, "data": dataset.source}
        rows = [
            {**{k: v for k, v in row.items() if not k.startswith("_")}, **extra, **metadata}
            for row in report.rows
        ]
        csv_path = harness.append_csv(harness.results_path(args.out, device), rows)
        md_path = harness.results_path(args.out, device, "-eig.md")
        figure = save_eig_figure(report.rows, harness.results_path(args.out, device, "-eig.png"))
        md_path.write_text(
            markdown_summary(
                report, metadata, settings, dataset.source, None if figure is None else figure.name
            ),
            encoding="utf-8",
        )
        plotted = "" if figure is None else f", figure {figure}"
        print(f"appended {len(rows)} rows to {csv_path}; summary in {md_path}{plotted}")
    for line in report.failures:
        print(f"FAILED: {line}")
    print(f"{metadata['device']}, torch {metadata['torch']}, {time.perf_counter() - start:.1f} s")
    print()
    harness.print_table(report.models, MODEL_COLUMNS)
    print()
    harness.print_table(report.rows, TABLE_COLUMNS)
    print()
    for line in target_lines(report):
        print(line)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
