"""The oracles themselves, against closed forms: a wrong oracle would pass wrong engines.

For a linear model ``z = x W^T`` (no bias, weights flattened row-major) the Hessian is known:

* MSE with sum reduction: ``H = 2 I_M kron X^T X``;
* mean cross-entropy: ``H = (1/N) sum_n (diag(p_n) - p_n p_n^T) kron x_n x_n^T``;

and it equals the GGN, because the model is linear in its parameters.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn


def _linear(gen, k=5, m=3):
    model = nn.Linear(k, m, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(m, k, generator=gen))
    return model


def test_linear_least_squares_closed_form(oracles):
    gen = torch.Generator().manual_seed(0)
    model = _linear(gen)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    t = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    expected = 2.0 * torch.kron(torch.eye(3, dtype=torch.float64), x.T @ x)
    batch = (x, t)
    hess = oracles.dense_hessian(model, nn.MSELoss(reduction="sum"), batch)
    ggn = oracles.dense_ggn(model, nn.MSELoss(reduction="sum"), batch)
    assert hess.dtype == torch.float64 and hess.shape == (15, 15)
    torch.testing.assert_close(hess, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ggn, expected, rtol=1e-12, atol=1e-12)


def test_linear_softmax_closed_form(oracles):
    gen = torch.Generator().manual_seed(1)
    model = _linear(gen)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    p = torch.softmax(x @ model.weight.detach().double().T, dim=1)
    expected = (
        sum(
            torch.kron(torch.diag(p[n]) - torch.outer(p[n], p[n]), torch.outer(x[n], x[n]))
            for n in range(6)
        )
        / 6
    )
    hess = oracles.dense_hessian(model, nn.CrossEntropyLoss(), (x, y))
    ggn = oracles.dense_ggn(model, nn.CrossEntropyLoss(), (x, y))
    torch.testing.assert_close(hess, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ggn, expected, rtol=1e-12, atol=1e-14)


def test_oracle_skips_frozen_parameters(oracles):
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(_linear(gen, 4, 4), nn.Tanh(), _linear(gen, 4, 3))
    x = torch.randn(5, 4, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    full = oracles.dense_hessian(model, nn.CrossEntropyLoss(), (x, y))
    model[0].weight.requires_grad_(False)
    frozen = oracles.dense_hessian(model, nn.CrossEntropyLoss(), (x, y))
    # The trainable block of the full Hessian: the last 12 coordinates.
    torch.testing.assert_close(frozen, full[16:, 16:], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case_name", ["mlp_gelu", "conv_bn2d_affine_adaptive"])
def test_oracle_is_symmetric_and_leaves_model_alone(oracles, case_name):
    model, loss_fn, batch = oracles.build_case(case_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for curvature in ("hessian", "ggn"):
        mat = oracles.dense(curvature, model, loss_fn, batch)
        assert mat.dtype == torch.float64
        torch.testing.assert_close(mat, mat.T, rtol=0, atol=1e-12 * float(mat.abs().max()))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unbatched_oracle_agrees(oracles):
    model, loss_fn, batch = oracles.build_case("conv_bn2d_affine_adaptive")
    batched = oracles.dense_hessian(model, loss_fn, batch)
    looped = oracles.dense_hessian(model, loss_fn, batch, vectorize=False)
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
