"""Top Hessian eigenpairs of LeNet-300-100, the Hessian's batch sharded over torchrun ranks.

    torchrun --nproc_per_node=2 examples/torchrun_top_eigvecs.py [--k 8] [--batch 1024]

Each rank builds the same model (seeded), takes its shard of the same batch and wraps it in
:class:`imc_kernels.distributed.DistributedHessianOperator`; ``top_eigvecs`` then runs
replicated: every rank computes the same eigenpairs, bit for bit, from block products that
are all-reduced over the ranks. gloo on CPUs, NCCL with one GPU per rank. Fashion-MNIST is
read from ``$IMC_DATA`` or ``/usr/share/datasets`` (see ``imc_prune.data.load_dataset``); the
scikit-learn digits stand in when it is not there.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import imc_kernels
from imc_kernels.distributed import DistributedHessianOperator, shard_batch
from imc_prune.data import DatasetNotFoundError, first_batch, load_dataset
from imc_prune.models import build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8, help="eigenpairs (default 8)")
    parser.add_argument("--batch", type=int, default=1024, help="Hessian batch, all ranks")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance")
    parser.add_argument("--seed", type=int, default=0, help="model and start-block seed")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="process-group timeout in seconds"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="rank 0 also applies the single-process full-batch operator and compares",
    )
    return parser.parse_args()


def load_data():
    try:
        return load_dataset("fashion-mnist")
    except DatasetNotFoundError as exc:
        print(f"[rank {dist.get_rank()}] Fashion-MNIST not found ({exc}); using digits")
        return load_dataset("digits")


def main() -> None:
    args = parse_args()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # The timeout bounds every collective: a rank that fails makes the others raise, not hang.
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        data = load_data()
        model = build_model(
            "lenet300100",
            num_classes=data.num_classes,
            input_shape=data.input_shape,
            seed=args.seed,  # the same weights on every rank (the operator checks)
        ).to(device)
        batch = first_batch(data.train, args.batch)  # the same batch on every rank
        inputs, targets = (t.to(device) for t in shard_batch(batch, rank, world_size))

        started = time.perf_counter()
        operator = DistributedHessianOperator(model, None, (inputs, targets))
        res = imc_kernels.top_eigvecs(operator, None, args.k, tol=args.tol, seed=args.seed)
        seconds = time.perf_counter() - started

        # Replicated: every rank holds the same eigenvalues, bit for bit.
        gathered = [torch.empty_like(res.eigenvalues) for _ in range(world_size)]
        dist.all_gather(gathered, res.eigenvalues)
        identical = all(torch.equal(g, gathered[0]) for g in gathered)
        shards = [torch.empty(1, dtype=torch.float64, device=device) for _ in range(world_size)]
        dist.all_gather(
            shards, torch.tensor([operator.n_samples], dtype=torch.float64, device=device)
        )

        if rank == 0:
            print(
                f"{data.name}: LeNet-300-100, {operator.dim:,} parameters, Hessian batch "
                f"{int(operator.total_samples)} over {world_size} ranks "
                f"({'/'.join(str(int(s.item())) for s in shards)}), {backend} on {device.type}, "
                f"engine {operator.engine}"
            )
            print(f"loss {float(operator.loss):.4f}")
            for i in range(res.k):
                print(
                    f"  lambda_{i + 1} = {float(res.eigenvalues[i]):.6f}   "
                    f"residual {float(res.residuals[i]):.1e}   "
                    f"converged {bool(res.converged[i])}"
                )
            print(
                f"{res.n_hvps} Hessian-vector products, {res.restarts} restarts, "
                f"{seconds:.2f} s; eigenvalues identical on all ranks: {identical}"
            )
        if args.check and rank == 0:
            # The single-process full-batch operator on rank 0 (the others wait at the end).
            full = imc_kernels.HessianOperator(model, None, tuple(t.to(device) for t in batch))
            single = full @ res.eigenvectors
            rayleigh = (res.eigenvectors * single).sum(0).double()
            error = (rayleigh - res.eigenvalues).abs().max() / res.eigenvalues.abs().max()
            print(f"check: single-process Rayleigh quotients agree to {float(error):.1e}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
