"""The fused rules' kept tangent buffers (``LayerRule.kept``) on the CPU.

Activation-sized tangents (pool gathers and scatters, activation products, chunked conv
outputs) are written into buffers a rule keeps from one product to the next. What that must
not change: the products (against the dense fp64 Hessian), products already handed out (no
aliasing of a kept buffer), and products of alternating block sizes (a smaller block takes
the front of a larger buffer). And what it is for: a second product of the same block size
allocates no new activation-sized buffer.
"""

from __future__ import annotations

import pytest
import torch

from imc_kernels import HessianOperator
from imc_kernels._dispatch import ENV_BACKEND
from imc_kernels.hvp.layers.base import ENV_WORKSPACE_BYTES, Workspace

# Max pooling with disjoint and with overlapping windows, a padded overlapping pool, and a
# GELU MLP (the activation's second-derivative term reads the kept forward tangent).
CASES = (
    "conv_relu_maxpool_twice",
    "conv_sigmoid_maxpool_pad_overlap",
    "mlp_gelu",
    "conv_bn2d_affine_adaptive",
    "bn1d_affine",
)


def _kept_buffers(op: HessianOperator) -> dict[tuple, torch.Tensor]:
    """The operator's kept buffers: by (rule index, role), and the two shared backward ones
    by ("backward", 0 or 1)."""
    index = {id(rule): i for i, rule in enumerate(op._engine.rules)}
    assert all(rule.workspace is op._engine.workspace for rule in op._engine.rules)
    return {
        (index.get(owner, owner), role): buf
        for (owner, role), buf in op._engine.workspace.buffers.items()
    }


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("case_name", CASES)
def test_alternating_block_sizes_match_the_dense_hessian(oracles, case_name, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv(ENV_BACKEND, backend)
    else:
        monkeypatch.delenv(ENV_BACKEND, raising=False)
    model, loss_fn, batch = oracles.build_case(case_name)
    model64, batch64 = oracles.cast(model, batch, torch.float64)
    hessian = oracles.dense("hessian", model64, loss_fn, batch64)
    op = HessianOperator(model64, loss_fn, batch64, engine="fused")
    handed_out = []
    for b, seed in ((4, 1), (1, 2), (3, 3), (4, 4)):
        block = oracles.random_block(op.dim, b, dtype=torch.float64, seed=seed)
        product = op.matmat(block)
        assert oracles.rel_err(product, hessian @ block) <= 1e-10, (b, seed)
        handed_out.append((product, product.clone(), hessian @ block))
    # Later products wrote the kept buffers again; the products already returned are intact.
    for product, copy, _ in handed_out:
        assert torch.equal(product, copy)


def _reference_operator(oracles, monkeypatch, case="conv_relu_maxpool_twice", limit=None):
    """A fused operator on the pure-PyTorch twins (the CPU path outside the tests' Triton
    interpreter: its activation passes write kept buffers, the Triton kernels allocate their
    outputs), with ``IMC_HVP_WORKSPACE_BYTES`` set to ``limit`` (None: unset)."""
    monkeypatch.setenv(ENV_BACKEND, "reference")
    if limit is None:
        monkeypatch.delenv(ENV_WORKSPACE_BYTES, raising=False)
    else:
        monkeypatch.setenv(ENV_WORKSPACE_BYTES, str(limit))
    model, loss_fn, batch = oracles.build_case(case)
    return HessianOperator(model, loss_fn, batch, engine="fused")


def test_a_second_product_reuses_the_kept_buffers(oracles, monkeypatch):
    op = _reference_operator(oracles, monkeypatch)
    op.matmat(oracles.random_block(op.dim, 3, seed=1))
    first = {key: buf.data_ptr() for key, buf in _kept_buffers(op).items()}
    # Both pools' gathers and both activations keep their forward tangents; every backward
    # output (the pools' scatters, the activations' and the second conv's input terms)
    # alternates between the two shared buffers.
    roles = {role for _, role in first}
    assert roles == {"ry", "ra", 0, 1}, roles
    assert not any(role == "rg_x" for _, role in first)
    op.matmat(oracles.random_block(op.dim, 3, seed=2))
    op.matmat(oracles.random_block(op.dim, 2, seed=3))  # smaller: the front of each buffer
    assert {key: buf.data_ptr() for key, buf in _kept_buffers(op).items()} == first


def test_a_larger_block_grows_the_buffers(oracles, monkeypatch):
    op = _reference_operator(oracles, monkeypatch)
    op.matmat(oracles.random_block(op.dim, 1, seed=1))
    small = {key: buf.numel() for key, buf in _kept_buffers(op).items()}
    op.matmat(oracles.random_block(op.dim, 5, seed=2))
    large = {key: buf.numel() for key, buf in _kept_buffers(op).items()}
    assert small.keys() == large.keys()
    assert all(large[key] == 5 * small[key] for key in small), (small, large)


def _product_and_buffers(oracles, monkeypatch, limit):
    op = _reference_operator(oracles, monkeypatch, "conv_bn2d_affine_adaptive", limit)
    return op.matmat(oracles.random_block(op.dim, 3, seed=4)), op._engine.workspace


def test_the_budget_caps_the_kept_bytes(oracles, monkeypatch):
    unlimited, workspace = _product_and_buffers(oracles, monkeypatch, None)
    total = workspace.nbytes
    sizes = sorted(b.numel() * b.element_size() for b in workspace.buffers.values())
    assert len(sizes) >= 4 and total == sum(sizes)
    # A budget for about half of them keeps some, within it; none keeps nothing. The products
    # are the same either way (the same ops, into kept or fresh tensors).
    for limit in (total // 2, 0):
        product, capped = _product_and_buffers(oracles, monkeypatch, str(limit))
        assert capped.limit_bytes == limit
        assert capped.nbytes <= limit
        assert (0 < len(capped.buffers) < len(sizes)) if limit else not capped.buffers
        torch.testing.assert_close(product, unlimited, rtol=0, atol=0)


def test_a_bad_budget_is_refused_by_name(monkeypatch):
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(ENV_WORKSPACE_BYTES, bad)
        with pytest.raises(ValueError, match=ENV_WORKSPACE_BYTES):
            Workspace()


def test_other_devices_get_fresh_tensors():
    # CUDA's caching allocator reuses memory already: nothing is kept there. The meta device
    # stands in for it here (any non-CPU device takes the same branch).
    workspace = Workspace(limit_bytes=2**30)
    like = torch.empty(0, device="meta")
    first = workspace.get(("rule", "ry"), (4, 5), like)
    assert first.shape == (4, 5) and first.device.type == "meta"
    assert not workspace.buffers


def test_a_dead_operators_buffers_serve_the_next_one(oracles, monkeypatch):
    """A collected operator's kept buffers go to the solver's buffer cache, and the next
    operator on the same shapes takes them (no fresh memory to page-fault in); its products
    are bitwise those of an operator on fresh memory. Grown-out buffers go back too."""
    import gc

    from imc_kernels.linalg import buffers

    gc.collect()
    buffers.empty_cache()
    op = _reference_operator(oracles, monkeypatch)
    block = oracles.random_block(op.dim, 3, seed=7)
    fresh = op.matmat(block)
    pointers = {buf.data_ptr() for buf in op._engine.workspace.buffers.values()}
    del op
    gc.collect()
    cached = {t.data_ptr() for t in buffers._free}
    assert pointers <= cached
    # Poison what the cache holds: a reused buffer must be fully rewritten by the product.
    for t in buffers._free:
        t.fill_(float("nan"))
    again = _reference_operator(oracles, monkeypatch)
    assert torch.equal(again.matmat(block), fresh)
    taken = {buf.data_ptr() for buf in again._engine.workspace.buffers.values()}
    assert len(taken) == len(pointers) and taken <= cached
    # A larger block outgrows them: the old buffers are handed back, nothing else holds them.
    again.matmat(oracles.random_block(again.dim, 5, seed=8))
    assert taken <= {t.data_ptr() for t in buffers._free}
    buffers.empty_cache()
