"""Fused softmax cross-entropy HVP kernel: Triton launcher against the twin, the twin against
``torch.func`` derivatives of ``F.cross_entropy``.

On CPU the Triton kernel runs in the interpreter (``TRITON_INTERPRET=1``, set by conftest).

Tolerances. Kernel and twin compute ``p`` differently (``exp(z - max) / sum`` against
``exp(log_softmax)``) and reduce ``p . u`` in a different order, so they agree to a few ulp
of the largest term: fp32 ``rtol=1e-5, atol=1e-6`` (eps 1.2e-7; the atol covers the cancelling
difference ``p u - p (p . u)`` and entries of ``p`` near zero), fp64 ``rtol=1e-12, atol=1e-14``
(eps 2.2e-16). Row losses are ``logsumexp - z_t`` of size ~10 with logits of size ~10: one
ulp of the logits, 1e-6 in fp32, is within the same atol.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imc_kernels import _dispatch, ops
from imc_kernels.reference import cross_entropy as ref

pytest.importorskip("triton")
from imc_kernels.ops import cross_entropy as triton_ce  # noqa: E402

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}
SCALE = 1.0 / 3.0  # not exact in fp32: exercises the hi/lo split of the scale in fp64 runs
# (8, 16) aligned; (5, 37) awkward; (6, 10) the project's class count; (3, 1) a lone class.
SHAPES = [(8, 16), (5, 37), (6, 10), (3, 1)]


def _problem(n_rows, n_classes, b, dtype, *, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(n_rows, n_classes, generator=gen, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, n_classes, (n_rows,), generator=gen)
    if n_rows > 2:
        target[1] = ignore_index
    tangents = torch.randn(b, n_rows, n_classes, generator=gen, dtype=torch.float64).to(dtype)
    return logits, target, tangents


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _run_kernel(logits, target, tangents, *, write_primal=True, **kwargs):
    """The launcher with NaN-poisoned outputs, so an element it does not write fails."""
    n_rows, n_classes = logits.shape
    dtype = logits.dtype
    outs = dict(out_tangents=_poisoned(tangents.shape, dtype))
    if write_primal:
        outs.update(
            out_loss=_poisoned((n_rows,), dtype), out_grad=_poisoned((n_rows, n_classes), dtype)
        )
    loss, grad, rgrad = triton_ce.cross_entropy_hvp(
        logits, target, tangents, write_primal=write_primal, **kwargs, **outs
    )
    assert rgrad is outs["out_tangents"]
    if write_primal:
        assert loss is outs["out_loss"] and grad is outs["out_grad"]
    else:
        assert loss is None and grad is None
    return loss, grad, rgrad


def _assert_matches_reference(logits, target, tangents, *, write_primal=True, **kwargs):
    got = _run_kernel(logits, target, tangents, write_primal=write_primal, **kwargs)
    want = ref.cross_entropy_hvp(logits, target, tangents, write_primal=write_primal, **kwargs)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == logits.dtype
            torch.testing.assert_close(g, w, equal_nan=False, **TOLERANCES[logits.dtype])
    return got


# --- Triton launcher against the twin -----------------------------------------------------


@pytest.mark.parametrize("write_primal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, b, dtype, write_primal):
    logits, target, tangents = _problem(*shape, b, dtype)
    _assert_matches_reference(logits, target, tangents, scale=SCALE, write_primal=write_primal)


@pytest.mark.parametrize("write_primal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [0, 3])
def test_chunked_online_softmax(b, dtype, write_primal, monkeypatch):
    # Rows wider than _MAX_BLOCK_C take the chunked path; shrinking the limit to 16 drives it
    # with 37 classes (3 chunks, the last partial) at interpreter speed.
    monkeypatch.setattr(triton_ce, "_MAX_BLOCK_C", 16)
    logits, target, tangents = _problem(4, 37, b, dtype)
    # A first chunk that is entirely -inf (a masked vocabulary) must not turn the running
    # maximum into exp(-inf - -inf) = NaN.
    logits[0, :16] = float("-inf")
    target[0] = 20
    _assert_matches_reference(logits, target, tangents, scale=SCALE, write_primal=write_primal)


def test_wide_rows_past_the_register_tile():
    # The real threshold: 8200 classes, one chunk of 8192 and one of 8.
    logits, target, tangents = _problem(3, 8200, 2, torch.float32)
    _assert_matches_reference(logits, target, tangents, scale=SCALE)


def test_many_rows_several_programs():
    # 10 classes: 256 rows per program, so 600 rows take three programs, the last partial.
    logits, target, tangents = _problem(600, 10, 2, torch.float32)
    target[::7] = -100
    _assert_matches_reference(logits, target, tangents, scale=1.0 / 600)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_target_dtypes_and_custom_ignore_index(dtype):
    logits, target, tangents = _problem(6, 10, 2, torch.float32, ignore_index=3)
    _assert_matches_reference(logits, target.to(dtype), tangents, scale=SCALE, ignore_index=3)
    # uint8 targets cannot hold a negative ignore_index; no row is ignored then.
    target_u8 = torch.randint(0, 10, (6,), dtype=torch.uint8)
    _assert_matches_reference(logits, target_u8, tangents, scale=SCALE)


def test_ignored_rows_are_exact_zeros():
    logits, target, tangents = _problem(5, 37, 3, torch.float32)
    target[:] = -100
    target[2] = 4
    # Whatever an ignored row holds, its outputs are zeros (the kernel does not even read it).
    logits[0, 3] = float("nan")
    logits[1, :] = float("-inf")
    logits[3, 5] = float("inf")
    tangents[:, 4, 0] = float("nan")
    loss, grad, rgrad = _assert_matches_reference(logits, target, tangents, scale=SCALE)
    ignored = target == -100
    assert torch.all(loss[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(rgrad[:, ignored] == 0)
    assert torch.all(loss[~ignored] > 0)


def test_all_rows_ignored():
    logits, target, tangents = _problem(4, 10, 2, torch.float32)
    target[:] = -100
    loss, grad, rgrad = _run_kernel(logits, target, tangents, scale=1.0)
    assert not loss.any() and not grad.any() and not rgrad.any()


def test_masked_logits_in_valid_rows():
    # -inf logits away from the target (a masked class) give p = 0 there, not NaN.
    logits, target, tangents = _problem(4, 10, 2, torch.float64)
    target[:] = torch.tensor([0, 1, 2, 3])
    logits[:, 9] = float("-inf")
    _, grad, rgrad = _assert_matches_reference(logits, target, tangents, scale=SCALE)
    assert torch.all(grad[:, 9] == 0) and torch.all(rgrad[:, :, 9] == 0)


def test_hvp_symmetric_and_block_equals_single():
    logits, target, tangents = _problem(6, 37, 3, torch.float64)
    _, _, block = _run_kernel(logits, target, tangents, scale=SCALE)
    for i in range(3):
        _, _, single = _run_kernel(logits, target, tangents[i : i + 1], scale=SCALE)
        assert torch.equal(block[i], single[0])
    # u . (H v) = v . (H u) for every pair: fp64, products of size ~1, so 1e-13.
    gram = torch.einsum("inc,jnc->ij", tangents, block)
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=1e-13)


def test_deterministic():
    logits, target, tangents = _problem(8, 37, 3, torch.float32)
    first = _run_kernel(logits, target, tangents, scale=SCALE)
    second = _run_kernel(logits, target, tangents, scale=SCALE)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch():
    logits, target = torch.empty(0, 10), torch.empty(0, dtype=torch.int64)
    loss, grad, rgrad = triton_ce.cross_entropy_hvp(
        logits, target, torch.empty(2, 0, 10), scale=1.0
    )
    assert loss.shape == (0,) and grad.shape == (0, 10) and rgrad.shape == (2, 0, 10)


# --- The twin against independent oracles (torch.func on F.cross_entropy), fp64 -----------


@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("shape", [(6, 10), (4, 7)])
def test_reference_matches_torch_func(shape, ignore_index):
    logits, target, tangents = _problem(*shape, 3, torch.float64, ignore_index=ignore_index)
    n_valid = int((target != ignore_index).sum())

    def mean_loss(z):
        return F.cross_entropy(z, target, reduction="mean", ignore_index=ignore_index)

    loss, grad, rgrad = ref.cross_entropy_hvp(
        logits, target, tangents, scale=1.0 / n_valid, ignore_index=ignore_index
    )
    # fp64, derivatives of size ~1 from two exact formulas: 1e-12 covers the ~1e-15 noise.
    hessian = torch.func.hessian(mean_loss)(logits)
    rgrad_oracle = torch.einsum("ncmd,bmd->bnc", hessian, tangents)
    torch.testing.assert_close(rgrad, rgrad_oracle, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, torch.func.grad(mean_loss)(logits), rtol=1e-12, atol=1e-14)
    row_losses = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    torch.testing.assert_close(loss, row_losses, rtol=1e-12, atol=1e-14)


# --- Through the dispatcher ---------------------------------------------------------------


def test_dispatcher_backends_agree(monkeypatch):
    logits, target, tangents = _problem(5, 37, 3, torch.float32)
    calls = []
    launcher = triton_ce.cross_entropy_hvp

    def spy(*args, **kwargs):
        calls.append("triton")
        return launcher(*args, **kwargs)

    monkeypatch.setattr(triton_ce, "cross_entropy_hvp", spy)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv(_dispatch.ENV_BACKEND, backend)
        results[backend] = ops.cross_entropy_hvp(logits, target, tangents, scale=SCALE)
    assert calls == ["triton"]
    for tri, reference in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(tri, reference, **TOLERANCES[torch.float32])


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, target, tangents = _problem(3, 4, 1, torch.float32)
    with pytest.raises(_dispatch.BackendUnavailableError, match="TRITON_INTERPRET"):
        ops.cross_entropy_hvp(logits, target, tangents, scale=1.0)


# --- Bad input ----------------------------------------------------------------------------


def test_bad_input():
    logits, target, tangents = _problem(4, 5, 2, torch.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\).*\[5\]"):
        ops.cross_entropy_hvp(logits, torch.tensor([0, 5, 1, 2]), tangents, scale=1.0)
    with pytest.raises(ValueError, match="must lie in"):
        ops.cross_entropy_hvp(logits, torch.tensor([0, -1, 1, 2]), tangents, scale=1.0)
    with pytest.raises(TypeError, match="integer class indices, got torch.float32"):
        ops.cross_entropy_hvp(logits, target.float(), tangents, scale=1.0)
    with pytest.raises(TypeError, match="integer class indices"):
        ops.cross_entropy_hvp(logits, target > 0, tangents, scale=1.0)
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        ops.cross_entropy_hvp(logits[0], target[:1], tangents[:, 0], scale=1.0)
    with pytest.raises(ValueError, match=r"target must be \(4,\)"):
        ops.cross_entropy_hvp(logits, target[:3], tangents, scale=1.0)
    with pytest.raises(ValueError, match=r"tangents must be \(b, N, C\)"):
        ops.cross_entropy_hvp(logits, target, tangents[0], scale=1.0)
    with pytest.raises(TypeError, match="must match logits"):
        ops.cross_entropy_hvp(logits, target, tangents.double(), scale=1.0)
    with pytest.raises(TypeError, match="logits must be floating point"):
        ops.cross_entropy_hvp(logits.long(), target, tangents.long(), scale=1.0)
    with pytest.raises(ValueError, match="at least one class"):
        ops.cross_entropy_hvp(
            torch.empty(4, 0), torch.full((4,), -100), torch.empty(1, 4, 0), scale=1.0
        )


def test_bad_output_buffers():
    logits, target, tangents = _problem(4, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="out_grad must have shape"):
        triton_ce.cross_entropy_hvp(logits, target, tangents, scale=1.0, out_grad=torch.empty(5, 4))
    with pytest.raises(TypeError, match="out_loss"):
        triton_ce.cross_entropy_hvp(
            logits, target, tangents, scale=1.0, out_loss=torch.empty(4, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="write_primal=False"):
        triton_ce.cross_entropy_hvp(
            logits, target, tangents, scale=1.0, write_primal=False, out_loss=torch.empty(4)
        )


# --- GPU only -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1024, 10), (37, 1000), (5, 50257)])
def test_cuda_fp32_matches_reference(shape):
    cuda = torch.device("cuda")
    logits, target, tangents = (x.to(cuda) for x in _problem(*shape, 3, torch.float32))
    got = triton_ce.cross_entropy_hvp(logits, target, tangents, scale=SCALE)
    want = ref.cross_entropy_hvp(logits, target, tangents, scale=SCALE)
    for g, w in zip(got, want):
        # Row losses of a 50257-class row are sums over many terms: 1e-5 relative holds.
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 10), (8, 9000)])
def test_cuda_low_precision_rule(shape, dtype):
    # STYLE.md: the kernel's error against an fp64 reference is at most twice the error of the
    # reference itself run in the low dtype (plus one ulp of slack for exact ties).
    cuda = torch.device("cuda")
    logits, target, tangents = (x.to(cuda) for x in _problem(*shape, 3, dtype))
    exact = ref.cross_entropy_hvp(logits.double(), target, tangents.double(), scale=SCALE)
    low = ref.cross_entropy_hvp(logits, target, tangents, scale=SCALE)
    kernel = triton_ce.cross_entropy_hvp(logits, target, tangents, scale=SCALE)
    ulp = torch.finfo(dtype).eps
    for kernel_out, low_out, fp64_out in zip(kernel, low, exact):
        assert kernel_out.dtype == dtype
        kernel_err = (kernel_out.double() - fp64_out).abs().max().item()
        ref_err = (low_out.double() - fp64_out).abs().max().item()
        assert kernel_err <= 2 * ref_err + ulp * fp64_out.abs().max().item(), (kernel_err, ref_err)
