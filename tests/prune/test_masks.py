"""Mask sets: exact kept counts, tie-breaking, which parameters are prunable, clear errors."""

import numpy as np
import pytest
import torch
from torch import nn

from imc_prune.masks import (
    apply_masks,
    check_masks,
    check_sparsity,
    dense_masks,
    masks_from_scores,
    prunable_parameters,
    sparsity_report,
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
