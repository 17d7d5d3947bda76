"""One rank of the two-process gloo tests of ``imc_kernels.distributed``, run as a script.

``python _worker.py SCENARIO RANK WORLD_SIZE PORT FOLDER``: joins a gloo process group on
``127.0.0.1:PORT``, loads the case the test saved in ``FOLDER/case.pt`` (model state, batch,
block), runs ``SCENARIO`` and saves what it saw to ``FOLDER/rank<RANK>.pt``. Expected
exceptions are recorded as ``(type name, message, seconds)``; an unexpected one is saved
under ``"crash"`` and the script exits with status 1.

The test module loads this file too (``build_model``), so both sides build the same network.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SIZES = [40, 24]  # uneven shards of the 64-sample batch
K = 3
CLASS_WEIGHT = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])


def ignored_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets with 10 samples of the second shard marked ``ignore_index`` (-100)."""
    ignored = targets.clone()
    ignored[45:55] = -100
    return ignored


def BAD_ARGUMENTS(shard):  # noqa: N802 - a table, read as a constant
    """Constructor arguments that every rank rejects before any collective."""
    return [
        {"batch": shard, "loss_fn": nn.CrossEntropyLoss(reduction="none")},
        {"batch": shard, "reduction": "max"},
        {"batch": shard, "reduce_dtype": torch.float16},
        {"batch": shard, "n_samples": -1},
        {"batch": shard, "curvature": "fisher"},
        {"batch": None},
    ]


def build_model() -> nn.Module:
    """The 20-16-5 MLP of the tests (cross-entropy over 5 classes)."""
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5))


def _load_case(folder: Path):
    case = torch.load(folder / "case.pt")
    model = build_model()
    model.load_state_dict(case["state"])
    return model, (case["inputs"], case["targets"]), case["block"]


def _caught(fn) -> tuple[str, str, float] | None:
    """Run ``fn``; the exception it raises as ``(type name, message, seconds)``, or None."""
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, str(exc), time.perf_counter() - started
    return None


def scenario_main(rank: int, folder: Path) -> dict:
    import imc_kernels
    from imc_kernels.distributed import DistributedHessianOperator, broadcast_model, shard_batch

    model, batch, block = _load_case(folder)
    out: dict = {}
    shard = shard_batch(batch, rank, 2, sizes=SIZES)
    op = DistributedHessianOperator(model, None, shard)
    out["n_samples"], out["weight"] = op.n_samples, op.weight
    out["total_samples"], out["loss"] = op.total_samples, op.loss
    out["products"] = op @ block
    out["vector"] = op.matvec(block[:, 0].clone())
    out["n_products"] = op.n_products
    out["scipy"] = torch.as_tensor(op.to_scipy().matvec(block[:, 1].double().numpy()))
    out["as_params"] = {k: v.clone() for k, v in op.as_params(block[:, 2].clone()).items()}

    out["products_fp32"] = DistributedHessianOperator(
        model, None, shard, reduce_dtype=torch.float32
    ).matmat(block)
    out["products_full_batch"] = DistributedHessianOperator(
        model, None, batch, full_batch=True
    ).matmat(block)
    empty_op = DistributedHessianOperator(model, None, shard_batch(batch, rank, 2, sizes=[64, 0]))
    out["empty_engine"] = empty_op.engine
    out["products_empty_shard"] = empty_op.matmat(block)
    sum_loss = nn.CrossEntropyLoss(reduction="sum")
    sum_op = DistributedHessianOperator(model, sum_loss, shard)
    out["sum_weight"], out["sum_loss"] = sum_op.weight, sum_op.loss
    out["products_sum"] = sum_op.matmat(block)
    ggn_op = DistributedHessianOperator(model, None, shard, curvature="ggn")
    out["products_ggn"] = ggn_op.matmat(block)
    # Cross-entropy means over the targets that are not ignored, weighted by class weights:
    # the default shard weights follow (rank 1's shard holds all the ignored targets).
    ignored = ignored_targets(batch[1])
    ignored_shard = shard_batch((batch[0], ignored), rank, 2, sizes=SIZES)
    out["products_ignore"] = DistributedHessianOperator(
        model, nn.CrossEntropyLoss(), ignored_shard
    ).matmat(block)
    weighted = nn.CrossEntropyLoss(weight=CLASS_WEIGHT)
    out["products_class_weight"] = DistributedHessianOperator(model, weighted, shard).matmat(block)
    # Explicit weights: 10 and 30 "tokens", so H = H_0 / 4 + 3 H_1 / 4.
    tokens_op = DistributedHessianOperator(model, None, shard, n_samples=10 if rank == 0 else 30)
    out["tokens_weight"], out["products_tokens"] = tokens_op.weight, tokens_op.matmat(block)
    out["bad_arguments"] = [
        _caught(lambda kw=kw: DistributedHessianOperator(model, **kw))
        for kw in BAD_ARGUMENTS(shard)
    ]

    # Rank 1 passes another seed: the solvers take rank 0's, or the agreement check raises.
    before = op.n_products
    res = imc_kernels.top_eigvecs(op, None, K, seed=0 if rank == 0 else 7)
    out["eigenvalues"], out["eigenvectors"] = res.eigenvalues, res.eigenvectors
    out["residuals"], out["converged"] = res.residuals, res.converged
    out["n_hvps"], out["counted"] = res.n_hvps, op.n_products - before
    dens = imc_kernels.spectral_density(op, None, n_probes=4, steps=12, seed=rank)
    out["nodes"], out["weights"], out["density_hvps"] = dens.nodes, dens.weights, dens.n_hvps

    # Blocks that differ by one ulp in one entry on rank 1: both ranks refuse to mix them.
    diverged = block.clone()
    if rank == 1:
        diverged[5, 1] = torch.nextafter(diverged[5, 1], torch.tensor(float("inf")))
    out["diverged"] = _caught(lambda: op.matmat(diverged))

    # A model that differs by one ulp in one weight on rank 1.
    other = copy.deepcopy(model)
    if rank == 1:
        with torch.no_grad():
            weight = other[2].weight
            weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
    out["model_mismatch"] = _caught(lambda: DistributedHessianOperator(other, None, shard))
    broadcast_model(other)  # rank 0's weights everywhere: the check passes again
    out["after_broadcast"] = DistributedHessianOperator(other, None, shard).matmat(block)

    # Rank 1's shard product raises: it re-raises its error, rank 0 raises RankFailedError
    # at once (not after the process group's timeout).
    if rank == 1:

        def broken(block):
            raise FloatingPointError("injected failure of the shard product")

        op.local.matmat = broken
    out["product_failure"] = _caught(lambda: op.matmat(block))

    # Rank 1's shard cannot build its operator (a target out of range).
    bad_inputs, bad_targets = shard
    if rank == 1:
        bad_targets = bad_targets.clone()
        bad_targets[0] = 99
    out["build_failure"] = _caught(
        lambda: DistributedHessianOperator(model, None, (bad_inputs, bad_targets))
    )
    # The group survives both failures: one more product agrees with the first.
    out["after_failures"] = DistributedHessianOperator(model, None, shard).matmat(block)
    return out


def scenario_timeout(rank: int, folder: Path) -> dict:
    """Rank 1 raises before a collective and stays alive; rank 0 must raise on the timeout."""
    import imc_kernels
    from imc_kernels.distributed import DistributedHessianOperator, shard_batch

    model, batch, _ = _load_case(folder)
    op = DistributedHessianOperator(model, None, shard_batch(batch, rank, 2, sizes=SIZES))
    if rank == 1:

        def fail_before_solving():
            raise RuntimeError("rank 1 fails before the solve")

        failure = _caught(fail_before_solving)
        # Keep the connection open until rank 0 is done (or a deadline), so rank 0 sees the
        # process group's timeout and not a closed connection.
        deadline = time.monotonic() + 30
        while not (folder / "rank0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"failure": failure}
    return {"failure": _caught(lambda: imc_kernels.top_eigvecs(op, None, K))}


def scenario_exit(rank: int, folder: Path) -> dict:
    """Rank 1's process dies before a collective; rank 0 must raise, well before the timeout."""
    import imc_kernels
    from imc_kernels.distributed import DistributedHessianOperator, shard_batch

    model, batch, _ = _load_case(folder)
    op = DistributedHessianOperator(model, None, shard_batch(batch, rank, 2, sizes=SIZES))
    if rank == 1:
        sys.stdout.flush()
        os._exit(3)  # a crashed rank: no cleanup, no goodbye to the group
    return {"failure": _caught(lambda: imc_kernels.top_eigvecs(op, None, K))}


# imc_prune.imc on the 64-sample case: every rank passes the whole batch, the operator keeps
# the rank's shard (full_batch=True).
IMC_KW = dict(
    sparsity=0.6, warmup_steps=3, warmup_batch_size=16, hessian_batch_size=64, k=3,
    n_probes=2, steps=10, n_directions=1, seed=0,
)  # fmt: skip


def imc_dataset(batch):
    return torch.utils.data.TensorDataset(*batch)


def scenario_imc(rank: int, folder: Path) -> dict:
    """IMC with the data-parallel operator: the same decision as one process, on each rank."""
    import functools

    from imc_kernels.distributed import DistributedHessianOperator
    from imc_prune.imc import imc

    if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        # The pipeline, not the kernels, is under test: the twins, not the slow interpreter.
        os.environ["IMC_KERNELS_BACKEND"] = "reference"
    model, batch, _ = _load_case(folder)
    operator = functools.partial(DistributedHessianOperator, full_batch=True)
    result = imc(model, imc_dataset(batch), operator=operator, **IMC_KW)
    return {
        "masks": result.masks,
        "top": result.spectrum.top_eigenvalues,
        "lipschitz": result.lipschitz.value,
        "gap_n": result.gap.n,
    }


SCENARIOS = {
    "main": scenario_main,
    "timeout": scenario_timeout,
    "exit": scenario_exit,
    "imc": scenario_imc,
}


def main() -> None:
    scenario, rank, world_size, port, folder = sys.argv[1:6]
    rank, world_size, folder = int(rank), int(world_size), Path(folder)
    timeout = float(os.environ.get("IMC_TEST_PG_TIMEOUT", "20"))
    torch.set_num_threads(1)  # the same thread count on both ranks: the same bits
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        result = SCENARIOS[scenario](rank, folder)
        status = 0
    except Exception:
        result = {"crash": traceback.format_exc()}
        status = 1
    torch.save(result, folder / f"rank{rank}.tmp")
    os.replace(folder / f"rank{rank}.tmp", folder / f"rank{rank}.pt")
    sys.stdout.flush()
    sys.stderr.flush()
    # No destroy_process_group: after a failure scenario the group is broken and tearing it
    # down could block; the test only needs the saved results.
    os._exit(status)


if __name__ == "__main__":
    main()
