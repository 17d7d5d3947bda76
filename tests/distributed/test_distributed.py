"""``imc_kernels.distributed``: two gloo processes on the CPU against one process.

The ranks run ``_worker.py`` as subprocesses (a free port on 127.0.0.1, a process-group
timeout, a hard deadline here so a hang fails the test rather than stalling it) on a 20-16-5
MLP with cross-entropy over a batch of 64 split 40/24. The references are the single-process
full-batch :class:`imc_kernels.HessianOperator` and solvers, run in this process.

Tolerances: products 1e-5 relative, with an absolute floor of 1e-5 of the block's largest
entry: the shard products and the full-batch one are fp32 with different summation orders
(a few ulp of each column's scale, ~1e-7), and the floor covers entries that cancel to
nothing. Eigenvalues 1e-5 relative: the solver's own fp32 rounding of the same operator.
Across ranks: the same bits, no tolerance.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import imc_kernels
from imc_kernels.distributed import (
    DistributedHessianOperator,
    RankFailedError,
    shard_batch,
    shard_sizes,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORKER = Path(__file__).with_name("_worker.py")
_spec = importlib.util.spec_from_file_location("imc_kernels_tests_distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

RTOL = 1e-5
# Seconds a run may take before the test declares it hung; far above the ~3 s it needs.
DEADLINE = 90.0
# The process-group timeout of the timeout scenario.
PG_TIMEOUT = 3.0


def _case():
    torch.manual_seed(0)
    model = worker.build_model()
    inputs = torch.randn(64, 20)
    targets = torch.randint(0, 5, (64,))
    block = torch.randn(sum(p.numel() for p in model.parameters()), 3)
    return model, (inputs, targets), block


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(scenario: str, folder: Path, *, pg_timeout: float = 20.0) -> list[dict | None]:
    """Run ``scenario`` on two ranks; each rank's saved results (None if it saved none)."""
    model, (inputs, targets), block = _case()
    torch.save(
        {"state": model.state_dict(), "inputs": inputs, "targets": targets, "block": block},
        folder / "case.pt",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", IMC_TEST_PG_TIMEOUT=str(pg_timeout))
    logs = [folder / f"rank{rank}.log" for rank in range(2)]
    for _attempt in range(3):  # another process may take the free port before rank 0 binds it
        for rank in range(2):
            (folder / f"rank{rank}.pt").unlink(missing_ok=True)
        _run_ranks(scenario, folder, logs, env, _free_port())
        if "address already in use" not in _logs(logs).lower():
            break
    results = []
    for rank in range(2):
        path = folder / f"rank{rank}.pt"
        results.append(torch.load(path) if path.exists() else None)
        if results[-1] is not None and "crash" in results[-1]:
            pytest.fail(f"{scenario}: rank {rank} crashed:\n{results[-1]['crash']}\n{_logs(logs)}")
    return results


def _run_ranks(scenario: str, folder: Path, logs: list[Path], env: dict, port: int) -> None:
    procs = []
    for rank in range(2):
        with open(logs[rank], "w") as log:
            argv = [sys.executable, str(WORKER), scenario, str(rank), "2", str(port), str(folder)]
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + DEADLINE
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"{scenario}: the ranks did not finish in {DEADLINE} s:\n{_logs(logs)}")


def _logs(logs) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in logs)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    results = _launch("main", tmp_path_factory.mktemp("distributed_main"))
    assert all(r is not None for r in results)
    return results


@pytest.fixture(scope="module")
def reference():
    """The single-process full-batch products and solves (one thread: these tests share two
    cores with the ranks and with other work; oversubscribed threads cost 10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, batch, block = _case()
        full = imc_kernels.HessianOperator(model, None, batch)
        full_sum = imc_kernels.HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), batch)
        full_ggn = imc_kernels.HessianOperator(model, None, batch, curvature="ggn")
        ignored = (batch[0], worker.ignored_targets(batch[1]))
        full_ignore = imc_kernels.HessianOperator(model, nn.CrossEntropyLoss(), ignored)
        weighted = nn.CrossEntropyLoss(weight=worker.CLASS_WEIGHT)
        full_weighted = imc_kernels.HessianOperator(model, weighted, batch)
        shards = [shard_batch(batch, r, 2, sizes=worker.SIZES) for r in range(2)]
        shard_ops = [imc_kernels.HessianOperator(model, None, shard) for shard in shards]
        return {
            "block": block,
            "loss": full.loss,
            "products": full @ block,
            "scipy": (full @ block[:, 1]).double(),
            "sum_loss": full_sum.loss,
            "products_sum": full_sum @ block,
            "products_ggn": full_ggn @ block,
            "products_ignore": full_ignore @ block,
            "products_class_weight": full_weighted @ block,
            "products_tokens": (shard_ops[0] @ block) / 4 + (shard_ops[1] @ block) * 3 / 4,
            "eig": imc_kernels.top_eigvecs(full, None, worker.K, seed=0),
            "density": imc_kernels.spectral_density(full, None, n_probes=4, steps=12, seed=0),
        }
    finally:
        torch.set_num_threads(threads)


def _assert_product_close(actual, expected):
    atol = RTOL * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol)


# --------------------------------------------------------------------------------- products
def test_products_match_full_batch_and_are_identical_across_ranks(ranks, reference):
    expected = reference["products"]
    assert ranks[0]["products"].dtype == torch.float32
    _assert_product_close(ranks[0]["products"], expected)
    assert torch.equal(ranks[0]["products"], ranks[1]["products"])
    # A vector is a block of one; the counter counts columns (3 + 1) on every rank.
    _assert_product_close(ranks[1]["vector"], expected[:, 0])
    assert [r["n_products"] for r in ranks] == [4, 4]
    # The loss is the full batch's, from the shards weighted 40/64 and 24/64.
    assert [r["n_samples"] for r in ranks] == [40.0, 24.0]
    assert [r["weight"] for r in ranks] == [40 / 64, 24 / 64]
    assert ranks[0]["total_samples"] == ranks[1]["total_samples"] == 64.0
    torch.testing.assert_close(ranks[1]["loss"], reference["loss"], rtol=RTOL, atol=0)


def test_reduce_dtypes_sharding_and_empty_shards_give_the_full_batch_product(ranks, reference):
    keys = ("products_fp32", "products_full_batch", "products_empty_shard", "after_failures")
    for key in (*keys, "after_broadcast"):
        _assert_product_close(ranks[0][key], reference["products"])
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert [r["empty_engine"] for r in ranks] == ["fused", "none"]


def test_sum_reduced_loss_adds_the_shard_products(ranks, reference):
    assert [r["sum_weight"] for r in ranks] == [1.0, 1.0]
    _assert_product_close(ranks[0]["products_sum"], reference["products_sum"])
    torch.testing.assert_close(ranks[0]["sum_loss"], reference["sum_loss"], rtol=RTOL, atol=0)


def test_ggn_products_match(ranks, reference):
    _assert_product_close(ranks[1]["products_ggn"], reference["products_ggn"])


@pytest.mark.parametrize("key", ["products_ignore", "products_class_weight", "products_tokens"])
def test_shard_weights_follow_what_the_loss_averages_over(ranks, reference, key):
    _assert_product_close(ranks[0][key], reference[key])
    assert torch.equal(ranks[0][key], ranks[1][key])
    assert [r["tokens_weight"] for r in ranks] == [0.25, 0.75]


def test_bad_arguments_raise_on_every_rank(ranks):
    expected = [
        ("ValueError", "reduction='none'"),
        ("ValueError", "reduction must be one of"),
        ("TypeError", "reduce_dtype must be"),
        ("ValueError", "n_samples must be"),
        ("ValueError", "curvature must be one of"),
        ("ValueError", "batch is required"),
    ]
    for r in ranks:
        seen = [(kind, message) for kind, message, _ in r["bad_arguments"]]
        assert len(seen) == len(expected)
        for (kind, message), (want_kind, want_text) in zip(seen, expected):
            assert kind == want_kind and want_text in message, (kind, message)


def test_converters(ranks, reference):
    _assert_product_close(ranks[0]["scipy"], reference["scipy"])
    params = ranks[0]["as_params"]
    assert sorted(params) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert params["0.weight"].shape == (16, 20)
    assert torch.equal(params["0.weight"].reshape(-1), reference["block"][:320, 2])


# ------------------------------------------------------------------------------- solvers
def test_top_eigvecs_matches_single_process_and_ranks_agree_bitwise(ranks, reference):
    single = reference["eig"]
    for r in ranks:
        assert r["converged"].all()
        torch.testing.assert_close(r["eigenvalues"], single.eigenvalues, rtol=RTOL, atol=0)
        assert r["n_hvps"] == r["counted"] > 0
    # Rank 1 was given seed 7: it ran from rank 0's start block, bit for bit.
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"])
    assert torch.equal(ranks[0]["eigenvectors"], ranks[1]["eigenvectors"])
    assert torch.equal(ranks[0]["residuals"], ranks[1]["residuals"])
    # Eigenvectors up to sign: |cos| of the angle to the single-process ones. Davis-Kahan:
    # sin(angle) <= ||r|| / gap; both solves meet residuals of 1e-4 ||H|| and the smallest
    # gap next to the top 3 is 0.02 ||H|| (eigenvalues 0.471, 0.454, 0.419 | 0.409), so
    # the two vectors are within 1e-2 of each other and 1 - |cos| <= 5e-5 (measured: 6e-8).
    overlap = (ranks[0]["eigenvectors"].double().T @ single.eigenvectors.double()).abs()
    ones = torch.ones(worker.K, dtype=torch.float64)
    torch.testing.assert_close(overlap.diagonal(), ones, atol=1e-4, rtol=0)


def test_spectral_density_accepts_it(ranks, reference):
    single = reference["density"]
    assert torch.equal(ranks[0]["nodes"], ranks[1]["nodes"])
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["density_hvps"] == 4 * 12
    # Rank 1 was given seed 1, rank 0 seed 0: both ran rank 0's probes, so the quadrature
    # is the single-process one with seed 0, up to the fp32 rounding of the products that
    # the 12-step recurrence carries: 1e-5 of the spectrum's scale (measured: 6e-8).
    scale = float(single.nodes.abs().max())
    torch.testing.assert_close(ranks[1]["nodes"], single.nodes, rtol=0, atol=RTOL * scale)
    torch.testing.assert_close(ranks[1]["weights"], single.weights, rtol=0, atol=RTOL)


# -------------------------------------------------------------------------------- guards
def test_diverged_blocks_raise_on_every_rank(ranks):
    for r in ranks:
        kind, message, _ = r["diverged"]
        assert kind == "RuntimeError" and "different blocks" in message


def test_models_that_differ_across_ranks_raise_on_every_rank(ranks):
    for r in ranks:
        kind, message, _ = r["model_mismatch"]
        assert kind == "ValueError" and "same model" in message


def test_a_failing_shard_product_makes_the_other_rank_raise_at_once(ranks):
    kind, message, _ = ranks[1]["product_failure"]
    assert kind == "FloatingPointError" and "injected" in message
    kind, message, seconds = ranks[0]["product_failure"]
    assert kind == RankFailedError.__name__ and "rank 1 of 2" in message
    assert seconds < 5.0  # well inside the 20 s process-group timeout: no wait on it


def test_a_rank_that_cannot_build_its_shard_makes_the_other_raise(ranks):
    kind, message, _ = ranks[1]["build_failure"]
    assert kind == "ValueError" and "targets must lie in [0, 5)" in message
    kind, message, seconds = ranks[0]["build_failure"]
    assert kind == RankFailedError.__name__ and "rank 1 of 2" in message
    assert seconds < 5.0


def test_a_rank_that_raises_before_a_collective_times_the_others_out(tmp_path):
    results = _launch("timeout", tmp_path, pg_timeout=PG_TIMEOUT)
    assert results[1]["failure"][0] == "RuntimeError"
    kind, message, seconds = results[0]["failure"]
    assert kind in ("RuntimeError", "DistBackendError", "DistError"), (kind, message)
    # It waited for the timeout (the peer was alive) and raised soon after it.
    assert PG_TIMEOUT * 0.5 <= seconds < PG_TIMEOUT + 10.0, (seconds, message)


def test_a_rank_that_dies_makes_the_others_raise(tmp_path):
    results = _launch("exit", tmp_path, pg_timeout=20.0)
    assert results[1] is None  # it died without saving anything
    kind, message, seconds = results[0]["failure"]
    assert kind in ("RuntimeError", "DistBackendError", "DistError"), (kind, message)
    assert seconds < 10.0  # gloo notices the closed connection; no wait on the 20 s timeout


# ------------------------------------------------------------------ single-process checks
def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    model, batch, _ = _case()
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        DistributedHessianOperator(model, None, batch)
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        shard_batch(batch)


@pytest.mark.parametrize(
    ("n", "world_size", "sizes"),
    [(64, 2, [32, 32]), (10, 4, [3, 3, 2, 2]), (3, 5, [1, 1, 1, 0, 0]), (0, 2, [0, 0])],
)
def test_shard_sizes(n, world_size, sizes):
    assert shard_sizes(n, world_size) == sizes


def test_shard_batch_splits_every_tensor_and_keeps_the_structure():
    inputs = {"x": torch.arange(10.0).view(10, 1), "scale": 2.0, "flag": torch.tensor(1)}
    targets = torch.arange(10)
    pieces = [shard_batch((inputs, targets), r, 3) for r in range(3)]
    assert [p[1].tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert torch.equal(pieces[1][0]["x"].view(-1), torch.tensor([4.0, 5.0, 6.0]))
    assert pieces[2][0]["scale"] == 2.0 and pieces[2][0]["flag"] is inputs["flag"]
    x, y = shard_batch(
        ((torch.zeros(64, 20), torch.ones(64, 3)), targets.repeat(7)[:64]), 1, 2, sizes=[40, 24]
    )
    assert isinstance(x, tuple) and x[0].shape == (24, 20) and x[1].shape == (24, 3)
    assert y.shape == (24,)
    empty = shard_batch((torch.zeros(64, 20), targets.repeat(7)[:64]), 1, 2, sizes=[64, 0])
    assert empty[0].shape == (0, 20) and empty[1].shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "world_size": 2}, "rank must be an integer in"),
        ({"rank": 0, "world_size": 0}, "world_size must be a positive integer"),
        ({"rank": 0}, "give both rank and world_size"),
        ({"rank": 0, "world_size": 2, "sizes": [40, 20]}, "sum to 60 but the batch has 64"),
        ({"rank": 0, "world_size": 2, "sizes": [64]}, "2 non-negative integers"),
        ({"rank": 0, "world_size": 2, "sizes": [70, -6]}, "2 non-negative integers"),
    ],
)
def test_shard_batch_bad_arguments(kwargs, match):
    batch = (torch.zeros(64, 20), torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match=match):
        shard_batch(batch, **kwargs)


def test_shard_batch_rejects_a_tensor_of_another_length():
    batch = ((torch.zeros(64, 20), torch.zeros(8, 20)), torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"inputs\[1\] has 8 rows but the batch has 64"):
        shard_batch(batch, 0, 2)
    with pytest.raises(ValueError, match="pair"):
        shard_batch(torch.zeros(64, 20), 0, 2)


def test_imc_prune_accepts_the_distributed_operator(tmp_path, monkeypatch):
    """imc_prune.imc over two ranks: the single-process decision, bitwise equal across ranks."""
    from imc_kernels import _dispatch
    from imc_prune.imc import imc

    if _dispatch.triton_interpret() and not torch.cuda.is_available():
        monkeypatch.setenv(_dispatch.ENV_BACKEND, "reference")  # as the ranks do

    results = _launch("imc", tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, batch, _ = _case()
        single = imc(model, worker.imc_dataset(batch), **worker.IMC_KW)
    finally:
        torch.set_num_threads(threads)
    first, second = results
    for name, mask in single.masks.items():
        assert torch.equal(first["masks"][name], mask) and torch.equal(second["masks"][name], mask)
    assert torch.equal(torch.as_tensor(first["top"]), torch.as_tensor(second["top"]))
    torch.testing.assert_close(
        torch.as_tensor(first["top"]),
        torch.as_tensor(single.spectrum.top_eigenvalues),
        rtol=1e-5,
        atol=0,
    )
    assert first["lipschitz"] == second["lipschitz"]
    assert first["lipschitz"] == pytest.approx(single.lipschitz.value, rel=1e-3)
    assert first["gap_n"] == second["gap_n"] == single.gap.n
