"""Pure-PyTorch twin of ``imc_kernels/ops/cross_entropy.py``.

Softmax cross-entropy per row ``n`` with logits ``z`` and ``p = softmax(z)``:

* loss ``l_n = logsumexp(z) - z[t_n]``,
* gradient ``dl/dz = p - onehot(t_n)``,
* Hessian ``diag(p) - p p^T``, so a tangent ``u`` maps to ``p * u - p (p . u)``
  (BackPACK ``core/derivatives/crossentropyloss.py`` has the same closed form).

The Hessian does not depend on the target; ignored rows (``t_n == ignore_index``) contribute
nothing at all.
"""

from __future__ import annotations

import torch


def check_inputs(
    logits: torch.Tensor, target: torch.Tensor, tangents: torch.Tensor, ignore_index: int
) -> None:
    """Validate the inputs of :func:`cross_entropy_hvp`.

    Raises:
        ValueError: wrong ranks or shapes, or a target out of ``[0, C)``.
        TypeError: non-integer targets, or tangents of another dtype or device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    n_rows, n_classes = logits.shape
    if n_classes == 0:
        raise ValueError("logits must have at least one class (C >= 1)")
    if target.shape != (n_rows,):
        raise ValueError(
            f"target must be ({n_rows},) for logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"cross-entropy targets must be integer class indices, got {target.dtype}")
    if target.device != logits.device:
        raise TypeError(f"target is on {target.device} but logits are on {logits.device}")
    if tangents.dim() != 3 or tangents.shape[1:] != logits.shape:
        raise ValueError(
            f"tangents must be (b, N, C) = (b, {n_rows}, {n_classes}), got {tuple(tangents.shape)}"
        )
    if tangents.dtype != logits.dtype or tangents.device != logits.device:
        raise TypeError(
            f"tangents ({tangents.dtype}, {tangents.device}) must match logits "
            f"({logits.dtype}, {logits.device})"
        )
    valid = target != ignore_index
    if n_rows and bool(((target < 0) | (target >= n_classes))[valid].any()):
        bad = target[valid & ((target < 0) | (target >= n_classes))]
        raise ValueError(
            f"cross-entropy targets must lie in [0, {n_classes}) (or equal ignore_index="
            f"{ignore_index}); found {bad[:5].tolist()}"
        )


def cross_entropy_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    tangents: torch.Tensor,
    *,
    scale: float,
    ignore_index: int = -100,
    write_primal: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Reference of :func:`imc_kernels.ops.cross_entropy_hvp`."""
    valid_rows = target != ignore_index
    valid = valid_rows.unsqueeze(1)
    zero = logits.new_zeros(())
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    # Ignored rows: torch.where, not a product with the mask, since such a row may hold inf or
    # NaN logits or tangents (0 * NaN = NaN) and the contract is exact zeros for it.
    p_masked = torch.where(valid, p, zero)
    pu = (tangents * p_masked).sum(dim=2, keepdim=True)
    rgrad = torch.where(valid, (p_masked * tangents - p_masked * pu) * scale, zero)
    if not write_primal:
        return None, None, rgrad
    safe_target = torch.where(valid_rows, target, torch.zeros_like(target)).long()
    onehot = torch.zeros_like(logits).scatter_(1, safe_target.unsqueeze(1), 1.0)
    grad = torch.where(valid, p_masked - onehot, zero) * scale
    row_loss = torch.where(valid_rows, -log_p.gather(1, safe_target.unsqueeze(1)).squeeze(1), zero)
    return row_loss, grad, rgrad
