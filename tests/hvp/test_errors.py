"""Bad input gets a clear exception naming the problem (DESIGN section 7), and train-mode
models get a warning; one test per case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imc_kernels import HessianOperator

ENGINES = ("fused", "func", "double_backward")


def _problem(n=6, n_in=5, n_out=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(n_in, 7), nn.Tanh(), nn.Linear(7, n_out))
    x = torch.randn(n, n_in, generator=gen)
    y = torch.randint(0, n_out, (n,), generator=gen)
    return model, (x, y)


# ---------------------------------------------------------------------------- the batch


@pytest.mark.parametrize("batch", ["tensor", "triple", "none"])
def test_batch_must_be_a_pair(batch):
    model, (x, y) = _problem()
    bad = {"tensor": x, "triple": (x, y, y), "none": None}[batch]
    with pytest.raises(ValueError, match="pair"):
        HessianOperator(model, None, bad)


def test_batch_that_does_not_fit_the_model():
    model, (x, y) = _problem()
    with pytest.raises(ValueError, match=r"forward failed.*\(6, 3\)"):
        HessianOperator(model, None, (x[:, :3], y))


def test_inputs_and_targets_of_different_batch_sizes():
    model, (x, y) = _problem()
    with pytest.raises(ValueError, match="6 samples.*batch size"):
        HessianOperator(model, None, (x, y[:4]))


def test_batch_on_another_device():
    model, (x, y) = _problem()
    with pytest.raises(TypeError, match="meta"):
        HessianOperator(model, None, (x.to("meta"), y))


def test_no_trainable_parameters():
    model, batch = _problem()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(model, None, batch)


# Under TRITON_INTERPRET=1 the cross-entropy kernel's tl.max runs as numpy's nanmax, which
# warns on a row of logits that is all NaN (NaN inputs make every logit of that row NaN); the
# compiled kernel propagates the NaN silently. Either way the loss is NaN and the error below
# is what the user sees.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["inputs", "parameter"])
def test_non_finite_loss(where):
    model, (x, y) = _problem()
    if where == "inputs":
        x[2, 1] = float("nan")
    else:
        with torch.no_grad():
            model[2].weight[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        HessianOperator(model, None, (x, y))


@pytest.mark.parametrize("engine", ("auto", *ENGINES))
def test_cross_entropy_all_rows_ignored(engine):
    """The mean over no rows is NaN; the message says why instead of 'loss is not finite'."""
    model, (x, y) = _problem()
    with pytest.raises(ValueError, match=r"every target is ignore_index \(-100\)"):
        HessianOperator(model, None, (x, torch.full_like(y, -100)), engine=engine)
    with pytest.raises(ValueError, match=r"every target is ignore_index \(3\)"):
        HessianOperator(model, nn.CrossEntropyLoss(ignore_index=3), (x, torch.full_like(y, 3)))
    # A sum over no rows is 0, and so is its Hessian: well defined.
    op = HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), (x, torch.full_like(y, -100)))
    assert float(op.loss) == 0.0
    assert torch.equal(op @ torch.ones(op.dim), torch.zeros(op.dim))


@pytest.mark.parametrize("engine", ("auto", *ENGINES))
def test_empty_batch(engine):
    model, (x, y) = _problem()
    with pytest.raises(ValueError, match=r"the batch is empty \(0 samples\)"):
        HessianOperator(model, None, (x[:0], y[:0]), engine=engine)


@pytest.mark.parametrize("engine", ("auto", *ENGINES))
def test_cross_entropy_targets_of_the_wrong_shape(engine):
    """(N, 1) class indices: torch's 'multi-target not supported' before."""
    model, (x, y) = _problem()
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\).*got \(6, 1\)"):
        HessianOperator(model, None, (x, y[:, None]), engine=engine)


@pytest.mark.parametrize("engine", ("auto", *ENGINES))
def test_cross_entropy_needs_one_score_per_class(engine):
    """A squeezed (N,) output: torch's 'Expected floating point type for target with class
    probabilities' before."""
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))
    x, y = _problem()[1]
    with pytest.raises(ValueError, match=r"outputs of shape \(N, C\).*got shape \(6,\)"):
        HessianOperator(model, None, (x, torch.zeros_like(y)), engine=engine)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("engine", ENGINES)
def test_narrow_integer_class_indices(engine, dtype):
    """int32 targets ran on the fused engine but failed in F.cross_entropy (func and
    double_backward): every engine now takes them, as int64, with the same products."""
    model, (x, y) = _problem()
    op = HessianOperator(model, None, (x, y.to(dtype)), engine=engine)
    assert op.targets.dtype == torch.int64 and torch.equal(op.targets, y)
    want = HessianOperator(model, None, (x, y), engine=engine)
    v = torch.linspace(-1, 1, op.dim)
    torch.testing.assert_close(op @ v, want @ v, rtol=0, atol=0)


def test_loss_fn_must_return_a_scalar():
    model, batch = _problem()
    with pytest.raises(ValueError, match=r"scalar \(a 0-dim tensor\), got shape \(6,\).*'sum'"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), batch)
    with pytest.raises(TypeError, match="loss_fn must return a tensor, got float"):
        HessianOperator(model, lambda out, t: 1.0, batch)


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(x), x


@pytest.mark.parametrize("engine", ("auto", *ENGINES))
def test_model_must_return_one_tensor(engine):
    """A tuple output: an AttributeError from inside the target checks before."""
    _, batch = _problem()
    with pytest.raises(TypeError, match="the model must return one tensor, got tuple"):
        HessianOperator(_TwoOutputs(), None, batch, engine=engine)


@pytest.mark.parametrize("bad", [4, 9, -1, -7])
def test_cross_entropy_targets_out_of_range(bad):
    model, (x, y) = _problem()
    y[3] = bad
    with pytest.raises(ValueError, match=rf"\[0, 4\).*{bad}"):
        HessianOperator(model, None, (x, y))


def test_cross_entropy_ignored_rows_are_not_out_of_range():
    model, (x, y) = _problem()
    y[3] = -100
    op = HessianOperator(model, None, (x, y))
    assert torch.isfinite(op @ torch.ones(op.dim)).all()


def test_one_hot_float_targets_warn_that_they_get_mse(recwarn):
    model, (x, y) = _problem()
    one_hot = nn.functional.one_hot(y, 4).float()
    with pytest.warns(UserWarning, match=r"one-hot rows.*MSE Hessian.*targets.argmax\(1\)"):
        op = HessianOperator(model, None, (x, one_hot))
    mse = HessianOperator(model, nn.MSELoss(), (x, one_hot))
    v = torch.randn(op.dim)
    assert torch.equal(op @ v, mse @ v)  # the rule is unchanged: MSE, said out loud
    recwarn.clear()
    HessianOperator(model, None, (x, 0.9 * one_hot + 0.025))  # soft labels: no warning
    HessianOperator(model, nn.MSELoss(), (x, one_hot))  # an explicit loss: no warning
    assert not [w for w in recwarn if "one-hot" in str(w.message)]


def test_mse_targets_of_the_wrong_shape():
    model, (x, _) = _problem()
    with pytest.raises(ValueError, match=r"MSE targets have shape \(6, 3\)"):
        HessianOperator(model, nn.MSELoss(), (x, torch.randn(6, 3)))


# ------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"curvature": "fisher"}, "curvature must be one of"),
        ({"engine": "jax"}, "engine must be one of"),
        ({"mode": "inference"}, "mode must be one of"),
        (
            {"engine": "double_backward", "curvature": "ggn"},
            "double_backward.*Hessian products only",
        ),
    ],
    ids=["curvature", "engine", "mode", "double_backward-ggn"],
)
def test_bad_arguments(kwargs, match):
    model, batch = _problem()
    with pytest.raises(ValueError, match=match):
        HessianOperator(model, None, batch, **kwargs)


def test_model_and_loss_types():
    model, batch = _problem()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        HessianOperator(lambda x: x, None, batch)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        HessianOperator(model, "cross_entropy", batch)


# ------------------------------------------------------------------------- the vectors


@pytest.fixture(scope="module")
def operator():
    model, batch = _problem()
    return HessianOperator(model, None, batch)


def test_vector_of_wrong_length(operator):
    with pytest.raises(ValueError, match=f"length {operator.dim - 1}.*{operator.dim} trainable"):
        operator @ torch.zeros(operator.dim - 1)
    with pytest.raises(ValueError, match="length"):
        operator @ torch.zeros(operator.dim + 2, 3)


def test_vector_of_wrong_rank(operator):
    with pytest.raises(ValueError, match=r"shape \(dim,\) or \(dim, b\)"):
        operator @ torch.zeros(operator.dim, 2, 1)


def test_vector_of_wrong_dtype(operator):
    with pytest.raises(TypeError, match="float64.*float32"):
        operator @ torch.zeros(operator.dim, dtype=torch.float64)


def test_vector_on_wrong_device(operator):
    with pytest.raises(TypeError, match="meta"):
        operator @ torch.zeros(operator.dim, device="meta")


def test_vector_not_a_tensor(operator):
    with pytest.raises(TypeError, match="torch.Tensor"):
        operator.matmat([0.0] * operator.dim)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_product(engine, value):
    model, batch = _problem()
    op = HessianOperator(model, None, batch, engine=engine)
    block = torch.ones(op.dim, 3)
    block[5, 1] = value
    with pytest.raises(FloatingPointError, match=f"{engine} engine.*not finite"):
        op @ block
    assert op.n_products == 0
    unchecked = HessianOperator(model, None, batch, engine=engine, check_finite=False)
    assert not torch.isfinite(unchecked @ block).all()


# ------------------------------------------------------------------------- train mode


def _train_model(kind):
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        middle = nn.Dropout(0.5) if kind == "dropout" else nn.BatchNorm1d(7)
        model = nn.Sequential(nn.Linear(5, 7), middle, nn.Tanh(), nn.Linear(7, 3))
    batch = (torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    return model.train(), batch


@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
def test_train_mode_model_warns_and_is_restored(kind):
    model, batch = _train_model(kind)
    model[2].eval()  # mixed flags come back exactly
    flags = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.warns(UserWarning, match="eval mode"):
        op = HessianOperator(model, None, batch)
    assert [m.training for m in model.modules()] == flags
    assert op.engine == "fused"
    first = op @ torch.ones(op.dim, 2)
    assert torch.equal(first, op @ torch.ones(op.dim, 2))  # eval mode: deterministic
    assert [m.training for m in model.modules()] == flags
    # Running statistics are read, never updated.
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in buffers.items())


def test_eval_mode_model_does_not_warn(recwarn):
    model, batch = _train_model("dropout")
    HessianOperator(model.eval(), None, batch)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
def test_train_mode_warns_not_deterministic(kind):
    model, batch = _train_model(kind)
    with pytest.warns(UserWarning, match="not deterministic"):
        op = HessianOperator(model, None, batch, mode="train", engine="double_backward")
    assert model.training
    assert op @ torch.ones(op.dim, 3) is not None


def _train_mode_batchnorm_hessian(model, batch) -> torch.Tensor:
    """Dense fp64 Hessian of _train_model("batchnorm") in train mode, written out by hand
    (batch statistics, biased variance, as BatchNorm1d normalizes in training) and
    differentiated by torch.func: an oracle independent of every engine."""
    x, y = batch
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    eps = model[1].eps

    def loss(flat):
        w1, b1, gamma, beta, w2, b2 = (
            t.view(shape) for t, shape in zip(flat.split(sizes), shapes, strict=True)
        )
        h = x.double() @ w1.T + b1
        mean, var = h.mean(0), h.var(0, unbiased=False)
        h = (h - mean) / torch.sqrt(var + eps) * gamma + beta
        return nn.functional.cross_entropy(torch.tanh(h) @ w2.T + b2, y)

    flat = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    return torch.func.hessian(loss)(flat)


@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
def test_train_mode_products_with_auto_engine(kind):
    """mode='train' is a documented mode, and auto picks double_backward for it (torch.func
    forbids Dropout's masks and BatchNorm's running-statistic writes): products must run.

    BatchNorm in train mode (batch statistics) is deterministic, so its products must match
    the dense Hessian of the train-mode loss; Dropout draws masks, so only shape and
    finiteness hold.
    """
    model, batch = _train_model(kind)
    with pytest.warns(UserWarning, match="not deterministic"):
        op = HessianOperator(model, None, batch, mode="train")
    assert op.engine == "double_backward" and "mode='train'" in op.engine_reason
    block = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(5))
    out = op @ block
    assert out.shape == (op.dim, 3) and torch.isfinite(out).all()
    if kind == "batchnorm":
        dense = _train_mode_batchnorm_hessian(model, batch)
        expected = (dense @ block.double()).float()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * dense.abs().max().item())
        # And the eval-mode operator (running statistics) is a different matrix.
        with pytest.warns(UserWarning, match="eval mode"):
            eval_out = HessianOperator(model, None, batch) @ block
        assert not torch.allclose(eval_out, out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["dropout", "batchnorm"])
def test_ggn_in_train_mode_names_what_to_change(kind):
    model, batch = _train_model(kind)
    message = "curvature='ggn' cannot run mode='train'.*mode='eval'"
    with (
        pytest.warns(UserWarning, match="not deterministic"),
        pytest.raises(ValueError, match=message),
    ):
        HessianOperator(model, None, batch, mode="train", curvature="ggn")


def test_class_index_masks_honour_the_loss_ignore_index():
    """The shared class-index check: valid = not the loss' ignore_index; bad = valid and
    outside [0, C). Both the operator and the pruning layer build their errors on it."""
    from imc_kernels.hvp._common import class_index_masks

    targets = torch.tensor([0, 2, 3, -1, -100, 7])
    bad, valid = class_index_masks(targets, 3, torch.nn.CrossEntropyLoss())
    assert valid.tolist() == [True, True, True, True, False, True]
    assert bad.tolist() == [False, False, True, True, False, True]
    bad, valid = class_index_masks(targets, 3, torch.nn.CrossEntropyLoss(ignore_index=7))
    assert valid.tolist() == [True, True, True, True, True, False]
    assert bad.tolist() == [False, False, True, True, True, False]
