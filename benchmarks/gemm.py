"""CPU float32 GEMMs: :func:`imc_kernels.ops.gemm` (oneDNN) against ``torch.mm`` (MKL), one run.

The fused HVP engine's Linear rule and the Lanczos solver's basis products call
:func:`imc_kernels.ops.gemm`. On the CPU it runs float32 through the oneDNN matmul inside
libtorch instead of torch's ``mm`` (MKL's sgemm). This script times both on the shapes those
callers use, so the choice rests on a measurement of the machine at hand:

* ``mlp_lenet`` / ``mlp_wide``: every GEMM of one block product of the fused engine at batch
  1024 and block ``--block`` (tangent forward ``x dW^T`` and ``rx W^T``, tangent backward
  ``rg_y W``, weight products ``rg_y^T x``; transposed operands as the rule passes them);
* ``solver``: the Ritz-vector product ``V S`` of block Lanczos on the MLP's 266,610 weights
  (``V`` stored column-major for single vectors, row-major for blocks).

Each shape is checked against the float64 product (relative error of both libraries), then
timed in interleaved rounds (one call of each library per round), medians with 20th/80th
percentiles; ``speedup`` is torch's median over ours.

    python benchmarks/gemm.py --quick        # smoke run, seconds
    python benchmarks/gemm.py --threads 1    # one core, as the eig benchmark's CPU runs
    python benchmarks/gemm.py                # all threads

Writes ``<device>-gemm[-quick][-<n>t].md`` to ``--out`` and appends the rows to
``<device>.csv``. CPU only: on CUDA both names run cuBLAS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `imc_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _harness as harness  # noqa: E402
from imc_kernels import ops  # noqa: E402

GROUPS = ("mlp_lenet", "mlp_wide", "solver")
WIDTHS = {"mlp_lenet": (784, 300, 100, 10), "mlp_wide": (784, 1024, 1024, 10)}
BATCH = 1024
SOLVER_DIM = 266_610  # weights of the 784-300-100-10 MLP

COLUMNS = [
    ("group", "group"),
    ("gemm", "product"),
    ("shape", "m x k x n"),
    ("torch_ms", "torch.mm ms"),
    ("ours_ms", "ops.gemm ms"),
    ("speedup", "speedup"),
    ("torch_gflops", "torch GFLOP/s"),
    ("ours_gflops", "ours GFLOP/s"),
    ("torch_err", "torch rel err"),
    ("ours_err", "ours rel err"),
]


def layer_products(widths: tuple[int, ...], rows: int, b: int) -> list[tuple[str, tuple]]:
    """``(name, (a_shape, a_transposed, b_shape, b_transposed))`` of one block product.

    Shapes are the stored (untransposed) tensors; a transposed operand is passed as ``.T``.
    """
    products = []
    for layer, (k, m) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        tag = f"L{layer + 1} {k}->{m}"
        products.append((f"{tag} x dW^T", ((rows, k), False, (b * m, k), True)))
        if layer > 0:
            products.append((f"{tag} rx W^T", ((rows * b, k), False, (m, k), True)))
            products.append((f"{tag} rg_y W", ((rows * b, m), False, (m, k), False)))
        products.append((f"{tag} rg_y^T x", ((rows, b * m), True, (rows, k), False)))
    return products


def solver_products(dim: int) -> list[tuple[str, tuple]]:
    """The Ritz-vector products ``V[:, :m] S`` for the basis sizes of k = 10 and k = 32."""
    out = []
    for m, k in ((21, 10), (64, 32)):
        out.append((f"V S col-major m={m} k={k}", ((m, dim), True, (m, k), False)))
        out.append((f"V S row-major m={m} k={k}", ((dim, m), False, (m, k), False)))
    return out


def _operand(shape, transposed, gen):
    t = torch.randn(*shape, generator=gen)
    return t.T if transposed else t


def run_product(name, spec, group, rounds, gen) -> dict:
    a_shape, a_t, b_shape, b_t = spec
    a, b = _operand(a_shape, a_t, gen), _operand(b_shape, b_t, gen)
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    exact = a.double() @ b.double()
    out_torch, out_ours = torch.empty(m, n), torch.empty(m, n)
    calls = {
        "torch": (lambda: torch.mm(a, b, out=out_torch), tuple),
        "ours": (lambda: ops.gemm(a, b, out=out_ours), tuple),
    }
    measured = harness.measure_interleaved(calls, rounds)
    errors = {  # of the last timed call's output
        key: float(harness.relative_error(out, exact))
        for key, out in (("torch", out_torch), ("ours", out_ours))
    }
    flops = 2.0 * m * k * n
    return {
        "group": group,
        "gemm": name,
        "shape": f"{m} x {k} x {n}",
        "torch_ms": measured["torch"].ms(),
        "ours_ms": measured["ours"].ms(),
        "speedup": measured["torch"].median / measured["ours"].median,
        "torch_gflops": flops / measured["torch"].median / 1e9,
        "ours_gflops": flops / measured["ours"].median / 1e9,
        "torch_err": errors["torch"],
        "ours_err": errors["ours"],
        "torch_median_s": measured["torch"].median,
        "ours_median_s": measured["ours"].median,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = harness.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--groups", default=None, help=f"comma list of {', '.join(GROUPS)}")
    parser.add_argument("--block", type=int, default=8, help="block size of the HVP shapes")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    args.groups = harness.parse_list(args.groups, GROUPS, "group")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type != "cpu":
        raise SystemExit("benchmarks/gemm.py compares CPU GEMM libraries; run it with --device cpu")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    library = ops._cpu_gemm()
    if library != "onednn":
        raise SystemExit(
            "ops.gemm does not run oneDNN here (IMC_CPU_GEMM=torch, oneDNN disabled, or the "
            "extension or torch's oneDNN matmul missing): nothing to compare"
        )
    rounds = args.rounds or (3 if args.quick else 15)
    rows_per_batch = 128 if args.quick else BATCH
    dim = 20_000 if args.quick else SOLVER_DIM
    warning = harness.busy_machine_warning(device)
    if warning:
        print(warning, flush=True)
    load_before = harness.load_average()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for group in args.groups:
        if group == "solver":
            products = solver_products(dim)
        else:
            products = layer_products(WIDTHS[group], rows_per_batch, args.block)
        for name, spec in products:
            row = run_product(name, spec, group, rounds, gen)
            rows.append(row)
            print(
                f"{group:9s} {name:28s} {row['shape']:22s} speedup {row['speedup']:.2f}", flush=True
            )
    metadata = {
        **harness.run_metadata(device, sys.argv if argv is None else [__file__, *argv]),
        "load": load_before,
    }
    speedups = sorted(row["speedup"] for row in rows)
    summary = (
        f"oneDNN over torch.mm (float32, {torch.get_num_threads()} threads, block "
        f"{args.block}): median speedup {speedups[len(speedups) // 2]:.2f}, range "
        f"{speedups[0]:.2f}-{speedups[-1]:.2f} over {len(rows)} products"
    )
    table = harness.markdown_table(rows, COLUMNS)
    if not args.no_save:
        suffix = "-gemm-quick" if args.quick else "-gemm"
        if args.threads is not None:
            suffix += f"-{args.threads}t"
        extra = {"benchmark": "gemm", "quick": args.quick, "block": args.block}
        csv_path = harness.append_csv(
            harness.results_path(args.out, device),
            [
                {**extra, **{k: v for k, v in row.items() if not k.endswith("_ms")}, **metadata}
                for row in rows
            ],
        )
        md_path = harness.results_path(args.out, device, f"{suffix}.md")
        md_path.write_text(
            "# CPU float32 GEMM: ops.gemm (oneDNN) against torch.mm (MKL)\n\n"
            f"`{metadata['command']}` at commit `{metadata['commit']}`, {metadata['timestamp']},"
            f" {metadata['device']} ({harness._cpu_model()}), torch {metadata['torch']}, "
            f"{metadata['threads']} threads, load {metadata['load']} before the run.\n\n"
            f"{summary}. Times: median [p20, p80] of {rounds} interleaved rounds; errors "
            "relative to the float64 product.\n\n" + table + "\n",
            encoding="utf-8",
        )
        print(f"appended {len(rows)} rows to {csv_path}; summary in {md_path}")
    print(summary)
    print(f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
