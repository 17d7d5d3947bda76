"""Structured-sparse layers (imc_kernels.sparse) against the masked-dense path, and the
``granularity="block"`` / ``"2:4"`` masks of ``imc_prune.masks``.

Layer tests run the block-sparse products on both backends, forced through
``IMC_KERNELS_BACKEND``: the pure-PyTorch twin and the Triton kernels (in the interpreter on
CPU). The oracle is ``F.linear(x, W * mask, b)`` with autograd, i.e. ``MaskedLinear``.

Tolerances. Both sides compute fp32 dot products of at most 128 terms (forward and input
gradient) or of the batch rows (weight gradient, at most 70 here) in different orders;
the difference is fp32 summation error, ~sqrt(K) * 6e-8 * |y| ~ 1e-5 typically and below
1e-3 in the worst case (see tests/ops/test_block_sparse_kernels.py), so
``rtol = atol = 1e-4``. A wrong, missing or extra tile gives O(1) errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imc_kernels import _dispatch
from imc_kernels.masked import MaskedAdam, MaskedLinear
from imc_kernels.reference.block_sparse import expand_block_mask
from imc_kernels.sparse import (
    AUTO_BLOCK_SPARSE,
    BlockSparseLinear,
    SemiStructuredLinear,
    block_sparse_path,
    semi_structured_path,
    semi_structured_unsupported_reason,
    structured_model,
)
from imc_prune.masks import (
    block_scores,
    check_masks,
    is_two_four,
    masks_from_scores,
    prunable_parameters,
)

TOL = dict(rtol=1e-4, atol=1e-4)
BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(_dispatch.ENV_BACKEND, request.param)
    return request.param


def _random_block_mask(n_rows, n_cols, seed=0, keep=0.5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_rows, n_cols, generator=gen) < keep


def _layer_pair(in_features, out_features, block_size, block_mask, bias=True, seed=0):
    """A block-sparse layer and the masked-dense oracle with the same parameters."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    oracle = copy.deepcopy(dense)
    layer = BlockSparseLinear.from_dense(
        dense, block_mask, block_size=block_size, path="block_sparse"
    )
    return layer, oracle, expand_block_mask(layer.block_mask, block_size)


def _run(layer, input, grad_output):
    input = input.clone().requires_grad_(True)
    output = layer(input)
    output.backward(grad_output)
    return output, input.grad


def _oracle_run(oracle, mask, input, grad_output):
    input = input.clone().requires_grad_(True)
    output = F.linear(input, oracle.weight * mask, oracle.bias)
    output.backward(grad_output)
    return output, input.grad


# (input shape, in, out, block): 3-D input with 35 rows in all (awkward), a single row,
# 70 rows (one full and one partial row tile).
SHAPES = [((5, 7, 96), 96, 64, 16), ((1, 32), 32, 64, 32), ((70, 128), 128, 32, 16)]


@pytest.mark.parametrize("pattern", ["random", "dense", "empty_rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=["3d-awkward", "one-row", "70-rows"])
def test_forward_backward_match_masked_dense(shape, pattern, backend):
    input_shape, in_features, out_features, block_size = shape
    grid = (out_features // block_size, in_features // block_size)
    if pattern == "dense":
        block_mask = None
    else:
        block_mask = _random_block_mask(*grid, seed=1)
        if pattern == "empty_rows":
            block_mask[0] = False  # an output block-row with no kept tile
            block_mask[:, -1] = False  # an input block-column with no kept tile
    layer, oracle, mask = _layer_pair(in_features, out_features, block_size, block_mask)
    assert layer.active_path()[0] == "block_sparse"
    expected_backend = "triton" if backend == "triton" else "reference"
    assert f"on the {expected_backend} backend" in layer.active_path()[1]
    # Pruned weights hold garbage: neither the output nor any gradient may depend on it.
    with torch.no_grad():
        layer.weight[~mask] = 1e6
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(input_shape, generator=gen)
    dy = torch.randn(*input_shape[:-1], out_features, generator=gen)
    y, dx = _run(layer, x, dy)
    y_ref, dx_ref = _oracle_run(oracle, mask, x, dy)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    torch.testing.assert_close(layer.weight.grad, oracle.weight.grad, **TOL)
    torch.testing.assert_close(layer.bias.grad, oracle.bias.grad, **TOL)
    assert torch.equal(layer.weight.grad[~mask], torch.zeros(int((~mask).sum())))


def test_no_bias_and_frozen_input(backend):
    layer, oracle, mask = _layer_pair(64, 32, 16, _random_block_mask(2, 4, seed=3), bias=False)
    x = torch.randn(9, 64)  # no requires_grad: only the weight gradient is needed
    layer(x).square().sum().backward()
    F.linear(x, oracle.weight * mask).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, oracle.weight.grad, **TOL)
    assert layer.bias is None


def test_masked_dense_path_equals_masked_linear():
    block_mask = _random_block_mask(2, 3, seed=4)
    layer, oracle, mask = _layer_pair(48, 32, 16, block_mask)
    layer.path = "masked_dense"
    assert layer.active_path() == ("masked_dense", "path='masked_dense' was requested")
    masked = MaskedLinear.from_dense(oracle, mask)
    x = torch.randn(6, 48)
    assert torch.equal(layer(x), masked(x))


def test_auto_path_follows_the_measured_thresholds():
    # benchmarks/sparse.py: the twin beat masked-dense on CPU from 80 % block sparsity with
    # tiles of 64 (AUTO_BLOCK_SPARSE["cpu"]); nothing is measured on a GPU yet.
    max_density, min_block = AUTO_BLOCK_SPARSE["cpu"]
    path, reason = block_sparse_path("cpu", max_density, min_block)
    assert path == "block_sparse" and "benchmarks/sparse.py" in reason
    assert block_sparse_path("cpu", 0.05, 128)[0] == "block_sparse"
    path, reason = block_sparse_path("cpu", max_density + 0.01, min_block)  # too dense
    assert path == "masked_dense" and f"density <= {max_density:g}" in reason
    assert block_sparse_path("cpu", 0.05, min_block // 2)[0] == "masked_dense"  # tiles too small
    layer = BlockSparseLinear(64, 64, block_size=32, mask=_random_block_mask(2, 2, keep=0.1))
    assert layer.active_path()[0] == "masked_dense"  # blocks of 32
    path, reason = block_sparse_path("cuda", 0.05, 64)  # not measured on GPU yet
    assert path == "masked_dense" and "has no measurement" in reason
    assert block_sparse_path("cpu", 0.5, 64, "block_sparse")[0] == "block_sparse"
    assert block_sparse_path("cpu", 0.05, 64, "masked_dense")[0] == "masked_dense"
    with pytest.raises(ValueError, match="path must be one of"):
        block_sparse_path("cpu", 0.5, 64, "fast")


def test_block_size_without_triton_kernel_runs_the_twin(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_BACKEND, raising=False)
    layer, oracle, mask = _layer_pair(72, 48, 24, _random_block_mask(2, 3, seed=5))
    assert "on the reference backend" in layer.active_path()[1]
    x = torch.randn(4, 72)
    torch.testing.assert_close(layer(x), F.linear(x, oracle.weight * mask, oracle.bias), **TOL)


def test_mask_cache_follows_state_dict_and_set_mask():
    layer, oracle, mask = _layer_pair(32, 32, 16, torch.tensor([[True, False], [False, True]]))
    other = torch.tensor([[False, True], [True, True]])
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "block_mask"}
    x = torch.randn(3, 32)
    layer(x)  # builds the cached layout
    state["block_mask"] = other
    layer.load_state_dict(state)
    assert layer.layout.n_kept == 3
    expected = F.linear(x, layer.weight * expand_block_mask(other, 16), layer.bias)
    torch.testing.assert_close(layer(x), expected, **TOL)
    layer.set_mask(expand_block_mask(torch.tensor([[True, False], [False, False]]), 16))
    assert layer.layout.n_kept == 1 and layer.density == 0.25
    assert torch.equal(layer.mask, expand_block_mask(layer.block_mask, 16))


def test_layer_bad_input():
    with pytest.raises(ValueError, match=r"in_features = 100 \(remainder 4\)"):
        BlockSparseLinear(100, 64, block_size=16)
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="not block-structured"):
        BlockSparseLinear(32, 32, block_size=16, mask=mask)
    with pytest.raises(ValueError, match=r"expected the block grid \(2, 2\)"):
        BlockSparseLinear(32, 32, block_size=16, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        BlockSparseLinear(32, 32, block_size=16, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="path must be one of"):
        BlockSparseLinear(32, 32, block_size=16, path="sparse")
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        BlockSparseLinear.from_dense(nn.Conv2d(1, 1, 1), block_size=1)


def test_trains_like_masked_linear_with_masked_adam(backend):
    # Block masks from imc_prune, the same masked optimizer: the block-sparse layer follows
    # the masked-dense trajectory (5 steps; differences stay at fp32 rounding).
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    scores = {name: p.detach().abs() for name, p in prunable_parameters(base).items()}
    masks = masks_from_scores(scores, 0.5, granularity="block", block_size=16)
    sparse_model = structured_model(
        copy.deepcopy(base), masks, granularity="block", block_size=16, path="block_sparse"
    )
    dense_model = copy.deepcopy(base)
    dense_model[0] = MaskedLinear.from_dense(dense_model[0], masks["0.weight"])
    dense_model[2] = MaskedLinear.from_dense(dense_model[2], masks["2.weight"])
    assert isinstance(sparse_model[0], BlockSparseLinear)
    assert [n for n, _ in sparse_model.named_parameters()] == [
        n for n, _ in base.named_parameters()
    ]
    optimizers = [
        MaskedAdam.from_model(model, masks, lr=1e-2) for model in (sparse_model, dense_model)
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, target = torch.randn(24, 64, generator=gen), torch.randn(24, 16, generator=gen)
        for model, opt in zip((sparse_model, dense_model), optimizers):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
    for (name, p), (_, q) in zip(sparse_model.named_parameters(), dense_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)
    for name, mask in masks.items():
        assert not dict(sparse_model.named_parameters())[name][~mask].any()


def test_structured_model_bad_input():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="only nn.Linear"):
        structured_model(
            model, {"0.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool)}, granularity="2:4"
        )
    with pytest.raises(ValueError, match="needs a block_size"):
        structured_model(model, {}, granularity="block")
    with pytest.raises(ValueError, match="granularity must be"):
        structured_model(model, {}, granularity="4:8")
    with pytest.raises(ValueError, match="not a weight name"):
        structured_model(model, {"2.bias": torch.ones(16, dtype=torch.bool)}, granularity="2:4")


# --- 2:4 layer -------------------------------------------------------------------------------


def _two_four_mask(out_features, in_features, seed=0):
    scores = torch.rand(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return masks_from_scores({"w": scores}, 0.5, granularity="2:4")["w"]


def test_semi_structured_on_cpu_is_masked_dense():
    mask = _two_four_mask(16, 32)
    torch.manual_seed(0)
    dense = nn.Linear(32, 16)
    layer = SemiStructuredLinear.from_dense(copy.deepcopy(dense), mask)
    path, reason = layer.active_path()
    assert path == "masked_dense" and "needs a CUDA GPU" in reason
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), F.linear(x, dense.weight * mask, dense.bias))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        semi_structured_path("cpu", torch.float16, (16, 32), "semi_structured")
    assert "CUDA" in semi_structured_unsupported_reason("cpu", torch.float16, (16, 32))


def test_semi_structured_bad_masks():
    bad = torch.zeros(4, 8, dtype=torch.bool)
    bad[2, 4:7] = True  # 3 of 4 kept
    with pytest.raises(ValueError, match=r"row 2, columns 4:8 keep 3 of 4"):
        SemiStructuredLinear(8, 4, mask=bad)
    with pytest.raises(ValueError, match="multiple of 4 columns"):
        SemiStructuredLinear(6, 4, mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="weight has shape"):
        SemiStructuredLinear(8, 4, mask=torch.zeros(8, 8, dtype=torch.bool))


@pytest.mark.gpu
def test_semi_structured_on_gpu_matches_masked_dense():
    # fp16 on a GPU with 2:4 support (sm80+): the forward runs on the sparse tensor cores.
    # fp16 products accumulate in fp32 over 128 terms in either path; they differ by the
    # rounding of the output to fp16 (~1e-3 relative) and accumulation order.
    device = torch.device("cuda")
    reason = semi_structured_unsupported_reason(device, torch.float16, (128, 128))
    if reason is not None:
        pytest.skip(reason)
    mask = _two_four_mask(128, 128).to(device)
    dense = nn.Linear(128, 128, device=device, dtype=torch.float16)
    oracle = copy.deepcopy(dense)
    layer = SemiStructuredLinear.from_dense(dense, mask, path="semi_structured")
    x = torch.randn(64, 128, device=device, dtype=torch.float16)
    dy = torch.randn(64, 128, device=device, dtype=torch.float16)
    y, dx = _run(layer, x, dy)
    y_ref, dx_ref = _oracle_run(oracle, mask, x, dy)
    tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(layer.weight.grad, oracle.weight.grad, **tol)


# --- imc_prune masks: granularity="block" --------------------------------------------------


def test_block_scores_pool_by_sum():
    score = torch.tensor(
        [
            [1.0, 2.0, 0.0, 0.0, 5.0, 5.0],
            [3.0, 4.0, 0.0, 1.0, 5.0, 5.0],
            [0.5, 0.5, 9.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0, -1.0],
        ]
    )
    # Tiles of 2x2, summed by hand.
    expected = torch.tensor([[10.0, 1.0, 20.0], [2.0, 9.0, -1.0]], dtype=torch.float64)
    assert torch.equal(block_scores(score, 2), expected)
    # Keep 2 of 6 tiles: the sums 20 and 10.
    mask = masks_from_scores({"w": score}, 4 / 6, granularity="block", block_size=2)["w"]
    keep = torch.tensor([[True, False, True], [False, False, False]])
    assert torch.equal(mask, expand_block_mask(keep, 2))
    # Conv-shaped scores are pooled over the (out, in * kh * kw) matrix.
    conv = torch.arange(2 * 2 * 2 * 2.0).reshape(2, 2, 2, 2)  # matrix (2, 8)
    assert block_scores(conv, 2).tolist() == [[18.0, 26.0, 34.0, 42.0]]


def test_block_pooling_keeps_signed_scores_meaning():
    # Scores are summed as given (higher = more important): a tile of large negative scores
    # (GraSP's convention) ranks last, as its elements would. |score| would rank it first.
    score = torch.cat([torch.full((2, 2), -9.0), torch.full((2, 2), 1.0)], dim=1)
    mask = masks_from_scores({"w": score}, 0.5, granularity="block", block_size=2)["w"]
    assert mask[:, 2:].all() and not mask[:, :2].any()


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95])
def test_block_masks_keep_the_exact_fraction(sparsity, scope):
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 96), "b": (32, 32), "c": (16, 8, 2, 2)}  # c: a conv, matrix (16, 32)
    scores = {name: torch.rand(shape, generator=gen) for name, shape in shapes.items()}
    block_size = 8
    masks = masks_from_scores(
        scores, sparsity, scope=scope, granularity="block", block_size=block_size
    )
    tiles = {name: block_scores(s, block_size) for name, s in scores.items()}
    if scope == "global":
        total = sum(t.numel() for t in tiles.values())
        kept_tiles = round((1 - sparsity) * total)
        assert sum(int(m.sum()) for m in masks.values()) == kept_tiles * block_size**2
        # The kept tiles are the top pooled scores over all layers.
        flat = torch.cat([t.reshape(-1) for t in tiles.values()])
        threshold = flat.sort(descending=True).values[kept_tiles - 1]
    for name, mask in masks.items():
        assert mask.shape == scores[name].shape and mask.dtype == torch.bool
        matrix = mask.reshape(mask.shape[0], -1)
        n_rows, n_cols = matrix.shape[0] // block_size, matrix.shape[1] // block_size
        tile_view = matrix.reshape(n_rows, block_size, n_cols, block_size)
        tile_keep = tile_view.any(dim=3).any(dim=1)
        assert torch.equal(tile_keep, tile_view.all(dim=3).all(dim=1))  # whole tiles only
        if scope == "layerwise":
            assert int(tile_keep.sum()) == round((1 - sparsity) * tile_keep.numel())
        else:
            assert bool((tiles[name][tile_keep] >= threshold).all())
            assert bool((tiles[name][~tile_keep] <= threshold).all())


def test_block_masks_ties_and_validity():
    scores = {"w": torch.ones(4, 4)}  # four equal tiles: the first two in row-major order win
    mask = masks_from_scores(scores, 0.5, granularity="block", block_size=2)["w"]
    assert torch.equal(mask, expand_block_mask(torch.tensor([[True, True], [False, False]]), 2))
    model = nn.Linear(32, 16)
    masks = masks_from_scores(
        {"weight": model.weight.detach().abs()}, 0.5, granularity="block", block_size=16
    )
    check_masks(model, masks)  # a valid imc_prune mask set, usable by every consumer
    layer = BlockSparseLinear.from_dense(model, masks["weight"], block_size=16)
    assert layer.layout.n_kept == 1 and layer.density == 0.5


def test_block_masks_bad_input():
    scores = {"w": torch.rand(30, 32)}
    with pytest.raises(ValueError, match=r"block_size 16 does not divide \(remainders 14 and 0\)"):
        masks_from_scores(scores, 0.5, granularity="block", block_size=16)
    with pytest.raises(ValueError, match="needs a block_size"):
        masks_from_scores(scores, 0.5, granularity="block")
    with pytest.raises(ValueError, match="only used with granularity='block'"):
        masks_from_scores(scores, 0.5, block_size=2)
    with pytest.raises(TypeError, match="block_size must be an int"):
        masks_from_scores(scores, 0.5, granularity="block", block_size=2.0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        masks_from_scores(scores, 0.5, granularity="row")
    with pytest.raises(ValueError, match=r"2 or more dimensions.*shape \(8,\)"):
        masks_from_scores({"b": torch.rand(8)}, 0.5, granularity="block", block_size=2)


# --- imc_prune masks: granularity="2:4" ----------------------------------------------------


def test_two_four_keeps_top_two_of_each_group():
    score = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.7, 3.0, 3.0, 3.0, 1.0],
            [-1.0, -2.0, -3.0, -4.0, 0.0, 2.0, 0.0, 1.0],
        ]
    )
    mask = masks_from_scores({"w": score}, 0.5, granularity="2:4")["w"]
    expected = torch.tensor(
        [
            [False, True, False, True, True, True, False, False],  # tie 3,3,3: lower columns
            [True, True, False, False, False, True, False, True],
        ]
    )
    assert torch.equal(mask, expected)
    assert is_two_four(mask)


def test_two_four_pattern_on_layers_and_convs():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "fc": torch.rand(24, 64, generator=gen),
        "conv": torch.rand(8, 3, 2, 2, generator=gen),
    }
    masks = masks_from_scores(scores, 0.5, granularity="2:4", scope="layerwise")
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert bool((groups.sum(dim=2) == 2).all()), name  # exactly 2 of every 4
        assert is_two_four(mask)
        assert int(mask.sum()) * 2 == mask.numel()
        # The kept two are the two largest of their group.
        group_scores = scores[name].reshape(mask.shape[0], -1, 4)
        kept_min = group_scores.masked_fill(~groups, float("inf")).amin(dim=2)
        pruned_max = group_scores.masked_fill(groups, -float("inf")).amax(dim=2)
        assert bool((kept_min >= pruned_max).all())
    assert not is_two_four(torch.ones(2, 8, dtype=torch.bool))
    assert not is_two_four(torch.ones(2, 6, dtype=torch.bool))


def test_two_four_bad_input():
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        masks_from_scores({"w": torch.rand(4, 8)}, 0.8, granularity="2:4")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        masks_from_scores({"w": torch.rand(4, 6)}, 0.5, granularity="2:4")
    with pytest.raises(ValueError, match="2 or more dimensions"):
        masks_from_scores({"w": torch.rand(8)}, 0.5, granularity="2:4")
