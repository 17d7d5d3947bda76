"""IMC's steps against independent references: brute-force gap search on known spectra, dense
fp64 Hessians from ``torch.func.hessian`` for the Lipschitz estimate and the leverage scores,
and ``torch.optim.SGD`` for the warm-up."""

import copy
import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import TensorDataset

from imc_kernels.spectral import SpectralDensity
from imc_prune.imc import Spectrum, imc, lipschitz, scores, spectral_gap, warmup
from imc_prune.masks import is_two_four, prunable_parameters

imc_mod = importlib.import_module("imc_prune.imc")  # the module; imc_prune.imc is the function


def _tiny_mlp(seed=0, dtype=torch.float64, hidden=5, inputs=4, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def _batch(n=40, inputs=4, classes=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g, dtype=dtype), torch.randint(
        0, classes, (n,), generator=g
    )


def _dense_hessian(model, batch):
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    inputs, targets = batch

    def loss(flat):
        split, offset = {}, 0
        for name in names:
            count = params[name].numel()
            split[name] = flat[offset : offset + count].view_as(params[name])
            offset += count
        return nn.functional.cross_entropy(functional_call(model, split, (inputs,)), targets)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return hessian(loss)(flat)


# ---------------------------------------------------------------------------------------------
# spectral_gap against a brute-force search over an explicit eigenvalue list


class _FakeTop:
    def __init__(self, values):
        self.eigenvalues = torch.as_tensor(np.sort(values)[::-1].copy())


def _spectrum_of(eigenvalues, k, sigma):
    """A Spectrum whose density is the exact eigenvalue list (one probe, weights 1/d) and
    whose top-k are the exact largest eigenvalues."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    d = lam.size
    density = SpectralDensity(
        nodes=torch.as_tensor(lam)[None],
        weights=torch.full((1, d), 1.0 / d, dtype=torch.float64),
        n_hvps=0,
        dim=d,
        lengths=torch.tensor([d]),
    )
    return Spectrum(
        density=density, top=_FakeTop(lam[-k:]), dim=d, sigma=sigma, n_hvps=0, seconds=0
    )


def _brute_force_gap(lam, threshold):
    lam = np.sort(lam)
    n0 = int((lam <= 0).sum())
    for n in range(max(n0, 1), lam.size):  # 1-based n: lambda_n = lam[n-1]
        if lam[n] - lam[n - 1] > threshold:
            return n
    return lam.size


@pytest.mark.parametrize(
    "lipschitz_constant",
    # The fixture spectrum's spacings: bulk 0.01, a 0.5 hole inside the positive bulk, the
    # bulk-edge gap of 3, outlier gaps 2 and 5: thresholds (c=4) below, between and above.
    [0.001, 0.05, 0.3, 0.6, 1.1, 2.0],
)
def test_gap_matches_brute_force(lipschitz_constant):
    # No eigenvalue exactly at 0, where the smoothed count #{lambda <= 0} is a half.
    bulk = np.concatenate([np.linspace(-0.3, -0.01, 30), np.linspace(0.01, 1.0, 100)])
    bulk = np.concatenate([bulk, np.linspace(3.0, 4.0, 101)])  # hole 1.0 -> 3.0 (width 2)
    outliers = np.array([7.0, 9.0, 14.0])  # bulk edge 4 -> 7 (3), then 2, then 5
    lam = np.concatenate([bulk, outliers])
    # sigma far below every spacing: the smoothed quantiles are the eigenvalues.
    spec = _spectrum_of(lam, k=3, sigma=1e-5)
    gap = spectral_gap(spec, lipschitz_constant, c=4.0)
    expected = _brute_force_gap(lam, 4.0 * lipschitz_constant)
    assert gap.n == expected
    assert gap.prune_rate == pytest.approx(1 - expected / lam.size)
    assert gap.n_nonpositive == int((lam <= 0).sum())
    if expected < lam.size:
        sorted_lam = np.sort(lam)
        # Edges exact up to the grid's resolution.
        assert gap.lower == pytest.approx(sorted_lam[expected - 1], abs=2 * gap.resolution)
        assert gap.upper == pytest.approx(sorted_lam[expected], abs=2 * gap.resolution)
        assert gap.width > gap.threshold
    else:
        assert gap.source == "none" and gap.prune_rate == 0


def test_gap_search_starts_at_nonpositive_count():
    # A wide gap among the negative eigenvalues must be ignored: n >= #{lambda <= 0}.
    lam = np.concatenate([[-5.0], np.linspace(-1.0, 1.0, 200), [6.0]])
    spec = _spectrum_of(lam, k=1, sigma=1e-5)
    gap = spectral_gap(spec, 0.25, c=4.0)
    assert gap.n == lam.size - 1 and gap.source in ("bulk-edge", "eigenvalues")
    assert gap.lower == pytest.approx(1.0, abs=2 * gap.resolution)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_gap_rejects_bad_lipschitz(bad):
    spec = _spectrum_of(np.linspace(0, 1, 10), k=2, sigma=1e-3)
    with pytest.raises(ValueError, match="lipschitz_constant"):
        spectral_gap(spec, bad)
    with pytest.raises(ValueError, match="c must be positive"):
        spectral_gap(spec, 1.0, c=0)


# ---------------------------------------------------------------------------------------------
# Lipschitz estimate against the dense fp64 Hessian difference


def test_lipschitz_matches_dense_difference():
    model = _tiny_mlp()
    batch = _batch()
    eps, seed, directions = 0.3, 5, 2
    lip = lipschitz(model, batch, eps=eps, n_directions=directions, tol=1e-8, seed=seed)
    center = _dense_hessian(model, batch)
    generator = torch.Generator().manual_seed(seed)
    dim = center.shape[0]
    expected = []
    for _ in range(directions):
        shift = torch.randn(dim, generator=generator, dtype=torch.float64)
        shift *= eps / shift.norm()
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(shifted.parameters()) + shift,
                shifted.parameters(),
            )
        diff = center - _dense_hessian(shifted, batch)
        expected.append(float(torch.linalg.eigvalsh(diff).abs().max()))
    # fp64 operator, Lanczos to 1e-8 relative: the norms agree to about that.
    np.testing.assert_allclose(lip.per_direction, expected, rtol=1e-6)
    assert lip.value == max(lip.per_direction)
    assert lip.n_hvps > 0


def test_lipschitz_is_zero_for_a_quadratic_loss():
    # Linear model + MSE: the Hessian does not depend on W, so A - Hess L(W* + U) = 0.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double()
    inputs = torch.randn(30, 6, dtype=torch.float64)
    targets = torch.randn(30, 3, dtype=torch.float64)
    lip = lipschitz(model, (inputs, targets), eps=0.5, n_directions=1, max_hvps=40)
    assert lip.value < 1e-10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"eps": 0.0}, "eps"), ({"p": 0.5}, "p must be"), ({"n_directions": 0}, "n_directions")],
)
def test_lipschitz_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lipschitz(_tiny_mlp(), _batch(), **kwargs)


# ---------------------------------------------------------------------------------------------
# Scores


def test_leverage_and_curvature_scores_match_dense_eigenvectors():
    model = _tiny_mlp(hidden=6)
    batch = _batch()
    k = 4
    spec = imc_mod.spectrum(model, batch, k=k, n_probes=2, steps=10, tol=1e-10)
    dense = _dense_hessian(model, batch)
    values, vectors = torch.linalg.eigh(dense)
    top_values, top_vectors = values[-k:], vectors[:, -k:]
    assert values[-k] - values[-k - 1] > 1e-3  # the top-k subspace is well separated
    leverage_flat = top_vectors.pow(2).sum(1).sqrt()  # invariant to signs and rotations
    curvature_flat = (top_vectors.pow(2) * top_values.clamp_min(0)).sum(1).sqrt()
    lev = scores(model, spec, method="leverage")
    cur = scores(model, spec, method="curvature")
    offset = 0
    prunable = prunable_parameters(model)
    for name, param in model.named_parameters():
        count = param.numel()
        if name in prunable:
            want = leverage_flat[offset : offset + count].view_as(param)
            # float32 scores of fp64 eigenvectors converged to 1e-10: fp32 rounding.
            torch.testing.assert_close(lev[name].double(), want, rtol=1e-5, atol=1e-6)
            want_cur = curvature_flat[offset : offset + count].view_as(param) * param.abs()
            torch.testing.assert_close(cur[name].double(), want_cur.detach(), rtol=1e-5, atol=1e-6)
        offset += count
    assert set(lev) == set(prunable) and all("bias" not in n for n in lev)


def test_magnitude_score_and_errors():
    model = _tiny_mlp()
    mag = scores(model, method="magnitude")
    for name, param in prunable_parameters(model).items():
        assert torch.equal(mag[name], param.detach().abs().float())
    with pytest.raises(ValueError, match="needs the spectrum"):
        scores(model, None, method="leverage")
    with pytest.raises(ValueError, match="score must be one of"):
        scores(model, method="taylor")


# ---------------------------------------------------------------------------------------------
# Warm-up and the pipeline


def _dataset(n=256, inputs=4, classes=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y.clamp_max(classes - 1))


def test_warmup_equals_sgd_on_the_same_batches():
    data = _dataset()
    model = _tiny_mlp(dtype=torch.float32)
    reference = copy.deepcopy(model)
    w = warmup(model, data, steps=5, lr=0.05, batch_size=32, seed=3)
    assert w.steps == 5 and len(w.losses) == 5
    for name, value in reference.state_dict().items():
        assert torch.equal(w.initial[name], value)
    # The same batches through torch.optim.SGD.
    from imc_prune.data import iterate_batches

    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    taken = 0
    for inputs, targets in iterate_batches(data, 32, shuffle=True, generator=gen):
        if taken == 5:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(reference(inputs), targets).backward()
        opt.step()
        taken += 1
    for name, value in reference.state_dict().items():
        assert torch.equal(w.trained[name], value)
        assert torch.equal(model.state_dict()[name], value)


@pytest.mark.parametrize("bad", [{"steps": -1}, {"lr": 0.0}, {"batch_size": 0}])
def test_warmup_bad_input(bad):
    with pytest.raises(ValueError, match="warm-up"):
        warmup(_tiny_mlp(dtype=torch.float32), _dataset(), **bad)


@pytest.mark.parametrize("score", ["magnitude", "leverage", "curvature"])
def test_imc_pipeline_fixed_sparsity(score):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    before = copy.deepcopy(model.state_dict())
    res = imc(
        model,
        _dataset(),
        sparsity=0.75,
        warmup_steps=4,
        warmup_batch_size=32,
        hessian_batch_size=128,
        k=4,
        n_probes=2,
        steps=12,
        n_directions=1,
        score=score,
    )
    # The caller's model is untouched.
    for name, value in model.state_dict().items():
        assert torch.equal(before[name], value)
    n_prunable = sum(m.numel() for m in res.masks.values())
    kept = sum(int(m.sum()) for m in res.masks.values())
    assert kept == round(0.25 * n_prunable)
    assert res.sparsity == pytest.approx(1 - kept / n_prunable)
    # Rewound to W0 on the survivors, exactly zero elsewhere; biases untouched.
    state = res.model.state_dict()
    for name, mask in res.masks.items():
        assert torch.equal(state[name], before[name] * mask)
    for name in ("0.bias", "2.bias"):
        assert torch.equal(state[name], before[name])
    assert res.n_hvps == res.spectrum.n_hvps + res.lipschitz.n_hvps > 0
    assert 0 <= res.auto_sparsity < 1
    summary = res.summary()
    assert summary["settings"]["score"] == score and len(summary["top_eigenvalues"]) == 4
    assert set(res.timings) == {"warmup", "spectrum", "lipschitz", "gap", "masks"}


SMALL = dict(
    warmup_steps=4, warmup_batch_size=32, hessian_batch_size=128, k=4, n_probes=2, steps=12,
    n_directions=1,
)  # fmt: skip


def test_imc_reuse_equals_a_fresh_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    first = imc(model, _dataset(), sparsity=0.5, score="leverage", **SMALL)
    fresh = imc(model, _dataset(), sparsity=0.8, score="curvature", **SMALL)
    reused = imc(model, _dataset(), sparsity=0.8, score="curvature", reuse=first, **SMALL)
    assert reused.spectrum is first.spectrum and reused.n_hvps == first.n_hvps
    for name, mask in fresh.masks.items():
        assert torch.equal(reused.masks[name], mask)
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(reused.model.state_dict()[name], value)
    assert reused.auto_sparsity == fresh.auto_sparsity
    with pytest.raises(ValueError, match="settings differ.*k=4 vs 5"):
        imc(model, _dataset(), sparsity=0.8, reuse=first, **{**SMALL, "k": 5})
    other = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="different weights"):
        imc(other, _dataset(), sparsity=0.8, reuse=first, **SMALL)


def test_imc_auto_sparsity_follows_the_gap():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3))
    res = imc(
        model,
        _dataset(),
        warmup_steps=3,
        warmup_batch_size=32,
        hessian_batch_size=128,
        k=4,
        n_probes=2,
        steps=12,
        n_directions=1,
        rewind_to="warmup",
    )
    n_prunable = sum(m.numel() for m in res.masks.values())
    pruned = n_prunable - sum(int(m.sum()) for m in res.masks.values())
    assert pruned == round(res.auto_sparsity * n_prunable)
    assert res.auto_sparsity == pytest.approx(
        min((res.gap.dim - res.gap.n) / n_prunable, 1 - 1 / n_prunable)
    )
    # Kept at W*: the survivors hold the warmed-up weights.
    for name, mask in res.masks.items():
        assert torch.equal(res.model.state_dict()[name], res.warmup.trained[name] * mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity must be"),
        ({"sparsity": "most"}, "sparsity must be"),
        ({"score": "taylor"}, "score must be"),
        ({"rewind_to": "late"}, "rewind_to must be"),
        ({"scope": "local"}, "scope must be"),
    ],
)
def test_imc_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        imc(_tiny_mlp(dtype=torch.float32), _dataset(), **kwargs)


# ---------------------------------------------------------------------------------------------
# Mask structure: block tiles and 2:4 groups, against NumPy oracles on |W*| (the magnitude score)


def _whole_tiles(mask: torch.Tensor, block: int) -> torch.Tensor:
    """The tile mask of ``mask``, after checking that every tile is kept or pruned whole."""
    rows, cols = mask.shape
    tiles = mask.reshape(rows // block, block, cols // block, block)
    kept, touched = tiles.all(dim=(1, 3)), tiles.any(dim=(1, 3))
    assert torch.equal(kept, touched), "a tile is partly kept"
    return kept


def _tile_magnitudes(weight: torch.Tensor, block: int) -> np.ndarray:
    matrix = weight.abs().double().numpy()
    rows, cols = matrix.shape
    return matrix.reshape(rows // block, block, cols // block, block).sum(axis=(1, 3))


@pytest.mark.parametrize("block", [1, 3])
def test_imc_block_masks_keep_whole_tiles_of_the_largest_magnitude(block):
    # (12, 6) and (3, 12) weight matrices: 8 + 4 tiles of 3, or 108 single weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    res = imc(
        model, _dataset(inputs=6), sparsity=0.75, granularity="block", block_size=block, **SMALL
    )
    tiles = {name: _whole_tiles(mask, block) for name, mask in res.masks.items()}
    n_tiles = sum(t.numel() for t in tiles.values())
    assert sum(int(t.sum()) for t in tiles.values()) == round(0.25 * n_tiles)
    assert res.sparsity == pytest.approx(0.75)  # whole tiles hit 1/4 exactly here
    # Oracle: tiles ranked by the sum of |W*| (stable, ties to the lower index).
    sums = [_tile_magnitudes(res.warmup.trained[name], block).reshape(-1) for name in tiles]
    order = np.argsort(-np.concatenate(sums), kind="stable")[: round(0.25 * n_tiles)]
    expected = np.zeros(n_tiles, dtype=bool)
    expected[order] = True
    got = torch.cat([t.reshape(-1) for t in tiles.values()]).numpy()
    np.testing.assert_array_equal(got, expected)
    assert res.granularity == "block" and res.block_size == block
    assert res.summary()["settings"]["granularity"] == "block"
    assert res.summary()["settings"]["block_size"] == block


def test_imc_two_four_masks_keep_two_of_every_four_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
    res = imc(model, _dataset(inputs=8), sparsity=0.5, granularity="2:4", **SMALL)
    for name, mask in res.masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(dim=2) == 2).all(), name  # along in_features, every group
        magnitude = res.warmup.trained[name].abs().reshape(groups.shape)
        top = torch.sort(magnitude, dim=2, descending=True, stable=True).indices[..., :2]
        expected = torch.zeros_like(groups).scatter_(2, top, True)
        assert torch.equal(groups, expected), name
        assert is_two_four(mask)
    assert res.sparsity == 0.5 and res.granularity == "2:4" and res.block_size is None


def test_imc_element_masks_are_the_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    first = imc(model, _dataset(), sparsity=0.5, **SMALL)
    spelled = imc(model, _dataset(), sparsity=0.5, granularity="element", reuse=first, **SMALL)
    assert first.granularity == "element" and first.settings["block_size"] is None
    assert all(torch.equal(first.masks[name], spelled.masks[name]) for name in first.masks)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"granularity": "tile"}, ValueError, "granularity must be one of"),
        ({"granularity": "block"}, ValueError, "needs a block_size"),
        ({"granularity": "block", "block_size": 0}, ValueError, "at least 1, got 0"),
        ({"granularity": "block", "block_size": "2"}, TypeError, "block_size must be an int"),
        # The tiny MLP's (5, 4) and (3, 5) matrices: 2 divides neither 5 nor 3.
        ({"granularity": "block", "block_size": 2}, ValueError, r"'0.weight'.*\(5, 4\)"),
        ({"block_size": 2}, ValueError, "only used with granularity='block'"),
        ({"granularity": "2:4"}, ValueError, "sparsity='auto'.*cannot be honoured"),
        ({"granularity": "2:4", "sparsity": 0.3}, ValueError, "sparsity must be 0.5"),
        ({"granularity": "2:4", "sparsity": 0.5}, ValueError, "'2.weight'.*rows of 5"),
    ],
)
def test_imc_bad_structure_fails_before_the_warmup(monkeypatch, kwargs, error, match):
    def no_warmup(*args, **kw):
        raise AssertionError("the structure must be checked before the warm-up")

    monkeypatch.setattr(imc_mod, "warmup", no_warmup)
    with pytest.raises(error, match=match):
        imc(_tiny_mlp(dtype=torch.float32), _dataset(), **kwargs)


def test_gap_nan_free_on_real_spectrum():
    # The whole chain on a real (tiny) model gives finite, consistent numbers.
    model = _tiny_mlp(dtype=torch.float32, hidden=8)
    batch = tuple(t.float() if t.is_floating_point() else t for t in _batch())
    spec = imc_mod.spectrum(model, batch, k=3, n_probes=2, steps=8)
    lip = lipschitz(model, batch, n_directions=1)
    gap = spectral_gap(spec, lip.value)
    assert math.isfinite(gap.lower) and 0 <= gap.prune_rate < 1
    assert gap.n >= gap.n_nonpositive


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before the expensive steps, never a hang or a silent answer


def _splits(train, num_classes=3):
    from imc_prune.data import DatasetSplits

    sample = tuple(train[0][0].shape)
    return DatasetSplits("toy", train, train, num_classes=num_classes, input_shape=sample)


@pytest.fixture
def no_warmup(monkeypatch):
    """Fails the test if imc() reaches the warm-up: the error must come before it."""

    def refuse(*args, **kw):
        raise AssertionError("the input must be checked before the warm-up")

    monkeypatch.setattr(imc_mod, "warmup", refuse)


def test_imc_class_count_mismatch_names_the_dataset_classes(no_warmup):
    # A model with 2 outputs on labels 0..2: torch's "Target 2 is out of bounds" before.
    model = _tiny_mlp(dtype=torch.float32, classes=2)
    with pytest.raises(
        ValueError,
        match=r"targets must lie in \[0, 2\) for a model with 2 outputs; found 2 \(the dataset "
        r"has 3 classes: build the model with num_classes=3\)",
    ):
        imc(model, _splits(_dataset()), sparsity=0.5, **SMALL)


def test_warmup_checks_targets_against_the_outputs():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\).*found 2"):
        warmup(_tiny_mlp(dtype=torch.float32, classes=2), _dataset(), steps=2, batch_size=256)


def test_imc_input_shape_mismatch_names_the_samples(no_warmup):
    # Images (1, 2, 2) for an MLP that takes 4 features: "mat1 and mat2 shapes" before.
    data = _dataset()
    images = TensorDataset(data.tensors[0].view(-1, 1, 2, 2), data.tensors[1])
    with pytest.raises(
        ValueError,
        match=r"forward failed on inputs of shape \(128, 1, 2, 2\): .*the data's samples are "
        r"\(1, 2, 2\) \(load with flatten=True for an MLP",
    ):
        imc(_tiny_mlp(dtype=torch.float32), _splits(images), sparsity=0.5, **SMALL)


def test_imc_dtype_mismatch_names_both_dtypes(no_warmup):
    with pytest.raises(TypeError, match=r"dtype torch.float32.*parameters are torch.float64"):
        imc(_tiny_mlp(dtype=torch.float64), _dataset(), sparsity=0.5, **SMALL)


def test_empty_training_set_is_an_error_not_a_hang():
    # The warm-up looped forever over an epoch without batches.
    empty = TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="the training set is empty"):
        warmup(_tiny_mlp(dtype=torch.float32), empty, steps=2)
    with pytest.raises(ValueError, match="the training set is empty"):
        imc(_tiny_mlp(dtype=torch.float32), empty, sparsity=0.5, **SMALL)


def test_imc_float_targets_use_one_loss_for_every_step(monkeypatch):
    # Float targets: the warm-up took cross-entropy with soft labels while the Hessian
    # operator took MSE, two objectives in one analysis.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 3, generator=g)
    seen = {}
    for step in ("warmup", "spectrum", "lipschitz"):
        original = getattr(imc_mod, step)

        def spy(*args, _step=step, _original=original, **kw):
            seen[_step] = kw["loss_fn"]
            return _original(*args, **kw)

        monkeypatch.setattr(imc_mod, step, spy)
    model = _tiny_mlp(dtype=torch.float32)
    res = imc(model, TensorDataset(x, y), sparsity=0.5, **{**SMALL, "warmup_batch_size": 64})
    assert isinstance(seen["warmup"], nn.MSELoss)
    assert seen["spectrum"] is seen["warmup"] and seen["lipschitz"] is seen["warmup"]
    # The first warm-up batch is the whole set (in another order): its MSE at W0.
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(x), y)
    assert res.warmup.losses[0] == pytest.approx(float(expected), rel=1e-6)  # fp32 sum order


def test_warmup_stops_when_the_loss_explodes():
    with pytest.raises(FloatingPointError, match=r"warm-up diverged.*lower the warm-up lr"):
        warmup(_tiny_mlp(dtype=torch.float32), _dataset(), steps=5, lr=1e6, batch_size=32)


def test_imc_refuses_a_zero_hessian():
    # Every ReLU dead and no output bias: the loss is flat in every weight, the Hessian is 0,
    # and a "gap" in a spectrum of zeros gave an arbitrary auto sparsity.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    with pytest.raises(ValueError, match=r"the Hessian at W\* is zero"):
        imc(model, _dataset(), **{**SMALL, "warmup_steps": 0})


@pytest.mark.parametrize("data", ["tuple", "loader"])
def test_imc_data_must_be_a_dataset(no_warmup, data):
    dataset = _dataset()
    given = {"tuple": dataset.tensors, "loader": torch.utils.data.DataLoader(dataset)}[data]
    kind = type(given).__name__
    with pytest.raises(
        TypeError, match=rf"data must be a DatasetSplits or a map-style Dataset \(got {kind}\)"
    ):
        imc(_tiny_mlp(dtype=torch.float32), given, sparsity=0.5, **SMALL)


@pytest.mark.parametrize("score", ["leverage", "curvature"])
def test_spectral_scores_refuse_frozen_weights(no_warmup, score):
    model = _tiny_mlp(dtype=torch.float32)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.weight'\] do not require grad"):
        imc(model, _dataset(), sparsity=0.5, score=score, **SMALL)
    with pytest.raises(ValueError, match=r"\['0.weight'\] do not require grad"):
        scores(model, None, method=score)


def test_imc_needs_prunable_weights(no_warmup):
    class Bilinear(nn.Module):  # a bare parameter, no Linear or Conv2d
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.w.T

    with pytest.raises(ValueError, match=r"no prunable weights \(Linear/Conv2d\)"):
        imc(Bilinear(), _dataset(), sparsity=0.5, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": "a"}, TypeError, "seed must be an int, got 'a'"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
        ({"k": "4"}, TypeError, "k must be an int, got '4'"),
        ({"k": 0}, ValueError, "k must be a positive int, got 0"),
        ({"hessian_batch_size": 0}, ValueError, "hessian_batch_size must be a positive int"),
        ({"n_probes": 2.0}, TypeError, "n_probes must be an int"),
        ({"eps": 0.0}, ValueError, "eps must be positive"),
        ({"c": -1.0}, ValueError, "c must be positive"),
        ({"p": 0.5}, ValueError, "p must be at least 1"),
        ({"warmup_lr": "0.1"}, TypeError, "warmup_lr must be a positive number"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps must be a non-negative int"),
        ({"curvature": "GGN"}, ValueError, "curvature must be one of hessian, ggn"),
        ({"engine": "triton"}, ValueError, "engine must be one of auto"),
        ({"loss_fn": "ce"}, TypeError, "loss_fn must be callable"),
    ],
)
def test_imc_settings_are_checked_before_the_warmup(no_warmup, kwargs, error, match):
    with pytest.raises(error, match=match):
        imc(_tiny_mlp(dtype=torch.float32), _dataset(), sparsity=0.5, **{**SMALL, **kwargs})


def test_check_settings_names_unknown_settings():
    imc_mod.check_settings({"k": 8, "c": 2.0, "score": "leverage"})
    with pytest.raises(ValueError, match=r"unknown imc settings \['kk'\]; imc\(\) takes"):
        imc_mod.check_settings({"kk": 3})


def test_spectrum_says_when_k_exceeds_the_dimension():
    model = _tiny_mlp(hidden=3, inputs=2, classes=2)  # 2*3+3 + 3*2+2 = 17 weights
    batch = _batch(inputs=2, classes=2)
    with pytest.warns(UserWarning, match="k = 40 top eigenpairs .* dimension 17; using k = 16"):
        spec = imc_mod.spectrum(model, batch, k=40, n_probes=2, steps=8, tol=1e-10)
    dense = torch.linalg.eigvalsh(_dense_hessian(model, batch))
    assert spec.top_eigenvalues.shape == (16,)
    assert torch.allclose(spec.top_eigenvalues, dense.flip(0)[:16], atol=1e-8)
