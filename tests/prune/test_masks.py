"""Mask sets: exact kept counts, tie-breaking, block and 2:4 structure against NumPy oracles,
which parameters are prunable, clear errors."""

import numpy as np
import pytest
import torch
from torch import nn

from imc_prune.masks import (
    apply_masks,
    block_scores,
    check_granularity,
    check_masks,
    check_sparsity,
    dense_masks,
    is_two_four,
    masks_from_scores,
    prunable_parameters,
    sparsity_report,
    weights_per_unit,
)

# One aligned and one awkward set of layer shapes (primes, a conv kernel).
SHAPES = {
    "aligned": [(16, 32), (32, 16)],
    "awkward": [(7, 13), (5, 3, 3, 3), (1, 11)],
}
SPARSITIES = [0.0, 0.37, 0.5, 0.9, 0.999]


def _scores(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}.weight": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)
    }


def _reference_keep(flat: np.ndarray, kept: int) -> np.ndarray:
    # NumPy's stable argsort of the negated scores: descending, ties by lower index.
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:kept]] = True
    return keep


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
        nn.LayerNorm(10),
        nn.Linear(10, 3, bias=False),
    )


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_global_keeps_exact_count_of_top_scores(shapes, sparsity):
    scores = _scores(shapes)
    masks = masks_from_scores(scores, sparsity)
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).numpy()
    expected = _reference_keep(flat, int(round((1 - sparsity) * flat.size)))
    got = torch.cat([m.reshape(-1) for m in masks.values()]).numpy()
    np.testing.assert_array_equal(got, expected)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == scores[name].shape


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_layerwise_keeps_exact_count_per_layer(shapes, sparsity):
    scores = _scores(shapes, seed=1)
    masks = masks_from_scores(scores, sparsity, scope="layerwise")
    for name, score in scores.items():
        kept = int(round((1 - sparsity) * score.numel()))
        expected = _reference_keep(score.reshape(-1).numpy(), kept)
        np.testing.assert_array_equal(masks[name].reshape(-1).numpy(), expected)


def test_ties_go_to_the_lower_index_across_layers():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = masks_from_scores(scores, 0.2)  # keep 8 of 10: all of a, then b[0], b[1]
    assert masks["a"].all()
    assert masks["b"].tolist() == [True, True, False, False]
    # Within a layer too, and the same on a second call (deterministic).
    tied = {"w": torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])}
    for _ in range(2):
        assert masks_from_scores(tied, 0.6)["w"].tolist() == [False, True, True, False, False]


def test_mixed_dtypes_and_infinite_scores():
    scores = {
        "a": torch.tensor([1.0, -float("inf")], dtype=torch.float16),
        "b": torch.tensor([3, 0], dtype=torch.int64),
        "c": torch.tensor([2.5, float("inf")], dtype=torch.float64),
    }
    masks = masks_from_scores(scores, 0.5)
    assert masks["a"].tolist() == [False, False]
    assert masks["b"].tolist() == [True, False]
    assert masks["c"].tolist() == [True, True]


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match="sparsity must lie in"):
        masks_from_scores({"w": torch.ones(3)}, bad)


@pytest.mark.parametrize("bad", [True, "0.5", None])
def test_sparsity_wrong_type(bad):
    with pytest.raises(TypeError, match="sparsity must be a real number"):
        check_sparsity(bad)


def test_scores_errors():
    with pytest.raises(ValueError, match="scope"):
        masks_from_scores({"w": torch.ones(3)}, 0.5, scope="per-layer")
    with pytest.raises(ValueError, match="empty"):
        masks_from_scores({}, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        masks_from_scores({"w": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(TypeError, match="dict"):
        masks_from_scores([torch.ones(3)], 0.5)
    with pytest.raises(TypeError, match="real tensor"):
        masks_from_scores({"w": torch.ones(3, dtype=torch.bool)}, 0.5)


# --------------------------------------------------------------------------------------------
# Block and 2:4 structure

# (shapes, block size): aligned shapes with tiles of 1 and 8; odd shapes (a conv kernel read as
# a (3, 12) matrix) with an odd tile of 3.
BLOCK_CASES = {
    "aligned-1": ([(16, 32), (32, 16)], 1),
    "aligned-8": ([(16, 32), (32, 16)], 8),
    "odd-3": ([(9, 6), (3, 3, 2, 2)], 3),
}


def _tile_sums(score: torch.Tensor, block: int) -> np.ndarray:
    matrix = score.reshape(score.shape[0], -1).double().numpy()
    rows, cols = matrix.shape
    return matrix.reshape(rows // block, block, cols // block, block).sum(axis=(1, 3))


def _expand(tile_keep: np.ndarray, block: int, shape) -> np.ndarray:
    return np.kron(tile_keep, np.ones((block, block), dtype=bool)).reshape(shape)


@pytest.mark.parametrize("shapes, block", BLOCK_CASES.values(), ids=BLOCK_CASES.keys())
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.75])
def test_block_masks_keep_the_top_tiles(shapes, block, scope, sparsity):
    scores = _scores(shapes, seed=3)
    masks = masks_from_scores(scores, sparsity, scope=scope, granularity="block", block_size=block)
    tiles = {name: _tile_sums(score, block) for name, score in scores.items()}
    if scope == "global":
        flat = np.concatenate([t.reshape(-1) for t in tiles.values()])
        keep = _reference_keep(flat, int(round((1 - sparsity) * flat.size)))
        offset = 0
        expected = {}
        for name, t in tiles.items():
            expected[name] = keep[offset : offset + t.size].reshape(t.shape)
            offset += t.size
    else:
        expected = {
            name: _reference_keep(t.reshape(-1), int(round((1 - sparsity) * t.size))).reshape(
                t.shape
            )
            for name, t in tiles.items()
        }
    for name, score in scores.items():
        want = _expand(expected[name], block, score.shape)
        np.testing.assert_array_equal(masks[name].numpy(), want)


def test_block_masks_of_a_single_tile_size_equal_element_masks():
    scores = _scores(SHAPES["aligned"], seed=4)
    element = masks_from_scores(scores, 0.6)
    block = masks_from_scores(scores, 0.6, granularity="block", block_size=1)
    assert all(torch.equal(element[name], block[name]) for name in scores)


@pytest.mark.parametrize("shape", [(4, 8), (6, 3, 2, 2)], ids=["linear", "conv"])
def test_two_four_keeps_the_top_two_of_each_group_along_the_rows(shape):
    score = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    mask = masks_from_scores({"w": score}, 0.5, granularity="2:4")["w"]
    groups = score.reshape(shape[0], -1, 4).numpy()
    order = np.argsort(-groups, axis=2, kind="stable")[..., :2]
    expected = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(expected, order, True, axis=2)
    np.testing.assert_array_equal(mask.reshape(groups.shape).numpy(), expected)
    assert is_two_four(mask) and int(mask.sum()) == score.numel() // 2
    # Groups run along the input dimension: the transposed mask is not 2:4 in general.
    assert not is_two_four(mask.reshape(shape[0], -1).T.contiguous())


@pytest.mark.parametrize(
    "granularity, block_size, kwargs, error, match",
    [
        ("tile", None, {}, ValueError, "granularity must be one of"),
        ("block", None, {}, ValueError, "needs a block_size"),
        ("block", 0, {}, ValueError, "block_size must be at least 1, got 0"),
        ("block", -2, {}, ValueError, "block_size must be at least 1, got -2"),
        ("block", 2.0, {}, TypeError, "block_size must be an int"),
        ("element", 4, {}, ValueError, "only used with granularity='block'"),
        ("2:4", None, {"sparsity": 0.3}, ValueError, "sparsity must be 0.5, got 0.3"),
        (
            "block",
            4,
            {"shapes": {"fc.weight": (10, 100)}},
            ValueError,
            r"'fc.weight' has shape \(10, 100\).*block_size 4 does not divide",
        ),
        ("2:4", None, {"shapes": {"fc.weight": (4, 6)}}, ValueError, "rows of 6 weights"),
        ("block", 2, {"shapes": {"bias": (8,)}}, ValueError, "needs weight matrices"),
    ],
)
def test_bad_granularity_says_what_is_wrong(granularity, block_size, kwargs, error, match):
    with pytest.raises(error, match=match):
        check_granularity(granularity, block_size, **kwargs)
    scores = {name: torch.ones(shape) for name, shape in kwargs.get("shapes", {}).items()}
    with pytest.raises(error, match=match):
        masks_from_scores(
            scores or {"w": torch.ones(8, 8)},
            kwargs.get("sparsity", 0.5),
            granularity=granularity,
            block_size=block_size,
        )


def test_check_granularity_accepts_fitting_shapes():
    check_granularity("block", 3, sparsity=0.9, shapes={"a": (9, 6), "b": (3, 3, 2, 2)})
    check_granularity("2:4", sparsity=0.5, shapes={"a": (3, 8)})
    check_granularity("element", shapes={"bias": (7,)})  # element masks take any shape
    assert weights_per_unit("block", 3) == 9 and weights_per_unit("2:4") == 1


def test_prunable_parameters_are_linear_and_conv_weights_only():
    model = _conv_net()
    assert list(prunable_parameters(model)) == ["0.weight", "4.weight", "6.weight"]
    for name, param in prunable_parameters(model).items():
        assert param is dict(model.named_parameters())[name]


def test_tied_weight_appears_once():
    first = nn.Linear(4, 4)
    model = nn.Sequential(first, nn.ReLU(), first, nn.Linear(4, 2))
    assert list(prunable_parameters(model)) == ["0.weight", "3.weight"]


def test_prunable_parameters_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        prunable_parameters({"weight": torch.ones(2)})


def test_apply_masks_zeroes_pruned_weights_and_nothing_else():
    torch.manual_seed(0)
    model = _conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {name: torch.rand(p.shape) for name, p in prunable_parameters(model).items()}
    masks = masks_from_scores(scores, 0.6)
    assert apply_masks(model, masks) is model
    after = model.state_dict()
    for name, value in after.items():
        if name in masks:
            pruned = value[~masks[name]]
            assert (pruned == 0).all()
            assert not torch.signbit(pruned).any()  # +0.0, never -0.0
            assert torch.equal(value[masks[name]], before[name][masks[name]])
        else:  # biases, BatchNorm and LayerNorm parameters and buffers untouched
            assert torch.equal(value, before[name])


def test_apply_masks_narrows_a_mask_buffer():
    class Masked(nn.Linear):
        def __init__(self, *args):
            super().__init__(*args)
            self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

    model = nn.Sequential(Masked(3, 2))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    apply_masks(model, {"0.weight": mask})
    assert torch.equal(model[0].mask, mask)


def test_apply_masks_without_grad_tracking():
    model = nn.Linear(3, 2)
    apply_masks(model, {"weight": torch.zeros(2, 3, dtype=torch.bool)})
    assert model.weight.grad_fn is None and model.weight.requires_grad


def test_check_masks_errors():
    model = _conv_net()
    good = dense_masks(model)
    check_masks(model, good)
    check_masks(model, {"4.weight": good["4.weight"]})  # a subset is fine
    with pytest.raises(ValueError, match="names no parameter.*0.weight"):
        check_masks(model, {"fc.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not prunable"):
        check_masks(model, {"0.bias": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not prunable"):
        check_masks(model, {"1.weight": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        check_masks(model, {"4.weight": torch.ones(10, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="torch.bool"):
        check_masks(model, {"4.weight": torch.ones(10, 144)})
    with pytest.raises(TypeError, match="dict"):
        check_masks(model, [good["4.weight"]])
    with pytest.raises(TypeError, match="must be a tensor"):
        check_masks(model, {"4.weight": np.ones((10, 144), dtype=bool)})
    with pytest.raises(ValueError, match="names no parameter"):
        apply_masks(model, {"nope": torch.ones(1, dtype=torch.bool)})


def test_sparsity_report_counts():
    model = _conv_net()  # 36 + 1440 + 30 prunable weights
    masks = {"4.weight": torch.zeros(10, 144, dtype=torch.bool)}
    masks["4.weight"][:, :72] = True
    report = sparsity_report(model, masks)
    assert report["total"] == 36 + 1440 + 30
    assert report["kept"] == 36 + 720 + 30
    assert report["layers"]["4.weight"] == {"total": 1440, "kept": 720, "fraction": 0.5}
    assert report["layers"]["0.weight"]["fraction"] == 1.0
    assert report["weights_remaining"] == pytest.approx(786 / 1506)
    assert report["sparsity"] == pytest.approx(1 - 786 / 1506)
    assert sparsity_report(model)["weights_remaining"] == 1.0


def test_dense_masks():
    model = _conv_net()
    masks = dense_masks(model)
    assert list(masks) == list(prunable_parameters(model))
    assert all(m.all() and m.dtype == torch.bool for m in masks.values())


def test_mask_helpers_refuse_a_list_where_a_tensor_or_dict_belongs():
    # Each raised AttributeError ('list' object has no attribute ...) before.
    with pytest.raises(TypeError, match="shapes must be a dict parameter name -> shape"):
        check_granularity("block", 2, shapes=[(4, 4)])
    with pytest.raises(TypeError, match="score 'score' must be a tensor, got list"):
        block_scores([[1.0, 2.0], [3.0, 4.0]], 2)
    with pytest.raises(TypeError, match="mask must be a bool tensor, got list"):
        is_two_four([True, False, True, False])
