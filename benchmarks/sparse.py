"""Sparse-masked training kernels against the masked-dense path, in one run.

Two parts, each with its baseline timed in the same run (ratios below are baseline / ours):

* **Linear layer**, ``size x size`` with ``rows`` input rows (tokens), at 80, 90 and 95 %
  block sparsity (``--block-size`` tiles, exactly ``round((1 - s) * n_tiles)`` kept, chosen
  at random): ``masked_dense`` (``F.linear(x, W * mask, b)`` with autograd, what
  ``MaskedLinear`` runs) against ``block_sparse``
  (:func:`imc_kernels.sparse.block_sparse_linear`: the Triton kernels on CUDA, the
  pure-PyTorch twin on CPU), forward alone and forward + backward (input, weight and bias
  gradients). ``dense`` (no mask) is timed once for scale. On a GPU with 2:4 support the
  ``semi_structured`` path of :class:`imc_kernels.sparse.SemiStructuredLinear` is timed
  against masked-dense in fp16 at its fixed 50 % as well; elsewhere the reason it cannot run
  is printed.
* **Fused masked optimizer step** over the same layer's parameters (weight + bias, 90 %
  of the weights pruned): :func:`imc_kernels.ops.masked_adam_step` / ``masked_sgd_step`` on
  flat buffers (as :class:`imc_kernels.masked.MaskedAdam` packs them; Triton on CUDA, the
  twin on CPU) against the unfused torch sequence ``p.grad.mul_(mask);
  torch.optim.Adam/SGD(...).step(); p.mul_(mask)`` with torch's default implementation
  for the device.

Every method is checked against its baseline before it is timed (relative error in the
``rel err`` column). Methods are timed in interleaved rounds (one call of each per round,
fresh random inputs and gradients every call, untimed), so a load change on a shared
machine hits all of them alike; medians with 20th/80th percentiles.

The script prints which default the numbers support: ``imc_kernels.sparse.AUTO_BLOCK_SPARSE``
turns the block-sparse path on by default only where it beats masked-dense; the setting
itself is edited by hand, with the result file it rests on.

    python benchmarks/sparse.py --quick       # smoke run, about a minute on 2 CPU cores
    python benchmarks/sparse.py               # 4096 x 4096 on a GPU; 2048 x 2048 on CPU
    python benchmarks/sparse.py --size 4096 --rows 2048 --block-size 128

Writes ``<device>-sparse.md`` and ``<device>-sparse.json`` (``-sparse-quick.*`` for
``--quick``, with ``-<n>t`` appended for ``--threads n``) to ``--out`` and appends the rows to
``<device>.csv``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `imc_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as harness  # noqa: E402
from imc_kernels import ops, sparse  # noqa: E402
from imc_kernels.reference.block_sparse import block_layout, expand_block_mask  # noqa: E402

SPARSITIES = (0.8, 0.9, 0.95)
OPTIMIZER_SPARSITY = 0.9
# A structured path counts as a gain when its median beats masked-dense by this factor and
# its 80th percentile is below masked-dense's 20th: a smaller edge is within the spread of a
# shared machine and would not survive the next run.
GAIN = 1.1


def _defaults(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(size=4096, rows=4096, rounds=5 if quick else 30)
    # The twin on 2 CPU cores: 4096 x 4096 with 4096 rows is ~0.8 TFLOP per masked-dense
    # training step, several seconds a call; 2048 x 2048 with 1024 rows keeps a full run
    # within minutes and is still large enough for 64-wide tiles to be GEMM-like.
    if quick:
        return dict(size=1024, rows=256, rounds=3)
    return dict(size=2048, rows=1024, rounds=9)


def _gain(ours: harness.Measurement, baseline: harness.Measurement) -> bool:
    return baseline.median / ours.median >= GAIN and ours.p80 < baseline.p20


# --- Linear layer ----------------------------------------------------------------------------


class LinearProblem:
    """One ``size x size`` layer, its input rows, and a gradient for the output."""

    def __init__(self, size: int, rows: int, device: torch.device, dtype: torch.dtype, seed: int):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        bound = size**-0.5  # nn.Linear's init scale: outputs of order 1
        self.weight = ((torch.rand(size, size, generator=gen) * 2 - 1) * bound).to(device, dtype)
        self.bias = ((torch.rand(size, generator=gen) * 2 - 1) * bound).to(device, dtype)
        self.weight.requires_grad_(True)
        self.bias.requires_grad_(True)
        self.size, self.rows, self.device, self.dtype = size, rows, device, dtype

    def inputs(self, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh ``(x, dy)``; parameter gradients reset (untimed)."""
        self.weight.grad = None
        self.bias.grad = None
        x = torch.randn(self.rows, self.size, device=self.device, dtype=self.dtype)
        dy = torch.randn(self.rows, self.size, device=self.device, dtype=self.dtype)
        return x.requires_grad_(requires_grad), dy

    def flops(self, density: float, backward: bool) -> float:
        return 2.0 * self.rows * self.size * self.size * density * (3 if backward else 1)


def _random_block_mask(n_tiles: int, sparsity: float, device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kept = round((1 - sparsity) * n_tiles * n_tiles)
    flat = torch.zeros(n_tiles * n_tiles, dtype=torch.bool)
    flat[torch.randperm(n_tiles * n_tiles, generator=gen)[:kept]] = True
    return flat.view(n_tiles, n_tiles).to(device)


def _step_fns(forward: Callable, problem: LinearProblem):
    def forward_only(x, dy):
        with torch.no_grad():
            forward(x)

    def forward_backward(x, dy):
        forward(x).backward(dy)

    return {
        "forward": (forward_only, lambda: problem.inputs(False)),
        "forward+backward": (forward_backward, lambda: problem.inputs(True)),
    }


def _check_against(forward, baseline, problem, what: str, rtol: float) -> float:
    """Output and all gradients of ``forward`` against ``baseline`` on the same inputs; the
    worst relative error. Raises before anything is timed if they disagree."""
    x, dy = problem.inputs(False)
    results = []
    for fn in (baseline, forward):
        problem.weight.grad = problem.bias.grad = None
        x_leaf = x.clone().requires_grad_(True)
        y = fn(x_leaf)
        y.backward(dy)
        results.append([y.detach(), x_leaf.grad, problem.weight.grad, problem.bias.grad])
    names = ("output", "input grad", "weight grad", "bias grad")
    return max(
        harness.check_close(actual, expected, rtol=rtol, what=f"{what} {name}")
        for actual, expected, name in zip(results[1], results[0], names)
    )


def run_linear(args, settings: dict, device: torch.device, report: dict, sync) -> None:
    size, rows, block_size = settings["size"], settings["rows"], args.block_size
    if size % block_size:
        raise SystemExit(f"--size {size} is not a multiple of --block-size {block_size}")
    problem = LinearProblem(size, rows, device, torch.float32, args.seed)
    n_tiles = size // block_size
    dense_fns = _step_fns(lambda x: F.linear(x, problem.weight, problem.bias), problem)
    for sparsity in args.sparsities:
        block_mask = _random_block_mask(n_tiles, sparsity, device, args.seed + 1)
        layout = block_layout(block_mask, block_size)
        mask = expand_block_mask(block_mask, block_size)  # bool, as MaskedLinear's buffer
        backend = ops.block_sparse_backend(problem.weight, layout)

        def masked_dense(x, mask=mask):
            return F.linear(x, problem.weight * mask, problem.bias)

        def block_sparse(x, layout=layout):
            return sparse.block_sparse_linear(x, problem.weight, problem.bias, layout)

        # fp32 on both paths; the sums run in different orders (see the tests' tolerances).
        rel_err = _check_against(
            block_sparse, masked_dense, problem, f"block_sparse {sparsity}", 1e-4
        )
        calls = {}
        for direction, (fn, setup) in _step_fns(masked_dense, problem).items():
            calls[("masked_dense", direction)] = (fn, setup)
        for direction, (fn, setup) in _step_fns(block_sparse, problem).items():
            calls[("block_sparse", direction)] = (fn, setup)
        if sparsity == args.sparsities[0]:
            for direction, (fn, setup) in dense_fns.items():
                calls[("dense", direction)] = (fn, setup)
        print(
            f"  {sparsity:.0%} block sparsity: timing {len(calls)} calls x {settings['rounds']}",
            flush=True,
        )
        times = harness.measure_interleaved(calls, settings["rounds"], sync)
        for (method, direction), measured in times.items():
            baseline = times[("masked_dense", direction)]
            density = 1.0 if method == "dense" else layout.density
            executed = 1.0 if method in ("dense", "masked_dense") else layout.density
            report["linear"].append(
                {
                    "part": "linear",
                    "size": size,
                    "rows": rows,
                    "block_size": block_size,
                    "sparsity": 0.0 if method == "dense" else sparsity,
                    "density": density,
                    "direction": direction,
                    "method": method,
                    "backend": backend if method == "block_sparse" else "torch",
                    "ms": measured.median * 1e3,
                    "p20_ms": measured.p20 * 1e3,
                    "p80_ms": measured.p80 * 1e3,
                    "repeats": measured.n,
                    "speedup": baseline.median / measured.median,
                    "gain": _gain(measured, baseline) if method == "block_sparse" else "",
                    "gflops": problem.flops(executed, direction != "forward")
                    / measured.median
                    / 1e9,
                    "rel_err": rel_err if method == "block_sparse" else "",
                    "_time": measured,
                }
            )
    report["linear"].sort(key=lambda r: (r["direction"], r["sparsity"], r["method"]))


def run_semi_structured(args, settings: dict, device: torch.device, report: dict, sync) -> None:
    dtype = torch.float16
    size, rows = settings["size"], settings["rows"]
    reason = sparse.semi_structured_unsupported_reason(device, dtype, (size, size))
    if reason is not None:
        report["notes"].append(f"2:4 semi-structured not timed: {reason}")
        print(f"  2:4: not timed -- {reason}", flush=True)
        return
    problem = LinearProblem(size, rows, device, dtype, args.seed)
    scores = torch.rand(size, size // 4, 4, device=device)
    top = scores.topk(2, dim=2).indices
    mask = torch.zeros(size, size // 4, 4, dtype=torch.bool, device=device)
    mask.scatter_(2, top, True)
    mask = mask.view(size, size)

    def masked_dense(x):
        return F.linear(x, problem.weight * mask, problem.bias)

    def semi_structured(x):
        return sparse.semi_structured_linear(x, problem.weight, problem.bias, mask)

    # fp16 outputs of 4096-term fp32-accumulated sums; the paths differ by accumulation order
    # and the rounding of the result to fp16 (2^-11 relative).
    rel_err = _check_against(semi_structured, masked_dense, problem, "semi_structured", 1e-2)
    calls = {}
    for method, forward in (("masked_dense", masked_dense), ("semi_structured", semi_structured)):
        for direction, (fn, setup) in _step_fns(forward, problem).items():
            calls[(method, direction)] = (fn, setup)
    times = harness.measure_interleaved(calls, settings["rounds"], sync)
    for (method, direction), measured in times.items():
        baseline = times[("masked_dense", direction)]
        report["linear"].append(
            {
                "part": "linear_2:4_fp16",
                "size": size,
                "rows": rows,
                "block_size": "",
                "sparsity": 0.5,
                "density": 0.5,
                "direction": direction,
                "method": method,
                "backend": "torch" if method == "masked_dense" else "to_sparse_semi_structured",
                "ms": measured.median * 1e3,
                "p20_ms": measured.p20 * 1e3,
                "p80_ms": measured.p80 * 1e3,
                "repeats": measured.n,
                "speedup": baseline.median / measured.median,
                "gain": _gain(measured, baseline) if method != "masked_dense" else "",
                "gflops": problem.flops(
                    1.0 if method == "masked_dense" else 0.5, direction != "forward"
                )
                / measured.median
                / 1e9,
                "rel_err": rel_err if method != "masked_dense" else "",
                "_time": measured,
            }
        )


# --- Fused masked optimizer step --------------------------------------------------------------


class UnfusedStep:
    """``p.grad.mul_(mask); torch.optim.<X>.step(); p.mul_(mask)`` over separate tensors."""

    def __init__(self, optim_cls, hyper: dict, initial: list, masks: list):
        self.params = [torch.nn.Parameter(t.clone()) for t in initial]
        self.masks = masks
        with torch.no_grad():
            for p, m in zip(self.params, masks):
                p.mul_(m)
                p.grad = torch.zeros_like(p)
        self.optimizer = optim_cls(self.params, **hyper)

    def fresh_gradients(self) -> tuple:
        for p in self.params:
            p.grad.normal_()
        return ()

    @torch.no_grad()
    def __call__(self) -> None:
        for p, m in zip(self.params, self.masks):
            p.grad.mul_(m)
        self.optimizer.step()
        for p, m in zip(self.params, self.masks):
            p.mul_(m)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


class FusedStep:
    """One :func:`imc_kernels.ops.masked_adam_step` / ``masked_sgd_step`` over flat buffers
    (parameters, gradient, mask, state), as :class:`imc_kernels.masked.MaskedAdam` packs them."""

    def __init__(self, name: str, hyper: dict, flat_param: torch.Tensor, flat_mask: torch.Tensor):
        self.name, self.hyper = name, hyper
        self.param, self.mask = flat_param, flat_mask
        self.grad = torch.zeros_like(flat_param)
        self.state = [torch.zeros_like(flat_param) for _ in range(2)]
        self.step = 0

    def fresh_gradients(self) -> tuple:
        self.grad.normal_()
        return ()

    def __call__(self) -> None:
        self.step += 1
        if self.name == "adam":
            ops.masked_adam_step(
                self.param, self.grad, self.mask, *self.state, step=self.step, **self.hyper
            )
        else:
            ops.masked_sgd_step(
                self.param,
                self.grad,
                self.mask,
                self.state[0],
                first_step=self.step == 1,
                **self.hyper,
            )


OPTIMIZERS = {
    "adam": (torch.optim.Adam, dict(lr=1e-3)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
}


def run_optimizer(args, settings: dict, device: torch.device, report: dict, sync) -> None:
    size = settings["size"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    initial = [torch.randn(shape, generator=gen).to(device) for shape in [(size, size), (size,)]]
    # The weight is 90 % pruned, the bias kept (as imc_prune masks leave biases whole).
    weight_mask = (torch.rand(size, size, generator=gen) >= OPTIMIZER_SPARSITY).to(device)
    masks = [weight_mask, torch.ones(size, dtype=torch.bool, device=device)]
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    n = flat_mask.numel()
    for name, (optim_cls, hyper) in OPTIMIZERS.items():
        unfused = UnfusedStep(optim_cls, hyper, initial, masks)
        fused = FusedStep(name, hyper, unfused.flat().clone(), flat_mask)
        # Correctness: one step from the same state with the same gradient.
        unfused.fresh_gradients()
        fused.grad.copy_(torch.cat([p.grad.reshape(-1) for p in unfused.params]))
        unfused()
        fused()
        rel_err = harness.check_close(
            fused.param, unfused.flat(), rtol=1e-6, what=f"fused {name} step"
        )
        backend = ops._masked_optim_backend(fused.param)
        print(f"  {name}: timing fused ({backend}) and unfused x {settings['rounds']}", flush=True)
        times = harness.measure_interleaved(
            {
                "unfused_torch": (unfused, unfused.fresh_gradients),
                "fused": (fused, fused.fresh_gradients),
            },
            settings["rounds"],
            sync,
        )
        # Bytes a fused step must move per element: Adam reads p, g, m, v (4 B each) and the
        # mask (1 B) and writes p, m, v; SGD with momentum reads p, g, buf, mask, writes p, buf.
        per_element = 29 if name == "adam" else 21
        baseline = times["unfused_torch"]
        for method, measured in times.items():
            report["optimizer"].append(
                {
                    "part": "optimizer",
                    "optimizer": name,
                    "elements": n,
                    "sparsity": OPTIMIZER_SPARSITY,
                    "method": method,
                    "backend": backend if method == "fused" else "torch.optim",
                    "ms": measured.median * 1e3,
                    "p20_ms": measured.p20 * 1e3,
                    "p80_ms": measured.p80 * 1e3,
                    "repeats": measured.n,
                    "speedup": baseline.median / measured.median,
                    "gb_per_s": per_element * n / measured.median / 1e9,
                    "rel_err": rel_err if method == "fused" else "",
                    "_time": measured,
                }
            )


# --- Verdict and output ----------------------------------------------------------------------


def verdict(report: dict, device: torch.device, block_size: int) -> list[str]:
    """What the numbers support for ``AUTO_BLOCK_SPARSE[device.type]``, against the setting."""
    rows = [
        r
        for r in report["linear"]
        if r["part"] == "linear"
        and r["method"] == "block_sparse"
        and r["direction"] == "forward+backward"
    ]
    current = sparse.AUTO_BLOCK_SPARSE.get(device.type)
    # The default may cover densities up to the largest one at which this setting and every
    # sparser one gained: a gain at 80 % with a loss at 95 % is noise, not a threshold.
    suggestion = None
    for r in sorted(rows, key=lambda r: r["density"]):
        if not r["gain"]:
            break
        suggestion = (round(r["density"], 4), block_size)
    lines = []
    for r in sorted(rows, key=lambda r: r["sparsity"]):
        lines.append(
            f"block-sparse fwd+bwd at {r['sparsity']:.0%} sparsity: {r['speedup']:.2f}x "
            f"masked-dense ({'a gain' if r['gain'] else 'no clear gain'}; "
            f"p20-p80 {r['p20_ms']:.3g}-{r['p80_ms']:.3g} ms)"
        )
    lines.append(
        f"the numbers support AUTO_BLOCK_SPARSE[{device.type!r}] = {suggestion}; the package "
        f"has {current}" + ("" if suggestion == current else " (edit imc_kernels/sparse.py)")
    )
    for r in report["optimizer"]:
        if r["method"] == "fused":
            lines.append(
                f"fused masked {r['optimizer']} step: {r['speedup']:.2f}x the unfused torch "
                f"sequence ({r['backend']} backend, {r['gb_per_s']:.3g} GB/s effective)"
            )
    return lines


LINEAR_COLUMNS = [
    ("part", "part"),
    ("direction", "pass"),
    ("sparsity", "sparsity"),
    ("method", "method"),
    ("backend", "backend"),
    ("_time", "ms median [p20, p80]"),
    ("speedup", "x masked-dense"),
    ("gain", "gain"),
    ("gflops", "GFLOP/s"),
    ("rel_err", "rel err"),
]
OPTIMIZER_COLUMNS = [
    ("optimizer", "optimizer"),
    ("elements", "elements"),
    ("method", "method"),
    ("backend", "backend"),
    ("_time", "ms median [p20, p80]"),
    ("speedup", "x unfused"),
    ("gb_per_s", "GB/s"),
    ("rel_err", "rel err"),
]


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def markdown_summary(report, metadata, settings, args, lines) -> str:
    out = [
        "# Sparse-masked training benchmark",
        "",
        "```",
        metadata["command"],
        "```",
        "",
        f"- device: `{metadata['device']}` ({report['device_detail']}; {metadata['threads']} "
        f"torch threads, 1-minute load average {metadata['load']} before the run)",
        f"- date: {metadata['timestamp']}, commit `{metadata['commit'] or 'unknown'}`",
        f"- torch {metadata['torch']}, triton {metadata['triton'] or 'not installed'}, "
        f"python {metadata['python']}",
        f"- mode: {'quick (smoke numbers)' if settings['quick'] else 'full'}; layer "
        f"{settings['size']} x {settings['size']}, {settings['rows']} rows, block "
        f"{args.block_size}, {settings['rounds']} interleaved rounds",
        "",
        *[f"- {note}" for note in report["notes"]],
        "",
        "Reading:",
        "",
        *[f"- {line}" for line in lines],
        "",
        "Times: median and [20th, 80th] percentiles of single calls, methods interleaved, fresh "
        "random inputs per call. `x masked-dense` / `x unfused` = baseline median / method "
        "median (above 1: faster than the baseline). `gain`: at least "
        f"{GAIN}x and the method's 80th percentile below the baseline's 20th. GFLOP/s counts "
        "the FLOPs a method executes (masked-dense: the dense product; block-sparse: kept "
        "tiles). GB/s: bytes a fused step must move / time. `rel err`: worst "
        "||x - baseline|| / ||baseline|| over output and gradients (or parameters).",
        "",
        harness.markdown_table(report["linear"], LINEAR_COLUMNS),
        "",
        harness.markdown_table(report["optimizer"], OPTIMIZER_COLUMNS),
    ]
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--size", type=int, help="layer size (default 4096 on CUDA, 2048 on CPU)")
    parser.add_argument("--rows", type=int, help="input rows per call (default: see --size)")
    parser.add_argument("--block-size", type=int, default=64, help="tile edge (default 64)")
    parser.add_argument(
        "--sparsities",
        default=",".join(str(s) for s in SPARSITIES),
        help="comma list of block sparsities (default 0.8,0.9,0.95)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's). On a shared machine, 1 avoids timing the "
        "OpenMP wake-up of idle worker threads (milliseconds per parallel op under load)",
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the summary (run conditions)"
    )
    parser.add_argument(
        "--parts", default="linear,optimizer", help="comma list of linear, optimizer"
    )
    args = parser.parse_args(argv)
    try:
        args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sparsities must be numbers, got {args.sparsities!r}") from None
    if not args.sparsities or not all(0 < s < 1 for s in args.sparsities):
        raise SystemExit("--sparsities must lie in (0, 1)")
    args.parts = harness.parse_list(args.parts, ["linear", "optimizer"], "part")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    settings = {**_defaults(device, args.quick), "quick": args.quick}
    for key in ("size", "rows", "rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if device.type == "cuda":
        # Strict fp32 for the masked-dense baseline, as the Triton kernels (ieee dots).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        major, minor = torch.cuda.get_device_capability(device)
        detail = f"{torch.cuda.get_device_name(device)}, sm{major}{minor}"
    else:
        detail = f"{harness._cpu_model()}, {harness._cpu_count()} cores"
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_before = harness.load_average()
    warning = harness.busy_machine_warning(device)
    if warning:
        print(warning, flush=True)
    sync = harness.synchronizer(device)
    report = {"linear": [], "optimizer": [], "notes": list(args.note), "device_detail": detail}
    if device.type != "cuda":
        report["notes"].append(
            "no GPU in this run: the block-sparse rows time the pure-PyTorch twin (the CPU "
            "path); the Triton kernels on a GPU are pending a GPU run of this script"
        )
    print(
        f"{harness.device_name(device)} ({detail}): layer {settings['size']}, rows "
        f"{settings['rows']}, block {args.block_size}",
        flush=True,
    )
    if "linear" in args.parts:
        run_linear(args, settings, device, report, sync)
        run_semi_structured(args, settings, device, report, sync)
    if "optimizer" in args.parts:
        run_optimizer(args, settings, device, report, sync)
    lines = verdict(report, device, args.block_size)

    argv_for_record = sys.argv if argv is None else [__file__, *argv]
    metadata = {**harness.run_metadata(device, argv_for_record), "load": load_before}
    if not args.no_save:
        suffix = "-sparse-quick" if args.quick else "-sparse"
        if args.threads is not None:
            suffix += f"-{args.threads}t"  # a thread count the device name does not imply
        extra = {"benchmark": "sparse", "quick": args.quick, "seed": args.seed}
        rows = [
            {**extra, **_public(row), **metadata} for row in report["linear"] + report["optimizer"]
        ]
        csv_path = harness.append_csv(harness.results_path(args.out, device), rows)
        md_path = harness.results_path(args.out, device, f"{suffix}.md")
        md_path.write_text(
            markdown_summary(report, metadata, settings, args, lines), encoding="utf-8"
        )
        json_path = harness.results_path(args.out, device, f"{suffix}.json")
        payload = {
            "metadata": {**metadata, "device_detail": detail},
            "settings": {**settings, "block_size": args.block_size, "sparsities": args.sparsities},
            "linear": [_public(r) for r in report["linear"]],
            "optimizer": [_public(r) for r in report["optimizer"]],
            "notes": report["notes"],
            "reading": lines,
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"appended {len(rows)} rows to {csv_path}; summary in {md_path} and {json_path}")
    for note in report["notes"]:
        print(note)
    print(f"{metadata['device']}, torch {metadata['torch']}, {time.perf_counter() - start:.1f} s")
    print()
    for line in lines:
        print(line)
    print()
    if report["linear"]:
        harness.print_table(report["linear"], LINEAR_COLUMNS)
        print()
    if report["optimizer"]:
        harness.print_table(report["optimizer"], OPTIMIZER_COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
