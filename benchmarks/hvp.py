"""Hessian-vector product benchmark: per-vector time of block HVPs against one gradient.

For every model (``benchmarks/models.py``) and block size b it times

* ``gradient``: one ``torch.autograd.grad`` of the mean cross-entropy, forward included --
  the unit every HVP time is divided by (``ratio`` column, same run);
* plain-torch baselines, written here so they do not depend on the package under test:
  ``double_backward`` (PyHessian-style: forward, gradient graph, grad of ``g.v`` for every
  product), ``double_backward_reuse`` (gradient graph built once, then
  ``autograd.grad(g, params, v, retain_graph=True)`` per product, PyHessian's trick),
  ``jvp_grad`` (``torch.func.jvp(torch.func.grad(loss))``, one vector at a time) and
  ``vmap_jvp_grad`` (the same under ``torch.func.vmap`` over the block);
* ours: ``imc_kernels.hvp.HessianOperator(..., engine=e, curvature=c).matmat(V)`` for the
  ``fused``, ``func`` and ``double_backward`` engines (GGN too for fused and func), and
  ``ours_fused_graph``: the fused engine with ``cuda_graph=True`` (the block product replayed
  from a CUDA graph captured by the correctness call; CUDA only, listed as unavailable on
  CPU). Building the operator (which may run the primal forward/backward once) is timed
  apart: ``setup``.

Per-vector time = median time of one block call / b; every call gets a fresh random block.
A block size whose call is predicted (from the previous block) to take longer than
``--max-call-s`` is skipped with a note: the loop baselines cost b products per call and
their per-vector time does not depend on b.
Before any timing every method's block product is checked against ``jvp_grad`` (GGN
variants against a ``torch.func`` GGN reference). An engine that cannot be imported or
built is listed as unavailable; a method that gives a wrong product is not timed, is
reported, and makes the script exit with status 1.

    python benchmarks/hvp.py --quick --no-save      # smoke run, < 1 min on 2 CPU cores
    python benchmarks/hvp.py                        # full run (a GPU run; minutes)
    python benchmarks/hvp.py --models mlp_lenet,cnn_small --blocks 1,32 --methods \
        vmap_jvp_grad,ours_fused

Full runs use the batch sizes of ``models.MODELS`` (1024 / 512); on a few CPU cores the
wide and deep models at b = 32 take long and several GB (use ``--batch`` or ``--models``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `imc_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as harness  # noqa: E402
from benchmarks import models  # noqa: E402

BASELINES = ("double_backward", "double_backward_reuse", "jvp_grad", "vmap_jvp_grad")
# Our engines and the curvatures each one offers.
OURS = {
    "ours_fused": ("fused", ("hessian", "ggn")),
    "ours_fused_graph": ("fused", ("hessian", "ggn")),
    "ours_func": ("func", ("hessian", "ggn")),
    "ours_double_backward": ("double_backward", ("hessian",)),
}
METHODS = (*BASELINES, *OURS)
# Ours with HessianOperator(..., cuda_graph=True); the operator refuses it on CPU, with the
# reason the report lists.
GRAPH_METHODS = ("ours_fused_graph",)
CURVATURES = ("hessian", "ggn")
DEFAULT_BLOCKS = (1, 8, 32)
# --quick is a smoke run (< 1 min on 2 CPU cores): the per-vector loops of the baselines cost
# b products per call, so block 32 there is only run when asked for with --blocks.
QUICK_BLOCKS = (1, 8)

# Correctness tolerance, fp32, norm-wise per vector: the methods add the same terms in
# different orders (reverse-over-reverse vs forward-over-reverse, per-vector vs block GEMMs)
# over reductions of up to ~1e5 terms (batch x features), so rounding differences grow like
# sqrt(n) * 6e-8 ~ 1e-5 of the product's norm (observed here: 1e-7 to 1e-6 on CPU, see the
# rel_err column). Elementwise tolerances would fail on entries that cancel to nearly zero.
# A wrong term -- a dropped act'' term, GGN instead of Hessian -- is 1e-3 or more.
RTOL_FP32 = 1e-4
# The check is against the oracle evaluated in float64 (model and batch cast). Where the fp32
# oracle itself is further from that than RTOL_FP32, rounding is not the only fp32 error: the
# product is not continuous at fp32 resolution. On cnn_deep at batch 512 (seed 0), moving
# the float64 weights by 1e-8 relative moves the product by 4e-8, and by 1e-7 (fp32
# rounding) 7.5e-4: some ReLU or max-pool decisions among its 38 M units flip. Every fp32
# method then lands ~5e-4 from the float64 product (jvp_grad 5.1e-4, ours 4.8e-4; ours in
# float64 agrees with it to 4e-15). There a method passes when it is no further than
# FP32_ORACLE_SLACK times the fp32 oracle's own error.
FP32_ORACLE_SLACK = 2.0


# --------------------------------------------------------------------------------------
# The problem and the baselines


@dataclasses.dataclass
class Problem:
    """One model, one batch, cross-entropy mean; flat vectors in ``model.parameters()`` order."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: nn.Module = dataclasses.field(default_factory=nn.CrossEntropyLoss)

    def __post_init__(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = tuple(n for n, _ in named)
        self.params = tuple(p for _, p in named)
        self.numels = tuple(p.numel() for p in self.params)
        self.offsets = tuple(sum(self.numels[:i]) for i in range(len(self.numels)))
        self.dim = sum(self.numels)

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets

    def column(self, block: torch.Tensor, j: int) -> tuple[torch.Tensor, ...]:
        """Column ``j`` of a ``(d, b)`` block as per-parameter tensors (views)."""
        return tuple(
            block[off : off + n, j].view(p.shape)
            for off, n, p in zip(self.offsets, self.numels, self.params)
        )

    def split(self, block: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(d, b)`` -> per-parameter ``(b, *shape)`` tensors."""
        rows = block.T
        return tuple(
            rows[:, off : off + n].reshape(rows.shape[0], *p.shape)
            for off, n, p in zip(self.offsets, self.numels, self.params)
        )

    def join(self, pieces, b: int) -> torch.Tensor:
        """Per-parameter ``(b, *shape)`` tensors -> contiguous ``(d, b)``."""
        return torch.cat([piece.reshape(b, -1) for piece in pieces], dim=1).T.contiguous()

    def join_columns(self, columns) -> torch.Tensor:
        """A list of per-parameter tuples (one per vector) -> contiguous ``(d, b)``."""
        flat = [torch.cat([piece.reshape(-1) for piece in column]) for column in columns]
        return torch.stack(flat, dim=1)

    def loss(self, inputs=None, targets=None) -> torch.Tensor:
        inputs = self.inputs if inputs is None else inputs
        targets = self.targets if targets is None else targets
        return self.loss_fn(self.model(inputs), targets)

    def functional_loss(self) -> Callable:
        """``params tuple -> loss`` for torch.func (buffers such as BN statistics kept)."""
        names, model, inputs, targets = self.names, self.model, self.inputs, self.targets

        def loss_of(params):
            output = torch.func.functional_call(model, dict(zip(names, params)), (inputs,))
            return self.loss_fn(output, targets)

        return loss_of

    def functional_output(self) -> Callable:
        names, model, inputs = self.names, self.model, self.inputs
        return lambda params: torch.func.functional_call(model, dict(zip(names, params)), (inputs,))

    def detached_params(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.detach() for p in self.params)


def gradient(problem: Problem, inputs: torch.Tensor, targets: torch.Tensor):
    """One gradient, forward included: the unit of the ratio column."""
    return torch.autograd.grad(problem.loss(inputs, targets), problem.params)


class DoubleBackward:
    """PyHessian-style reverse-over-reverse, nothing reused: per product a forward, a
    backward with ``create_graph=True`` and a backward of ``g . v``."""

    def __init__(self, problem: Problem):
        self.problem = problem

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        p = self.problem
        columns = []
        for j in range(block.shape[1]):
            grads = torch.autograd.grad(p.loss(), p.params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, p.column(block, j)))
            columns.append(torch.autograd.grad(dot, p.params))
        return p.join_columns(columns)


class DoubleBackwardReuse:
    """Reverse-over-reverse with the gradient graph built once (PyHessian's
    ``hessian_vector_product``): per product ``autograd.grad(g, params, v,
    retain_graph=True)``, i.e. one backward through the gradient graph."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.grads = torch.autograd.grad(problem.loss(), problem.params, create_graph=True)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        p = self.problem
        columns = [
            torch.autograd.grad(self.grads, p.params, p.column(block, j), retain_graph=True)
            for j in range(block.shape[1])
        ]
        return p.join_columns(columns)


class JvpGrad:
    """Forward-over-reverse, eager: ``torch.func.jvp(torch.func.grad(loss), (w,), (v,))``
    for one vector at a time (what curvlinops does per column)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.grad_fn = torch.func.grad(problem.functional_loss())
        self.params = problem.detached_params()

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        p = self.problem
        columns = [
            torch.func.jvp(self.grad_fn, (self.params,), (p.column(block, j),))[1]
            for j in range(block.shape[1])
        ]
        return p.join_columns(columns)


class VmapJvpGrad:
    """``torch.func.vmap`` of the forward-over-reverse product over the b vectors."""

    def __init__(self, problem: Problem):
        self.problem = problem
        grad_fn = torch.func.grad(problem.functional_loss())
        params = problem.detached_params()
        self.hvp = torch.func.vmap(lambda v: torch.func.jvp(grad_fn, (params,), (v,))[1])

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        p = self.problem
        return p.join(self.hvp(p.split(block)), block.shape[1])


BASELINE_CLASSES = {
    "double_backward": DoubleBackward,
    "double_backward_reuse": DoubleBackwardReuse,
    "jvp_grad": JvpGrad,
    "vmap_jvp_grad": VmapJvpGrad,
}


def ggn_reference(problem: Problem, block: torch.Tensor) -> torch.Tensor:
    """``J^T H_L J v`` per column with torch.func: ``J v`` by jvp of the model output,
    ``H_L`` (the loss Hessian in the logits, CE here) by jvp of the loss gradient in the
    logits, ``J^T`` by one vjp of the model output, reused for every column."""
    output_fn = problem.functional_output()
    params = problem.detached_params()
    logits, vjp_fn = torch.func.vjp(output_fn, params)
    targets = problem.targets
    loss_grad = torch.func.grad(lambda z: problem.loss_fn(z, targets))
    columns = []
    for j in range(block.shape[1]):
        _, jv = torch.func.jvp(output_fn, (params,), (problem.column(block, j),))
        _, hjv = torch.func.jvp(loss_grad, (logits,), (jv,))
        columns.append(vjp_fn(hjv)[0])
    return problem.join_columns(columns)


def hessian_reference(problem: Problem, block: torch.Tensor) -> torch.Tensor:
    """The correctness oracle for Hessian products: eager ``jvp_grad``."""
    return JvpGrad(problem)(block)


def cross_entropy_hessian_product(logits: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """Closed form of ``H_L u`` for mean softmax cross-entropy: ``(p*u - p (p.u)) / N``
    (kernel_design section 2.1); used by the tests to check :func:`ggn_reference`."""
    p = F.softmax(logits, dim=-1)
    return (p * tangent - p * (p * tangent).sum(-1, keepdim=True)) / logits.shape[0]


# --------------------------------------------------------------------------------------
# Our operator


def import_operator():
    """``(HessianOperator, None)`` or ``(None, reason)`` when the package cannot provide it."""
    try:
        from imc_kernels.hvp import HessianOperator
    except Exception as error:  # a half-written package fails in many ways; report, go on
        return None, f"import imc_kernels.hvp.HessianOperator failed: {_reason(error)}"
    return HessianOperator, None


def _reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


class Ours:
    """``HessianOperator(model, loss_fn, batch, curvature, engine[, cuda_graph]).matmat``."""

    def __init__(
        self, operator_cls, problem: Problem, engine: str, curvature: str, cuda_graph=False
    ):
        graph = {"cuda_graph": True} if cuda_graph else {}
        self.operator = operator_cls(
            problem.model,
            problem.loss_fn,
            problem.batch,
            curvature=curvature,
            engine=engine,
            **graph,
        )

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        return self.operator.matmat(block)


# --------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class Variant:
    method: str
    curvature: str
    engine: str | None  # our engine, None for the baselines


def variants(methods, curvatures) -> list[Variant]:
    out = []
    for method in methods:
        if method in BASELINE_CLASSES:
            if "hessian" in curvatures:
                out.append(Variant(method, "hessian", None))
        else:
            engine, offered = OURS[method]
            out.extend(Variant(method, c, engine) for c in offered if c in curvatures)
    return out


@dataclasses.dataclass
class Settings:
    quick: bool
    warmup: int
    min_repeats: int
    min_time_s: float
    max_repeats: int
    slow_call_s: float  # calls slower than this get only `slow_repeats` repeats
    slow_repeats: int


FULL = Settings(
    quick=False,
    warmup=1,
    min_repeats=7,
    min_time_s=1.0,
    max_repeats=200,
    slow_call_s=1.0,
    slow_repeats=3,
)
QUICK = Settings(
    quick=True,
    warmup=0,
    min_repeats=3,
    min_time_s=0.0,
    max_repeats=3,
    slow_call_s=0.25,
    slow_repeats=2,
)


def _time_block(fn, problem: Problem, b: int, estimate_s: float, settings: Settings, sync):
    # The correctness call already warmed the method up; slow calls get fewer repeats so a
    # full run stays within minutes (their spread is small next to their length).
    repeats = settings.slow_repeats if estimate_s > settings.slow_call_s else settings.min_repeats
    device, dim = problem.params[0].device, problem.dim
    return harness.measure(
        fn,
        warmup=settings.warmup,
        min_repeats=repeats,
        min_time_s=settings.min_time_s if repeats == settings.min_repeats else 0.0,
        max_repeats=max(repeats, settings.max_repeats),
        setup=lambda: (torch.randn(dim, b, device=device),),
        sync=sync,
    )


def float64_problem(problem: Problem) -> Problem:
    """The same model and batch in float64 (a copy; the original is left alone)."""
    model = copy.deepcopy(problem.model).double()
    return Problem(model, problem.inputs.double(), problem.targets, problem.loss_fn)


class References:
    """The oracle products of the check block, computed lazily and once per column:
    ``jvp_grad`` for the Hessian, :func:`ggn_reference` for the GGN, in fp32 (the reference
    row's own result and timing) and in float64 (what every method is checked against)."""

    def __init__(self, problem: Problem, check: torch.Tensor, sync):
        self.problem, self.check, self.sync = problem, check, sync
        self.problem64: Problem | None = None
        self.columns: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.seconds_per_column: dict[str, float] = {}

    def _columns(self, curvature: str, b: int, dtype: torch.dtype) -> torch.Tensor:
        have = self.columns.get((curvature, dtype))
        done = 0 if have is None else have.shape[1]
        if done < b:
            reference_fn = ggn_reference if curvature == "ggn" else hessian_reference
            problem = self.problem
            if dtype == torch.float64:
                if self.problem64 is None:
                    self.problem64 = float64_problem(self.problem)
                problem = self.problem64
            self.sync()
            start = time.perf_counter()
            more = reference_fn(problem, self.check[:, done:b].to(dtype).contiguous())
            self.sync()
            if dtype != torch.float64:
                self.seconds_per_column[curvature] = (time.perf_counter() - start) / (b - done)
            have = more if have is None else torch.cat([have, more], dim=1)
            self.columns[(curvature, dtype)] = have
        return have[:, :b]

    def get(self, curvature: str, b: int) -> torch.Tensor:
        """The fp32 oracle's products of the first ``b`` check columns."""
        return self._columns(curvature, b, torch.float32)

    def truth(self, curvature: str, b: int) -> torch.Tensor:
        """The float64 oracle's products of the first ``b`` check columns."""
        return self._columns(curvature, b, torch.float64)

    def oracle_error(self, curvature: str, b: int) -> float:
        """The fp32 oracle's worst relative error against the float64 one, first ``b``."""
        fp32, truth = self.get(curvature, b).double(), self.truth(curvature, b)
        return float(((fp32 - truth).norm(dim=0) / truth.norm(dim=0)).max())

    def rtol(self, curvature: str, b: int) -> float:
        """The correctness tolerance against :meth:`truth` (see ``FP32_ORACLE_SLACK``)."""
        return max(RTOL_FP32, FP32_ORACLE_SLACK * self.oracle_error(curvature, b))


def run_model(name: str, blocks, chosen: list[Variant], settings: Settings, args, report):
    device = torch.device(args.device)
    sync = harness.synchronizer(device)
    batch = args.batch or models.batch_size(name, settings.quick)
    model = models.build_model(name, seed=args.seed, device=device)
    inputs, targets = models.make_batch(name, batch, seed=args.seed, device=device)
    problem = Problem(model, inputs, targets)
    input_shape = tuple(inputs.shape)
    flops = {c: harness.flops_per_hvp(model, input_shape, c) for c in CURVATURES}
    grad_flops = harness.flops_per_gradient(model, input_shape)
    report.models.append(
        {
            "model": name,
            "params": problem.dim,
            "batch": batch,
            "grad_gflop": grad_flops / 1e9,
            "hvp_gflop": flops["hessian"] / 1e9,
            "ggn_gflop": flops["ggn"] / 1e9,
        }
    )
    common = {"benchmark": "hvp", "model": name, "params": problem.dim, "batch": batch}
    print(f"[{name}] {problem.dim:,} params, batch {batch}", flush=True)
    model_start = time.perf_counter()

    # The unit: one gradient on a fresh batch each repeat, timed before and after the HVP
    # methods and pooled, so that a burst of load from other processes during one of the
    # two does not skew every ratio of the model.
    batch_seed = iter(range(args.seed + 1, args.seed + 10**6))

    def time_gradient() -> harness.Measurement:
        return harness.measure(
            lambda x, y: gradient(problem, x, y),
            warmup=1,
            min_repeats=settings.min_repeats,
            min_time_s=settings.min_time_s / 2,
            max_repeats=settings.max_repeats,
            setup=lambda: models.make_batch(name, batch, next(batch_seed), device),
            sync=sync,
        )

    grad_before = time_gradient()
    print(f"  gradient: {grad_before.ms()} ms", flush=True)
    first_row = len(report.rows)

    # Correctness first, on one fixed check block: block b is checked on its first b
    # columns, so each reference column is computed once per model.
    generator = torch.Generator().manual_seed(args.seed + 12345)
    check = torch.randn(problem.dim, max(blocks), generator=generator).to(device)
    references = References(problem, check, sync)
    operator_cls, missing = (None, None)
    if any(v.engine for v in chosen):
        operator_cls, missing = import_operator()

    for variant in chosen:
        tag = f"{name} {variant.method} ({variant.curvature})"
        if variant.engine is not None and operator_cls is None:
            report.unavailable(tag, missing)
            continue
        if variant.engine is None:
            make = lambda v=variant: BASELINE_CLASSES[v.method](problem)  # noqa: E731
        else:
            make = lambda v=variant: Ours(  # noqa: E731
                operator_cls, problem, v.engine, v.curvature, v.method in GRAPH_METHODS
            )
        try:
            fn = make()
        except Exception as error:  # e.g. an engine that does not support this model
            report.unavailable(tag, _reason(error))
            continue
        setup = harness.measure(
            make, warmup=0, min_repeats=1 if settings.quick else 3, max_repeats=3, sync=sync
        )
        # jvp_grad is the Hessian oracle: checking it would compare it with itself, so the
        # reference computation stands in for its correctness (and warm-up) call.
        is_reference = variant == Variant("jvp_grad", "hessian", None)
        per_vector_estimate = None
        for b in blocks:
            # A block call of the loop baselines costs b products; skip calls predicted
            # (from the previous block) to run past the limit rather than stall the run.
            if per_vector_estimate is not None and per_vector_estimate * b > args.max_call_s:
                report.skip(
                    f"{tag} b={b}",
                    f"skipped -- ~{per_vector_estimate * b:.1f} s per call > --max-call-s "
                    f"{args.max_call_s:g}",
                )
                continue
            row = {
                **common,
                "block": b,
                "method": variant.method,
                "curvature": variant.curvature,
                "engine": variant.engine or "",
            }
            try:
                truth = references.truth(variant.curvature, b)
                rtol = references.rtol(variant.curvature, b)
                if is_reference:
                    estimate = references.seconds_per_column["hessian"] * b
                    product = references.get(variant.curvature, b)
                else:
                    block = check[:, :b].contiguous()
                    sync()
                    start = time.perf_counter()
                    product = fn(block)
                    sync()
                    estimate = time.perf_counter() - start
                rel_err = harness.check_close(
                    product, truth, rtol=rtol, what=f"{tag}, b={b}", dim=0
                )
                del product
            except harness.CorrectnessError as error:
                report.failed(f"{tag} b={b}", str(error))
                continue
            except Exception as error:
                report.failed(f"{tag} b={b}", _reason(error))
                continue
            call = _time_block(fn, problem, b, estimate, settings, sync)
            per_vector_estimate = call.median / b
            report.add(
                row,
                call,
                per_vector=call.per(b),
                setup=setup,
                rel_err=rel_err,
                gflop=flops[variant.curvature] / 1e9,
            )
        del fn

    grad = harness.Measurement.of(grad_before.times + time_gradient().times)
    report.add(
        {**common, "block": "", "method": "gradient", "curvature": "", "engine": ""},
        grad,
        per_vector=grad,
        gflop=grad_flops / 1e9,
        position=first_row,
    )
    report.set_unit(first_row, grad)
    print(f"[{name}] {time.perf_counter() - model_start:.1f} s", flush=True)


class Report:
    """Rows for the CSV and the table, plus what could not run and what failed."""

    def __init__(self):
        self.rows: list[dict] = []
        self.models: list[dict] = []
        self.skipped: list[str] = []
        self.failures: list[str] = []

    def add(self, row, call, *, per_vector, gflop, setup=None, rel_err=None, position=None):
        ms = 1e3
        row = {
            **row,
            "per_vector_ms": per_vector.median * ms,
            "per_vector_p20_ms": per_vector.p20 * ms,
            "per_vector_p80_ms": per_vector.p80 * ms,
            "call_ms": call.median * ms,
            "repeats": call.n,
            "grad_ms": None,  # set by set_unit once the model's gradient timing is done
            "ratio_to_grad": None,
            "setup_ms": setup.median * ms if setup is not None else "",
            "rel_err": rel_err if rel_err is not None else "",
            "model_gflop": gflop,
            "gflops": gflop / per_vector.median,
            "_per_vector": per_vector,
        }
        self.rows.insert(len(self.rows) if position is None else position, row)
        if row["method"] != "gradient":
            print(
                f"  {row['method']:<22} {row['curvature']:<8} b={row['block']!s:<3}"
                f" {per_vector.ms()} ms/vector",
                flush=True,
            )

    def set_unit(self, first: int, grad: harness.Measurement):
        """Gradient time and ratios for the rows from ``first`` on (one model's rows)."""
        for row in self.rows[first:]:
            per_vector = row["_per_vector"]
            row["grad_ms"] = grad.median * 1e3
            row["ratio_to_grad"] = per_vector.median / grad.median
            # The spread of the per-vector time, in the same unit (the gradient's median).
            row["ratio_p20"] = per_vector.p20 / grad.median
            row["ratio_p80"] = per_vector.p80 / grad.median
            row["_ratio"] = (
                f"{row['ratio_to_grad']:.3f} [{row['ratio_p20']:.3f}, {row['ratio_p80']:.3f}]"
            )

    def unavailable(self, what: str, why: str | None):
        self.skip(what, f"unavailable -- {why}")

    def skip(self, what: str, why: str):
        self.skipped.append(f"{what}: {why}")
        print(f"  {what}: {why}", flush=True)

    def failed(self, what: str, why: str):
        self.failures.append(f"{what}: FAILED -- {why}")
        print(f"  {what}: FAILED -- {why}", flush=True)

    def csv_rows(self, metadata: dict, extra: dict) -> list[dict]:
        return [
            {**{k: v for k, v in row.items() if not k.startswith("_")}, **extra, **metadata}
            for row in self.rows
        ]


TABLE_COLUMNS = [
    ("model", "model"),
    ("block", "b"),
    ("method", "method"),
    ("curvature", "curv"),
    ("_per_vector", "ms/vector median [p20, p80]"),
    ("_ratio", "x grad median [p20, p80]"),
    ("setup_ms", "setup ms"),
    ("gflops", "GFLOP/s"),
    ("rel_err", "rel err"),
]

MODEL_COLUMNS = [
    ("model", "model"),
    ("params", "params"),
    ("batch", "batch"),
    ("grad_gflop", "GFLOP/gradient"),
    ("hvp_gflop", "GFLOP/HVP"),
    ("ggn_gflop", "GFLOP/GGN-VP"),
]


def markdown_summary(report: Report, metadata: dict, settings: Settings) -> str:
    lines = [
        "# HVP benchmark",
        "",
        "```",
        metadata["command"],
        "```",
        "",
        f"- device: `{metadata['device']}` ({metadata['threads']} torch threads, 1-minute "
        f"load average {metadata['load']} before the run)",
        f"- date: {metadata['timestamp']}, commit `{metadata['commit'] or 'unknown'}`",
        f"- torch {metadata['torch']}, triton {metadata['triton'] or 'not installed'}, "
        f"python {metadata['python']}",
        f"- mode: {'quick (smoke numbers)' if settings.quick else 'full'}",
        "",
        "Per-vector time = one block call / b, median and [20th, 80th] percentiles over calls "
        "with fresh random vectors. `x grad` = per-vector time / median time of one gradient "
        "(forward + backward) in the same run; its [p20, p80] are the per-vector "
        "percentiles over that same median. `setup` = building the method (for ours, "
        "the operator with its cached primal pass). GFLOP/s = cost-model GEMM FLOPs of one "
        "product (tangent passes only, `notes/kernel_design.md` section 1) / per-vector time "
        "(gradient row: forward + backward GEMM FLOPs / its time). "
        "`rel err` = worst per-vector ||x - ref|| / ||ref|| against `jvp_grad` (Hessian) or a "
        "torch.func GGN evaluated in float64 (model and batch cast; the `jvp_grad` row is the "
        "fp32 oracle's own error). A method is timed only if that error is at most "
        f"max({RTOL_FP32:g}, {FP32_ORACLE_SLACK:g} x the fp32 oracle's error).",
        "",
        harness.markdown_table(report.models, MODEL_COLUMNS),
        "",
        harness.markdown_table(report.rows, TABLE_COLUMNS),
    ]
    if report.skipped or report.failures:
        lines += ["", "Not timed:", ""] + [f"- {line}" for line in report.skipped + report.failures]
    return "\n".join(lines) + "\n"


def fused_flops_lines(report: Report) -> list[str]:
    """Achieved FLOP/s of the fused engine against the cost model, best block per model."""
    lines = []
    for model in report.models:
        rows = [
            r for r in report.rows if r["model"] == model["model"] and r["method"] == "ours_fused"
        ]
        for curvature in CURVATURES:
            best = [r for r in rows if r["curvature"] == curvature]
            if best:
                top = max(best, key=lambda r: r["gflops"])
                lines.append(
                    f"fused {curvature} on {model['model']}: {top['model_gflop']:.3g} GFLOP/vector"
                    f" (cost model), {top['gflops']:.3g} GFLOP/s achieved at b={top['block']}"
                )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--models", help=f"comma list of {', '.join(models.MODELS)} (default all)")
    parser.add_argument(
        "--blocks", help="comma list of block sizes (default 1,8,32; with --quick 1,8)"
    )
    parser.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default all)")
    parser.add_argument("--curvatures", help="comma list of hessian, ggn (default both)")
    parser.add_argument(
        "--batch", type=int, help="batch size for every model (default: the model's own)"
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        help="skip a block size when one call is predicted to take longer than this "
        "(default 60, with --quick 10)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    if args.max_call_s is None:
        args.max_call_s = 10.0 if args.quick else 60.0
    names = harness.parse_list(args.models, list(models.MODELS), "model")
    methods = harness.parse_list(args.methods, METHODS, "method")
    curvatures = harness.parse_list(args.curvatures, CURVATURES, "curvature")
    if args.blocks:
        blocks = harness.parse_ints(args.blocks, "--blocks")
    else:
        blocks = list(QUICK_BLOCKS if args.quick else DEFAULT_BLOCKS)
    device = torch.device(args.device)
    if device.type == "cuda":
        # Strict fp32 for every method (ours sets it inside the operator): a TF32 baseline
        # would be faster and 1e-3 wrong, not comparable.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)  # the fresh random blocks of the timed calls
    load_before = harness.load_average()
    warning = harness.busy_machine_warning(device)
    if warning:
        print(warning, flush=True)
    chosen = variants(methods, curvatures)
    report = Report()
    for name in names:
        run_model(name, blocks, chosen, settings, args, report)

    argv_for_record = sys.argv if argv is None else [__file__, *argv]
    metadata = {**harness.run_metadata(device, argv_for_record), "load": load_before}
    if not args.no_save and report.rows:
        extra = {"quick": settings.quick, "seed": args.seed}
        csv_path = harness.append_csv(
            harness.results_path(args.out, device), report.csv_rows(metadata, extra)
        )
        md_path = harness.results_path(args.out, device, "-hvp.md")
        md_path.write_text(markdown_summary(report, metadata, settings), encoding="utf-8")
        print(f"appended {len(report.rows)} rows to {csv_path}; summary in {md_path}")
    for line in report.skipped + report.failures + fused_flops_lines(report):
        print(line)
    print(f"{metadata['device']}, torch {metadata['torch']}, {time.perf_counter() - start:.1f} s")
    print()
    harness.print_table(report.models, MODEL_COLUMNS)
    print()
    harness.print_table(report.rows, TABLE_COLUMNS)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
