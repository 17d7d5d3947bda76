"""Independent fp64 oracles and the model catalogue for the HVP tests (DESIGN section 7).

The oracles share no code with the engines: a float64 deep copy of the model, evaluated in
eval mode through ``torch.func.functional_call`` on a flat parameter vector (trainable
parameters only, in ``model.parameters()`` order), differentiated densely:

* ``dense_hessian``: ``torch.func.hessian`` of the loss with respect to that vector (checked
  symmetric; an unbatched column-by-column variant for models where a batching rule fails);
* ``dense_ggn``: ``J^T H_L J`` with ``J = jacrev(outputs)`` and ``H_L = hessian(loss)`` with
  respect to the outputs.

Models are tiny (a few hundred to ~2000 weights), so the dense matrices cost milliseconds.

The catalogue holds small models with awkward sizes (primes, nothing a multiple of a block
size), one builder per case; ``build_case(name)`` returns ``(model, loss_fn, batch)`` in
float32, the same bits on every call.

This file is loaded by ``conftest.py`` (the tests run with ``--import-mode=importlib``, so
it is not importable by name); tests reach it through the ``oracles`` fixture.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp

# ----------------------------------------------------------------------------- oracles


def _as_float64(batch):
    inputs, targets = batch
    inputs = inputs.to(torch.float64)
    if targets.dtype.is_floating_point:
        targets = targets.to(torch.float64)
    return inputs, targets


def resolve_loss(loss_fn, batch):
    """The documented default (DESIGN section 3): cross-entropy for integer targets, else MSE."""
    if loss_fn is not None:
        return loss_fn
    return nn.MSELoss() if batch[1].dtype.is_floating_point else nn.CrossEntropyLoss()


def _functional(model: nn.Module, batch):
    """``(flat0, output_of, targets)`` for a float64 eval-mode copy of ``model``."""
    twin = copy.deepcopy(model).to(torch.float64).eval()
    # named_parameters deduplicates shared parameters, like model.parameters(); the deep copy
    # keeps the sharing, so one entry of the flat vector drives every use.
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    inputs, targets = _as_float64(batch)

    def output_of(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(numels), shapes)}
        return functional_call(twin, params, (inputs,))

    return flat0, output_of, targets


def flat_params(model: nn.Module) -> torch.Tensor:
    """The trainable parameters as one float64 vector in ``model.parameters()`` order."""
    return torch.cat(
        [p.detach().double().reshape(-1) for p in model.parameters() if p.requires_grad]
    )


def dense_hessian(model: nn.Module, loss_fn: Callable, batch, *, vectorize: bool = True):
    """``d^2 loss / dw^2`` (dim x dim, float64) over the trainable parameters.

    ``vectorize=True`` is ``torch.func.hessian`` (``jacfwd(jacrev)``: one vmapped pass over
    the basis). Some second-order batching rules are wrong (LayerNorm's backward,
    pytorch/functorch#534: an asymmetric result off by ~10%), so the result must be symmetric
    or this raises; ``vectorize=False`` builds the same matrix one unbatched
    ``jvp(grad)`` column at a time, for such models.
    """
    loss_fn = resolve_loss(loss_fn, batch)
    flat0, output_of, targets = _functional(model, batch)

    def loss_of(flat):
        return loss_fn(output_of(flat), targets)

    if vectorize:
        mat = hessian(loss_of)(flat0)
    else:
        basis = torch.eye(flat0.numel(), dtype=torch.float64)
        mat = torch.stack([jvp(grad(loss_of), (flat0,), (e,))[1] for e in basis], dim=1)
    asymmetry = float((mat - mat.T).norm() / mat.norm())
    if asymmetry > 1e-10:
        raise AssertionError(
            f"the oracle Hessian is not symmetric ({asymmetry:.1e}): a batching rule is wrong "
            "for this model; use vectorize=False"
        )
    return mat


def dense_ggn(model: nn.Module, loss_fn: Callable, batch) -> torch.Tensor:
    """``J^T H_L J`` (dim x dim, float64): ``J`` the output Jacobian, ``H_L`` the loss Hessian."""
    loss_fn = resolve_loss(loss_fn, batch)
    flat0, output_of, targets = _functional(model, batch)
    with torch.no_grad():
        output = output_of(flat0)
    jac = jacrev(output_of)(flat0).reshape(output.numel(), -1)
    h_out = hessian(lambda out: loss_fn(out, targets))(output).reshape(output.numel(), -1)
    return jac.T @ h_out @ jac


def dense(curvature: str, model: nn.Module, loss_fn: Callable, batch, **kwargs) -> torch.Tensor:
    if curvature == "hessian":
        return dense_hessian(model, loss_fn, batch, **kwargs)
    return dense_ggn(model, loss_fn, batch)


def rel_err(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst column's ``||result - reference|| / ||reference||``, in float64."""
    result = result.to(torch.float64).reshape(reference.shape[0], -1)
    reference = reference.to(torch.float64).reshape(reference.shape[0], -1)
    diff = torch.linalg.vector_norm(result - reference, dim=0)
    scale = torch.linalg.vector_norm(reference, dim=0)
    return float((diff / scale).max())


def cast(model: nn.Module, batch, dtype: torch.dtype, device="cpu"):
    """``model`` and ``batch`` in ``dtype`` on ``device`` (integer targets keep their dtype)."""
    inputs, targets = batch
    if targets.dtype.is_floating_point:
        targets = targets.to(dtype)
    return model.to(device=device, dtype=dtype), (inputs.to(device, dtype), targets.to(device))


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """``torch.empty`` filled with NaN while inside (deterministic mode), so a product that
    reads an element it never wrote comes out non-finite. Restores the previous settings."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def random_block(dim: int, b: int, dtype=torch.float32, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, b, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- catalogue


def _ce(n, c, gen):
    return torch.randint(0, c, (n,), generator=gen)


def _set_batchnorm(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics (and affine parameters) so no term hides behind 0 or 1."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
        if bn.affine:
            bn.weight.copy_(1.0 + 0.3 * torch.randn(c, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(c, generator=gen))
    return bn


def _mlp(act: nn.Module):
    def build(gen):
        model = nn.Sequential(nn.Linear(7, 13), act, nn.Linear(13, 11), act, nn.Linear(11, 5))
        x = torch.randn(9, 7, generator=gen)
        return model, nn.CrossEntropyLoss(), (x, _ce(9, 5, gen))

    return build


def _nested(gen):
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 11), nn.Tanh()),
        nn.Dropout(0.4),
        nn.Identity(),
        nn.Sequential(nn.Linear(11, 9), nn.Sequential(nn.SiLU(), nn.Linear(9, 4))),
    )
    x = torch.randn(7, 6, generator=gen)
    return model, nn.CrossEntropyLoss(), (x, _ce(7, 4, gen))


def _bn1d(affine: bool):
    def build(gen):
        model = nn.Sequential(
            nn.Linear(5, 11),
            nn.BatchNorm1d(11, affine=affine),
            nn.Tanh(),
            nn.Linear(11, 3),
        )
        _set_batchnorm(model[1], gen)
        x = torch.randn(6, 5, generator=gen)
        return model, nn.CrossEntropyLoss(), (x, _ce(6, 3, gen))

    return build


def _mlp_3d(gen):
    # Linear on (N, L, K) rows, BatchNorm1d on (N, C, L): channels are dimension 1.
    model = nn.Sequential(
        nn.Linear(5, 6), _set_batchnorm(nn.BatchNorm1d(4), gen), nn.GELU(), nn.Flatten()
    )
    model.append(nn.Linear(24, 3))
    x = torch.randn(6, 4, 5, generator=gen)
    return model, nn.CrossEntropyLoss(), (x, _ce(6, 3, gen))


def _activation_first(gen):
    # Parameter-free layers before the first parameter: their input gradient is never needed.
    model = nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Linear(12, 7), nn.Sigmoid(), nn.Linear(7, 3))
    x = torch.randn(5, 3, 2, 2, generator=gen)
    return model, nn.CrossEntropyLoss(), (x, _ce(5, 3, gen))


def _mlp_loss(loss_fn, kind: str):
    def build(gen):
        model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 7), nn.Sigmoid())
        model.append(nn.Linear(7, 4))
        x = torch.randn(11, 6, generator=gen)
        if kind == "mse":
            targets = torch.randn(11, 4, generator=gen)
        else:
            targets = _ce(11, 4, gen)
            if kind == "ignore":
                # Rows with the ignored label drop out of the mean (the scale is 1/valid rows).
                targets[torch.tensor([1, 4, 5, 9])] = loss_fn.ignore_index
        return model, loss_fn, (x, targets)

    return build


def _cnn(*layers_fn, in_ch=3, size=7, n=5, n_out=5, loss="ce"):
    def build(gen):
        layers = [f() for f in layers_fn]
        for layer in layers:
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                _set_batchnorm(layer, gen)
        features = nn.Sequential(*layers)
        x = torch.randn(n, in_ch, size, size, generator=gen)
        with torch.no_grad():
            width = features.eval()(x).flatten(1).shape[1]
        model = nn.Sequential(features, nn.Flatten(), nn.Linear(width, n_out))
        if loss == "mse":
            return model, nn.MSELoss(reduction="sum"), (x, torch.randn(n, n_out, generator=gen))
        return model, nn.CrossEntropyLoss(), (x, _ce(n, n_out, gen))

    return build


CASES: dict[str, Callable] = {
    # MLPs, one per activation (each appears twice, so the second one sees a tangent rz).
    "mlp_relu": _mlp(nn.ReLU()),
    "mlp_leaky_relu": _mlp(nn.LeakyReLU(0.1)),
    "mlp_tanh": _mlp(nn.Tanh()),
    "mlp_sigmoid": _mlp(nn.Sigmoid()),
    "mlp_gelu": _mlp(nn.GELU()),
    "mlp_gelu_tanh": _mlp(nn.GELU(approximate="tanh")),
    "mlp_silu": _mlp(nn.SiLU()),
    "nested_dropout_identity": _nested,
    "bn1d_affine": _bn1d(True),
    "bn1d_plain": _bn1d(False),
    "linear_3d_bn1d_ncl": _mlp_3d,
    "activation_first": _activation_first,
    # Losses.
    "ce_sum": _mlp_loss(nn.CrossEntropyLoss(reduction="sum"), "ce"),
    "ce_ignore_index": _mlp_loss(nn.CrossEntropyLoss(), "ignore"),
    "ce_ignore_index_sum": _mlp_loss(
        nn.CrossEntropyLoss(ignore_index=2, reduction="sum"), "ignore"
    ),
    "ce_functional": _mlp_loss(F.cross_entropy, "ce"),
    "mse_mean": _mlp_loss(nn.MSELoss(), "mse"),
    "mse_sum": _mlp_loss(nn.MSELoss(reduction="sum"), "mse"),
    # CNNs.
    "conv_stride2_pad1": _cnn(lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU),
    "conv_dilation2_avgpool": _cnn(
        lambda: nn.Conv2d(3, 5, 3, dilation=2, padding=1), nn.Tanh, lambda: nn.AvgPool2d(2)
    ),
    "conv_groups2_nobias_maxpool_overlap": _cnn(
        lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False),
        nn.SiLU,
        lambda: nn.MaxPool2d(2, 1),
        in_ch=4,
    ),
    "conv_same_maxpool_ceil": _cnn(
        lambda: nn.Conv2d(2, 3, 3, padding="same"),
        nn.GELU,
        lambda: nn.MaxPool2d(2, ceil_mode=True),
        in_ch=2,
    ),
    "conv_bn2d_affine_adaptive": _cnn(
        lambda: nn.Conv2d(3, 4, 2),
        lambda: nn.BatchNorm2d(4),
        nn.LeakyReLU,
        lambda: nn.AdaptiveAvgPool2d((2, 3)),
    ),
    "conv_bn2d_plain_mse": _cnn(
        lambda: nn.Conv2d(2, 3, 3, padding=1),
        lambda: nn.BatchNorm2d(3, affine=False),
        nn.Sigmoid,
        lambda: nn.AdaptiveAvgPool2d(1),
        in_ch=2,
        loss="mse",
    ),
    "maxpool_pad_dilation": _cnn(
        lambda: nn.Conv2d(2, 3, 2),
        nn.Tanh,
        lambda: nn.MaxPool2d(3, 2, padding=1, dilation=2),
        in_ch=2,
        size=8,
    ),
    "avgpool_pad_ceil_nocount": _cnn(
        lambda: nn.Conv2d(2, 3, 2),
        nn.SiLU,
        lambda: nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
        in_ch=2,
    ),
    "avgpool_divisor_rect_stride": _cnn(
        lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding="valid"),
        nn.Tanh,
        lambda: nn.AvgPool2d((2, 3), (1, 2), divisor_override=5),
        in_ch=2,
    ),
    # Monotone activations before max pooling (the fused engine pools first), a non-monotone
    # one (negative slope: must not be reordered), overlapping and padded windows.
    "conv_relu_maxpool_twice": _cnn(
        lambda: nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU,
        lambda: nn.MaxPool2d(2),
        lambda: nn.Conv2d(4, 3, 2),
        lambda: nn.LeakyReLU(0.1),
        lambda: nn.MaxPool2d(2, 1),
        in_ch=2,
        size=8,
    ),
    "conv_sigmoid_maxpool_pad_overlap": _cnn(
        lambda: nn.Conv2d(2, 3, 2), nn.Sigmoid, lambda: nn.MaxPool2d(3, 1, padding=1), in_ch=2
    ),
    "conv_leaky_negative_slope_maxpool": _cnn(
        lambda: nn.Conv2d(2, 3, 2), lambda: nn.LeakyReLU(-0.3), lambda: nn.MaxPool2d(2), in_ch=2
    ),
    # An input convolution pooled at once (Conv2dRule.absorb_max_pool; taken on the CPU by
    # default for these three): 2x2 windows, overlapping padded ceil-mode windows after a
    # dilated bias-free conv, a strided conv with two input channels and a LeakyReLU after the
    # pool; a second conv after the first sees the pooled tangent as its input tangent.
    "input_conv_relu_maxpool": _cnn(
        lambda: nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU,
        lambda: nn.MaxPool2d(2),
        lambda: nn.Conv2d(4, 3, 2),
        nn.Tanh,
        in_ch=1,
        size=8,
    ),
    "input_conv_dilated_sigmoid_maxpool_overlap": _cnn(
        lambda: nn.Conv2d(1, 3, 2, dilation=2, bias=False),
        nn.Sigmoid,
        lambda: nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
        in_ch=1,
        size=9,
    ),
    "input_conv_stride2_maxpool": _cnn(
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
        lambda: nn.MaxPool2d(2),
        lambda: nn.LeakyReLU(0.2),
        in_ch=2,
        size=9,
    ),
    "pool_first": _cnn(
        lambda: nn.MaxPool2d(2), lambda: nn.Conv2d(2, 3, 2), nn.Sigmoid, in_ch=2, size=8
    ),
    # Two convolutions: the second sees an input tangent, which exercises the cross terms
    # (conv_w(rx, g_y), conv_x(g_y, dW)), grouped and strided.
    "conv_conv_groups_stride": _cnn(
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh,
        lambda: nn.Conv2d(4, 6, 2, groups=2, dilation=2, padding=1),
        nn.GELU,
        lambda: nn.Conv2d(6, 3, 2, stride=2, bias=False),
        nn.Tanh,
        in_ch=2,
        size=8,
    ),
}


def build_case(name: str):
    """``(model, loss_fn, (inputs, targets))`` for a catalogue entry, float32, deterministic."""
    gen = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)  # module initialisation draws from the global generator
        model, loss_fn, batch = CASES[name](gen)
    return model.eval(), loss_fn, batch
