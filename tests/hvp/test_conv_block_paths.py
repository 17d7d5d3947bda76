"""The Conv2d rule's two block paths: ``chunked`` (sample chunks into kept buffers, the CPU
default) against ``batched`` (one call per term over the whole batch, the CUDA default).

``CHUNK_BYTES`` is lowered so the tiny models here split into several chunks with a ragged
last one (the default 8 MiB would give one chunk, which is the batched path itself).

Tolerances (worst column's ``||chunked - batched|| / ||batched||``): both paths make the same
calls, on sample slices or on the whole batch, so only the order in which the weight terms
sum over samples differs: a few ulp of the result. fp32 1e-5 and fp64 1e-10 are the oracle
test's bounds (``test_engines_vs_oracle.py``); a slice off by one sample or a missed term is
off by O(1e-1).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imc_kernels import HessianOperator
from imc_kernels.hvp.layers import conv2d

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
BLOCKS = (1, 3, 8)
N_SAMPLES = 7  # prime: chunks of 2, 3 or 4 samples leave a ragged last chunk


def _rect_strided_dilated_groups():
    """Non-square kernels, stride, dilation and asymmetric padding; then groups, no bias."""
    return [
        nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Tanh(),
        nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=(0, 1), groups=2, bias=False),
        nn.Sigmoid(),
    ]


def _linear_first_same_padding():
    """A Linear on the image rows first, so the first convolution also gets an input tangent
    and returns an input gradient; 'same' padding with dilation; a 1x3 grouped conv."""
    return [
        nn.Linear(8, 7),
        nn.Conv2d(3, 4, 3, padding="same", dilation=2, bias=False),
        nn.GELU(),
        nn.Conv2d(4, 6, (1, 3), stride=2, groups=2),
        nn.Tanh(),
    ]


MODELS = {
    "rect_strided_dilated_groups": _rect_strided_dilated_groups,
    "linear_first_same_padding": _linear_first_same_padding,
}


def _problem(name: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(97)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(79)
        features = nn.Sequential(*MODELS[name]())
        x = torch.randn(N_SAMPLES, 3, 9, 8, generator=gen)
        with torch.no_grad():
            width = features.eval()(x).flatten(1).shape[1]
        model = nn.Sequential(features, nn.Flatten(), nn.Linear(width, 5)).eval()
    targets = torch.randint(0, 5, (N_SAMPLES,), generator=gen)
    return model.to(dtype), (x.to(dtype), targets)


def _conv_rules(op: HessianOperator) -> list[conv2d.Conv2dRule]:
    return [r for r in op._engine.rules if isinstance(r, conv2d.Conv2dRule)]


def _product(op, block, path, monkeypatch):
    monkeypatch.setenv("IMC_CONV_BLOCK_PATH", path)
    return op @ block


@pytest.mark.parametrize("samples_per_chunk", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_matches_batched(name, curvature, dtype, samples_per_chunk, monkeypatch, oracles):
    model, batch = _problem(name, dtype)
    op = HessianOperator(model, None, batch, engine="fused", curvature=curvature)
    for b in BLOCKS:
        first = _conv_rules(op)[0]
        per_sample = b * max(first.x[0].numel(), first.y_shape[1:].numel())
        monkeypatch.setattr(
            conv2d, "CHUNK_BYTES", samples_per_chunk * per_sample * first.x.element_size()
        )
        monkeypatch.setenv("IMC_CONV_BLOCK_PATH", "chunked")
        full, ragged = divmod(N_SAMPLES, samples_per_chunk)
        expected = [samples_per_chunk] * full + ([ragged] if ragged else [])
        assert [s.stop - s.start for s in first._sample_chunks(b)] == expected
        block = oracles.random_block(op.dim, b, dtype, seed=b)
        batched = _product(op, block, "batched", monkeypatch)
        chunked = _product(op, block, "chunked", monkeypatch)
        assert torch.isfinite(chunked).all()
        err = oracles.rel_err(chunked, batched)
        assert err <= TOLERANCE[dtype], f"b={b}: chunked vs batched {err:.2e}"


def test_chunked_matches_dense_oracle(monkeypatch, oracles, dense_oracle):
    """One sample per chunk on the catalogue's three-conv model, fp64, against the oracle."""
    monkeypatch.setattr(conv2d, "CHUNK_BYTES", 1)
    monkeypatch.setenv("IMC_CONV_BLOCK_PATH", "chunked")
    reference = dense_oracle("conv_conv_groups_stride", "hessian")
    model, loss_fn, batch = oracles.build_case("conv_conv_groups_stride")
    model, batch = oracles.cast(model, batch, torch.float64)
    op = HessianOperator(model, loss_fn, batch, engine="fused")
    assert all(len(r._sample_chunks(3)) == batch[0].shape[0] for r in _conv_rules(op))
    block = oracles.random_block(op.dim, 3, torch.float64, seed=5)
    err = oracles.rel_err(op @ block, reference @ block)
    assert err <= TOLERANCE[torch.float64], f"relative error {err:.2e}"


def test_kept_buffers_across_block_sizes(monkeypatch, oracles):
    """Alternating block sizes reuse the front of the kept buffers: every product has the
    bits of a fresh operator's, and a later product never changes an earlier result."""
    monkeypatch.setattr(conv2d, "CHUNK_BYTES", 1)
    monkeypatch.setenv("IMC_CONV_BLOCK_PATH", "chunked")
    model, batch = _problem("linear_first_same_padding", torch.float32)
    op = HessianOperator(model, None, batch, engine="fused")
    results = []
    for b in (8, 3, 8, 1):
        block = oracles.random_block(op.dim, b, seed=b)
        result = op @ block
        results.append((block, result, result.clone()))
    for block, result, snapshot in results:
        fresh = HessianOperator(model, None, batch, engine="fused") @ block
        assert torch.equal(result, snapshot)
        assert torch.equal(result, fresh)


def test_kept_buffers_are_written_before_read(monkeypatch, oracles):
    """``torch.empty`` filled with NaN (deterministic mode): an unwritten element would show."""
    monkeypatch.setattr(conv2d, "CHUNK_BYTES", 1)
    monkeypatch.setenv("IMC_CONV_BLOCK_PATH", "chunked")
    model, batch = _problem("rect_strided_dilated_groups", torch.float32)
    block = oracles.random_block(sum(p.numel() for p in model.parameters()), 3, seed=13)
    expected = HessianOperator(model, None, batch, engine="fused") @ block
    with oracles.poisoned_empty():
        poisoned = HessianOperator(model, None, batch, engine="fused") @ block
    assert torch.isfinite(poisoned).all()
    assert oracles.rel_err(poisoned, expected) <= 1e-6


def test_block_path_by_device_and_override(monkeypatch):
    monkeypatch.delenv("IMC_CONV_BLOCK_PATH", raising=False)
    assert conv2d.block_path(torch.device("cpu")) == "chunked"
    assert conv2d.block_path(torch.device("cuda")) == "batched"
    for forced in ("batched", "chunked"):
        monkeypatch.setenv("IMC_CONV_BLOCK_PATH", forced)
        assert conv2d.block_path(torch.device("cpu")) == forced
        assert conv2d.block_path(torch.device("cuda")) == forced
    monkeypatch.setenv("IMC_CONV_BLOCK_PATH", "im2col")
    with pytest.raises(ValueError, match="IMC_CONV_BLOCK_PATH='im2col'"):
        conv2d.block_path(torch.device("cpu"))
