"""imc_prune: one-shot pruning by inertial-manifold compression (IMC), built on imc_kernels.

The pruning layer (DESIGN sections 3 and 5): warm-up, Hessian spectrum, Lipschitz estimate,
spectral gap, scores and masks, baselines and sparse-masked training. It consumes
``imc_kernels`` and never the other way round.

Example:
    >>> import imc_prune
    >>> splits = imc_prune.data.load_dataset("fashion-mnist")   # or "digits"
    >>> model = imc_prune.models.build_model("lenet300100", input_shape=splits.input_shape)
    >>> result = imc_prune.imc(model, splits, sparsity="auto")  # or a float, e.g. 0.95
    >>> result.masks, result.sparsity, result.spectrum, result.gap, result.lipschitz
    >>> masks = imc_prune.baselines.snip(model, batch, 0.95)
    >>> imc_prune.train(result.model, result.masks, splits, preset="lth_lenet")

``imc_prune.imc`` and ``imc_prune.train`` are the functions; their modules are
``importlib.import_module("imc_prune.imc")`` and ``importlib.import_module("imc_prune.train")``
(or ``from imc_prune.imc import spectrum, lipschitz, ...``).
"""

from imc_prune import baselines, data, masks, models
from imc_prune.imc import IMCResult, imc
from imc_prune.train import train

__all__ = ["IMCResult", "baselines", "data", "imc", "masks", "models", "train"]
